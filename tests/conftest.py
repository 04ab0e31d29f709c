"""Shared fixtures: real local clusters on loopback, always stopped."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
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


class CoordinatorProcess:
    """``qscale-coordinator serve`` as a real process on a fixed port and state directory."""

    def __init__(self, address: str, state_dir: Path, log: Path, *extra: str) -> None:
        self.address, self.state_dir, self.log, self.extra = address, state_dir, log, extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qscale.coordinator", "serve", "--listen", self.address,
                 "--state-dir", str(self.state_dir), "--heartbeat-interval", "0.25", "--heartbeat-timeout", "1.5",
                 "--shots-per-shard", "1000", *self.extra],  # as fast_config(): the reference plans the same
                stdout=log, stderr=log, cwd=self.state_dir.parent)
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
                try:
                    return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
                except grpc.RpcError:
                    return False

            wait_until(serving, 60, "the coordinator to serve", interval=0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
