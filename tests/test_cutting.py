"""qscale.cutting: cut circuits become exact (and sampled) expectation-value work.

No cluster: subexperiments run in-process on qiskit-aer / Statevector, and the reconstruction is
compared with the uncut circuit's exact values.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit import ParameterVector
from qiskit.quantum_info import Operator, Pauli, Statevector
from qiskit_addon_cutting.cutting_reconstruction import _process_outcome_v2
from qiskit_addon_cutting.utils.observable_grouping import CommutingObservableGroup
from qiskit_aer import AerSimulator

from qscale.cutting import CutPlan, plan_cuts
from qscale.cutting import _defer_measurements  # the deferral itself, checked against shots
from qscale.errors import FailedPreconditionError, InvalidArgumentError

ROWS = 3


def layered(num_qubits: int, joins: list[tuple[str, int, int]], halves: int) -> QuantumCircuit:
    """Two parameterised halves (ry layers and cx ladders) joined in the middle by ``joins``."""
    theta = ParameterVector("t", 3 * num_qubits)
    halves_qubits = [range(halves), range(halves, num_qubits)]
    qc = QuantumCircuit(num_qubits)
    for layer in range(3):
        rotation = qc.rx if layer == 1 else qc.ry
        for q in range(num_qubits):
            rotation(theta[layer * num_qubits + q], q)
        for part in halves_qubits:
            for a, b in itertools.pairwise(part):
                qc.cx(a, b)
        if layer == 1:
            for name, a, b in joins:
                getattr(qc, name)(a, b)
    return qc


def hub(num_qubits: int = 7) -> QuantumCircuit:
    """Qubit 3 talks to 0-2 and then to 4-6: one wire cut beats three gate cuts."""
    theta = ParameterVector("h", 2 * num_qubits)
    qc = QuantumCircuit(num_qubits)
    for q in range(num_qubits):
        qc.ry(theta[q], q)
    qc.barrier()  # stripped: a barrier over all qubits would otherwise join every partition
    for q in (0, 1, 2, 4, 5, 6):
        qc.cx(3, q)
    for q in range(num_qubits):
        qc.rx(theta[num_qubits + q], q)
    return qc


def random_rows(qc: QuantumCircuit, rows: int, seed: int) -> np.ndarray:
    """Parameter rows, columns in ``qc.parameters`` order."""
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, (rows, qc.num_parameters))


def exact_uncut(qc: QuantumCircuit, paulis: list[str], rows: np.ndarray) -> np.ndarray:
    return np.array([[Statevector(qc.assign_parameters(row)).expectation_value(Pauli(p)).real for p in paulis]
                     for row in rows])


def aer_values(plan: CutPlan, circuit: QuantumCircuit, rows: np.ndarray) -> list[np.ndarray]:
    """Each subexperiment's exact values per row, the way a node computes them (each binds its
    own rows, positionally in its ``circuit.parameters`` order)."""
    circuits = []
    for sub, sub_rows in zip(plan.subexperiments, plan.subexperiment_rows(rows, circuit.parameters)):
        for row in sub_rows:
            qc = sub.circuit.assign_parameters(row)
            for j, label in enumerate(sub.paulis):
                qc.save_expectation_value(Pauli(label), range(qc.num_qubits), label=f"ev{j}")
            circuits.append(qc)
    result = AerSimulator(method="statevector").run(circuits).result()
    values, i = [], 0
    for sub in plan.subexperiments:
        block = []
        for _ in range(len(rows)):
            data = result.data(i)
            block.append([data[f"ev{j}"] for j in range(len(sub.paulis))])
            i += 1
        values.append(np.array(block))
    return values


def assert_well_formed(plan: CutPlan, max_qubits: int) -> None:
    """Every subexperiment fits and is pure estimator work."""
    assert plan.subexperiments
    for sub in plan.subexperiments:
        assert sub.circuit.num_qubits <= max_qubits
        assert sub.circuit.num_clbits == 0 and not sub.circuit.cregs
        assert not {"measure", "reset"} & set(sub.circuit.count_ops())
        assert sub.paulis and all(len(p) == sub.circuit.num_qubits and set(p) <= {"I", "Z"} and "Z" in p
                                  for p in sub.paulis)
    assert max(plan.subcircuit_widths) <= max_qubits
    meta = plan.metadata()
    assert meta["subexperiments"] == len(plan.subexperiments) <= meta["generated_subexperiments"]
    assert meta["cuts"] == plan.gate_cuts + plan.wire_cuts == plan.num_cuts >= 1
    assert meta["subcircuit_widths"] == list(plan.subcircuit_widths)


PAULIS_8 = ["ZZZZZZZZ", "XIIIIIIY", "IIIXZIII", "YYIIIIXX", "IIIIIIII", "ZIIIXIIZ"]
PAULIS_6 = ["ZZZZZZ", "XIIIIY", "IIXZII", "YYIIXX", "ZIYIIZ"]


@pytest.mark.parametrize(
    ("qc", "paulis", "max_qubits", "gate_cuts"),
    [
        (layered(8, [("cx", 3, 4)], 4), PAULIS_8, 5, 1),
        (layered(6, [("cx", 2, 3), ("cz", 1, 4)], 3), PAULIS_6, 5, 2),
    ],
    ids=["8q-one-cx", "6q-cx-and-cz"],
)
def test_gate_cuts_reconstruct_exact_values(qc: QuantumCircuit, paulis: list[str], max_qubits: int,
                                            gate_cuts: int) -> None:
    plan = plan_cuts(qc, paulis, max_qubits)
    assert (plan.gate_cuts, plan.wire_cuts) == (gate_cuts, 0)
    assert plan.sampling_overhead == pytest.approx(9.0**gate_cuts)
    assert_well_formed(plan, max_qubits)
    # each subexperiment keeps the parameters of its own half only: rows go via subexperiment_rows
    assert all(0 < sub.circuit.num_parameters < qc.num_parameters for sub in plan.subexperiments)
    rows = random_rows(qc, ROWS, seed=1)
    got = plan.reconstruct(aer_values(plan, qc, rows))
    assert got.shape == (ROWS, len(paulis))
    np.testing.assert_allclose(got, exact_uncut(qc, paulis, rows), atol=1e-9)


def test_wire_cut_reconstructs_exact_values() -> None:
    qc = hub()
    paulis = ["ZZZZZZZ", "XYZXYZX", "IIIXIII", "IIYIIII", "ZIIIIIY"]
    plan = plan_cuts(qc, paulis, 4)
    assert plan.wire_cuts == 1 and plan.gate_cuts == 0
    assert_well_formed(plan, 4)
    rows = random_rows(qc, ROWS, seed=2)
    got = plan.reconstruct(aer_values(plan, qc, rows))
    np.testing.assert_allclose(got, exact_uncut(qc, paulis, rows), atol=1e-9)


def test_parameterised_two_qubit_and_three_qubit_gates_are_expanded() -> None:
    """The addon cannot cut rzz(theta) nor take a ccx: both become their definitions first."""
    theta = ParameterVector("a", 8)
    qc = QuantumCircuit(6)
    for q in range(6):
        qc.ry(theta[q], q)
    qc.ccx(0, 1, 2)
    qc.cx(3, 4)
    qc.cx(4, 5)
    qc.rzz(theta[6], 2, 3)
    qc.rx(theta[7], 3)
    qc.measure_all()  # final measurements are stripped
    paulis = ["ZZZZZZ", "IIXYII", "XIIIIZ"]
    plan = plan_cuts(qc, paulis, 5)
    assert_well_formed(plan, 5)
    rows = random_rows(qc, 2, seed=3)
    unmeasured = qc.remove_final_measurements(inplace=False)
    got = plan.reconstruct(aer_values(plan, unmeasured, rows))
    np.testing.assert_allclose(got, exact_uncut(unmeasured, paulis, rows), atol=1e-9)


def test_idle_qubits_count_as_zero_state() -> None:
    qc = layered(8, [("cx", 3, 4)], 4)
    wide = QuantumCircuit(9)
    wide.compose(qc, range(8), inplace=True)  # qubit 8 never touched
    paulis = ["Z" + PAULIS_8[0], "X" + PAULIS_8[1], "I" + PAULIS_8[3], "ZIIIIIIII", "YIIIIIIII"]
    plan = plan_cuts(wide, paulis, 5)
    rows = random_rows(qc, 2, seed=4)
    got = plan.reconstruct(aer_values(plan, wide, rows))
    np.testing.assert_allclose(got, exact_uncut(wide, paulis, rows), atol=1e-9)
    np.testing.assert_allclose(got[:, 1], 0.0, atol=1e-12)


def test_over_budget_names_the_numbers() -> None:
    qc = layered(6, [("cx", 2, 3), ("cz", 1, 4)], 3)
    numbers = r"at most 5 qubits needs 2 gate and 0 wire cuts.* 252 subexperiments.*max_subexperiments=50"
    with pytest.raises(FailedPreconditionError, match=numbers):
        plan_cuts(qc, PAULIS_6, 5, max_subexperiments=50)


def test_impossible_width_names_the_numbers() -> None:
    """A cut CX measures a qubit that is used afterwards: one ancilla, so never 1 qubit."""
    qc = QuantumCircuit(2)
    qc.h([0, 1])
    qc.cx(0, 1)
    qc.h([0, 1])
    with pytest.raises(FailedPreconditionError, match=r"at most 1 qubits.*needs 2 qubits"):
        plan_cuts(qc, ["XX"], 1)


def test_bad_input_is_refused() -> None:
    mid_circuit = QuantumCircuit(2, 1)
    mid_circuit.h(0)
    mid_circuit.measure(0, 0)
    mid_circuit.cx(0, 1)
    with pytest.raises(InvalidArgumentError, match="'measure'"):
        plan_cuts(mid_circuit, ["ZZ"], 1)
    controlled = QuantumCircuit(QuantumRegister(2), ClassicalRegister(1))
    with controlled.if_test((controlled.clbits[0], 1)):
        controlled.x(1)
    with pytest.raises(InvalidArgumentError, match="if_else"):
        plan_cuts(controlled, ["ZZ"], 1)
    with pytest.raises(InvalidArgumentError, match="Pauli label"):
        plan_cuts(hub(), ["ZZ"], 4)
    with pytest.raises(InvalidArgumentError, match="max_qubits"):
        plan_cuts(hub(), ["Z" * 7], 0)
    plan = plan_cuts(hub(), ["Z" * 7], 4)
    with pytest.raises(InvalidArgumentError, match="shape"):
        plan.reconstruct([np.zeros((2, len(s.paulis) + 1)) for s in plan.subexperiments])


# --- the deferral against the addon's own shot semantics -----------------------------------------


def branch_average(qc: QuantumCircuit, group: CommutingObservableGroup) -> np.ndarray:
    """Exact mean of the addon's per-shot value ``_process_outcome_v2`` for ``qc``, by following
    every measurement and reset branch with its probability."""
    projectors = [Operator(np.diag([1.0, 0.0])), Operator(np.diag([0.0, 1.0]))]
    flip = Operator(np.array([[0.0, 1.0], [1.0, 0.0]]))
    registers = {bit: (reg.name, i) for reg in qc.cregs for i, bit in enumerate(reg)}
    branches = [(Statevector.from_label("0" * qc.num_qubits), 0, 0)]  # state (unnormalised), qpd, obs
    for inst in qc.data:
        q = [qc.find_bit(b).index for b in inst.qubits]
        name = inst.operation.name
        if name not in ("measure", "reset"):
            branches = [(sv.evolve(inst.operation, q), a, b) for sv, a, b in branches]
            continue
        split = []
        for sv, a, b in branches:
            for outcome, projector in enumerate(projectors):
                part = sv.evolve(projector, q)
                if name == "reset":
                    split.append((part.evolve(flip, q) if outcome else part, a, b))
                else:
                    reg, i = registers[inst.clbits[0]]
                    a2, b2 = (a | outcome << i, b) if reg == "qpd_measurements" else (a, b | outcome << i)
                    split.append((part, a2, b2))
        branches = split
    return sum(float(np.vdot(sv.data, sv.data).real) * _process_outcome_v2(group, b, a) for sv, a, b in branches)


def test_deferral_matches_mid_circuit_measurements_and_resets() -> None:
    """Random circuits in the addon's format (qpd measurements mid-circuit, resets, basis change
    and final measurements): deferred values equal the exact average of the addon's shot value."""
    rng = np.random.default_rng(7)
    group = CommutingObservableGroup(Pauli("XZY"), [Pauli("XZY"), Pauli("IZI"), Pauli("XII"), Pauli("IIY")])
    for _ in range(12):
        qc = QuantumCircuit(QuantumRegister(3), ClassicalRegister(3, "observable_measurements"),
                            ClassicalRegister(3, "qpd_measurements"))
        qpd = 0
        for _ in range(10):
            kind = rng.integers(5)
            q = int(rng.integers(3))
            if kind == 0:
                qc.cx(q, (q + 1 + int(rng.integers(2))) % 3)
            elif kind == 1 and qpd < 3:
                qc.measure(q, qc.cregs[1][qpd])
                qpd += 1
            elif kind == 2:
                qc.reset(q)
            else:
                qc.u(*rng.uniform(-np.pi, np.pi, 3), q)
        qc.sx(0)  # Y on qubit 0 (general observable "XZY", qubit 0 rightmost)
        qc.h(2)  # X on qubit 2
        qc.measure([0, 1, 2], qc.cregs[0])
        deferred = _defer_measurements(qc, group)
        circuit = QuantumCircuit(deferred.num_qubits)
        for op, qubits in deferred.operations:
            circuit.append(op, qubits)
        sv = Statevector(circuit)
        got = [sv.expectation_value(Pauli(label)).real for label in deferred.labels]
        np.testing.assert_allclose(got, branch_average(qc, group), atol=1e-12)
    with qc.if_test((qc.cregs[1][0], 1)):  # never generated by the addon; refused all the same
        qc.x(0)
    with pytest.raises(InvalidArgumentError, match="classically controlled"):
        _defer_measurements(qc, group)


# --- sampled mode --------------------------------------------------------------------------------


def sample(plan: CutPlan, circuit: QuantumCircuit, row: np.ndarray, precision: float,
           seed: int) -> list[dict[str, int]]:
    """Counts of every sampling circuit at one parameter row, with the plan's shots."""
    sim = AerSimulator(method="statevector")
    circuits, shots = plan.sampling_circuits(), plan.shots_for(precision)
    counts = []
    for s, sub_rows in enumerate(plan.subexperiment_rows(row[None, :], circuit.parameters)):
        bound = circuits[s].assign_parameters(sub_rows[0])
        counts.append(sim.run(bound, shots=shots[s], seed_simulator=seed + s).result().get_counts())
    return counts


def test_sampled_reconstruction_is_within_its_standard_errors() -> None:
    qc = layered(8, [("cx", 3, 4)], 4)
    paulis = ["ZZZZZZZZ", "XIIIIIIY", "IIIXZIII", "ZIIIXIIZ"]
    plan = plan_cuts(qc, paulis, 5)
    row = random_rows(qc, 1, seed=5)[0]
    exact = exact_uncut(qc, paulis, row[None, :])[0]
    for circuit, sub in zip(plan.sampling_circuits(), plan.subexperiments):
        assert circuit.num_clbits == len({i for p in sub.paulis for i, c in enumerate(p) if c == "Z"})
    coarse, fine = 0.08, 0.02
    values, errors = plan.reconstruct_sampled(sample(plan, qc, row, coarse, seed=100))
    assert np.all(np.abs(values - exact) <= 4 * errors + 1e-12)
    assert np.all(errors <= 1.2 * coarse)
    values_fine, errors_fine = plan.reconstruct_sampled(sample(plan, qc, row, fine, seed=200))
    assert np.all(np.abs(values_fine - exact) <= 4 * errors_fine + 1e-12)
    ratio = errors[errors > 1e-3] / errors_fine[errors > 1e-3]
    assert ratio.size and np.all((ratio > 2.5) & (ratio < 6.0)), ratio
