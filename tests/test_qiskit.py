"""The Qiskit interfaces on a real cluster: SamplerV2, EstimatorV2, QScaleBackend, and Qiskit's
own BackendSamplerV2 / BackendEstimatorV2 on top of the backend."""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister, transpile
from qiskit.circuit import Parameter
from qiskit.primitives import (
    BackendEstimatorV2,
    BackendSamplerV2,
    BitArray,
    StatevectorEstimator,
    StatevectorSampler,
)
from qiskit.providers import JobStatus
from qiskit.quantum_info import SparsePauliOp
from qiskit_aer import AerSimulator
from qiskit_aer.noise import NoiseModel, depolarizing_error
from qiskit_aer.primitives import SamplerV2 as AerSamplerV2
from scipy import stats

from conftest import bell, ghz
from qscale import Client, EstimatorV2, QScaleBackend, SamplerV2
from qscale.errors import InvalidArgumentError
from qscale.local import LocalCluster

THETA, PHI = Parameter("θ"), Parameter("φ")


def rotations() -> QuantumCircuit:
    qc = QuantumCircuit(2, name="rotations")
    qc.ry(THETA, 0)
    qc.rx(PHI, 1)
    qc.cx(0, 1)
    qc.measure_all()
    return qc


def two_registers() -> QuantumCircuit:
    q = QuantumRegister(3)
    a, b = ClassicalRegister(1, "alpha"), ClassicalRegister(2, "beta")
    qc = QuantumCircuit(q, a, b, name="two-registers")
    qc.h(q[0])
    qc.x(q[2])
    qc.measure(q[0], a[0])
    qc.measure(q[1], b[0])
    qc.measure(q[2], b[1])
    return qc


def feed_forward() -> QuantumCircuit:
    """Mid-circuit measurement with classical control: the second qubit copies the first."""
    q, c = QuantumRegister(2), ClassicalRegister(2, "c")
    qc = QuantumCircuit(q, c, name="feed-forward")
    qc.h(q[0])
    qc.measure(q[0], c[0])
    with qc.if_test((c[0], 1)):
        qc.x(q[1])
    qc.ry(0.4, q[0])
    qc.measure(q[1], c[1])
    return qc


def noise_model() -> NoiseModel:
    model = NoiseModel()
    model.add_all_qubit_quantum_error(depolarizing_error(0.08, 1), ["h", "x", "ry", "rx"])
    model.add_all_qubit_quantum_error(depolarizing_error(0.1, 2), ["cx"])
    return model


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    from conftest import fast_config

    with LocalCluster(3, cores_per_node=1, config=fast_config()) as c:
        yield c


def _same_distribution(ours: dict[str, int], reference: dict[str, int]) -> float:
    """p-value of a chi-square test that two samples come from one distribution."""
    keys = sorted(set(ours) | set(reference))
    table = np.array([[ours.get(k, 0) for k in keys], [reference.get(k, 0) for k in keys]])
    if table.shape[1] == 1:
        return 1.0
    return stats.chi2_contingency(table + 0.5).pvalue


CONFORMANCE = [
    ("bell", bell, None, {"00", "11"}),
    ("ghz5", lambda: ghz(5), None, {"00000", "11111"}),
    ("rotations", rotations, [[0.3, 2.0], [np.pi, 0.0]], None),
    ("two registers", two_registers, None, None),
    ("feed-forward", feed_forward, None, {"00", "11", "10"}),
]


@pytest.mark.parametrize("name,make,values,support", CONFORMANCE, ids=[c[0] for c in CONFORMANCE])
def test_sampler_conformance(cluster: LocalCluster, name, make, values, support) -> None:
    circuit = make()
    pub = (circuit, values) if values is not None else (circuit,)
    ours = SamplerV2(cluster.client, seed=11).run([pub], shots=4000).result()[0]
    ref = StatevectorSampler(seed=11).run([pub], shots=4000).result()[0] if name != "feed-forward" else \
        BackendSamplerV2(backend=AerSimulator(seed_simulator=11)).run([pub], shots=4000).result()[0]
    assert set(ours.data.keys()) == set(ref.data.keys()) == {reg.name for reg in circuit.cregs}
    assert ours.data.shape == ref.data.shape
    assert ours.metadata["shots"] == 4000
    for reg in circuit.cregs:
        mine, theirs = ours.data[reg.name], ref.data[reg.name]
        assert isinstance(mine, BitArray) and mine.num_bits == reg.size and mine.num_shots == 4000
        for index in np.ndindex(ours.data.shape):
            a, b = mine.get_counts(index), theirs.get_counts(index)
            assert sum(a.values()) == 4000
            assert _same_distribution(a, b) > 1e-3, (reg.name, index, a, b)
    if support is not None:
        joined = ours.join_data().get_counts()
        assert set(joined) <= support


def test_noisy_sampling_matches_local_aer(cluster: LocalCluster) -> None:
    model = noise_model()
    circuit = ghz(3)
    ours = SamplerV2(cluster.client, seed=5, options={"noise_model": model}).run([circuit], shots=6000).result()
    counts = ours[0].data.meas.get_counts()
    local = AerSimulator(noise_model=model, seed_simulator=5).run(circuit, shots=6000).result().get_counts()
    assert sum(counts.values()) == 6000
    assert len(counts) > 2  # noise shows
    assert _same_distribution(counts, local) > 1e-3
    job = ours.metadata
    # 6,000 shots of a noisy 3-qubit circuit: the density-matrix method (as Aer's automatic
    # choice) simulates once for every shot, so the job is not split.
    assert job["shards"] == 1


def test_sampler_shapes_shots_and_bit_order(cluster: LocalCluster) -> None:
    sampler = SamplerV2(cluster.client, default_shots=300, seed=2)
    values = np.random.default_rng(0).uniform(0, np.pi, size=(2, 3, 2))
    job = sampler.run([(rotations(), values), (two_registers(), None, 50), (bell(),)])
    assert job.job_id() and isinstance(job.status(), JobStatus)
    result = job.result()
    assert job.done() and job.in_final_state() and not job.cancelled() and not job.running()
    assert result[0].data.shape == (2, 3) and result[0].data.meas.num_shots == 300
    assert result[1].data.shape == () and result[1].data.alpha.num_shots == 50
    assert result[1].data.beta.get_counts() == {"10": 50}  # clbit 0 rightmost
    assert set(result[1].data.alpha.get_counts()) <= {"0", "1"}
    assert result[2].metadata == {"shots": 300, "circuit_metadata": {}}
    # Pub shots beat run shots, which beat the default.
    counts = sampler.run([(bell(), None, 20), bell()], shots=40).result()
    assert [r.data.meas.num_shots for r in counts] == [20, 40]


def test_sampler_rejects_bad_pubs(cluster: LocalCluster) -> None:
    sampler = SamplerV2(cluster.client)
    with pytest.raises(ValueError):
        sampler.run([(rotations(), [1.0, 2.0, 3.0])])  # three values for two parameters
    with pytest.raises(InvalidArgumentError, match="at least one pub"):
        sampler.run([])
    with pytest.raises(ValueError):
        sampler.run([(bell(), None, -5)])


def test_unmeasured_registers_read_zero_as_in_qiskit_samplers(cluster: LocalCluster) -> None:
    """Classical bits that nothing measures read 0 in StatevectorSampler and qiskit-aer's
    SamplerV2; here too, with the same registers, shapes and metadata."""
    idle = QuantumCircuit(2, 2, name="idle")
    idle.h(0)
    swept = QuantumCircuit(1, 1, name="swept")
    swept.rx(THETA, 0)
    q, a, b = QuantumRegister(2), ClassicalRegister(1, "a"), ClassicalRegister(2, "b")
    half = QuantumCircuit(q, a, b, name="half-measured")
    half.x(q[0])
    half.measure(q[0], a[0])
    pubs = [(idle,), (swept, [[0.1], [0.2], [0.3]]), (half, None, 25)]
    ours = SamplerV2(cluster.client, seed=3).run(pubs, shots=40).result()
    statevector = StatevectorSampler(seed=3).run(pubs, shots=40).result()
    aer = AerSamplerV2(seed=3).run(pubs, shots=40).result()
    for mine, sv, ae in zip(ours, statevector, aer):
        assert list(mine.data.keys()) == list(sv.data.keys()) == list(ae.data.keys())
        assert mine.data.shape == sv.data.shape == ae.data.shape
        assert mine.metadata == sv.metadata
        for name in mine.data.keys():
            assert mine.data[name] == sv.data[name] == ae.data[name], name  # every outcome is certain
    assert ours[0].data.c.get_counts() == {"00": 40}
    assert [ours[1].data.c.get_counts(i) for i in range(3)] == [{"0": 40}] * 3
    assert ours[2].data.a.get_counts() == {"1": 25} and ours[2].data.b.get_counts() == {"00": 25}


def test_pubs_without_classical_registers_give_empty_results_without_the_cluster(cluster: LocalCluster) -> None:
    """As StatevectorSampler: an empty DataBin of the pub's shape, the same metadata and a
    UserWarning; nothing is sent (the sampler below has no coordinator behind it)."""
    bare = QuantumCircuit(2)
    bare.h(0)
    swept = QuantumCircuit(1)
    swept.rx(THETA, 0)
    pubs = [(bare,), (swept, [[0.1], [0.2], [0.3]], 7)]
    with pytest.warns(UserWarning, match="no output classical registers"):
        reference = StatevectorSampler().run(pubs, shots=5).result()
    with Client("127.0.0.1:1", timeout=1.0) as nowhere:
        with pytest.warns(UserWarning, match="no classical register"):
            job = SamplerV2(nowhere, seed=4).run(pubs, shots=5)
        assert job.job_id().startswith("local-") and job.status() == JobStatus.DONE and job.done()
        result = job.result()
        job.cancel()  # nothing to cancel
    for mine, theirs in zip(result, reference, strict=True):
        assert len(mine.data) == len(theirs.data) == 0
        assert mine.data.shape == theirs.data.shape
        assert mine.metadata == theirs.metadata
    assert result.metadata == {"version": 2, "job_id": job.job_id(), "seed": 4, "shards": 0, "nodes_used": []}
    # Next to pubs that sample, only those go to the cluster.
    with pytest.warns(UserWarning, match="pub 0"):
        mixed = SamplerV2(cluster.client, seed=4).run([bare, bell()], shots=30).result()
    assert len(mixed[0].data) == 0 and mixed[0].data.shape == () and mixed[0].metadata["shots"] == 30
    assert mixed[1].data.meas.num_shots == 30 and set(mixed[1].data.meas.get_counts()) <= {"00", "11"}
    assert mixed.metadata["shards"] >= 1


def test_default_shots_as_in_qiskit_samplers(cluster: LocalCluster) -> None:
    assert SamplerV2(cluster.client).default_shots == StatevectorSampler().default_shots \
        == AerSamplerV2().default_shots == 1024
    sampler = SamplerV2(cluster.client, default_shots=64, seed=1)
    assert sampler.default_shots == sampler.options.default_shots == 64 and sampler.seed == 1
    assert SamplerV2(cluster.client, default_shots=64, options={"default_shots": 32}).default_shots == 32
    assert sampler.run([bell()]).result()[0].data.meas.num_shots == 64
    with pytest.raises(AttributeError):
        sampler.default_shots = 5  # type: ignore[misc]  # read-only, as in Qiskit


def test_sweep_of_1000_bindings_is_spread_and_reproducible(cluster: LocalCluster, make_cluster) -> None:
    values = np.linspace(0, 2 * np.pi, 2000).reshape(1000, 2)
    pub = (rotations(), values)
    job = SamplerV2(cluster.client, seed=99).run([pub], shots=64)
    three = job.result()
    meta = three.metadata
    assert meta["shards"] > 1 and len(meta["nodes_used"]) >= 2, meta
    one = SamplerV2(make_cluster(1).client, seed=99).run([pub], shots=64).result()
    assert three[0].data.meas == one[0].data.meas
    assert three[0].data.meas.shape == (1000,)
    other = SamplerV2(cluster.client, seed=100).run([pub], shots=64).result()
    assert other[0].data.meas != three[0].data.meas


def test_estimator_broadcasting_precision_and_accuracy(cluster: LocalCluster) -> None:
    qc = QuantumCircuit(2)
    qc.ry(THETA, 0)
    qc.cx(0, 1)
    observables = [[SparsePauliOp("ZZ")], [SparsePauliOp.from_list([("XX", 0.5), ("ZI", 1.0)])]]  # shape (2, 1)
    values = [[[0.0], [1.0], [2.5]]]  # shape (1, 3)
    estimator = EstimatorV2(cluster.client, seed=4, default_precision=0.02)
    result = estimator.run([(qc, observables, values)]).result()
    exact = StatevectorEstimator().run([(qc, observables, values)]).result()[0].data.evs
    data = result[0].data
    assert data.evs.shape == data.stds.shape == (2, 3)
    assert np.all(np.abs(data.evs - exact) < 5 * 0.02 + 1e-9), (data.evs, exact)
    assert np.all(data.stds <= 0.02 * 1.25)
    assert result[0].metadata["target_precision"] == 0.02
    finer = estimator.run([(qc, SparsePauliOp("ZZ"), [[1.0]])], precision=0.005).result()
    assert finer[0].metadata["target_precision"] == 0.005
    assert finer[0].data.stds.max() <= 0.005 * 1.25
    exact_run = estimator.run([(qc, observables, values)], precision=0).result()[0]
    np.testing.assert_allclose(exact_run.data.evs, exact, rtol=0, atol=1e-9)
    assert not exact_run.data.stds.any() and exact_run.metadata["target_precision"] == 0.0


def test_backend_result_counts_memory_and_options(cluster: LocalCluster) -> None:
    backend = QScaleBackend(cluster.client)
    assert backend.max_circuits is None and backend.num_qubits >= 64
    assert {"cx", "h", "measure", "if_else"} <= set(backend.target.operation_names)
    assert backend.target.build_coupling_map() is None  # no coupling restrictions
    circuits = [transpile(c, backend) for c in (bell(), two_registers())]
    job = backend.run(circuits, shots=500, memory=True, seed_simulator=3)
    result = job.result()
    assert job.status() == JobStatus.DONE and result.success
    assert set(result.get_counts(0)) <= {"00", "11"} and sum(result.get_counts(0).values()) == 500
    assert set(result.get_counts(1)) <= {"10 0", "10 1"}
    memory = result.get_memory(1)
    assert len(memory) == 500 and set(memory) <= {"10 0", "10 1"}
    again = backend.run(circuits, shots=500, memory=True, seed_simulator=3).result()
    assert again.get_counts() == result.get_counts() and again.get_memory(1) == memory
    with pytest.raises(InvalidArgumentError, match="unknown run options"):
        backend.run(circuits, shots=10, bogus=True)
    noisy = backend.run(ghz(3), shots=2000, noise_model=noise_model(), seed_simulator=1).result().get_counts()
    assert len(noisy) > 2


def test_qiskit_backend_primitives_on_the_backend(cluster: LocalCluster) -> None:
    backend = QScaleBackend(cluster.client)
    sampled = BackendSamplerV2(backend=backend, options={"seed_simulator": 8}).run(
        [(rotations(), [[np.pi, 0.0], [0.0, 0.0]])], shots=200).result()
    assert sampled[0].data.meas.get_counts(0) == {"11": 200}
    assert sampled[0].data.meas.get_counts(1) == {"00": 200}
    qc = QuantumCircuit(1)
    qc.h(0)
    est = BackendEstimatorV2(backend=backend, options={"seed_simulator": 8, "default_precision": 0.02})
    evs = est.run([(qc, [SparsePauliOp("X"), SparsePauliOp("Z")])]).result()[0].data.evs
    assert abs(evs[0] - 1) < 0.1 and abs(evs[1]) < 0.1


def test_cli_result_writes_json_and_a_histogram(cluster: LocalCluster, tmp_path) -> None:
    import json
    import subprocess
    import sys

    job = cluster.client.submit(ghz(4), shots=300, seed=1)
    job.result(timeout=60)
    out, png = tmp_path / "counts.json", tmp_path / "hist.png"
    proc = subprocess.run([sys.executable, "-m", "qscale.coordinator", "result", job.job_id, "--coordinator",
                           cluster.address, "--output", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["results"][0]["counts"] == job.result().counts[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
