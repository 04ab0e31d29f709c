"""Shared fixtures: real local clusters on loopback, always stopped."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest
from qiskit import QuantumCircuit

from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.planner import PlanningPolicy
from qscale.local import LocalCluster

HEARTBEAT_INTERVAL = 0.25
HEARTBEAT_TIMEOUT = 1.5


def fast_config(**changes: object) -> CoordinatorConfig:
    """Quick liveness settings so failure tests finish in seconds."""
    base = CoordinatorConfig(heartbeat_interval_s=HEARTBEAT_INTERVAL, heartbeat_timeout_s=HEARTBEAT_TIMEOUT,
                             policy=PlanningPolicy(shots_per_shard=1000))
    return base.with_(**changes)


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Start local clusters; every one is stopped at teardown, even when the test fails."""
    clusters: list[LocalCluster] = []

    def make(nodes: int, **kwargs: object) -> LocalCluster:
        kwargs.setdefault("config", fast_config())
        kwargs.setdefault("cores_per_node", 1)
        cluster = LocalCluster(nodes, **kwargs)  # type: ignore[arg-type]
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster3() -> Iterator[LocalCluster]:
    """A 3-node cluster shared by the tests of one module."""
    cluster = LocalCluster(3, cores_per_node=1, config=fast_config())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def slow_circuit(n: int = 12, layers: int = 4) -> QuantumCircuit:
    """Each shot costs a simulation (mid-circuit measurement), so the planner splits its shots
    into shards of 1,000, each taking about a second on one core with the defaults."""
    qc = QuantumCircuit(n, n + 1, name="slow")
    for layer in range(layers):
        for q in range(n):
            qc.rx(0.3 + 0.1 * q + layer, q)
        for q in range(n - 1):
            qc.cx(q, q + 1)
    qc.measure(0, n)
    qc.rz(0.2, 0)
    qc.measure(range(n), range(n))
    return qc


def dense_circuit(num_qubits: int = 22, depth: int = 12) -> QuantumCircuit:
    """Dense, non-Clifford, in Aer's native gates: seconds of statevector simulation."""
    qc = QuantumCircuit(num_qubits)
    for layer in range(depth):
        for q in range(num_qubits):
            qc.h(q)
            qc.t(q)
            qc.rz(0.1 * (q + layer + 1), q)
        for q in range(layer % 2, num_qubits - 1, 2):
            qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def uniform(n: int = 3) -> QuantumCircuit:
    """H on every qubit, all measured: every outcome equally likely."""
    qc = QuantumCircuit(n)
    qc.h(range(n))
    qc.measure_all()
    return qc


def bell() -> QuantumCircuit:
    qc = QuantumCircuit(2, name="bell")
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    return qc


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, name=f"ghz{n}")
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure_all()
    return qc


def free_port() -> int:
    """A loopback port the OS just handed out (for a process that must be restarted on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
