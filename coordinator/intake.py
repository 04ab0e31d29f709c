"""Validation of submitted jobs: every circuit is decoded (QPY) or parsed (OpenQASM), checked
against the limits, and summarised for the planner before anything is stored.

CPU-bound; the servicer runs it in a worker thread so heartbeats are never held up by a big
submission.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from qiskit import QuantumCircuit

from qscale.circuits import METHODS, CircuitInfo, describe, dump_qpy, load_qpy, parse_qasm, qpy_version
from qscale.coordinator.config import Limits
from qscale.errors import InvalidArgumentError
from qscale.proto.v1 import jobs_pb2

__all__ = ["PreparedJob", "prepare_job", "MAX_SEED"]

MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True)
class PreparedJob:
    """A submission that passed validation, ready for the scheduler."""

    infos: list[CircuitInfo]
    qpy: list[bytes]
    shots: int
    seed: int
    method: str


def prepare_job(request: jobs_pb2.SubmitRequest, limits: Limits) -> PreparedJob:
    """Validate a submission and decode its circuits.

    Raises:
        InvalidArgumentError: with a message naming the offending circuit or field.
    """
    n = len(request.circuits)
    if n == 0:
        raise InvalidArgumentError("a job needs at least one circuit")
    if n > limits.max_circuits:
        raise InvalidArgumentError(f"a job may hold at most {limits.max_circuits} circuits, this one has {n}")
    if not 1 <= request.shots <= limits.max_shots:
        raise InvalidArgumentError(f"shots must be between 1 and {limits.max_shots}, got {request.shots}")
    method = request.method or "automatic"
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown simulation method {method[:40]!r}; choose one of {', '.join(METHODS)}")
    if request.HasField("seed"):
        if request.seed > MAX_SEED:
            raise InvalidArgumentError(f"seed must be below 2**63, got {request.seed}")
        seed = request.seed
    else:
        seed = secrets.randbits(63)
    infos: list[CircuitInfo] = []
    payloads: list[bytes] = []
    for index, source in enumerate(request.circuits):
        try:
            circuit, payload = _decode(source, limits)
            info = replace(describe(circuit, source.name[:200]), qpy_version=qpy_version(payload))
            _check(circuit, info, limits)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"circuit {index}: {exc}") from None
        infos.append(info)
        payloads.append(payload)
    return PreparedJob(infos, payloads, request.shots, seed, method)


def _decode(source: jobs_pb2.CircuitSource, limits: Limits) -> tuple[QuantumCircuit, bytes]:
    kind = source.WhichOneof("source")
    if kind == "qpy":
        return load_qpy(source.qpy, max_bytes=limits.max_circuit_bytes), source.qpy
    if kind == "qasm":
        circuit = parse_qasm(source.qasm, max_chars=limits.max_circuit_bytes)
        return circuit, dump_qpy(circuit)
    raise InvalidArgumentError("empty: give QPY bytes or OpenQASM text")


def _check(circuit: QuantumCircuit, info: CircuitInfo, limits: Limits) -> None:
    if info.num_qubits > limits.max_qubits:
        raise InvalidArgumentError(f"{info.num_qubits} qubits; the limit is {limits.max_qubits}")
    if info.num_qubits == 0:
        raise InvalidArgumentError("the circuit has no qubits")
    if not info.measures or info.num_clbits == 0:
        raise InvalidArgumentError("the circuit measures nothing, so there are no counts to return; "
                                   "add measurements (e.g. circuit.measure_all())")
    if circuit.parameters:
        names = ", ".join(sorted(p.name for p in circuit.parameters)[:5])
        raise InvalidArgumentError(f"unbound parameters ({names}); bind them before submitting")
