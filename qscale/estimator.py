"""``EstimatorV2`` on a qscale cluster: exact expectation values by default, circuit cutting for
circuits wider than any node.

At precision 0 (the default, as in qiskit-aer's ``EstimatorV2``) every pub becomes estimator
work: the cluster computes the exact expectation value of each distinct Pauli of the pub's
observables for each parameter set (qiskit-aer's ``save_expectation_value`` on the nodes), and
the observables are summed here in the order qiskit-aer's ``EstimatorV2`` sums them. The values
are the same bits however the sets are spread over the nodes, and whatever failed on the way.

A pub whose circuit no node's statevector holds is cut (:mod:`qscale.cutting`): its
subexperiments run as estimator work of the same job and the values are reconstructed here.
When cutting would need more than ``max_subexperiments`` subexperiments, the circuit goes to
the cluster as it is and the coordinator runs it on the matrix-product-state method (or refuses
it, saying why, when no node can).

At precision > 0 the estimate is sampled: Qiskit's ``BackendEstimatorV2`` on a
:class:`~qscale.QScaleBackend` (``ceil(1 / precision**2)`` shots per measured basis), seeded
per shard by the cluster, so the same seed gives the same estimate on any number of nodes. A
cut pub at precision > 0 samples its subexperiments instead (shots in proportion to each one's
weight in the reconstruction; standard errors from the decomposition's variance).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qiskit import QuantumCircuit
from qiskit.primitives import BackendEstimatorV2, BaseEstimatorV2, DataBin, PrimitiveResult, PubResult
from qiskit.primitives.containers.estimator_pub import EstimatorPub, EstimatorPubLike

from qscale.backend import QScaleBackend
from qscale.circuits import CLIFFORD_OPS
from qscale.client import Client, Job, check_priority
from qscale.errors import FailedPreconditionError, InvalidArgumentError, NoCapableNodeError
from qscale.primitives import QScalePrimitiveJob
from qscale.results import JobResult

if TYPE_CHECKING:
    from qiskit_aer.noise import NoiseModel

    from qscale.cutting import CutPlan

__all__ = ["EstimatorV2", "EstimatorOptions"]


@dataclass(frozen=True)
class EstimatorOptions:
    """Options of :class:`EstimatorV2`."""

    default_precision: float = 0.0
    """Target standard error when the pub and ``run`` give none. 0: exact expectation values
    (``stds`` of 0); > 0: a sampled estimate with ``ceil(1 / precision**2)`` shots per basis."""
    seed: int | None = None
    """Job seed, for reproducible sampled estimates."""
    method: str = "automatic"
    """qiskit-aer simulation method."""
    noise_model: NoiseModel | None = None
    """A qiskit-aer noise model (sent as JSON), or None. Exact values with noise run on the
    density-matrix method, which needs the circuit's density matrix to fit a node."""
    max_subexperiments: int = 10_000
    """Most subexperiments a cut circuit may need; a circuit that needs more runs uncut (on the
    matrix-product-state method)."""
    priority: str | int = "normal"
    """The jobs' priority class: ``low``, ``normal`` or ``high`` (checked by
    :func:`qscale.client.check_priority`)."""

    def __post_init__(self) -> None:
        _check_precision(self.default_precision, "default_precision")
        check_priority(self.priority)
        if not isinstance(self.max_subexperiments, int) or self.max_subexperiments < 1:
            raise InvalidArgumentError("max_subexperiments must be an integer >= 1")


def _check_precision(value: object, what: str = "precision") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"{what} must be a number >= 0 (0: exact), got {value!r}")
    return float(value)


class EstimatorV2(BaseEstimatorV2):
    """``BaseEstimatorV2`` on a qscale cluster.

    Args:
        client: a connected :class:`qscale.Client`.
        default_precision: 0 (the default) for exact values; > 0 for a sampled estimate.
        seed: job seed for reproducible sampled estimates.
        options: further :class:`EstimatorOptions` (or a dict of them); they win over the
            keyword arguments.

    Example::

        estimator = qscale.EstimatorV2(client)
        evs = estimator.run([(circuit, observables, parameter_values)]).result()[0].data.evs
    """

    def __init__(self, client: Client, *, default_precision: float = 0.0, seed: int | None = None,
                 options: EstimatorOptions | dict[str, Any] | None = None) -> None:
        given = vars(options) if isinstance(options, EstimatorOptions) else dict(options or {})
        self._options = EstimatorOptions(**{"default_precision": default_precision, "seed": seed, **given})
        self._client = client
        self.backend = QScaleBackend(client, method=self._options.method, noise_model=self._options.noise_model,
                                     priority=self._options.priority)
        self._sampled = BackendEstimatorV2(backend=self.backend, options={"seed_simulator": self._options.seed})

    @property
    def options(self) -> EstimatorOptions:
        return self._options

    def run(self, pubs: Iterable[EstimatorPubLike], *, precision: float | None = None
            ) -> QScalePrimitiveJob[PrimitiveResult[PubResult]]:
        """Estimate the pubs; returns at once. Exact pubs (precision 0) go to the cluster as one
        estimator job; sampled ones (precision > 0) as one sampling job.

        Raises:
            InvalidArgumentError: a bad pub or precision.
            NoCapableNodeError: a circuit no node can hold and cutting cannot split within
                ``max_subexperiments`` (the message says both).
        """
        precision = self._options.default_precision if precision is None else _check_precision(precision)
        coerced = [EstimatorPub.coerce(pub, precision) for pub in pubs]
        if not coerced:
            raise InvalidArgumentError("run needs at least one pub")
        for i, pub in enumerate(coerced):
            _check_precision(pub.precision, f"pub {i} precision")
        widest = self._widest_statevector()
        work = {i: _Pub.build(pub, widest, self._options) for i, pub in enumerate(coerced)}
        exact = [i for i, pub in enumerate(coerced) if pub.precision == 0]
        cut_sampled = [i for i, pub in enumerate(coerced) if pub.precision > 0 and work[i].cut is not None]
        plain_sampled = [i for i, pub in enumerate(coerced) if pub.precision > 0 and work[i].cut is None]
        backend_job = self._sampled.run([coerced[i] for i in plain_sampled]) if plain_sampled else None
        if not exact and not cut_sampled:
            return backend_job  # type: ignore[return-value]  # Qiskit's job on the cluster's backend
        exact_job = self._estimate([work[i] for i in exact]) if exact else None
        sampled_job = self._sample([work[i] for i in cut_sampled]) if cut_sampled else None

        main_job = exact_job or sampled_job

        def build(main: JobResult | None) -> PrimitiveResult[PubResult]:
            out: dict[int, PubResult] = {}
            metadata: dict[str, Any] = {"version": 2, "seed": self._options.seed, "shards": 0, "nodes_used": []}
            for job, indices in ((exact_job, exact), (sampled_job, cut_sampled)):
                if job is None:
                    continue
                result = main if job is main_job and main is not None else job.result()
                start = 0
                for index in indices:
                    item = work[index]
                    out[index] = item.pub_result(result.results[start : start + len(item.circuits)])
                    start += len(item.circuits)
                metadata.setdefault("job_id", result.job_id)
                metadata.update(seed=result.seed, shards=metadata["shards"] + result.status.shards_total,
                                nodes_used=sorted({*metadata["nodes_used"], *result.nodes_used}))
            if backend_job is not None:
                out.update(zip(plain_sampled, backend_job.result()))
            return PrimitiveResult([out[i] for i in range(len(coerced))], metadata=metadata)

        return QScalePrimitiveJob(main_job, build)

    def _widest_statevector(self) -> int:
        """The widest statevector a live node holds (0: no node to judge by)."""
        return max((n.max_statevector_qubits for n in self._client.nodes() if n.state == "alive"), default=0)

    def _estimate(self, work: list[_Pub]) -> Job:
        """One estimator job for the exact pubs: each pub's circuit, or its cut's subexperiments."""
        try:
            return self._client.estimate([c for item in work for c in item.circuits],
                                         [o for item in work for o in item.observables],
                                         parameter_values=[r for item in work for r in item.circuit_rows],
                                         seed=self._options.seed, method=self._options.method,
                                         noise_model=self._options.noise_model, priority=self._options.priority)
        except NoCapableNodeError as exc:
            reasons = "; ".join(f"{item.cut_error}" for item in work if item.cut_error)
            if reasons:
                raise NoCapableNodeError(f"{exc}; cutting was tried: {reasons}") from None
            raise

    def _sample(self, work: list[_Pub]) -> Job:
        """One sampling job for the cut pubs at precision > 0: each subexperiment with its final
        measurements, shots in proportion to its weight in the reconstruction."""
        circuits, shots, rows = [], [], []
        for item in work:
            assert item.cut is not None
            circuits.extend(item.cut.sampling_circuits())
            shots.extend(item.cut.shots_for(item.pub.precision))
            rows.extend(item.circuit_rows)
        return self._client.submit(circuits, shots=shots, seed=self._options.seed, parameter_values=rows,
                                   priority=self._options.priority)


@dataclass
class _Pub:
    """One pub as cluster work: its circuit (or the subexperiments of its cut), the distinct
    Paulis of its observables, and each circuit's parameter rows."""

    pub: EstimatorPub
    paulis: tuple[str, ...]
    rows: np.ndarray
    """Parameter sets x parameters (``circuit.parameters`` order), flattened in C order."""
    circuits: list[QuantumCircuit]
    observables: list[tuple[str, ...]]
    circuit_rows: list[np.ndarray | None]
    """Each circuit's parameter rows; None for a circuit without parameters (computed once and
    broadcast over the pub's rows)."""
    cut: CutPlan | None = None
    cut_error: str = ""
    """Why the circuit was not cut although no node's statevector holds it."""

    @classmethod
    def build(cls, pub: EstimatorPub, widest: int, options: EstimatorOptions) -> _Pub:
        circuit = pub.circuit
        if any(inst.name == "measure" for inst in circuit.data):
            circuit = circuit.remove_final_measurements(inplace=False)
        paulis = tuple(sorted({label for terms in pub.observables.ravel() for label in terms}))
        num_sets = math.prod(pub.parameter_values.shape)
        if circuit.num_parameters:
            rows = np.asarray(pub.parameter_values.as_array(circuit.parameters), dtype=float)
            rows = rows.reshape(num_sets, circuit.num_parameters)
        else:
            rows = np.zeros((num_sets, 0))
        item = cls(pub, paulis, rows, [circuit], [paulis], [rows if circuit.num_parameters else None])
        if 0 < widest < circuit.num_qubits and options.noise_model is None and options.method == "automatic" \
                and not {inst.name for inst in circuit.data} <= CLIFFORD_OPS:
            item._try_cut(circuit, widest, options.max_subexperiments)
        return item

    def _try_cut(self, circuit: QuantumCircuit, widest: int, budget: int) -> None:
        from qscale.cutting import plan_cuts

        try:
            plan = plan_cuts(circuit, self.paulis, widest, max_subexperiments=budget)
        except FailedPreconditionError as exc:
            self.cut_error = str(exc)
            return
        self.cut = plan
        self.circuits = [s.circuit for s in plan.subexperiments]
        self.observables = [s.paulis for s in plan.subexperiments]
        self.circuit_rows = [r if r.shape[1] else None
                             for r in plan.subexperiment_rows(self.rows, circuit.parameters)]

    def _per_row(self, array: np.ndarray) -> np.ndarray:
        """``array`` with one row per parameter set (a circuit without parameters has one)."""
        return np.broadcast_to(array, (len(self.rows), array.shape[1]))

    def pub_result(self, results: list) -> PubResult:
        """The pub's result from its circuits' results: exact values (``stds`` 0) or, for a cut
        sampled at precision > 0, the reconstruction from counts with its standard errors."""
        stds = None
        if self.cut is None:
            values = results[0].expectation_values
        elif self.pub.precision == 0:
            values = self._per_row(self.cut.reconstruct([self._per_row(r.expectation_values) for r in results]))
        else:
            values, stds = self._sampled_values(results)
        return self._combine(values, stds)

    def _sampled_values(self, results: list) -> tuple[np.ndarray, np.ndarray]:
        """Values and standard errors per parameter set, from each subexperiment's counts."""
        assert self.cut is not None
        rows = [[r.sets[min(k, len(r.sets) - 1)].counts for r in results] for k in range(len(self.rows))]
        pairs = [self.cut.reconstruct_sampled(counts) for counts in rows]
        return np.array([v for v, _ in pairs]), np.array([e for _, e in pairs])

    def _combine(self, values: np.ndarray, stds: np.ndarray | None) -> PubResult:
        """``evs`` of the pub's observables from the values of its Paulis, summed term by term in
        the order qiskit-aer's ``EstimatorV2`` sums them (and ``stds`` as if the terms were
        independent)."""
        column = {label: j for j, label in enumerate(self.paulis)}
        pub = self.pub
        param_shape = pub.parameter_values.shape
        rows = np.arange(math.prod(param_shape)).reshape(param_shape)
        observables = np.asarray(pub.observables)  # an object array of {label: coefficient}
        which = np.arange(observables.size).reshape(observables.shape)
        row_of, obs_of = np.broadcast_arrays(rows, which)
        evs = np.zeros(row_of.shape, dtype=float)
        variances = np.zeros(row_of.shape, dtype=float)
        for k, terms in enumerate(observables.ravel()):
            mask = obs_of == k
            picked = row_of[mask]
            total = np.zeros(picked.shape, dtype=float)
            variance = np.zeros(picked.shape, dtype=float)
            for label, coeff in terms.items():
                total += values[picked, column[label]] * coeff
                if stds is not None:
                    variance += (stds[picked, column[label]] * coeff) ** 2
            evs[mask] = total
            variances[mask] = variance
        metadata: dict[str, Any] = {"target_precision": float(pub.precision), "circuit_metadata": pub.circuit.metadata}
        if self.cut is not None:
            metadata["cutting"] = self.cut.metadata()
            if stds is not None:
                metadata["cutting"]["shots"] = sum(self.cut.shots_for(pub.precision))
        return PubResult(DataBin(evs=evs, stds=np.sqrt(variances), shape=evs.shape), metadata=metadata)
