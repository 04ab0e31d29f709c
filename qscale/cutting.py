"""Circuit cutting turned into exact expectation-value work.

A circuit wider than every node is cut with qiskit-addon-cutting into subexperiments that each
fit a node. The addon's subexperiments end in mid-circuit measurements (the quasi-probability
decomposition, QPD) and final measurements after a basis change, and it reconstructs from shots.
Here every subexperiment becomes *exact* estimator work instead, by deferred measurement:

* a measurement of qubit ``q`` becomes a CX from ``q`` onto a fresh ancilla that then holds the
  outcome bit (or, when nothing that matters touches ``q`` afterwards, ``q`` itself holds it);
* a ``reset`` of ``q`` moves ``q`` onto a fresh qubit in ``|0>``: the old wire is never used
  again, which is exactly the partial trace of a reset;
* the addon's shot value ``(-1)^parity(qpd bits) * (-1)^parity(observable bits & mask)`` is then
  the expectation value of a Z-string on the qubits holding those bits.

So each :class:`Subexperiment` is a measurement-free circuit plus Z/I Pauli labels, computed
exactly (``save_expectation_value``) for every parameter row, and :meth:`CutPlan.reconstruct`
combines them into the expectation values of the input Paulis. Along the way, gates whose
result is never read are dropped, unused wires removed, identical subexperiments computed once
(their labels merged) and identity labels (value 1) never sent. A sampled mode
(:meth:`CutPlan.sampling_circuits`, :meth:`CutPlan.shots_for`,
:meth:`CutPlan.reconstruct_sampled`) runs the same circuits with final measurements instead.

Pure: nothing here talks to a cluster.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from numbers import Integral, Real

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import (
    CircuitInstruction,
    ClassicalRegister,
    ControlFlowOp,
    Gate,
    Measure,
    Operation,
    Parameter,
)
from qiskit.circuit.library import CXGate, UnitaryGate
from qiskit.quantum_info import PauliList
from qiskit_addon_cutting import (
    DeviceConstraints,
    OptimizationParameters,
    cut_wires,
    expand_observables,
    find_cuts,
    generate_cutting_experiments,
    partition_problem,
)
from qiskit_addon_cutting.qpd import SingleQubitQPDGate
from qiskit_addon_cutting.utils.observable_grouping import (
    CommutingObservableGroup,
    ObservableCollection,
)

from qscale.circuits import check_pauli_labels
from qscale.errors import FailedPreconditionError, InvalidArgumentError

__all__ = ["Subexperiment", "CutPlan", "plan_cuts"]

#: Below this the addon treats a quasi-probability as zero and generates no term for it.
_ZERO_PROBABILITY = 1e-14
#: The addon's register of mid-circuit (QPD) measurements; the other is "observable_measurements".
_QPD_REGISTER = "qpd_measurements"


@dataclass(frozen=True)
class Subexperiment:
    """One piece of exact estimator work.

    ``circuit`` has no measurements, resets or clbits; it keeps the input's unbound
    :class:`~qiskit.circuit.Parameter` objects, but only those it uses, so its rows are not the
    input's (see :meth:`CutPlan.subexperiment_rows`). ``paulis`` are Z/I labels in Qiskit order
    (qubit 0 rightmost), each ``circuit.num_qubits`` letters long.
    """

    circuit: QuantumCircuit
    paulis: tuple[str, ...]


@dataclass(frozen=True)
class _Terms:
    """How subexperiment values combine into the input Paulis' expectation values.

    All values are laid side by side in one matrix ``V`` (rows x columns): column 0 is the
    constant 1 (the value of an identity label, never sent as work), then the columns of each
    subexperiment in turn (``offsets[s]`` is where subexperiment ``s`` starts). For input Pauli
    ``p`` the reconstruction is::

        E[p] = idle[p] * sum_i coefficients[i] * prod_L sum_e weights_L[p, e] * V[columns_L[i, p, e]]

    over QPD terms ``i`` and subsystems ``L``; ``e`` runs over the addon's lookups of the
    subsystem's observable (their mean, so the weights of one ``(L, p)`` sum to 1).
    """

    coefficients: np.ndarray  # (C,)
    columns: tuple[np.ndarray, ...]  # per subsystem: int (C, P, E)
    weights: tuple[np.ndarray, ...]  # per subsystem: float (P, E)
    idle: np.ndarray  # (P,) factor of the qubits no instruction touches (|0>: 1 for I/Z, 0 for X/Y)
    offsets: np.ndarray  # (S + 1,) column offsets, offsets[0] == 1

    def combine(self, values: np.ndarray) -> np.ndarray:
        """Expectation values (rows, P) from value matrices ``V`` (rows, columns)."""
        product = np.ones((values.shape[0], len(self.coefficients), len(self.idle)))
        for columns, weights in zip(self.columns, self.weights):
            product *= np.einsum("rcpe,pe->rcp", values[:, columns], weights)
        return np.einsum("rcp,c->rp", product, self.coefficients) * self.idle

    def gradient(self, values: np.ndarray) -> np.ndarray:
        """d E[p] / d V[column] at one row of values (columns,), as (P, columns - 1)."""
        factors = [np.einsum("cpe,pe->cp", values[cols], w) for cols, w in zip(self.columns, self.weights)]
        return self._spread(factors, self.coefficients, self.idle, len(values))

    def gradient_bound(self) -> np.ndarray:
        """An upper bound of ``|gradient|`` for any values in [-1, 1], as (P, columns - 1)."""
        ones = [np.ones(cols.shape[:2]) for cols in self.columns]
        return self._spread(ones, np.abs(self.coefficients), np.abs(self.idle), int(self.offsets[-1]))

    def _spread(self, factors: list[np.ndarray], coefficients: np.ndarray, idle: np.ndarray,
                num_columns: int) -> np.ndarray:
        """Sum, per column, of coefficient x idle x weight x the other subsystems' factors."""
        gradient = np.zeros((len(idle), num_columns))
        paulis = np.arange(len(idle))[None, :, None]
        for k, (columns, weights) in enumerate(zip(self.columns, self.weights)):
            others = np.prod([f for j, f in enumerate(factors) if j != k], axis=0)
            scale = coefficients[:, None] * others * idle
            np.add.at(gradient, (paulis, columns), scale[:, :, None] * weights)
        return gradient[:, 1:]


@dataclass(frozen=True, eq=False)
class CutPlan:
    """A cut circuit: the subexperiments to compute and how to put their values back together."""

    subexperiments: tuple[Subexperiment, ...]
    num_cuts: int  # gate cuts + wire cuts
    gate_cuts: int
    wire_cuts: int
    sampling_overhead: float
    subcircuit_widths: tuple[int, ...]  # widest subexperiment per subsystem, ancillas included
    _terms: _Terms = field(repr=False)
    _generated: int = field(repr=False)  # circuits the addon generated, before deduplication

    def reconstruct(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """Exact expectation values of the input Paulis, shape (rows, len(paulis)).

        ``values[s]`` has shape (rows, len(subexperiments[s].paulis)): the exact expectation
        values of subexperiment ``s`` for every parameter row. Vectorised over rows. Without any
        subexperiment (every value known beforehand, e.g. identity Paulis) there is one row.
        """
        if len(values) != len(self.subexperiments):
            raise InvalidArgumentError(f"{len(values)} value arrays for {len(self.subexperiments)} subexperiments")
        arrays = [np.asarray(v, dtype=np.float64) for v in values]
        rows = arrays[0].shape[0] if arrays and arrays[0].ndim == 2 else 1
        for s, (array, sub) in enumerate(zip(arrays, self.subexperiments)):
            if array.shape != (rows, len(sub.paulis)):
                raise InvalidArgumentError(
                    f"values[{s}] has shape {array.shape}, expected ({rows}, {len(sub.paulis)})")
        matrix = np.concatenate([np.ones((rows, 1)), *arrays], axis=1)
        return self._terms.combine(matrix)

    def metadata(self) -> dict[str, object]:
        """Figures of the plan, for logs and job metadata."""
        return {
            "cuts": self.num_cuts,
            "gate_cuts": self.gate_cuts,
            "wire_cuts": self.wire_cuts,
            "subexperiments": len(self.subexperiments),
            "generated_subexperiments": self._generated,  # by the addon, before deduplication
            "terms": len(self._terms.coefficients),  # QPD terms summed by the reconstruction
            "sampling_overhead": self.sampling_overhead,
            "subcircuit_widths": list(self.subcircuit_widths),
        }

    def subexperiment_rows(self, rows: np.ndarray, parameters: Sequence[Parameter]) -> tuple[np.ndarray, ...]:
        """Each subexperiment's parameter rows, taken from the input circuit's.

        ``rows`` has shape (sets, len(parameters)), columns in ``parameters`` order (typically the
        input circuit's ``parameters``). A subexperiment keeps only the parameters it uses, so
        row ``s`` of the result has the columns of ``subexperiments[s].circuit.parameters``, in
        that order (possibly none).
        """
        array = np.asarray(rows, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != len(parameters):
            raise InvalidArgumentError(f"rows of shape {array.shape} do not fit {len(parameters)} parameters")
        column = {p: j for j, p in enumerate(parameters)}
        out = []
        for s, sub in enumerate(self.subexperiments):
            missing = [p.name for p in sub.circuit.parameters if p not in column]
            if missing:
                raise InvalidArgumentError(f"subexperiment {s} needs parameters {missing} that the rows lack")
            out.append(array[:, [column[p] for p in sub.circuit.parameters]])
        return tuple(out)

    def sampling_circuits(self) -> tuple[QuantumCircuit, ...]:
        """Each subexperiment with final measurements of the qubits its Paulis touch.

        Clbit ``k`` of register ``meas`` holds the ``k``-th touched qubit in ascending order. Only
        final measurements, so a simulator samples every shot from one state.
        """
        return tuple(_with_measurements(sub) for sub in self.subexperiments)

    def shots_for(self, precision: float) -> tuple[int, ...]:
        """Shots per subexperiment so that each reconstructed standard error is at most about
        ``precision``, whatever the state.

        Shots go in proportion to each subexperiment's weight ``a_s`` (the sum of
        ``|coefficient|`` over the terms that use it, the largest over the input Paulis),
        ``N_s = a_s * sum(a) / precision**2``, at least 1: that minimises the total for the bound
        ``sum_s a_s**2 / N_s`` of the variance. The bound takes every other subsystem's factor
        and every ±1 variance as 1, so the real standard error is usually well below
        ``precision`` (the errors :meth:`reconstruct_sampled` reports are the real ones).
        """
        if not (isinstance(precision, Real) and math.isfinite(precision) and precision > 0):
            raise InvalidArgumentError(f"precision must be a positive number, not {precision!r}")
        if not self.subexperiments:
            return ()
        bound = self._terms.gradient_bound()
        per_subexperiment = np.add.reduceat(bound, self._terms.offsets[:-1] - 1, axis=1)
        weight = per_subexperiment.max(axis=0)
        shots = np.ceil(weight * weight.sum() / precision**2)
        return tuple(int(n) for n in np.maximum(shots, 1))

    def reconstruct_sampled(self, counts: Sequence[Mapping[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Values and standard errors (each of shape (len(paulis),)) from sampled counts.

        ``counts[s]`` are Qiskit-style bitstring counts (clbit 0 rightmost) of
        ``sampling_circuits()[s]``. The standard error is the delta method's: subexperiments are
        independent, and within one the covariance of its ±1 values is estimated from the same
        shots (a lone ±1 mean ``m`` over ``n`` shots has variance ``(1 - m**2) / n``).
        """
        if len(counts) != len(self.subexperiments):
            raise InvalidArgumentError(f"{len(counts)} counts for {len(self.subexperiments)} subexperiments")
        stats = [_count_statistics(c, sub.paulis, s)
                 for s, (c, sub) in enumerate(zip(counts, self.subexperiments))]
        row = np.concatenate([[1.0], *(mean for mean, _, _ in stats)])
        values = self._terms.combine(row[None, :])[0]
        gradient = self._terms.gradient(row)
        variance = np.zeros(len(values))
        for s, (_, covariance, shots) in enumerate(stats):
            g = gradient[:, self._terms.offsets[s] - 1 : self._terms.offsets[s + 1] - 1]
            variance += np.einsum("pc,cd,pd->p", g, covariance, g) / shots
        return values, np.sqrt(np.maximum(variance, 0.0))


def plan_cuts(circuit: QuantumCircuit, paulis: Sequence[str], max_qubits: int, *,
              max_subexperiments: int = 10_000, seed: int = 0) -> CutPlan:
    """Cut ``circuit`` so that every subexperiment, deferred-measurement ancillas included, has at
    most ``max_qubits`` qubits.

    Final measurements and barriers are stripped first. Gates on more than two qubits, and two-qubit gates
    with unbound parameters (which the addon cannot cut), are replaced by their definitions.
    ``find_cuts`` is first asked for subcircuits of ``max_qubits`` qubits; while ancillas make a
    subexperiment wider, it is asked again for one qubit fewer (the widths are probed before
    anything is generated). ``max_subexperiments`` bounds the circuits the addon generates (before
    deduplication), checked before generating.

    Raises:
        InvalidArgumentError: bad Paulis or limits; mid-circuit measurements, resets or classical
            control in the circuit.
        FailedPreconditionError: the cuts are impossible or over budget (the message gives the
            qubits, the cuts and the subexperiment count).
    """
    if not isinstance(max_qubits, Integral) or max_qubits < 1:
        raise InvalidArgumentError(f"max_qubits must be a positive integer, not {max_qubits!r}")
    if not isinstance(max_subexperiments, Integral) or max_subexperiments < 1:
        raise InvalidArgumentError(f"max_subexperiments must be a positive integer, not {max_subexperiments!r}")
    prepared = _prepare_circuit(circuit)
    labels = check_pauli_labels(paulis, prepared.num_qubits)
    if not labels:
        raise InvalidArgumentError("plan_cuts needs at least one Pauli label")
    observables = PauliList(list(labels))
    width = max_qubits
    while True:
        cut = _cut(prepared, observables, width, seed)
        cut.check_budget(max_subexperiments, max_qubits)
        widest = max(_probe_widths(cut), default=0)
        if widest <= max_qubits:
            plan = _build_plan(_balanced(cut, prepared, observables, seed, max_qubits, max_subexperiments))
            widest = max(plan.subcircuit_widths, default=0)
            if widest <= max_qubits:
                return plan
        width -= 1
        if width < 1:
            raise FailedPreconditionError(
                f"cannot cut the {prepared.num_qubits}-qubit circuit into subexperiments of at most {max_qubits} "
                f"qubits: even with subcircuits of {cut.width} qubits ({cut.describe()}), deferring the "
                f"measurements needs {widest} qubits")


#: Narrower subcircuits tried after the first cut that fits (each costs one ``find_cuts``).
_BALANCE_TRIES = 4


def _balanced(cut: _Cut, circuit: QuantumCircuit, observables: PauliList, seed: int, max_qubits: int,
              max_subexperiments: int) -> _Cut:
    """The cheapest of ``cut`` and the cuts into narrower subcircuits, down to an even split.

    The cut finder fills the first subcircuit up to the width it is given: two 20-qubit halves
    on 24-qubit nodes come back as 24 + 16 qubits. A statevector's cost doubles with each qubit,
    so a more even split is cheaper even with more subexperiments (22 + 18 qubits: about 2.3x
    faster here). The cost compared is, per subsystem, its subexperiments times ``2**width`` of
    its widest one.
    """
    def cost(candidate: _Cut) -> float:
        widths = _probe_widths(candidate)
        if max(widths, default=0) > max_qubits:
            return math.inf
        return float(sum(candidate.num_terms * len(collection.groups) * 2.0 ** width
                         for collection, width in zip(candidate.collections.values(), widths)))

    best, best_cost = cut, cost(cut)
    # Narrower than an even split the finder needs more cuts, and searching for them is slow.
    even = math.ceil(sum(c.num_qubits for c in cut.subcircuits.values()) / max(1, len(cut.subcircuits)))
    for width in range(cut.width - 1, max(even, cut.width - _BALANCE_TRIES) - 1, -1):
        candidate = _cut(circuit, observables, width, seed)
        if candidate.num_generated > max_subexperiments or len(candidate.subcircuits) != len(cut.subcircuits):
            continue
        candidate_cost = cost(candidate)
        if candidate_cost < best_cost:
            best, best_cost = candidate, candidate_cost
    return best


# --- input --------------------------------------------------------------------------------------


def _prepare_circuit(circuit: QuantumCircuit) -> QuantumCircuit:
    """The circuit without final measurements and barriers, in gates of at most two qubits the
    addon can cut."""
    if not isinstance(circuit, QuantumCircuit):
        raise InvalidArgumentError(f"expected a QuantumCircuit, not {type(circuit).__name__}")
    stripped = circuit.remove_final_measurements(inplace=False)
    if stripped.num_qubits == 0:
        raise InvalidArgumentError("cannot cut a circuit without qubits")
    flat = QuantumCircuit(stripped.num_qubits)
    index = {q: i for i, q in enumerate(stripped.qubits)}
    for inst in stripped.data:
        _append_flat(flat, inst.operation, [index[q] for q in inst.qubits], bool(inst.clbits))
    return flat


def _append_flat(out: QuantumCircuit, op: Operation, qubits: list[int], has_clbits: bool) -> None:
    """Append ``op``, replaced by its definition (recursively) where the addon cannot cut it."""
    if isinstance(op, ControlFlowOp) or has_clbits or op.name in ("measure", "reset"):
        raise InvalidArgumentError(
            f"cannot cut a circuit with {op.name!r}: only unitary gates (and final measurements) can be cut")
    if op.name == "barrier":  # meaningless for expectation values, and it would join the partitions
        return
    if not _must_expand(op):
        out.append(op, qubits, copy=False)
        return
    definition = getattr(op, "definition", None)
    if definition is None:
        raise InvalidArgumentError(f"cannot cut {op.name!r} on {len(qubits)} qubits: it has no definition")
    inner_index = {q: qubits[i] for i, q in enumerate(definition.qubits)}
    for inst in definition.data:
        _append_flat(out, inst.operation, [inner_index[q] for q in inst.qubits], bool(inst.clbits))


def _must_expand(op: Operation) -> bool:
    """Whether ``find_cuts`` would refuse ``op``: over two qubits, or two without a matrix."""
    if op.num_qubits > 2:
        return True
    if op.num_qubits == 2:
        return not isinstance(op, Gate) or op.is_parameterized() or not _has_matrix(op)
    return False


def _has_matrix(op: Gate) -> bool:
    """Whether the gate has a matrix, which the addon needs to cut it."""
    try:
        op.to_matrix()
    except Exception:  # any failure: the addon's to_matrix call would fail the same way
        return False
    return True


# --- cutting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cut:
    """One answer of the cut finder, partitioned, before generating subexperiments."""

    width: int  # qubits_per_subcircuit given to find_cuts
    subcircuits: dict[Hashable, QuantumCircuit]
    subobservables: dict[Hashable, PauliList]
    collections: dict[Hashable, ObservableCollection]
    num_terms: int  # QPD terms (coefficients) the addon will generate
    gate_cuts: int
    wire_cuts: int
    sampling_overhead: float
    idle: np.ndarray  # per input Pauli, the factor of the idle qubits

    def describe(self) -> str:
        """The cuts in words, for error messages."""
        return f"{self.gate_cuts} gate and {self.wire_cuts} wire cuts"

    @property
    def num_generated(self) -> int:
        """Circuits ``generate_cutting_experiments`` will return."""
        return self.num_terms * sum(len(c.groups) for c in self.collections.values())

    def check_budget(self, max_subexperiments: int, max_qubits: int) -> None:
        """Refuse, before generating anything, a cut with too many subexperiments."""
        if self.num_generated > max_subexperiments:
            raise FailedPreconditionError(
                f"cutting into subexperiments of at most {max_qubits} qubits needs {self.describe()} "
                f"(sampling overhead {self.sampling_overhead:g}) and {self.num_generated} subexperiments, "
                f"more than max_subexperiments={max_subexperiments}")


def _cut(circuit: QuantumCircuit, observables: PauliList, width: int, seed: int) -> _Cut:
    """Find cuts for subcircuits of ``width`` qubits and partition circuit and observables."""
    try:
        found, metadata = find_cuts(circuit, OptimizationParameters(seed=seed, gate_lo=True, wire_lo=True),
                                    DeviceConstraints(qubits_per_subcircuit=width))
        moved = cut_wires(found)
        problem = partition_problem(moved, observables=expand_observables(observables, circuit, moved))
    except ValueError as exc:
        raise FailedPreconditionError(f"the cut finder failed for subcircuits of {width} qubits: {exc}") from exc
    kinds = [kind for kind, _ in metadata["cuts"]]
    subobservables = dict(problem.subobservables or {})
    idle = subobservables.pop(None, None)  # qubits no instruction touches stay in |0>
    idle_factor = np.ones(len(observables)) if idle is None else (~idle.x).all(axis=1).astype(float)
    num_terms = math.prod(int(np.count_nonzero(np.asarray(b.probabilities) >= _ZERO_PROBABILITY))
                          for b in problem.bases)
    return _Cut(
        width=width,
        subcircuits=problem.subcircuits,
        subobservables=subobservables,
        collections={label: ObservableCollection(obs) for label, obs in subobservables.items()},
        num_terms=num_terms,
        gate_cuts=kinds.count("Gate Cut"),
        wire_cuts=kinds.count("Wire Cut"),
        sampling_overhead=float(math.prod(b.overhead for b in problem.bases)),
        idle=idle_factor,
    )


# --- deferred measurement -----------------------------------------------------------------------


class _Step(Enum):
    """What the deferral does with one instruction of a subexperiment."""

    DROP = 0  # barrier, unread measurement, or gate on qubits whose state is never read again
    GATE = 1
    RESET = 2  # continue the qubit on a fresh wire
    READ = 3  # measurement whose qubit is not used afterwards: the qubit itself holds the bit
    ANCILLA = 4  # measurement by CX onto a fresh ancilla that holds the bit


#: An instruction as the deferral reads it: operation, qubit indices, and for a measurement the
#: (register name, index) of its clbit.
_Instruction = tuple[Operation, list[int], tuple[str, int] | None]


@dataclass(frozen=True)
class _Deferred:
    """A subexperiment after deferral: operations on ``num_qubits`` wires and one Z/I label per
    observable of its commuting group (Qiskit order)."""

    operations: tuple[tuple[Operation, tuple[int, ...]], ...]
    num_qubits: int
    labels: tuple[str, ...]

    def key(self) -> Hashable | None:
        """Identity of the circuit for deduplication, None where operations are not comparable."""
        parts = []
        for op, qubits in self.operations:
            if getattr(op, "_standard_gate", None) is None and not isinstance(op, UnitaryGate):
                return None
            params = tuple(p.tobytes() if isinstance(p, np.ndarray) else p for p in op.params)
            parts.append((op.name, params, qubits))
        return self.num_qubits, tuple(parts)

    def circuit(self) -> QuantumCircuit:
        """The measurement-free circuit."""
        qc = QuantumCircuit(self.num_qubits)
        wires = qc.qubits
        for op, qubits in self.operations:
            qc._append(CircuitInstruction(op, tuple(wires[q] for q in qubits)))
        return qc


def _defer_measurements(circuit: QuantumCircuit, group: CommutingObservableGroup) -> _Deferred:
    """Replace the measurements and resets of one addon subexperiment by deferred measurement.

    The shot value of observable ``j`` of ``group`` is ``(-1)^parity(all qpd bits) *
    (-1)^parity(observable bits in pauli_bitmasks[j])`` (the addon's ``_process_outcome``); it is
    the Z-string on the wires that hold those bits once every measurement is deferred.
    """
    return _defer(_read_instructions(circuit), circuit.num_qubits, group)


def _defer(instructions: list[_Instruction], num_qubits: int, group: CommutingObservableGroup) -> _Deferred:
    """:func:`_defer_measurements` on instructions already read."""
    read_bits = 0
    for mask in group.pauli_bitmasks:
        read_bits |= mask
    steps = _plan_steps(instructions, num_qubits, read_bits)

    wire = list(range(num_qubits))  # logical qubit -> current wire
    fresh = [True] * num_qubits  # the current wire is still |0> and holds no bit
    num_wires = num_qubits
    operations: list[tuple[Operation, tuple[int, ...]]] = []
    qpd_wires: list[int] = []
    observable_wires: dict[int, int] = {}
    for (op, qubits, bit), step in zip(instructions, steps):
        if step is _Step.DROP:
            continue
        if step is _Step.GATE:
            operations.append((op, tuple(wire[q] for q in qubits)))
        elif step is _Step.RESET:
            if not fresh[qubits[0]]:
                wire[qubits[0]], num_wires = num_wires, num_wires + 1
        else:
            holder = wire[qubits[0]]
            if step is _Step.ANCILLA:
                holder, num_wires = num_wires, num_wires + 1
                operations.append((CXGate(), (wire[qubits[0]], holder)))
            if bit[0] == _QPD_REGISTER:
                qpd_wires.append(holder)
            else:
                observable_wires[bit[1]] = holder
        for q in qubits:
            fresh[q] = step is _Step.RESET
    return _compact(operations, qpd_wires, observable_wires, group.pauli_bitmasks)


def _read_instructions(circuit: QuantumCircuit) -> list[_Instruction]:
    """(operation, qubit indices, (register name, index) of a measurement's clbit) per
    instruction; refuses classical control, under which deferring measurements is invalid."""
    index = {q: i for i, q in enumerate(circuit.qubits)}
    registers = {bit: (reg.name, i) for reg in circuit.cregs for i, bit in enumerate(reg)}
    out = []
    for inst in circuit.data:
        op = inst.operation
        if isinstance(op, ControlFlowOp) or (inst.clbits and op.name != "measure"):
            raise InvalidArgumentError(
                f"cannot defer measurements past classically controlled {op.name!r}: deferral would be invalid")
        out.append((op, [index[q] for q in inst.qubits], registers[inst.clbits[0]] if inst.clbits else None))
    return out


def _plan_steps(instructions: list[_Instruction], num_qubits: int,
                read_bits: int) -> list[_Step]:
    """Classify every instruction by a backward pass that tracks whether each qubit's state is
    read later (by a kept measurement or a multi-qubit gate) before its next reset."""
    live = [False] * num_qubits
    steps = [_Step.DROP] * len(instructions)
    for pos in range(len(instructions) - 1, -1, -1):
        op, qubits, bit = instructions[pos]
        if op.name == "barrier":
            continue
        if op.name == "reset":
            live[qubits[0]] = False
            steps[pos] = _Step.RESET
        elif bit is not None:
            if bit[0] == _QPD_REGISTER or read_bits >> bit[1] & 1:
                steps[pos] = _Step.ANCILLA if live[qubits[0]] else _Step.READ
                live[qubits[0]] = True
        elif any(live[q] for q in qubits):
            steps[pos] = _Step.GATE
            for q in qubits:
                live[q] = True
    return steps


def _compact(operations: list[tuple[Operation, tuple[int, ...]]], qpd_wires: list[int],
             observable_wires: dict[int, int], masks: Sequence[int]) -> _Deferred:
    """Renumber the wires that are used, in order, and write one Z/I label per mask."""
    used = {w for _, qubits in operations for w in qubits} | set(qpd_wires) | set(observable_wires.values())
    renumber = {w: i for i, w in enumerate(sorted(used))}
    labels = []
    for mask in masks:
        z = np.zeros(len(renumber), dtype=bool)
        for w in qpd_wires:
            z[renumber[w]] ^= True
        for bit, w in observable_wires.items():
            if mask >> bit & 1:
                z[renumber[w]] ^= True
        labels.append("".join("Z" if flag else "I" for flag in z[::-1]))
    ops = tuple((op, tuple(renumber[w] for w in qubits)) for op, qubits in operations)
    return _Deferred(ops, len(renumber), tuple(labels))


# --- width before generating -------------------------------------------------------------------


def _probe_widths(cut: _Cut) -> list[int]:
    """Per subsystem, the width of its widest subexperiment, found without generating them all.

    The widest is the one where every decomposition takes a term that measures the most on this
    side (measurements are what add ancillas); that term combination is among those the addon
    generates, so a probe wider than the limit means the cut cannot fit.
    """
    widths = []
    for label, collection in cut.collections.items():
        base = _widest_terms(cut.subcircuits[label])
        widest = 0
        for group in collection.groups:
            deferred = _defer(base + _final_measurements(group), cut.subcircuits[label].num_qubits, group)
            if any("Z" in text for text in deferred.labels):
                widest = max(widest, deferred.num_qubits)
        widths.append(widest)
    return widths


def _widest_terms(subcircuit: QuantumCircuit) -> list[_Instruction]:
    """The subcircuit's instructions with each QPD gate replaced by its most-measuring term."""
    chosen = _most_measuring_terms(subcircuit)
    index = {q: i for i, q in enumerate(subcircuit.qubits)}
    out: list[_Instruction] = []
    measured = 0
    for inst in subcircuit.data:
        op, qubits = inst.operation, [index[q] for q in inst.qubits]
        if not isinstance(op, SingleQubitQPDGate):
            out.append((op, qubits, None))
            continue
        for inner in op.basis.maps[chosen[op.label]][op.qubit_id]:
            if inner.name == "qpd_measure":
                out.append((Measure(), qubits, (_QPD_REGISTER, measured)))
                measured += 1
            else:
                out.append((inner, qubits, None))
    return out


def _most_measuring_terms(subcircuit: QuantumCircuit) -> dict[str, int]:
    """Per decomposition (the QPD gates of one cut share a label), the term with a nonzero
    weight that measures most often on the sides this subcircuit holds."""
    sides: dict[str, list[SingleQubitQPDGate]] = defaultdict(list)
    for inst in subcircuit.data:
        if isinstance(inst.operation, SingleQubitQPDGate):
            sides[inst.operation.label].append(inst.operation)
    chosen = {}
    for label, gates in sides.items():
        basis = gates[0].basis
        terms = [m for m, p in enumerate(basis.probabilities) if p >= _ZERO_PROBABILITY]
        chosen[label] = max(terms, key=lambda m: sum(
            inner.name == "qpd_measure" for gate in gates for inner in basis.maps[m][gate.qubit_id]))
    return chosen


def _final_measurements(group: CommutingObservableGroup) -> list[_Instruction]:
    """The group's final measurements (their basis changes add no qubits)."""
    return [(Measure(), [q], ("observable_measurements", bit)) for bit, q in enumerate(group.pauli_indices)]


# --- assembling the plan ------------------------------------------------------------------------


class _Collector:
    """Deduplicates deferred subexperiments; merges the labels of identical circuits."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, int] = {}
        self.circuits: list[QuantumCircuit] = []
        self.labels: list[dict[str, int]] = []  # per subexperiment: label -> column within it

    def add(self, deferred: _Deferred) -> list[tuple[int, int]]:
        """(subexperiment, column) of each label of ``deferred``; (-1, 0) for identity labels."""
        refs: list[tuple[int, int]] = []
        s = -1
        for label in deferred.labels:
            if "Z" not in label:
                refs.append((-1, 0))
                continue
            if s < 0:
                s = self._index(deferred)
            refs.append((s, self.labels[s].setdefault(label, len(self.labels[s]))))
        return refs

    def _index(self, deferred: _Deferred) -> int:
        key = deferred.key()
        if key is not None and key in self._by_key:
            return self._by_key[key]
        self.circuits.append(deferred.circuit())
        self.labels.append({})
        if key is not None:
            self._by_key[key] = len(self.circuits) - 1
        return len(self.circuits) - 1


def _build_plan(cut: _Cut) -> CutPlan:
    """Generate the addon's subexperiments, defer each once, and tabulate the reconstruction."""
    generated, coefficients = generate_cutting_experiments(
        {label: cut.subcircuits[label] for label in cut.subobservables}, cut.subobservables, num_samples=np.inf)
    collector = _Collector()
    tables = []
    widths = []
    for label, collection in cut.collections.items():
        groups = collection.groups
        refs = []
        widest = 0
        for position, experiment in enumerate(generated.get(label, [])):
            deferred = _defer_measurements(experiment, groups[position % len(groups)])
            refs.append(collector.add(deferred))
            if any("Z" in text for text in deferred.labels):
                widest = max(widest, deferred.num_qubits)
        tables.append((label, collection, refs))
        widths.append(widest)
    offsets = np.cumsum([1] + [len(labels) for labels in collector.labels])
    columns, weights = zip(*(_subsystem_table(cut.subobservables[label], collection, refs, offsets)
                             for label, collection, refs in tables)) if tables else ((), ())
    terms = _Terms(np.array([c for c, _ in coefficients], dtype=np.float64), tuple(columns), tuple(weights),
                   cut.idle, offsets)
    subexperiments = tuple(Subexperiment(qc, tuple(labels))
                           for qc, labels in zip(collector.circuits, collector.labels))
    return CutPlan(subexperiments, cut.gate_cuts + cut.wire_cuts, cut.gate_cuts, cut.wire_cuts,
                   cut.sampling_overhead, tuple(widths), terms, cut.num_generated)


def _subsystem_table(subobservables: PauliList, collection: ObservableCollection,
                     refs: list[list[tuple[int, int]]], offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns (C, P, E) and weights (P, E) of one subsystem: the addon's reconstruction takes, for
    QPD term ``i`` and input Pauli ``p``, the mean over the lookups ``(m, n)`` of the subsystem's
    observable of value ``n`` of subexperiment ``i * len(groups) + m``."""
    lookups = [collection.lookup[pauli] for pauli in subobservables]
    depth = max(len(found) for found in lookups)
    groups = np.zeros((len(lookups), depth), dtype=int)
    entries = np.zeros((len(lookups), depth), dtype=int)
    weights = np.zeros((len(lookups), depth))
    for p, found in enumerate(lookups):
        for e, (m, n) in enumerate(found):
            groups[p, e], entries[p, e], weights[p, e] = m, n, 1.0 / len(found)
    width = max(len(r) for r in refs)
    column = np.zeros((len(refs), width), dtype=int)  # global column of each (subexperiment, entry)
    for position, row in enumerate(refs):
        for n, (s, j) in enumerate(row):
            column[position, n] = 0 if s < 0 else offsets[s] + j
    num_terms = len(refs) // len(collection.groups)
    rows = np.arange(num_terms)[:, None, None] * len(collection.groups) + groups[None]
    return column[rows, entries[None]], weights


# --- sampled mode -------------------------------------------------------------------------------


def _measured_qubits(paulis: Sequence[str]) -> list[int]:
    """Qubits (ascending) that any of the Z/I labels touches (every subexperiment has a Z)."""
    width = len(paulis[0])
    return sorted({width - 1 - i for label in paulis for i, c in enumerate(label) if c == "Z"})


def _with_measurements(sub: Subexperiment) -> QuantumCircuit:
    """The subexperiment with its touched qubits measured into register ``meas``."""
    qubits = _measured_qubits(sub.paulis)
    qc = sub.circuit.copy()
    register = ClassicalRegister(len(qubits), "meas")
    qc.add_register(register)
    qc.measure(qubits, register)
    return qc


def _count_statistics(counts: Mapping[str, int], paulis: Sequence[str],
                      s: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Means (K,), covariance (K, K) of the ±1 values of the K labels, and the shot count."""
    qubits = _measured_qubits(paulis)
    keys = list(counts)
    weights = np.array([counts[k] for k in keys], dtype=np.float64)
    shots = int(weights.sum())
    text = "".join(keys)
    if shots <= 0 or np.any(weights < 0) or len(text) != len(keys) * len(qubits):
        raise InvalidArgumentError(f"counts[{s}] must be bitstrings of {len(qubits)} bits with a positive total")
    codes = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).reshape(len(keys), len(qubits))
    bits = (codes - ord("0"))[:, ::-1]  # column k: clbit k
    if np.any(bits > 1):
        raise InvalidArgumentError(f"counts[{s}] has a key that is not a bitstring")
    width = len(paulis[0])
    masks = np.array([[label[width - 1 - q] == "Z" for q in qubits] for label in paulis], dtype=np.int64)
    signs = 1.0 - 2.0 * ((bits.astype(np.int64) @ masks.T) & 1)  # (outcomes, K)
    mean = weights @ signs / shots
    second = (signs * weights[:, None]).T @ signs / shots
    return mean, second - np.outer(mean, mean), shots
