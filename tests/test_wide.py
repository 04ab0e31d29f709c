"""Circuits wider than any node: cut with qiskit-addon-cutting and run as cluster work, exact at
precision 0 (also across a coordinator restart) and sampled within its standard errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import ParameterVector
from qiskit.quantum_info import SparsePauliOp, Statevector
from qiskit_aer.primitives import EstimatorV2 as AerEstimatorV2

from conftest import CoordinatorProcess, free_port, wait_until
from qscale import EstimatorV2
from qscale.client import Client
from qscale.local import LocalCluster


def two_halves(half: int, reps: int = 2) -> QuantumCircuit:
    """Two ``half``-qubit ry + CX-ladder blocks, joined by one CX per repetition after the first."""
    theta = ParameterVector("t", 2 * half * reps)
    qc = QuantumCircuit(2 * half)
    k = 0
    for rep in range(reps):
        for q in range(2 * half):
            qc.ry(theta[k], q)
            k += 1
        for start in (0, half):
            for q in range(start, start + half - 1):
                qc.cx(q, q + 1)
        if rep < reps - 1 or reps == 1:
            qc.cx(half - 1 - rep, half + rep)
    return qc


def test_a_24_qubit_circuit_on_16_qubit_nodes_is_cut_exact_and_survives_a_coordinator_restart(tmp_path: Path
                                                                                               ) -> None:
    qc = two_halves(12, reps=3)
    rows = np.random.default_rng(7).uniform(-np.pi, np.pi, (2, qc.num_parameters))
    paulis = ["I" * 22 + "ZZ", "ZZ" + "I" * 22, "I" * 11 + "ZZ" + "I" * 11, "X" * 24, "I" * 10 + "XYZX" + "I" * 10]
    observables = [[SparsePauliOp(p)] for p in paulis]
    address = f"127.0.0.1:{free_port()}"
    (tmp_path / "state").mkdir()
    coordinator = CoordinatorProcess(address, tmp_path / "state", tmp_path / "coordinator.log")
    nodes = LocalCluster(0, cores_per_node=1, max_qubits_per_node=16, log_dir=tmp_path / "logs")
    client = Client(address, timeout=90)
    try:
        coordinator.start()
        for _ in range(2):
            nodes.add_node(coordinator=address)
        wait_until(lambda: sum(n.state == "alive" for n in client.nodes()) == 2, 60, "two nodes")
        estimator = EstimatorV2(client)
        clean = estimator.run([(qc, observables, rows)]).result()[0]
        cutting = clean.metadata["cutting"]
        assert cutting["cuts"] >= 2 and max(cutting["subcircuit_widths"]) <= 16, cutting
        # qiskit-aer on the whole circuit as a matrix product state: exact here (the halves meet
        # in two CNOTs, so the bond dimension stays small; no truncation) and 0.01 s instead of
        # 8 s for the 24-qubit statevector, which agrees with it to 5e-12.
        mps = AerEstimatorV2(options={"backend_options": {"method": "matrix_product_state"}})
        reference = mps.run([(qc, observables, rows)]).result()[0].data.evs
        assert np.abs(clean.data.evs - reference).max() < 1e-6
        assert not clean.data.stds.any()

        job = estimator.run([(qc, observables, rows)])
        status = wait_until(lambda: (lambda s: s if s.shards_done else None)(job.qscale_job.status()), 60,
                            "a first shard")
        assert status.shards_done < status.shards_total, "the job ended before the restart"
        coordinator.kill()
        coordinator.start()
        restarted = job.result(timeout=180)[0]
        assert np.array_equal(restarted.data.evs, clean.data.evs)
    finally:
        client.close()
        nodes.stop()
        coordinator.stop()


def test_sampled_cutting_is_within_its_standard_errors(make_cluster) -> None:
    qc = two_halves(4, reps=1).assign_parameters(np.linspace(0.3, 2.9, 8))
    paulis = ["ZIIIIIIZ", "IIIZZIII", "XXIIIIII", "IIIIIIYY"]
    exact = np.array([Statevector(qc).expectation_value(SparsePauliOp(p)).real for p in paulis])
    cluster = make_cluster(2, max_qubits_per_node=5)
    result = EstimatorV2(cluster.client, seed=11).run([(qc, [SparsePauliOp(p) for p in paulis])],
                                                       precision=0.05).result()[0]
    assert result.metadata["target_precision"] == 0.05 and result.metadata["cutting"]["shots"] > 0
    stds = result.data.stds
    assert (stds > 0).all() and (stds < 0.05 * 1.5).all(), stds
    assert (np.abs(result.data.evs - exact) <= 4 * stds).all(), (result.data.evs, exact, stds)
    again = EstimatorV2(cluster.client, seed=11).run([(qc, [SparsePauliOp(p) for p in paulis])],
                                                      precision=0.05).result()[0]
    assert np.array_equal(again.data.evs, result.data.evs)  # seeded: the same estimate
