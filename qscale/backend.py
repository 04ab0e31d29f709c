"""``QScaleBackend``: a Qiskit ``BackendV2`` whose ``run`` spreads circuits over a qscale cluster.

Existing Qiskit code runs on it unchanged, Qiskit's own ``BackendSamplerV2`` and
``BackendEstimatorV2`` included::

    backend = qscale.QScaleBackend(client)
    counts = backend.run(circuits, shots=4000, seed_simulator=7).result().get_counts()
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from qiskit import QuantumCircuit
from qiskit.providers import BackendV2, JobStatus, JobV1, Options
from qiskit.result import Result
from qiskit.transpiler import Target

from qscale._version import __version__
from qscale.circuits import METHODS
from qscale.client import Client, Job, check_priority, check_shots
from qscale.errors import InvalidArgumentError
from qscale.outcomes import Outcomes
from qscale.results import CircuitResult, JobResult, JobState

__all__ = ["QScaleBackend", "QScaleBackendJob", "DEFAULT_NUM_QUBITS"]

#: The coordinator's default qubit limit. The nodes' real capacity depends on the method
#: (a statevector of n qubits needs 16 * 2**n bytes; stabilizer and MPS circuits go far wider)
#: and is checked when a job is submitted.
DEFAULT_NUM_QUBITS = 1024

_STATUS = {
    JobState.QUEUED: JobStatus.QUEUED,
    JobState.RUNNING: JobStatus.RUNNING,
    JobState.DONE: JobStatus.DONE,
    JobState.FAILED: JobStatus.ERROR,
    JobState.CANCELLED: JobStatus.CANCELLED,
}


def cluster_target(num_qubits: int = DEFAULT_NUM_QUBITS) -> Target:
    """Every operation qiskit-aer simulates, on every qubit: no coupling restrictions."""
    from qiskit_aer import AerSimulator

    aer = AerSimulator().target
    target = Target(description="qscale cluster of qiskit-aer simulators", num_qubits=num_qubits)
    for name in aer.operation_names:
        target.add_instruction(aer.operation_from_name(name), name=name)
    return target


class QScaleBackend(BackendV2):
    """A Qiskit backend backed by a qscale cluster.

    Args:
        client: a connected :class:`qscale.Client`.
        num_qubits: the target's width (default :data:`DEFAULT_NUM_QUBITS`).
        **options: default run options (``shots``, ``seed_simulator``, ``memory``, ``method``,
            ``noise_model``, ``priority``).
    """

    def __init__(self, client: Client, *, num_qubits: int = DEFAULT_NUM_QUBITS, **options: Any) -> None:
        super().__init__(name="qscale", description=f"qscale cluster at {client.address}",
                         backend_version=__version__)
        self._client = client
        self._target = cluster_target(num_qubits)
        if options:
            self.set_options(**options)

    @classmethod
    def _default_options(cls) -> Options:
        options = Options(shots=1024, seed_simulator=None, memory=False, method="automatic", noise_model=None,
                          priority="normal")
        options.set_validator("shots", (1, 100_000_000))
        options.set_validator("method", list(METHODS))
        return options

    def set_options(self, **fields: Any) -> None:
        """Change default run options; ``shots`` must be an integer (:func:`qscale.client.check_shots`),
        ``priority`` ``low``, ``normal`` or ``high`` (:func:`qscale.client.check_priority`)."""
        if "shots" in fields:
            fields["shots"] = check_shots(fields["shots"])
        if "priority" in fields:
            check_priority(fields["priority"])
        super().set_options(**fields)

    @property
    def target(self) -> Target:
        return self._target

    @property
    def max_circuits(self) -> None:
        """No limit here; the coordinator caps circuits per job (100,000 by default)."""
        return None

    @property
    def client(self) -> Client:
        return self._client

    def run(self, run_input: QuantumCircuit | Sequence[QuantumCircuit], **options: Any) -> QScaleBackendJob:
        """Submit circuits as one cluster job; returns at once.

        Options: ``shots`` (an integer, :func:`qscale.client.check_shots`), ``seed_simulator``,
        ``memory`` (per-shot outcomes in the result),
        ``method`` (Aer method), ``noise_model`` (a qiskit-aer ``NoiseModel``) and ``priority``
        (``low``, ``normal`` or ``high``: :func:`qscale.client.check_priority`).
        """
        unknown = set(options) - set(self.options.__dict__)
        if unknown:
            raise InvalidArgumentError(f"unknown run options {sorted(unknown)}; "
                                       f"valid: {sorted(self.options.__dict__)}")
        opts = {**self.options.__dict__, **options}
        shots = check_shots(opts["shots"])
        circuits = [run_input] if isinstance(run_input, QuantumCircuit) else list(run_input)
        job = self._client.submit(circuits, shots=shots, seed=opts["seed_simulator"],
                                  method=opts["method"], memory=bool(opts["memory"]),
                                  noise_model=opts["noise_model"], priority=opts["priority"])
        return QScaleBackendJob(self, job, circuits)


class QScaleBackendJob(JobV1):
    """A cluster job seen as a Qiskit ``JobV1``; ``result()`` is a ``qiskit.result.Result``."""

    def __init__(self, backend: QScaleBackend, job: Job, circuits: list[QuantumCircuit]) -> None:
        super().__init__(backend, job.job_id)
        self.qscale_job = job
        self._circuits = circuits
        self._result: Result | None = None

    def submit(self) -> None:
        raise InvalidArgumentError("the job was submitted by QScaleBackend.run")

    def result(self, timeout: float | None = None) -> Result:
        """Block until the job is done and return its ``Result`` (counts; memory if asked for)."""
        if self._result is None:
            self._result = _to_qiskit_result(self._backend, self.qscale_job.result(timeout), self._circuits)
        return self._result

    def status(self) -> JobStatus:
        return _STATUS[self.qscale_job.status().state]

    def cancel(self) -> bool:
        return self.qscale_job.cancel().state == JobState.CANCELLED


def _hex_memory(result: CircuitResult) -> list[str]:
    return list(map(hex, Outcomes.from_memory(result.sets[0].memory, result.memory_width).integers()))


def _to_qiskit_result(backend: BackendV2, result: JobResult, circuits: list[QuantumCircuit]) -> Result:
    experiments = []
    for circuit, r in zip(circuits, result.results):
        data: dict[str, Any] = {"counts": r.outcomes.hex_dict()}  # Aer's keys, from the packed outcomes
        if r.sets and r.sets[0].memory:
            data["memory"] = _hex_memory(r)
        experiments.append({
            "shots": r.shots,
            "success": True,
            "status": "DONE",
            "data": data,
            "seed_simulator": result.seed,
            "metadata": {"method": r.method},  # the method that ran, as in Aer's own results
            "header": {
                "name": circuit.name,
                "n_qubits": circuit.num_qubits,
                "memory_slots": circuit.num_clbits,
                "creg_sizes": [[reg.name, reg.size] for reg in circuit.cregs],
                "qreg_sizes": [[reg.name, reg.size] for reg in circuit.qregs],
                "metadata": dict(circuit.metadata or {}),
            },
        })
    return Result.from_dict({
        "backend_name": backend.name,
        "backend_version": backend.backend_version,
        "qobj_id": str(uuid.uuid4()),
        "job_id": result.job_id,
        "success": True,
        "status": "DONE",
        "date": datetime.now(timezone.utc).isoformat(),
        "results": experiments,
        "metadata": {"shards": result.status.shards_total, "nodes_used": result.nodes_used,
                     "wall_time_s": result.wall_time_s},
    })
