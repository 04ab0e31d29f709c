"""Validation of submitted jobs: every circuit is decoded (QPY) or parsed (OpenQASM), checked
against the limits and the operation allow-list, and summarised for the planner before anything
is stored; parameter values, shots and the noise model are checked too.

Untrusted bytes are decoded in the sandbox (:mod:`qscale.coordinator.sandbox`), never in the
coordinator's process: a payload that would exhaust memory or crash a parser costs an error
message. This module checks what is cheap (counts, sizes, shots) before sending anything there.
The servicer runs it in a worker thread so heartbeats are never held up by a big submission.
"""

from __future__ import annotations

import secrets
import time
import uuid

import numpy as np

from qscale.circuits import METHODS, CircuitInfo, check_pauli_labels, pack_parameter_values, unpack_parameter_values
from qscale.coordinator import sandbox
from qscale.coordinator.config import Limits
from qscale.coordinator.jobs import Job
from qscale.coordinator.planner import PlanningPolicy, shards_for_cap
from qscale.errors import InvalidArgumentError
from qscale.proto.v1 import common_pb2, jobs_pb2

__all__ = ["prepare_job", "check_noise_model", "MAX_SEED", "MAX_REQUESTED_SHARDS"]

MAX_SEED = (1 << 63) - 1
MAX_REQUESTED_SHARDS = 10_000
"""Most shards a job's own ``shots_per_shard`` may cut it into (the planner alone cuts a job of
hours of work into a few hundred): beyond, per-shard overhead and bookkeeping dominate."""


def prepare_job(request: jobs_pb2.SubmitRequest, limits: Limits,
                decoder: sandbox.Decoder | None = None) -> Job:
    """Validate a submission and decode its circuits; returns the new job (not yet planned).

    ``decoder`` decodes and checks the circuits and the noise model; by default the sandbox pool
    for ``limits`` (:func:`qscale.coordinator.sandbox.pool_for`).

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
        raise InvalidArgumentError(f"unknown simulation method; choose one of {', '.join(METHODS)}")
    if request.HasField("seed"):
        if request.seed > MAX_SEED:
            raise InvalidArgumentError(f"seed must be below 2**63, got {request.seed}")
        seed = request.seed
    else:
        seed = secrets.randbits(63)
    if request.shots_per_shard < 0:
        raise InvalidArgumentError(f"shots_per_shard must be 1 or more (0: the coordinator's setting), "
                                   f"got {request.shots_per_shard}")
    if len(request.noise_model) > limits.max_noise_model_bytes:
        raise InvalidArgumentError(
            f"noise model is {len(request.noise_model)} bytes; the limit is {limits.max_noise_model_bytes}")
    estimator = any(source.observables for source in request.circuits)
    if estimator:
        _check_estimator_request(request, limits)
    sources: list[sandbox.Source] = []
    shots: list[int] = []
    experiments = 0
    for index, source in enumerate(request.circuits):
        try:
            # An estimator experiment is one exact simulation: it has no shots.
            circuit_shots = 1 if estimator else source.shots or request.shots
            if not 1 <= circuit_shots <= limits.max_shots:
                raise InvalidArgumentError(f"shots must be between 1 and {limits.max_shots}, got {circuit_shots}")
            sources.append(_source(source, limits))
            sets = source.parameters.num_sets if source.HasField("parameters") else 1
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"circuit {index}: {exc}") from None
        experiments += max(1, sets)
        if experiments > limits.max_experiments:
            raise InvalidArgumentError(f"a job may hold at most {limits.max_experiments} experiments "
                                       "(circuits x parameter sets)")
        shots.append(circuit_shots)
    decoded = (decoder or sandbox.pool_for(limits)).decode(sources, limits, noise_model=request.noise_model)
    infos: list[CircuitInfo] = []
    payloads: list[bytes] = []
    params: list[common_pb2.ParameterValues | None] = []
    observables: list[tuple[str, ...]] = []
    for index, (source, result) in enumerate(zip(request.circuits, decoded)):
        try:
            _check(result.info, limits, estimator, bool(request.noise_model))
            values = _parameters(source, result.info)
            if estimator:
                observables.append(check_pauli_labels(source.observables, result.info.num_qubits))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"circuit {index}: {exc}") from None
        infos.append(result.info)
        payloads.append(source.qpy if result.qpy is None else result.qpy)
        params.append(values)
    if request.shots_per_shard:
        sets = [p.num_sets if p is not None else 1 for p in params]
        shards = shards_for_cap(infos, shots, sets, method, request.shots_per_shard, noisy=bool(request.noise_model),
                                estimator=estimator)
        if shards > MAX_REQUESTED_SHARDS:
            raise InvalidArgumentError(
                f"shots_per_shard {request.shots_per_shard} would cut the job into {shards:,} shards; a job may ask "
                f"for at most {MAX_REQUESTED_SHARDS:,} shards this way: give a larger value")
    return Job(uuid.uuid4().hex[:16], time.time(), seed, method, PlanningPolicy(), infos, shots, params, payloads,
               memory=request.memory, noise_model=request.noise_model, observables=observables)


def _check_estimator_request(request: jobs_pb2.SubmitRequest, limits: Limits) -> None:
    """The cheap checks of an estimator job: observables on every circuit, within the caps."""
    values = 0
    for index, source in enumerate(request.circuits):
        count = len(source.observables)
        if count == 0:
            raise InvalidArgumentError(f"circuit {index} has no observables, but other circuits of the job do: "
                                       "an estimator job gives observables for every circuit")
        if count > limits.max_observables:
            raise InvalidArgumentError(f"circuit {index}: {count} observables; the limit is {limits.max_observables}")
        values += count * (source.parameters.num_sets if source.HasField("parameters") else 1)
    if values > limits.max_expectation_values:
        raise InvalidArgumentError(f"the job asks for {values} expectation values (parameter sets x observables); "
                                   f"the limit is {limits.max_expectation_values}")
    if request.memory:
        raise InvalidArgumentError("an estimator job has no per-shot memory (memory must be false)")
    if request.noise_model and request.method not in ("", "automatic", "density_matrix"):
        raise InvalidArgumentError(f"exact expectation values with a noise model need the density_matrix method, "
                                   f"not {request.method!r} (whose noise is sampled by trajectories)")


def check_noise_model(text: str, limits: Limits, decoder: sandbox.Decoder | None = None) -> str:
    """Validate a JSON noise model (``NoiseModel.to_dict(serializable=True)``) in the sandbox;
    returns it unchanged."""
    if len(text) > limits.max_noise_model_bytes:
        raise InvalidArgumentError(f"noise model is {len(text)} bytes; the limit is {limits.max_noise_model_bytes}")
    (decoder or sandbox.pool_for(limits)).decode([], limits, noise_model=text)
    return text


def _source(source: jobs_pb2.CircuitSource, limits: Limits) -> sandbox.Source:
    """What the sandbox gets for one circuit, once the cheap checks passed."""
    name = source.name[:200]
    kind = source.WhichOneof("source")
    if kind == "qpy":
        if len(source.qpy) > limits.max_circuit_bytes:
            raise InvalidArgumentError(f"QPY payload is {len(source.qpy)} bytes; the limit is {limits.max_circuit_bytes}")
        return sandbox.Source("qpy", source.qpy, name)
    if kind == "qasm":
        if len(source.qasm) > limits.max_circuit_bytes:
            raise InvalidArgumentError(
                f"OpenQASM source is {len(source.qasm)} characters; the limit is {limits.max_circuit_bytes}")
        return sandbox.Source("qasm", source.qasm, name)
    raise InvalidArgumentError("empty: give QPY bytes or OpenQASM text")


def _check(info: CircuitInfo, limits: Limits, estimator: bool = False, noisy: bool = False) -> None:
    if info.num_qubits > limits.max_qubits:
        raise InvalidArgumentError(f"{info.num_qubits} qubits; the limit is {limits.max_qubits}")
    if info.num_qubits == 0:
        raise InvalidArgumentError("the circuit has no qubits")
    if estimator:
        # Exact expectation values are taken of the final state: a measurement, reset or
        # classical control would make it random.
        if info.measures or not info.final_measurements_only:
            raise InvalidArgumentError("exact expectation values need a circuit without measurements, resets or "
                                       "control flow (remove final measurements with "
                                       "circuit.remove_final_measurements())")
        if noisy and not info.density_matrix_ok:
            raise InvalidArgumentError("exact expectation values with a noise model need the density-matrix method, "
                                       "which does not simulate every instruction of this circuit; transpile it to "
                                       "basic gates, or ask for a sampled estimate (precision > 0)")
        return
    # Classical bits that nothing measures read 0, as in Qiskit's samplers and BasicSimulator
    # (the nodes fill in the all-zero outcome Aer leaves out); a circuit without classical bits
    # has no outcome at all.
    if info.num_clbits == 0:
        raise InvalidArgumentError("the circuit has no classical bits: it measures nothing, so there are no "
                                   "counts to return; add measurements (e.g. circuit.measure_all())")


def _parameters(source: jobs_pb2.CircuitSource, info: CircuitInfo) -> common_pb2.ParameterValues | None:
    """The source's parameter values with columns in the circuit's parameter order, or None."""
    if not source.HasField("parameters"):
        if info.parameters:
            raise InvalidArgumentError(f"unbound parameters ({_names(info.parameters)}); give values for them")
        return None
    given = source.parameters
    names = list(given.names)
    if sorted(names) != sorted(info.parameters) or len(set(names)) != len(names):
        raise InvalidArgumentError(
            f"parameter values name {_names(sorted(names))} but the circuit has {_names(sorted(info.parameters))}")
    if given.num_sets < 1:
        raise InvalidArgumentError("parameter values need at least one set")
    values = unpack_parameter_values(names, given.num_sets, given.values)
    column = {name: i for i, name in enumerate(names)}
    order = [column[name] for name in info.parameters]
    names, num_sets, data = pack_parameter_values(info.parameters, np.ascontiguousarray(values[:, order]))
    return common_pb2.ParameterValues(names=names, num_sets=num_sets, values=data)


def _names(names: list[str] | tuple[str, ...]) -> str:
    """Up to five parameter names, each cut short, for a message."""
    shown = [name if len(name) <= 40 else name[:37] + "..." for name in names[:5]]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
