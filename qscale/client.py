"""The Python client: submit circuits to a qscale coordinator and follow the jobs."""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import os
import re
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from numpy.typing import ArrayLike
from qiskit import QuantumCircuit

from qscale.circuits import check_pauli_labels, dump_qpy, load_qpy, pack_parameter_values, parse_qasm
from qscale.errors import (
    InvalidArgumentError,
    JobCancelledError,
    JobFailedError,
    JobTimeoutError,
    UnavailableError,
)
from qscale.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from qscale.results import PRIORITIES, JobResult, JobState, JobStatus, NodeStatus, Progress, UserStatus
from qscale.rpc import DEFAULT_CONNECT_TIMEOUT_S
from qscale.rpc_status import translate_rpc_errors
from qscale.security import TLSConfig, make_channel
from qscale.settings import DEFAULT_ADDRESS, ClientSettings

if TYPE_CHECKING:
    from qiskit_aer.noise import NoiseModel

__all__ = ["Client", "Job", "DEFAULT_COORDINATOR", "MAX_SHOTS", "check_shots", "check_priority",
           "circuit_sources_from_file", "noise_model_json"]

DEFAULT_COORDINATOR = DEFAULT_ADDRESS
#: The most shots the wire format carries (a signed 64-bit field); each coordinator sets its
#: own, lower limit (``--max-shots``) and refuses more.
MAX_SHOTS = (1 << 63) - 1
_MAX_MESSAGE = 256 << 20
_QPY_SUFFIXES = (".qpy",)
_QASM_SUFFIXES = (".qasm", ".qasm2", ".qasm3", ".inc")
_DEFAULT_CIRCUIT_NAME = re.compile(r"circuit-\d+")  # what Qiskit names a circuit given no name
_CIRCUIT_ERROR = re.compile(r"circuit (\d+): (.*)", re.S)  # the coordinator's message about one circuit


def _file_circuit_name(own: str, stem: str, index: int, count: int) -> str:
    """A circuit's name in results: its own, else (Qiskit's default name, or none) the file's
    stem, with the circuit's index in the file when the file holds several."""
    if own and not _DEFAULT_CIRCUIT_NAME.fullmatch(own):
        return own
    return f"{stem}[{index}]" if count > 1 else stem


def circuit_sources_from_file(path: str | os.PathLike[str]) -> list[jobs_pb2.CircuitSource]:
    """Wire sources for a ``.qpy`` or OpenQASM 2/3 ``.qasm`` file (one per circuit in it).

    OpenQASM is sent as text and parsed by the coordinator; a QPY file with several circuits
    is split here into one payload per circuit. Each source is named as results will name the
    circuit: a QPY circuit by its own ``QuantumCircuit.name``; an OpenQASM circuit, or a QPY
    circuit with Qiskit's default name (``circuit-N``), by the file's stem (``bell`` for
    ``bell.qasm``), with its index (``pair[1]``) when the file holds several circuits.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix in _QPY_SUFFIXES:
            data = p.read_bytes()
            programs = struct.unpack_from("!Q", data, 10)[0] if len(data) >= 18 else 1
            from qiskit import qpy

            try:
                circuits = qpy.load(io.BytesIO(data))
            except Exception:
                if programs > 1:
                    raise
                # Sent as it is: the coordinator's decoder says what is wrong with it.
                return [jobs_pb2.CircuitSource(qpy=data, name=p.stem)]
            if len(circuits) == 1:
                return [jobs_pb2.CircuitSource(qpy=data, name=_file_circuit_name(circuits[0].name, p.stem, 0, 1))]
            return [jobs_pb2.CircuitSource(qpy=dump_qpy(c), name=_file_circuit_name(c.name, p.stem, i, len(circuits)))
                    for i, c in enumerate(circuits)]
        if suffix in _QASM_SUFFIXES:
            return [jobs_pb2.CircuitSource(qasm=p.read_text(encoding="utf-8"), name=p.stem)]
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read {p}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{p} is not UTF-8 text") from exc
    except Exception as exc:
        raise InvalidArgumentError(f"{p}: not a readable QPY file ({type(exc).__name__})") from exc
    raise InvalidArgumentError(f"{p}: unknown circuit file type {suffix!r}; use .qpy or .qasm")


def circuits_from_file(path: str | os.PathLike[str]) -> list[QuantumCircuit]:
    """The circuits of a ``.qpy`` or OpenQASM 2/3 ``.qasm`` file, decoded here (for work that
    needs the circuit itself on the client, such as estimator pubs and cutting)."""
    circuits = []
    for source in circuit_sources_from_file(path):
        circuit = load_qpy(source.qpy) if source.WhichOneof("source") == "qpy" else parse_qasm(source.qasm)
        circuit.name = source.name or circuit.name
        circuits.append(circuit)
    return circuits


def check_shots(value: object, what: str = "shots") -> int:
    """``value`` as a number of shots, or a clear :class:`~qscale.errors.InvalidArgumentError`.

    The one rule for every place users give shots (:meth:`Client.submit`, ``SamplerV2``,
    ``QScaleBackend``): a Python ``int`` or any integral type (``numpy.int64``, ``numpy.uint32``,
    ...) from 1 to :data:`MAX_SHOTS`; never a ``bool``, a float (even ``5.0``), a string or
    anything else. ``what`` names the value in the message (``"pub 2 shots"``).

    Returns:
        The shots as a Python ``int``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{what} must be a positive integer, got {type(value).__name__} {value!r:.40}")
    shots = int(value)
    if not 1 <= shots <= MAX_SHOTS:
        raise InvalidArgumentError(f"{what} must be a positive integer below 2**63, got {shots}")
    return shots


def check_priority(value: object, what: str = "priority") -> int:
    """``value`` as a job priority on the wire (``common_pb2.Priority``), or a clear
    :class:`~qscale.errors.InvalidArgumentError`.

    The one rule for every place users give a priority (:meth:`Client.submit`, the primitives'
    and the backend's ``priority`` option): ``"low"``, ``"normal"`` or ``"high"`` (any case), one
    of the enum's integers (``common_pb2.PRIORITY_LOW`` ... ``PRIORITY_HIGH``; 0, unspecified,
    is normal), or None for normal. A higher class is served first; within a class the
    coordinator shares the cluster fairly between users.
    """
    if value is None:
        return common_pb2.PRIORITY_NORMAL
    if isinstance(value, str):
        number = PRIORITIES.get(value.strip().lower())
        if number is not None:
            return number
    elif isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        number = int(value)
        if number == common_pb2.PRIORITY_UNSPECIFIED:
            return common_pb2.PRIORITY_NORMAL
        if number in PRIORITIES.values():
            return number
    raise InvalidArgumentError(f"{what} must be one of {', '.join(PRIORITIES)} (or common_pb2.Priority's "
                               f"{', '.join(str(n) for n in PRIORITIES.values())}), got {value!r:.40}")


def _shots_per_shard(value: object) -> int:
    """A job's own cap on shots per shard on the wire: 0 for None, else checked as shots are."""
    return 0 if value is None else check_shots(value, "shots_per_shard")


def _circuit_source(circuit: object, values: ArrayLike | None, shots: int = 0) -> jobs_pb2.CircuitSource:
    """One circuit on the wire (QPY), with its parameter values if any."""
    if not isinstance(circuit, QuantumCircuit):
        raise InvalidArgumentError(f"expected QuantumCircuit, got {type(circuit).__name__}")
    source = jobs_pb2.CircuitSource(qpy=dump_qpy(circuit), name=circuit.name, shots=shots)
    if values is not None:
        source.parameters.CopyFrom(_parameter_values(circuit, values))
    return source


def _parameter_values(circuit: QuantumCircuit, values: ArrayLike) -> common_pb2.ParameterValues:
    """Rows of values (columns in ``circuit.parameters`` order) on the wire. A circuit without
    parameters takes an array of shape (sets, 0) to be run that many times."""
    names = [p.name for p in circuit.parameters]
    array = np.asarray(values, dtype=float)
    try:
        array = array.reshape(-1, len(names)) if names else array.reshape(len(array) if array.ndim else 1, 0)
    except ValueError as exc:
        raise InvalidArgumentError(f"circuit {circuit.name!r}: parameter values of shape {array.shape} do not "
                                   f"fit its {len(names)} parameters") from exc
    names, num_sets, data = pack_parameter_values(names, array)
    return common_pb2.ParameterValues(names=names, num_sets=num_sets, values=data)


def noise_model_json(noise_model: NoiseModel) -> str:
    """A qiskit-aer noise model in its portable JSON form (``to_dict(serializable=True)``)."""
    try:
        return json.dumps(noise_model.to_dict(serializable=True))
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot serialise the noise model: {exc}") from exc


class Client:
    """A connection to a qscale coordinator.

    Args:
        address: ``host:port`` of the coordinator; defaults to ``$QSCALE_COORDINATOR`` or
            ``127.0.0.1:50051``.
        token: the API token sent with every call; defaults to ``$QSCALE_CLIENT_TOKEN``, or the
            token in the file named by ``$QSCALE_CLIENT_TOKEN_FILE``; none when neither is set.
        tls: TLS settings (:class:`qscale.security.TLSConfig`): ``ca`` verifies the coordinator
            (the system's roots when None), ``cert`` + ``key`` are presented for mutual TLS.
            None: a plain connection.
        timeout: deadline in seconds for each unary call.
        connect_timeout: seconds a call waits for the coordinator to answer (packets dropped,
            a port that is not gRPC, a coordinator restarting) before it fails with
            :class:`~qscale.errors.UnavailableError`; defaults to ``$QSCALE_CONNECT_TIMEOUT`` or
            5. Until the coordinator has answered once, a refused connection fails at once
            (after gRPC's retries, under a second; see :mod:`qscale.rpc`). :meth:`Job.wait`
            and :meth:`Job.result` ride through restarts of any length, within their timeout.

    Example::

        with qscale.Client("coordinator:50051") as client:
            job = client.submit(circuit, shots=10_000, seed=7)
            print(job.result().counts[0])
    """

    def __init__(self, address: str | None = None, *, token: str | None = None, tls: TLSConfig | None = None,
                 timeout: float = 60.0, connect_timeout: float | None = None) -> None:
        # The command-line tools' settings, read the same way; TLS comes from ``tls`` alone.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("QSCALE_TLS_")}
        settings = ClientSettings.from_env(environ, coordinator=address or None, connect_timeout_s=connect_timeout)
        self.address = settings.coordinator
        self.timeout = timeout
        self.connect_timeout = settings.connect_timeout_s or DEFAULT_CONNECT_TIMEOUT_S
        self.tls = tls
        if token is None:
            token = settings.resolved_token()
        self._channel = make_channel(
            self.address, token=token, tls=tls, connect_timeout=self.connect_timeout,
            options=[("grpc.max_receive_message_length", _MAX_MESSAGE),
                     ("grpc.max_send_message_length", _MAX_MESSAGE)],
        )
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._reached = False  # whether a call has been answered (see _await_ready)
        self._connectivity: grpc.ChannelConnectivity | None = None  # as last seen (see _call)

    def _rpc_errors(self) -> contextlib.AbstractContextManager[None]:
        """:func:`~qscale.rpc_status.translate_rpc_errors` for this client's channel: a
        connection error that its TLS settings explain says what to change."""
        return translate_rpc_errors(tls=self.tls is not None,
                                    client_cert=self.tls is not None and self.tls.cert is not None)

    def _call(self, method: str, request: Any) -> Any:
        """A unary JobService call under :attr:`timeout`, once the coordinator can answer
        (:meth:`_await_ready`)."""
        self._await_ready()
        with self._rpc_errors():
            reply = getattr(self._stub, method)(request, timeout=self.timeout)
        if not self._reached:
            self._reached = True
            # From now on the channel's state is followed (one subscription for the client's
            # life: gRPC's polling thread then ends cleanly when the channel closes).
            self._channel.subscribe(self._seen)
        return reply

    def _seen(self, state: grpc.ChannelConnectivity) -> None:
        self._connectivity = state

    def _await_ready(self) -> None:
        """Once this client has reached the coordinator and the connection is gone (a
        coordinator restarting), wait up to :attr:`connect_timeout` for gRPC to make it again:
        a restart within that goes unnoticed, and a Submit is not left in doubt by a short
        outage. Before that, nothing is waited for: a call on a new channel connects, and a
        wrong address fails at the first refused connection (or, when nothing answers, after
        the connect timeout; see :mod:`qscale.rpc`). Nothing here sleeps."""
        if not self._reached or self._connectivity in (grpc.ChannelConnectivity.READY, None):
            return
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            pass  # the call says why

    def submit(
        self,
        circuits: QuantumCircuit | Iterable[QuantumCircuit],
        *,
        shots: int | Sequence[int] = 1024,
        seed: int | None = None,
        method: str | None = None,
        parameter_values: Sequence[ArrayLike | None] | None = None,
        memory: bool = False,
        noise_model: NoiseModel | None = None,
        shots_per_shard: int | None = None,
        priority: str | int = "normal",
    ) -> Job:
        """Submit one circuit or several; returns at once with a :class:`Job`.

        Args:
            circuits: circuits with classical bits; bits that nothing measures read 0 (as in
                Qiskit's samplers). A circuit without classical bits is refused.
            shots: shots per circuit (per parameter set), or one value per circuit: integers
                (``numpy`` integers too) of at least 1 (:func:`check_shots`).
            seed: makes the results reproducible, whatever the number of nodes.
            method: an Aer simulation method; ``automatic`` (the default) lets Aer choose.
            parameter_values: per circuit, ``None`` or an array of shape (sets, parameters) with
                columns in ``circuit.parameters`` order; each row is simulated as its own
                experiment and the sets of one circuit are spread over the nodes.
            memory: keep every shot's outcome (``CircuitResult.memory()``), not only counts.
            noise_model: a qiskit-aer ``NoiseModel``, sent as JSON (never pickled).
            shots_per_shard: at most this many shots of a circuit in one shard, where each shot
                costs a simulation of its own (the stabilizer method, noise, mid-circuit
                measurement): spreads a small job over more nodes. None: the coordinator's
                setting; with both set, the smaller wins. It changes the plan and so the chunk
                seeds: a seeded job gives the same counts for the same value on any number of
                nodes, other (equally valid) counts for another value.
            priority: ``"low"``, ``"normal"`` or ``"high"`` (:func:`check_priority`): the
                coordinator runs higher classes first, and shares the cluster fairly between
                users within a class.

        Raises:
            InvalidArgumentError: a circuit or option the coordinator rejects, or a bad priority.
            NoCapableNodeError: no node of the cluster can hold a circuit.
            ResourceExhaustedError: the job would take its user over a quota (unfinished jobs,
                queued shots).
        """
        wire_priority = check_priority(priority)
        if isinstance(circuits, QuantumCircuit):
            circuits = [circuits]
        circuits = list(circuits)
        if isinstance(shots, np.ndarray):
            shots = shots.tolist()  # a 0-d array gives a scalar, a 1-d one a list
        if isinstance(shots, Sequence) and not isinstance(shots, (str, bytes)):
            per_circuit_shots = [check_shots(value, f"shots[{i}]") for i, value in enumerate(shots)]
        else:
            per_circuit_shots = [check_shots(shots)] * len(circuits)
        values = list(parameter_values) if parameter_values is not None else [None] * len(circuits)
        if len(per_circuit_shots) != len(circuits) or len(values) != len(circuits):
            raise InvalidArgumentError("give one shots value and one parameter array per circuit")
        sources = [_circuit_source(circuit, circuit_values, shots=circuit_shots)
                   for circuit, circuit_shots, circuit_values in zip(circuits, per_circuit_shots, values)]
        return self._submit(sources, 0, seed, method, memory=memory, noise_model=noise_model,
                            shots_per_shard=_shots_per_shard(shots_per_shard), priority=wire_priority)

    def estimate(
        self,
        circuits: QuantumCircuit | Iterable[QuantumCircuit],
        observables: Sequence[Sequence[str]],
        *,
        parameter_values: Sequence[ArrayLike | None] | None = None,
        seed: int | None = None,
        method: str | None = None,
        noise_model: NoiseModel | None = None,
        priority: str | int = "normal",
    ) -> Job:
        """Submit an estimator job: the exact expectation value of every observable of each
        circuit, for each of its parameter sets; returns at once with a :class:`Job`.

        The values come back as ``job.result().results[i].expectation_values``, an array of
        shape (parameter sets, observables), computed with qiskit-aer's exact expectation values
        (as its ``EstimatorV2`` at precision 0) and the same bits however the sets are spread
        over the nodes. :class:`qscale.EstimatorV2` builds on this.

        Args:
            circuits: circuits without measurements, resets or control flow.
            observables: per circuit, Pauli labels (one letter of ``IXYZ`` per qubit, qubit 0
                rightmost).
            parameter_values: per circuit, ``None`` or an array of shape (sets, parameters).
            seed: job seed (matters only for methods that sample, e.g. with noise).
            method: an Aer method; ``automatic`` picks statevector, stabilizer (Clifford),
                density matrix (noise: exact) or matrix product state (wider than any node).
            noise_model: a qiskit-aer ``NoiseModel``; the values are then exact on the
                density-matrix method.
            priority: ``"low"``, ``"normal"`` or ``"high"``, as for :meth:`submit`.

        Raises:
            InvalidArgumentError: a bad circuit, label or option.
            NoCapableNodeError: no node of the cluster can hold a circuit.
        """
        wire_priority = check_priority(priority)
        if isinstance(circuits, QuantumCircuit):
            circuits = [circuits]
        circuits = list(circuits)
        values = list(parameter_values) if parameter_values is not None else [None] * len(circuits)
        if len(observables) != len(circuits) or len(values) != len(circuits):
            raise InvalidArgumentError("give one list of observables and one parameter array per circuit")
        sources = []
        for circuit, labels, circuit_values in zip(circuits, observables, values):
            source = _circuit_source(circuit, circuit_values)
            labels = check_pauli_labels(labels, circuit.num_qubits)
            if not labels:
                raise InvalidArgumentError(f"circuit {circuit.name!r} has no observables")
            source.observables.extend(labels)
            sources.append(source)
        return self._submit(sources, 0, seed, method, noise_model=noise_model, priority=wire_priority)

    def submit_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        shots: int = 1024,
        seed: int | None = None,
        method: str | None = None,
        shots_per_shard: int | None = None,
        priority: str | int = "normal",
    ) -> Job:
        """Submit the circuits of ``.qpy`` and OpenQASM 2/3 ``.qasm`` files, named as
        :func:`circuit_sources_from_file` says; returns at once with a :class:`Job`.

        Args:
            paths: the files, their circuits in order.
            shots, seed, method, shots_per_shard, priority: as for :meth:`submit`.

        Raises:
            InvalidArgumentError: a file that cannot be read, or a circuit or option the
                coordinator rejects; a message about one circuit starts with its file's path
                (an OpenQASM syntax error: ``path: OpenQASM 2 error at line 6, ...``).
        """
        shots = check_shots(shots)
        cap = _shots_per_shard(shots_per_shard)
        wire_priority = check_priority(priority)
        sources: list[jobs_pb2.CircuitSource] = []
        origins: list[tuple[str, int, int]] = []  # per source: its file, index in the file, circuits in the file
        for path in paths:
            found = circuit_sources_from_file(path)
            origins.extend((str(path), index, len(found)) for index in range(len(found)))
            sources.extend(found)
        try:
            return self._submit(sources, shots, seed, method, shots_per_shard=cap, priority=wire_priority)
        except InvalidArgumentError as exc:
            match = _CIRCUIT_ERROR.fullmatch(str(exc))
            if match is None or int(match[1]) >= len(origins):
                raise
            path, index, count = origins[int(match[1])]
            where = path if count == 1 else f"{path} (circuit {index} of the file)"
            raise InvalidArgumentError(f"{where}: {match[2]}") from None

    def _submit(self, sources: list[jobs_pb2.CircuitSource], shots: int, seed: int | None,
                method: str | None, *, memory: bool = False, noise_model: NoiseModel | None = None,
                shots_per_shard: int = 0, priority: int = common_pb2.PRIORITY_NORMAL) -> Job:
        """Send a submission whose shots and priority were checked (:func:`check_shots`,
        :func:`check_priority`; ``shots`` 0: every source carries its own)."""
        if seed is not None and not 0 <= seed < 2**63:
            raise InvalidArgumentError("seed must be between 0 and 2**63 - 1")
        request = jobs_pb2.SubmitRequest(circuits=sources, shots=shots, method=method or "", memory=memory,
                                         shots_per_shard=shots_per_shard, priority=priority)
        if noise_model is not None:
            request.noise_model = noise_model_json(noise_model)
        if seed is not None:
            request.seed = seed
        # The idempotency key makes retrying safe (gRPC retries Submit on UNAVAILABLE, see
        # qscale.rpc): a Submit that reached the coordinator before it went away is answered with
        # the same job, never a second one.
        request.request_key = uuid.uuid4().hex
        reply = self._call("Submit", request)
        return Job(self, reply.job_id, seed=reply.seed)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job (checked to exist)."""
        job = Job(self, job_id)
        job.status()
        return job

    def jobs(self, limit: int = 100, user: str | None = None) -> list[JobStatus]:
        """The newest jobs, newest first: the caller's own, or, for an admin (and on a
        coordinator without authentication), every user's.

        Args:
            limit: at most this many (0: the coordinator's default).
            user: only this user's jobs (an admin may name anyone; others see their own only).
        """
        reply = self._call("ListJobs", jobs_pb2.ListJobsRequest(limit=limit, user=user or ""))
        return [JobStatus.from_proto(j) for j in reply.jobs]

    def users(self) -> list[UserStatus]:
        """The users of the coordinator with their weights, what they use now and their quotas:
        every user for an admin, the caller alone for anyone else."""
        reply = self._call("ListUsers", jobs_pb2.ListUsersRequest())
        return [UserStatus.from_proto(u) for u in reply.users]

    def nodes(self) -> list[NodeStatus]:
        """Every node the coordinator knows, recently lost ones last."""
        reply = self._call("ListNodes", jobs_pb2.ListNodesRequest())
        return [NodeStatus.from_proto(n) for n in reply.nodes]

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> list[NodeStatus]:
        """Block until at least ``count`` nodes are alive; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                alive = [n for n in self.nodes() if n.state == "alive"]
            except UnavailableError:
                alive = []
            if len(alive) >= count:
                return alive
            if time.monotonic() > deadline:
                raise JobTimeoutError(f"only {len(alive)} of {count} nodes joined within {timeout:.0f}s")
            time.sleep(0.05)

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Job:
    """A submitted job. Cheap to create; every method asks the coordinator."""

    def __init__(self, client: Client, job_id: str, *, seed: int | None = None) -> None:
        self._client = client
        self.job_id = job_id
        self.seed = seed

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def status(self) -> JobStatus:
        """Current status and progress."""
        reply = self._client._call("GetJob", jobs_pb2.JobRef(job_id=self.job_id))
        return JobStatus.from_proto(reply)

    def done(self) -> bool:
        """True once the job is done, failed or cancelled."""
        return self.status().state.final

    def watch(self, *, counts: bool = True, max_outcomes: int = 0, timeout: float | None = None,
              wait_for_ready: bool = False) -> Iterator[Progress]:
        """Progress updates (with partial merged counts) until the job reaches a final state.

        Args:
            counts: include the merged counts so far in each update.
            max_outcomes: only the most frequent outcomes per circuit; 0 for all.
            timeout: give up after this many seconds (:class:`~qscale.errors.JobTimeoutError`).
            wait_for_ready: while the coordinator is unreachable (restarting), wait for the
                channel to reconnect (within ``timeout``) instead of failing at once with
                :class:`~qscale.errors.UnavailableError`.
        """
        request = jobs_pb2.WatchRequest(job_id=self.job_id, include_counts=counts, max_outcomes=max_outcomes)
        with self._client._rpc_errors():
            for msg in self._client._stub.Watch(request, timeout=timeout, wait_for_ready=wait_for_ready):
                yield Progress.from_proto(msg)

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job is final and return its final status.

        Survives a coordinator restart: when the Watch stream breaks, it watches again with
        ``wait_for_ready``, so the channel's own reconnect backoff does the waiting (this is
        :func:`qscale.progress.follow` with nothing to draw).

        Raises:
            JobTimeoutError: not final within ``timeout`` seconds (the job goes on).
        """
        from qscale.progress import QuietView, follow

        return follow(self, QuietView(), top=0, timeout=timeout).status

    def result(self, timeout: float | None = None) -> JobResult:
        """Block until the job is final and return its result.

        Raises:
            JobFailedError: a shard failed too often; the message names the circuit and the error.
            JobCancelledError: the job was cancelled.
            JobTimeoutError: not finished within ``timeout`` seconds (the job goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        try:
            # wait_for_ready: should the coordinator go away between the two calls, this waits for
            # it to come back (up to the deadline) instead of failing.
            with self._client._rpc_errors():
                reply = self._client._stub.GetResult(
                    jobs_pb2.JobRef(job_id=self.job_id), wait_for_ready=True,
                    timeout=None if deadline is None else max(0.1, deadline - time.monotonic()))
        except JobTimeoutError:
            raise JobTimeoutError(f"job {self.job_id}: no result within {timeout}s") from None
        result = JobResult.from_proto(reply)
        if result.status.state == JobState.FAILED:
            raise JobFailedError(f"job {self.job_id} failed: {result.status.error}", self.job_id)
        if result.status.state == JobState.CANCELLED:
            raise JobCancelledError(f"job {self.job_id} was cancelled", self.job_id)
        return result

    def cancel(self) -> JobStatus:
        """Cancel the job (no effect on a finished one); returns its status."""
        reply = self._client._call("Cancel", jobs_pb2.JobRef(job_id=self.job_id))
        return JobStatus.from_proto(reply)
