"""Exact estimator work on a real cluster: values equal to qiskit-aer's EstimatorV2 at precision
0, the same bits however the job is split and whatever fails, and routing of circuits wider
than any node."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit.library import efficient_su2
from qiskit.quantum_info import SparsePauliOp
from qiskit_aer.noise import NoiseModel, depolarizing_error
from qiskit_aer.primitives import EstimatorV2 as AerEstimatorV2

from conftest import fast_config, wait_until
from qscale import EstimatorV2, InvalidArgumentError, NoCapableNodeError
from qscale.coordinator.planner import PlanningPolicy

# Small shards, so that a job of a few seconds is spread over every node and several retries.
SPLIT = PlanningPolicy(min_shard_seconds=1e-4, min_chunk_seconds=1e-4, target_shards=24)


def labels(num_qubits: int, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("IXYZ"), num_qubits)) for _ in range(count)]


def ansatz(num_qubits: int) -> QuantumCircuit:
    return efficient_su2(num_qubits, reps=2).decompose()


def test_exact_values_equal_qiskit_aer_on_broadcast_shapes(cluster3) -> None:
    qc = ansatz(5)
    rng = np.random.default_rng(3)
    rows = rng.uniform(-np.pi, np.pi, (7, qc.num_parameters))  # parameter shape (7,)
    terms = labels(5, 4, 1)
    observables = [[SparsePauliOp(t)] for t in terms] + [[SparsePauliOp.from_list([(terms[0], 0.5),
                                                                                   (terms[1], -1.5)])]]  # (5, 1)
    pubs = [(qc, observables, rows), (qc.assign_parameters(rows[0]), SparsePauliOp("ZZIIX"))]
    result = EstimatorV2(cluster3.client).run(pubs).result()
    reference = AerEstimatorV2().run(pubs).result()
    for ours, theirs in zip(result, reference):
        assert ours.data.evs.shape == theirs.data.evs.shape
        np.testing.assert_allclose(ours.data.evs, theirs.data.evs, rtol=0, atol=1e-9)
        assert not ours.data.stds.any()
        assert ours.metadata["target_precision"] == 0.0
    assert result[0].data.evs.shape == (5, 7)
    assert result.metadata["job_id"] and result.metadata["shards"] >= 1


def test_exact_values_are_the_same_bits_on_1_and_3_nodes_and_after_a_sigkill(make_cluster) -> None:
    qc = ansatz(14)
    rng = np.random.default_rng(5)
    rows = rng.uniform(-np.pi, np.pi, (240, qc.num_parameters))
    terms = labels(14, 12, 2)
    three = make_cluster(3, config=fast_config(policy=SPLIT))
    job = three.client.estimate([qc], [terms], parameter_values=[rows])
    busy = wait_until(lambda: next((n for n in three.client.nodes() if n.running), None), 60, "a busy node")
    victim = three.processes[int(busy.name.rsplit("-", 1)[1])]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    killed = job.result(timeout=240)
    # It held a running shard and one in hand (prefetch) when it died: both ran again elsewhere.
    assert any(a.outcome != "done" for a in killed.attempts if a.node_id == busy.node_id)
    assert killed.status.shards_total >= 8
    values = killed.results[0].expectation_values
    assert values.shape == (240, 12) and np.isfinite(values).all()

    clean = three.client.estimate([qc], [terms], parameter_values=[rows]).result(timeout=240)
    one = make_cluster(1, config=fast_config(policy=PlanningPolicy(target_shards=3)))
    single = one.client.estimate([qc], [terms], parameter_values=[rows]).result(timeout=240)
    assert single.status.shards_total < killed.status.shards_total
    assert np.array_equal(values, clean.results[0].expectation_values)
    assert np.array_equal(values, single.results[0].expectation_values)
    reference = AerEstimatorV2().run([(qc, [[SparsePauliOp(t)] for t in terms], rows)]).result()[0].data.evs
    np.testing.assert_allclose(values.T, reference, rtol=0, atol=1e-9)


def test_exact_values_with_noise_use_the_density_matrix(cluster3) -> None:
    qc = ansatz(3)
    rows = np.linspace(0, 1, 3 * qc.num_parameters).reshape(3, qc.num_parameters)
    noise = NoiseModel()
    noise.add_all_qubit_quantum_error(depolarizing_error(0.05, 2), ["cx"])
    observables = [[SparsePauliOp("ZZI")], [SparsePauliOp("XIX")]]
    ours = EstimatorV2(cluster3.client, options={"noise_model": noise}).run([(qc, observables, rows)]).result()
    aer = AerEstimatorV2(options={"backend_options": {"noise_model": noise, "method": "density_matrix"}})
    reference = aer.run([(qc, observables, rows)]).result()[0].data.evs
    np.testing.assert_allclose(ours[0].data.evs, reference, rtol=0, atol=1e-9)
    noiseless = EstimatorV2(cluster3.client).run([(qc, observables, rows)]).result()[0].data.evs
    assert np.abs(noiseless - reference).max() > 1e-3  # the noise did something


def test_estimator_jobs_are_validated(cluster3) -> None:
    client = cluster3.client
    measured = QuantumCircuit(2, 2)
    measured.h(0)
    measured.measure([0, 1], [0, 1])
    with pytest.raises(InvalidArgumentError, match="without measurements"):
        client.estimate([measured], [["ZZ"]]).result(timeout=60)
    plain = QuantumCircuit(2)
    plain.h(0)
    with pytest.raises(InvalidArgumentError, match="Pauli label of 2 letters"):
        client.estimate([plain], [["ZZZ"]])
    with pytest.raises(InvalidArgumentError, match="Pauli label"):
        client.estimate([plain], [["ZA"]])
    with pytest.raises(InvalidArgumentError, match="no observables"):
        client.estimate([plain], [[]])
    with pytest.raises(InvalidArgumentError, match="precision"):
        EstimatorV2(client).run([(plain, "ZZ")], precision=-1.0)
    # Final measurements of an estimator pub are removed, as they do not change expectation values.
    evs = EstimatorV2(client).run([(measured, ["ZZ", "XX", "ZI"])]).result()[0].data.evs
    np.testing.assert_allclose(evs, [0.0, 0.0, 1.0], atol=1e-12)  # qubit 0 in |+>, qubit 1 in |0>


def test_wide_circuits_route_to_matrix_product_state_or_are_refused_with_the_reason(make_cluster) -> None:
    cluster = make_cluster(1, max_qubits_per_node=12)
    client = cluster.client
    chain = QuantumCircuit(40)
    for q in range(40):
        chain.ry(0.1 * (q + 1), q)
    for q in range(39):
        chain.cx(q, q + 1)
    measured = chain.copy()
    measured.measure_all()
    result = client.submit(measured, shots=300, seed=1).result(timeout=120)
    assert result.shots == 300 and sum(result.counts[0].values()) == 300
    assert {a.outcome for a in result.attempts} == {"done"}
    # The estimator takes the same route, exactly.
    values = client.estimate([chain], [["I" * 39 + "Z", "Z" + "I" * 39]]).result(timeout=120)
    np.testing.assert_allclose(values.results[0].expectation_values[0, 0], np.cos(0.1), atol=1e-9)
    # Nothing holds a 40-qubit statevector: asked for by name, it is refused, saying why.
    with pytest.raises(NoCapableNodeError, match=r"40 qubits.*statevectors of up to 12 qubits"):
        client.submit(measured, shots=10, method="statevector")


def test_cli_estimate_prints_exact_values(cluster3, tmp_path) -> None:
    import json
    import subprocess
    import sys

    path = tmp_path / "ghz.qasm"
    path.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\nh q[0];\ncx q[0],q[1];\ncx q[1],q[2];\n')
    base = [sys.executable, "-m", "qscale.coordinator.cli", "estimate", str(path), "--coordinator", cluster3.address]
    done = subprocess.run([*base, "--observable", "ZZI", "--observable", "XXX", "--observable", "XII", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [v["value"] for v in report["results"][0]["values"]] == pytest.approx([1.0, 1.0, 0.0], abs=1e-12)
    assert report["results"][0]["circuit"] == "ghz" and report["job_id"]
    wrong = subprocess.run([*base, "--observable", "ZZ"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "3 qubits" in wrong.stderr
