"""Validation of submitted jobs: every circuit is decoded (QPY) or parsed (OpenQASM), checked
against the limits, and summarised for the planner before anything is stored; parameter
values, shots and the noise model are checked too.

CPU-bound; the servicer runs it in a worker thread so heartbeats are never held up by a big
submission.
"""

from __future__ import annotations

import json
import secrets
import warnings
from dataclasses import dataclass, replace

import numpy as np
from qiskit import QuantumCircuit

from qscale.circuits import (
    METHODS,
    CircuitInfo,
    describe,
    dump_qpy,
    load_qpy,
    pack_parameter_values,
    parse_qasm,
    qpy_version,
    unpack_parameter_values,
)
from qscale.coordinator.config import Limits
from qscale.errors import InvalidArgumentError
from qscale.proto.v1 import common_pb2, jobs_pb2

__all__ = ["PreparedJob", "prepare_job", "check_noise_model", "MAX_SEED"]

MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True)
class PreparedJob:
    """A submission that passed validation, ready for the scheduler."""

    infos: list[CircuitInfo]
    qpy: list[bytes]
    shots: list[int]
    """Shots per parameter set, per circuit."""
    params: list[common_pb2.ParameterValues | None]
    """Parameter values per circuit, columns in ``CircuitInfo.parameters`` order."""
    seed: int
    method: str
    memory: bool = False
    noise_model: str = ""


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
    method = request.method or "automatic"
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown simulation method {method[:40]!r}; choose one of {', '.join(METHODS)}")
    if request.HasField("seed"):
        if request.seed > MAX_SEED:
            raise InvalidArgumentError(f"seed must be below 2**63, got {request.seed}")
        seed = request.seed
    else:
        seed = secrets.randbits(63)
    noise_model = check_noise_model(request.noise_model, limits) if request.noise_model else ""
    infos: list[CircuitInfo] = []
    payloads: list[bytes] = []
    shots: list[int] = []
    params: list[common_pb2.ParameterValues | None] = []
    experiments = 0
    for index, source in enumerate(request.circuits):
        try:
            circuit_shots = source.shots or request.shots
            if not 1 <= circuit_shots <= limits.max_shots:
                raise InvalidArgumentError(f"shots must be between 1 and {limits.max_shots}, got {circuit_shots}")
            circuit, payload = _decode(source, limits)
            info = replace(describe(circuit, source.name[:200]), qpy_version=qpy_version(payload))
            _check(circuit, info, limits)
            values = _parameters(source, info)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"circuit {index}: {exc}") from None
        experiments += values.num_sets if values is not None else 1
        if experiments > limits.max_experiments:
            raise InvalidArgumentError(f"a job may hold at most {limits.max_experiments} experiments "
                                       "(circuits x parameter sets)")
        infos.append(info)
        payloads.append(payload)
        shots.append(circuit_shots)
        params.append(values)
    return PreparedJob(infos, payloads, shots, params, seed, method, request.memory, noise_model)


def check_noise_model(text: str, limits: Limits) -> str:
    """Validate a JSON noise model (``NoiseModel.to_dict(serializable=True)``); returns it unchanged."""
    if len(text) > limits.max_noise_model_bytes:
        raise InvalidArgumentError(f"noise model is {len(text)} bytes; the limit is {limits.max_noise_model_bytes}")
    try:
        data = json.loads(text)
        from qiskit_aer.noise import NoiseModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            NoiseModel.from_dict(data)
    except Exception as exc:  # any failure is the payload's fault
        raise InvalidArgumentError(f"invalid noise model: {type(exc).__name__}") from None
    return text


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


def _parameters(source: jobs_pb2.CircuitSource, info: CircuitInfo) -> common_pb2.ParameterValues | None:
    """The source's parameter values with columns in the circuit's parameter order, or None."""
    if not source.HasField("parameters"):
        if info.parameters:
            names = ", ".join(info.parameters[:5])
            raise InvalidArgumentError(f"unbound parameters ({names}); give values for them")
        return None
    given = source.parameters
    names = list(given.names)
    if sorted(names) != sorted(info.parameters) or len(set(names)) != len(names):
        raise InvalidArgumentError(
            f"parameter values name {sorted(names)[:5]} but the circuit has {sorted(info.parameters)[:5]}")
    if given.num_sets < 1:
        raise InvalidArgumentError("parameter values need at least one set")
    values = unpack_parameter_values(names, given.num_sets, given.values)
    order = [names.index(name) for name in info.parameters]
    names, num_sets, data = pack_parameter_values(info.parameters, np.ascontiguousarray(values[:, order]))
    return common_pb2.ParameterValues(names=names, num_sets=num_sets, values=data)
