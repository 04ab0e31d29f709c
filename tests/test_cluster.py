"""End to end on real processes: exact totals, correct distributions, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit.random import random_circuit
from qiskit.quantum_info import Statevector
from scipy import stats

from conftest import ghz, slow_circuit
from qscale.local import LocalCluster


def seeded_workload() -> list[QuantumCircuit]:
    """Circuits of every planning kind: shot-split (Clifford, mid-circuit measurement), single, batched."""
    mid = QuantumCircuit(3, 3, name="mid-measure")
    mid.h(0)
    mid.measure(0, 0)
    mid.cx(0, 1)
    mid.rx(0.7, 2)
    mid.measure([1, 2], [1, 2])
    batch = [random_circuit(4, 3, measure=True, seed=s) for s in range(5)]
    return [ghz(6), mid, random_circuit(8, 5, measure=True, seed=11), *batch]


def test_totals_exact_and_ghz_only_yields_all_equal_bits(cluster3: LocalCluster) -> None:
    job = cluster3.client.submit([ghz(5), ghz(12)], shots=4321, seed=3)
    result = job.result(timeout=120)
    assert [r.shots for r in result.results] == [4321, 4321]
    for r, n in zip(result.results, (5, 12)):
        assert sum(r.counts.values()) == 4321
        assert set(r.counts) <= {"0" * n, "1" * n}
        assert len(r.counts) == 2
    assert result.status.shards_total == 10  # 5 shards of <= 1000 shots per Clifford circuit
    assert len(result.nodes_used) >= 2


def test_random_circuit_matches_exact_probabilities(cluster3: LocalCluster) -> None:
    qc = random_circuit(6, 6, seed=1234)
    probs = Statevector(qc).probabilities_dict()
    measured = qc.copy()
    measured.measure_all()
    shots = 20_000
    (counts,) = cluster3.client.submit(measured, shots=shots, seed=99).result(timeout=120).counts
    assert sum(counts.values()) == shots
    keys = sorted(set(probs) | set(counts))
    expected = np.array([probs.get(k, 0.0) for k in keys]) * shots
    observed = np.array([counts.get(k, 0) for k in keys])
    keep = expected > 5  # chi-square validity; pool the rare outcomes
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert math.isclose(obs.sum(), exp.sum(), rel_tol=1e-9)
    p = stats.chisquare(obs, exp).pvalue
    assert p > 1e-3, f"counts disagree with the exact distribution (p={p:.2e})"
    assert all(probs.get(k, 0) > 1e-12 for k in counts), "an impossible outcome was counted"


def test_registers_keep_qiskit_bit_order(cluster3: LocalCluster) -> None:
    q = QuantumRegister(3)
    a, b = ClassicalRegister(1, "a"), ClassicalRegister(2, "b")
    qc = QuantumCircuit(q, a, b)
    qc.x(q[0])  # a = 1
    qc.x(q[2])  # b = 10
    qc.measure(q[0], a[0])
    qc.measure(q[1], b[0])
    qc.measure(q[2], b[1])
    (counts,) = cluster3.client.submit(qc, shots=100, seed=1).result(timeout=60).counts
    assert counts == {"10 1": 100}


def test_same_seed_same_counts_on_1_and_3_nodes(cluster3: LocalCluster, make_cluster) -> None:
    circuits = seeded_workload()
    three = cluster3.client.submit(circuits, shots=3000, seed=2024).result(timeout=120)
    one = make_cluster(1).client.submit(circuits, shots=3000, seed=2024).result(timeout=180)
    assert one.counts == three.counts
    assert all(r.shots == 3000 for r in one.results)
    other = cluster3.client.submit(circuits, shots=3000, seed=2025).result(timeout=120)
    assert other.counts != three.counts


def test_watch_streams_partial_counts(cluster3: LocalCluster) -> None:
    job = cluster3.client.submit(slow_circuit(10, 2), shots=6000, seed=5)
    updates = list(job.watch(counts=True, timeout=120))
    assert updates[-1].status.state.final
    totals = [sum(u.counts[0].values()) for u in updates]
    assert totals[-1] == 6000
    assert any(0 < t < 6000 for t in totals), f"no partial update seen: {totals}"
    assert job.result(timeout=10).counts[0] == updates[-1].counts[0]


@pytest.mark.parametrize("method", ["statevector", "matrix_product_state", "density_matrix"])
def test_methods(cluster3: LocalCluster, method: str) -> None:
    (counts,) = cluster3.client.submit(ghz(4), shots=500, seed=8, method=method).result(timeout=60).counts
    assert sum(counts.values()) == 500 and set(counts) == {"0000", "1111"}
