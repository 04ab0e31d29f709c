"""The Qiskit sampler on a qscale cluster, :class:`SamplerV2`, and the job both primitives
return (:class:`QScalePrimitiveJob`; the estimator is in :mod:`qscale.estimator`).

``SamplerV2`` sends each pub's circuit once with its parameter values; the sets are spread
over the nodes and every shot's outcome comes back, so results are ``BitArray``s shaped like
the pub's bindings, with samples in shot order.
"""

from __future__ import annotations

import math
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
from qiskit.primitives import (
    BasePrimitiveJob,
    BaseSamplerV2,
    BitArray,
    DataBin,
    PrimitiveResult,
    SamplerPubResult,
)
from qiskit.primitives.containers.sampler_pub import SamplerPub, SamplerPubLike
from qiskit.providers import JobStatus

from qscale.backend import _STATUS
from qscale.client import Client, Job, check_priority, check_shots
from qscale.errors import InvalidArgumentError
from qscale.results import JobResult

if TYPE_CHECKING:
    from qiskit_aer.noise import NoiseModel

__all__ = ["SamplerV2", "SamplerOptions", "QScalePrimitiveJob"]

_R = TypeVar("_R")


@dataclass(frozen=True)
class SamplerOptions:
    """Options of :class:`SamplerV2`."""

    default_shots: int = 1024
    """Shots per pub when neither the pub nor ``run`` gives any (an integer, checked by
    :func:`qscale.client.check_shots`)."""
    seed: int | None = None
    """Job seed: the same seed gives the same BitArrays on any number of nodes."""
    method: str = "automatic"
    """qiskit-aer simulation method."""
    noise_model: NoiseModel | None = None
    """A qiskit-aer noise model (sent as JSON), or None for noiseless sampling."""
    priority: str | int = "normal"
    """The jobs' priority class: ``low``, ``normal`` or ``high`` (checked by
    :func:`qscale.client.check_priority`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "default_shots", check_shots(self.default_shots, "default_shots"))
        check_priority(self.priority)


class QScalePrimitiveJob(BasePrimitiveJob[_R, JobStatus], Generic[_R]):
    """A primitive job backed by one cluster job; ``job_id()`` is the cluster's job id.

    ``job`` None: nothing had to go to the cluster (every pub's result is known without
    simulating, e.g. circuits without classical registers); the job is done at once and its id
    is ``job_id``.
    """

    def __init__(self, job: Job | None, build: Callable[[JobResult | None], _R], *, job_id: str = "") -> None:
        super().__init__(job.job_id if job is not None else job_id)
        self.qscale_job = job
        self._build = build
        self._result: _R | None = None

    def result(self, timeout: float | None = None) -> _R:
        """Block until the cluster job is done; raises ``qscale.JobFailedError`` if it failed."""
        if self._result is None:
            self._result = self._build(None if self.qscale_job is None else self.qscale_job.result(timeout))
        return self._result

    def status(self) -> JobStatus:
        if self.qscale_job is None:
            return JobStatus.DONE
        return _STATUS[self.qscale_job.status().state]

    def done(self) -> bool:
        return self.status() == JobStatus.DONE

    def running(self) -> bool:
        return self.status() == JobStatus.RUNNING

    def cancelled(self) -> bool:
        return self.status() == JobStatus.CANCELLED

    def in_final_state(self) -> bool:
        return self.status() in (JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED)

    def cancel(self) -> None:
        if self.qscale_job is not None:
            self.qscale_job.cancel()


class SamplerV2(BaseSamplerV2):
    """``BaseSamplerV2`` on a qscale cluster.

    As Qiskit's samplers do, a classical register that nothing measures reads all zeros, and a
    pub whose circuit has no classical register gives an empty ``DataBin`` (with a
    ``UserWarning``) without going to the cluster.

    Args:
        client: a connected :class:`qscale.Client`.
        default_shots: shots per pub when neither the pub nor ``run`` gives any.
        seed: job seed for reproducible samples.
        options: further :class:`SamplerOptions` (or a dict of them); they win over the
            keyword arguments.

    Example::

        sampler = qscale.SamplerV2(client, seed=1)
        result = sampler.run([(circuit, parameter_values)], shots=1000).result()
        result[0].data.meas.get_counts()
    """

    def __init__(self, client: Client, *, default_shots: int = 1024, seed: int | None = None,
                 options: SamplerOptions | dict[str, Any] | None = None) -> None:
        given = vars(options) if isinstance(options, SamplerOptions) else dict(options or {})
        self._client = client
        self._options = SamplerOptions(**{"default_shots": default_shots, "seed": seed, **given})

    @property
    def options(self) -> SamplerOptions:
        return self._options

    @property
    def default_shots(self) -> int:
        """Shots per pub when neither the pub nor ``run`` gives any (as Qiskit's samplers)."""
        return self._options.default_shots

    @property
    def seed(self) -> int | None:
        """The job seed, or None for a fresh one per job (as Qiskit's samplers)."""
        return self._options.seed

    def run(self, pubs: Iterable[SamplerPubLike], *, shots: int | None = None
            ) -> QScalePrimitiveJob[PrimitiveResult[SamplerPubResult]]:
        """Sample the pubs as one cluster job; returns at once.

        Shots come from the pub, else ``shots``, else :attr:`default_shots`; each must be an
        integer (:func:`qscale.client.check_shots`).

        Raises:
            InvalidArgumentError: bad shots, or no pub.
            ValueError: a pub Qiskit's ``SamplerPub`` refuses (e.g. values that do not fit).
        """
        shots = self._options.default_shots if shots is None else check_shots(shots)
        coerced = [_coerce_pub(pub, shots, i) for i, pub in enumerate(pubs)]
        if not coerced:
            raise InvalidArgumentError("run needs at least one pub")
        for i, pub in enumerate(coerced):
            if not pub.circuit.cregs:
                warnings.warn(f"pub {i}: the circuit has no classical register, so its result is empty; "
                              "did you mean to add measurements?", UserWarning, stacklevel=2)
        # Only pubs with classical bits to read need simulating; the others' results are empty.
        sampled = [i for i, pub in enumerate(coerced) if any(creg.size for creg in pub.circuit.cregs)]
        seed = self._options.seed
        if not sampled:
            local_id = f"local-{uuid.uuid4().hex}"
            return QScalePrimitiveJob(None, lambda _: _sampler_result(coerced, sampled, None, local_id, seed),
                                      job_id=local_id)
        job = self._client.submit([coerced[i].circuit for i in sampled], shots=[coerced[i].shots for i in sampled],
                                  seed=seed, method=self._options.method,
                                  parameter_values=[_flat_values(coerced[i]) for i in sampled], memory=True,
                                  noise_model=self._options.noise_model, priority=self._options.priority)
        return QScalePrimitiveJob(job, lambda result: _sampler_result(coerced, sampled, result, job.job_id, seed))


def _coerce_pub(pub: SamplerPubLike, shots: int, index: int) -> SamplerPub:
    """Qiskit's ``SamplerPub.coerce``, with the pub's own shots checked by :func:`check_shots`
    (an :class:`InvalidArgumentError`, not Qiskit's ``TypeError``) and made a Python ``int``."""
    own = pub.shots if isinstance(pub, SamplerPub) else \
        pub[2] if isinstance(pub, (tuple, list)) and len(pub) == 3 else None
    if own is not None:
        check_shots(own, f"pub {index} shots")
    coerced = SamplerPub.coerce(pub, shots)
    if type(coerced.shots) is not int:
        coerced = SamplerPub(coerced.circuit, coerced.parameter_values, check_shots(coerced.shots), validate=False)
    return coerced


def _flat_values(pub: SamplerPub) -> np.ndarray:
    """The pub's bindings as rows (sets) x columns (``circuit.parameters`` order)."""
    num_sets = math.prod(pub.shape)
    if pub.circuit.num_parameters == 0:
        return np.zeros((num_sets, 0))
    array = pub.parameter_values.as_array(pub.circuit.parameters)
    return np.asarray(array, dtype=float).reshape(num_sets, pub.circuit.num_parameters)


def _register_bytes(rows: np.ndarray, positions: list[int]) -> np.ndarray:
    """One register's bits of every shot in ``BitArray``'s layout (``ceil(k / 8)`` bytes a shot,
    big-endian, register bit 0 the lowest), from per-shot memory ``rows`` (one row of
    little-endian bytes a shot, clbit 0 the lowest). A register of consecutive clbits, the usual
    case, is shifted or sliced out of the packed bytes; only another layout unpacks bits."""
    k, width = len(positions), rows.shape[1]
    start = positions[0] if positions else 0
    nbytes = -(-k // 8)
    if positions == list(range(start, start + k)):
        if width <= 8:  # the whole outcome fits in a uint64: shift and mask
            padded = np.zeros((rows.shape[0], 8), dtype=np.uint8)
            padded[:, :width] = rows
            mask = np.uint64((1 << k) - 1)
            values = (padded.view("<u8").ravel() >> np.uint64(start)) & mask
            return values.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - nbytes:]
        if start % 8 == 0:
            part = rows[:, start // 8 : start // 8 + nbytes].copy()
            if k % 8:
                part[:, -1] &= (1 << (k % 8)) - 1
            return part[:, ::-1]
    bits = np.unpackbits(rows, axis=1, bitorder="little")[:, positions].astype(bool)
    return BitArray.from_bool_array(bits, order="little").array


def _sampler_result(pubs: list[SamplerPub], sampled: list[int], result: JobResult | None, job_id: str,
                    seed: int | None) -> PrimitiveResult[SamplerPubResult]:
    """The primitive result: ``result`` holds the circuits of the pubs ``sampled``, in order
    (None when no pub went to the cluster); the other pubs have only registers of no bits."""
    by_pub = dict(zip(sampled, result.results)) if result is not None else {}
    pub_results = []
    for index, pub in enumerate(pubs):
        circuit_result = by_pub.get(index)
        data = {}
        if circuit_result is None:
            for creg in pub.circuit.cregs:  # none, or only registers of no bits
                data[creg.name] = BitArray(np.zeros((*pub.shape, pub.shots, 0), dtype=np.uint8), 0)
        else:
            width = circuit_result.memory_width
            rows = np.frombuffer(b"".join(x.memory for x in circuit_result.sets), dtype=np.uint8).reshape(-1, width)
            for creg in pub.circuit.cregs:
                positions = [pub.circuit.find_bit(bit).index for bit in creg]
                packed = _register_bytes(rows, positions)
                data[creg.name] = BitArray(packed.reshape(*pub.shape, pub.shots, packed.shape[-1]), len(positions))
        pub_results.append(SamplerPubResult(DataBin(**data, shape=pub.shape),
                                            metadata={"shots": pub.shots, "circuit_metadata": pub.circuit.metadata}))
    if result is None:
        return PrimitiveResult(pub_results, metadata={"version": 2, "job_id": job_id, "seed": seed, "shards": 0,
                                                      "nodes_used": []})
    return PrimitiveResult(pub_results, metadata={"version": 2, "job_id": result.job_id, "seed": result.seed,
                                                  "shards": result.status.shards_total,
                                                  "nodes_used": result.nodes_used})
