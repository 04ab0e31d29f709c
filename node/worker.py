"""Simulation worker processes.

A :class:`WorkerSlot` owns one worker process, started with the ``spawn`` method (never fork: the
daemon's parent holds gRPC threads), and one :func:`multiprocessing.Pipe`. The worker warms up
when it starts (imports qiskit and qiskit-aer, builds an ``AerSimulator``, runs and transpiles a
tiny circuit) so the first shard does not pay for it, then runs one shard at a time.

Protocol on the pipe (tuples; the parent sends, the worker answers)::

    worker -> parent  ("ready", WorkerInfo fields as a dict)      once, after warm-up
                      ("fatal", error)                             warm-up failed; the worker exits
    parent -> worker  ("run", ShardAssignment bytes)
    worker -> parent  ("chunk", chunk_index, [(circuit_index, {hex: count})], seconds)  per chunk
                      ("done", seconds) | ("failed", error, restart)                    then one
    parent -> worker  ("stop",)                                    exit cleanly

A worker that dies (segfault, ``os._exit``, SIGKILL by the OOM killer) closes its end of the pipe:
the parent reads EOF, reports the shard as failed with the exit status, and starts a fresh
worker. Aborting a shard kills the worker the same way.

Only the functions whose names start with ``_worker`` run in the worker; they import qiskit
lazily so that this module stays light in the daemon's parent.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from qscale.errors import QScaleError
from qscale.proto.v1 import common_pb2, node_pb2

__all__ = [
    "WorkerSlot",
    "WorkerInfo",
    "ChunkOutcome",
    "ShardOutcome",
    "WorkerStartError",
    "describe_exit",
]

logger = logging.getLogger(__name__)

#: Aer takes a signed 64-bit seed; chunk seeds are uint64 and are folded into 63 bits.
SEED_MASK = (1 << 63) - 1
_ERROR_MAX_CHARS = 500


class WorkerStartError(QScaleError):
    """A worker process could not start or warm up (broken install, died while importing)."""


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports once warmed up: what it can run, and with which versions."""

    pid: int
    methods: tuple[str, ...]
    """Aer methods offered: ``qscale.circuits.METHODS`` that this Aer build supports."""
    qpy_version: int
    """Newest QPY version this qiskit reads."""
    qiskit_version: str
    aer_version: str
    max_statevector_qubits: int
    """Widest statevector that fits in the slot's memory budget."""
    warmup_s: float
    """Seconds from the worker's first line to ready (imports, simulator, tiny run)."""


@dataclass(frozen=True)
class ChunkOutcome:
    """Results of one finished chunk: one :class:`CircuitCounts` per experiment (circuit,
    parameter set) in the chunk's order, with packed outcomes (:class:`~qscale.outcomes.Outcomes`)
    adding up to the chunk's shots and, when the shard asked for it, packed per-shot memory."""

    chunk_index: int
    counts: list[common_pb2.CircuitCounts]
    seconds: float


@dataclass(frozen=True)
class ShardOutcome:
    """How a shard ended on a slot."""

    ok: bool
    seconds: float
    chunks_done: int = 0
    error: str = ""
    """Short message, no traceback (``"AerError: ..."``, ``"worker process died (signal 9, SIGKILL)"``)."""
    aborted: bool = False
    """The run was stopped on purpose (:meth:`WorkerSlot.abort` or :meth:`WorkerSlot.close`)."""


def describe_exit(exitcode: int | None) -> str:
    """``"signal 9, SIGKILL"`` / ``"exit code 3"`` for a process exit code."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
        return f"signal {-exitcode}, {name}"
    return f"exit code {exitcode}"


class _WorkerDied(Exception):
    pass


class WorkerSlot:
    """One simulation worker process and the pipe to it.

    One owner thread calls :meth:`start`, :meth:`wait_ready` and :meth:`run`; :meth:`abort` and
    :meth:`close` may be called from any thread. The slot restarts its worker by itself after a
    crash or an abort. Use it as a context manager, or call :meth:`close`, so that the worker
    process never outlives it.

    Args:
        index: slot number, for logs.
        threads: OpenMP threads of the worker (``OMP_NUM_THREADS``, Aer's ``max_parallel_threads``).
        memory_budget_bytes: this slot's memory; Aer's ``max_memory_mb`` is set from it.
        cache_entries: decoded (and, where needed, transpiled) circuits the worker keeps.
        cache_bytes: bound of the QPY bytes behind the cached circuits.
        ready_timeout_s: the longest a worker may take to warm up.
    """

    def __init__(
        self,
        index: int = 0,
        *,
        threads: int = 1,
        memory_budget_bytes: int = 1 << 30,
        cache_entries: int = 1024,
        cache_bytes: int = 128 << 20,
        ready_timeout_s: float = 300.0,
    ) -> None:
        self.index = index
        self.threads = max(1, int(threads))
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self.ready_timeout_s = ready_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._proc: Any = None  # multiprocessing.context.SpawnProcess
        self._conn: Connection | None = None
        self._info: WorkerInfo | None = None
        self._started_at = 0.0
        self._running_token: str | None = None
        self._abort_reason: str | None = None
        self._pending_aborts: dict[str, str] = {}
        self._closed = False

    # ---- state ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Process id of the current worker (None before :meth:`start`)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def info(self) -> WorkerInfo | None:
        """What the current worker reported after warming up; None until it is ready."""
        return self._info

    @property
    def ready(self) -> bool:
        """The current worker has warmed up and is alive."""
        return self._info is not None and self._proc is not None and self._proc.is_alive()

    @property
    def closed(self) -> bool:
        """:meth:`close` was called: the slot runs nothing more and starts no worker."""
        return self._closed

    @property
    def running_token(self) -> str | None:
        """Attempt token of the shard running now, if any."""
        return self._running_token

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start a worker process unless one is alive. Returns at once; it warms up meanwhile."""
        with self._lock:
            if self._closed:
                raise WorkerStartError(f"slot {self.index} is closed")
            if self._proc is not None and self._proc.is_alive():
                return
            self._reap_locked()
            parent_conn, child_conn = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(
                target=_worker_main,
                args=(
                    child_conn, os.getpid(), self.threads, self.memory_budget_bytes,
                    self.cache_entries, self.cache_bytes,
                ),
                name=f"qscale-worker-{self.index}",
                daemon=True,
            )
            _start_from_launcher(proc)
            child_conn.close()  # the worker holds the only write end: its death gives us EOF
            self._proc, self._conn, self._info = proc, parent_conn, None
            self._started_at = time.monotonic()
        logger.debug("slot %d: started worker pid %d", self.index, proc.pid)

    def wait_ready(self, timeout: float | None = None) -> WorkerInfo:
        """Block until the worker has warmed up (starting one if needed) and return its info.

        Raises:
            TimeoutError: not ready within ``timeout`` (the worker goes on warming up).
            WorkerStartError: the worker failed to warm up or died meanwhile, or took longer than
                ``ready_timeout_s`` (it is stopped; :meth:`start` tries again).
        """
        if self._info is not None and self._proc is not None and self._proc.is_alive():
            return self._info
        if self._proc is None or (not self._proc.is_alive() and self._info is not None):
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        hard_deadline = self._started_at + self.ready_timeout_s
        while self._info is None:
            now = time.monotonic()
            if now >= hard_deadline:
                self._kill_and_reap()
                raise WorkerStartError(
                    f"slot {self.index}: worker did not warm up within {self.ready_timeout_s:g} s"
                )
            wait = hard_deadline - now if deadline is None else min(deadline, hard_deadline) - now
            if deadline is not None and wait <= 0:
                raise TimeoutError(f"slot {self.index}: worker not ready yet")
            try:
                msg = self._recv(min(wait, 0.25) if wait > 0 else 0)
            except _WorkerDied:
                code = self._reap()
                raise WorkerStartError(
                    f"slot {self.index}: worker process died while warming up ({describe_exit(code)})"
                ) from None
            if msg is None:
                continue
            if msg[0] == "ready":
                self._info = WorkerInfo(**msg[1])
                logger.info(
                    "slot %d: worker pid %d ready in %.2f s (qiskit %s, qiskit-aer %s, %d threads, %s memory)",
                    self.index, self._info.pid, self._info.warmup_s, self._info.qiskit_version,
                    self._info.aer_version, self.threads, _mib(self.memory_budget_bytes),
                )
            elif msg[0] == "fatal":
                self._kill_and_reap()
                raise WorkerStartError(f"slot {self.index}: worker failed to warm up: {msg[1]}")
            else:  # pragma: no cover - protocol error
                logger.warning("slot %d: unexpected message while warming up: %r", self.index, msg[0])
        return self._info

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (politely when idle, by SIGKILL when busy or slow). Idempotent."""
        with self._lock:
            self._closed = True
            proc, conn = self._proc, self._conn
            busy = self._running_token is not None
            if busy:
                self._abort_reason = self._abort_reason or "slot closed"
        if proc is None:
            return
        if proc.is_alive():
            if busy or self._info is None:  # running a shard, or still warming up: no need to wait
                proc.kill()
            else:
                try:
                    if conn is not None:
                        conn.send(("stop",))
                except (OSError, ValueError):
                    pass
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        if not busy:  # the owner thread reaps it otherwise
            with self._lock:
                self._reap_locked()

    def __enter__(self) -> WorkerSlot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- running --------------------------------------------------------------------------------

    def abort(self, attempt_token: str, reason: str = "aborted") -> bool:
        """Stop the shard ``attempt_token``: its :meth:`run` returns ``aborted`` with ``reason``.

        If the shard has not reached the worker yet, the abort is remembered and :meth:`run`
        returns at once without running it. Returns True when the shard was running (its worker is
        killed and a fresh one is started).
        """
        with self._lock:
            if self._running_token != attempt_token:
                self._pending_aborts[attempt_token] = reason
                return False
            self._abort_reason = reason
            proc = self._proc
        if proc is not None:
            proc.kill()
        return True

    def run(
        self,
        assignment: node_pb2.ShardAssignment | bytes,
        on_chunk: Callable[[ChunkOutcome], None] | None = None,
        *,
        timeout: float | None = None,
    ) -> ShardOutcome:
        """Run a shard on the worker, calling ``on_chunk`` for each chunk as soon as it finishes.

        Blocks until the shard is done, failed or aborted; never raises for a failure of the shard
        or of the worker (the outcome says what happened). Waits for the worker to warm up first.
        ``timeout`` (seconds, from the call; None: no limit) aborts a shard that runs too long.
        """
        if isinstance(assignment, (bytes, bytearray)):
            data = bytes(assignment)
            token = node_pb2.ShardAssignment.FromString(data).attempt_token
        else:
            data = assignment.SerializeToString()
            token = assignment.attempt_token
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        with self._lock:
            pending = self._pending_aborts.pop(token, None)
            if pending is None and self._closed:
                pending = "slot closed"
        if pending is not None:
            return ShardOutcome(ok=False, seconds=0.0, error=pending, aborted=True)
        try:
            self.wait_ready(self.ready_timeout_s if timeout is None else min(timeout, self.ready_timeout_s))
        except (WorkerStartError, TimeoutError) as exc:
            return ShardOutcome(ok=False, seconds=time.monotonic() - t0, error=str(exc))

        with self._lock:
            pending = self._pending_aborts.pop(token, None)
            if pending is not None or self._closed:
                return ShardOutcome(ok=False, seconds=0.0, error=pending or "slot closed", aborted=True)
            self._running_token = token
            self._abort_reason = None
            conn = self._conn
        chunks_done = 0
        settled = False  # the worker is between shards again (or dead): the pipe is in sync
        try:
            try:
                assert conn is not None
                conn.send(("run", data))
                timed_out = False
                while True:
                    msg = self._recv(0.25)
                    if msg is None:
                        if deadline is not None and not timed_out and time.monotonic() > deadline:
                            timed_out = True
                            self.abort(token, f"shard timed out after {timeout:g} s")
                        continue
                    kind = msg[0]
                    if kind == "chunk":
                        _, chunk_index, payload, seconds = msg
                        chunks_done += 1
                        if on_chunk is not None:
                            counts = list(common_pb2.ShardResult.FromString(payload).results)
                            on_chunk(ChunkOutcome(chunk_index, counts, seconds))
                    elif kind == "done":
                        settled = True
                        return ShardOutcome(ok=True, seconds=msg[1], chunks_done=chunks_done)
                    elif kind == "failed":
                        settled = True
                        _, error, restart = msg
                        if restart:
                            self._kill_and_reap()
                            self._restart_quietly()
                        return ShardOutcome(
                            ok=False, seconds=time.monotonic() - t0, chunks_done=chunks_done, error=error
                        )
                    else:  # pragma: no cover - protocol error
                        logger.warning("slot %d: unexpected message %r", self.index, kind)
            except (_WorkerDied, OSError, ValueError):
                settled = True
                code = self._reap()
                reason = self._abort_reason
                if reason is not None:
                    logger.debug("slot %d: worker stopped for attempt %s: %s", self.index, token, reason)
                    return ShardOutcome(
                        ok=False, seconds=time.monotonic() - t0, chunks_done=chunks_done,
                        error=reason, aborted=True,
                    )
                error = f"worker process died ({describe_exit(code)})"
                logger.warning("slot %d: %s while running attempt %s", self.index, error, token)
                return ShardOutcome(
                    ok=False, seconds=time.monotonic() - t0, chunks_done=chunks_done, error=error
                )
        finally:
            with self._lock:
                self._running_token = None
                self._abort_reason = None
            if not settled:  # left early (on_chunk raised...): the worker may still be running it
                self._kill_and_reap()
            if self._proc is None or not self._proc.is_alive():
                self._restart_quietly()

    # ---- internals ------------------------------------------------------------------------------

    def _recv(self, timeout: float) -> Any:
        """The next message, None if there is none within ``timeout``; _WorkerDied at EOF."""
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            raise _WorkerDied()
        try:
            if conn.poll(timeout):
                return conn.recv()
            if not proc.is_alive() and not conn.poll(0):
                raise _WorkerDied()
        except (EOFError, OSError, ValueError):  # ValueError/OSError: the pipe was closed
            raise _WorkerDied() from None
        return None

    def _reap(self) -> int | None:
        with self._lock:
            return self._reap_locked()

    def _reap_locked(self) -> int | None:
        proc, conn = self._proc, self._conn
        code = None
        if proc is not None:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
            code = proc.exitcode
            # No proc.close(): close() may be using the object from another thread; the
            # sentinel is released when the object goes.
        if conn is not None:
            conn.close()
        self._proc, self._conn, self._info = None, None, None
        return code

    def _kill_and_reap(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                self._proc.kill()
            self._reap_locked()

    def _restart_quietly(self) -> None:
        if self._closed:
            return
        try:
            self.start()
        except Exception as exc:  # noqa: BLE001 - reported when the slot is next used
            logger.error("slot %d: could not start a worker: %s", self.index, exc)


_launcher_lock = threading.Lock()
_launcher_queue: queue.SimpleQueue[tuple[Any, Future[None]]] = queue.SimpleQueue()
_launcher_thread: threading.Thread | None = None


def _launcher_loop() -> None:
    while True:
        proc, fut = _launcher_queue.get()
        try:
            proc.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)
        else:
            fut.set_result(None)


def _start_from_launcher(proc: Any) -> None:
    """Start ``proc`` from one long-lived thread.

    On Linux a worker asks for SIGKILL when its parent goes (``PR_SET_PDEATHSIG``), and the kernel
    counts the *thread* that started it as the parent: starting every worker from a thread that
    lives as long as the process keeps them from dying with a short-lived caller thread.
    """
    global _launcher_thread
    with _launcher_lock:
        if _launcher_thread is None or not _launcher_thread.is_alive():
            _launcher_thread = threading.Thread(target=_launcher_loop, name="qscale-worker-launcher", daemon=True)
            _launcher_thread.start()
    fut: Future[None] = Future()
    _launcher_queue.put((proc, fut))
    fut.result()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


# =============================================================================================
# Worker side. Everything below runs in the spawned worker process.
# =============================================================================================


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return message[:_ERROR_MAX_CHARS]


def _worker_die_with_parent(ppid: int) -> None:
    """Never outlive the daemon, even when it is SIGKILLed.

    Linux: the kernel SIGKILLs us when the parent goes (Aer holds the GIL while it simulates, so a
    Python thread alone could only notice it between chunks). Elsewhere, and as a fallback, a
    thread polls the parent pid.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != ppid:  # the parent died before prctl took effect
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(3)

    threading.Thread(target=watch, name="qscale-parent-watch", daemon=True).start()


@dataclass
class _WorkerState:
    sim: Any
    supported: frozenset[str]
    pass_manager: Any
    """Level-0 transpilation to what Aer runs, built once: ``transpile(backend=sim)`` rebuilds it
    each call (0.19 s, against 1 ms to run it on a 12-qubit circuit)."""
    threads: int
    max_memory_mb: int
    cache_entries: int
    cache_bytes: int
    cache: OrderedDict[tuple[bytes, ...], tuple[Any, int]] = field(default_factory=OrderedDict)
    """Decoded circuits by their QPY's digest (and, for estimator work, with the digest of their
    observables): a circuit submitted again, in this job or a later one, is not decoded again."""
    cached_bytes: int = 0
    noise: Any = None
    noise_key: str = ""

    def circuit(self, index: int, payloads: Mapping[int, bytes]) -> Any:
        """The circuit ``index`` of the shard, decoded and (only if needed) transpiled, via the LRU."""
        from qscale.circuits import load_qpy
        from qscale.errors import InvalidArgumentError

        if index not in payloads:
            raise InvalidArgumentError(f"the shard names circuit {index} but carries no QPY for it")
        data = payloads[index]
        key = (_digest(data),)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit[0]
        try:
            circuit = load_qpy(data)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"circuit {index}: {exc}") from None
        if _needs_transpile(circuit, self.supported):
            circuit = self.pass_manager.run(circuit)
        self.cache[key] = (circuit, len(data))
        self.cached_bytes += len(data)
        while self.cache and (len(self.cache) > self.cache_entries or self.cached_bytes > self.cache_bytes):
            _, (_, size) = self.cache.popitem(last=False)
            self.cached_bytes -= size
        return circuit

    def expectation_circuit(self, index: int, payloads: Mapping[int, bytes], labels: tuple[str, ...]) -> Any:
        """The circuit with a ``save_expectation_value`` of every Pauli label (``e0``, ``e1``
        ...) appended, built once per circuit and observables and kept beside it in the LRU."""
        from qiskit.quantum_info import Pauli

        circuit = self.circuit(index, payloads)
        key = (_digest(payloads[index]), _digest("|".join(labels).encode()))
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit[0]
        if circuit.num_clbits or any(inst.name in ("measure", "reset") for inst in circuit.data):
            raise ValueError(f"circuit {index} measures or resets qubits: it has no exact expectation values")
        saved = circuit.copy()
        # A global phase changes no expectation value, but Aer applies a parameterised one to the
        # first experiment of a call differently than to the others: dropping it keeps every
        # value the same bits however the parameter sets are split into calls.
        saved.global_phase = 0
        qubits = range(saved.num_qubits)
        for j, label in enumerate(labels):
            if len(label) != saved.num_qubits or label.strip("IXYZ"):
                raise ValueError(f"circuit {index}: observable {j} is not a {saved.num_qubits}-qubit Pauli label")
            saved.save_expectation_value(Pauli(label), qubits, label=f"e{j}")
        self.cache[key] = (saved, 0)
        return saved


def _digest(data: bytes) -> bytes:
    import hashlib

    return hashlib.blake2b(data, digest_size=16).digest()


def _needs_transpile(circuit: Any, supported: frozenset[str]) -> bool:
    # inst.name reads the native circuit; only control flow needs the Python operation.
    for inst in circuit.data:
        if inst.name not in supported:
            return True
        if inst.is_control_flow():
            for block in inst.operation.blocks:
                if _needs_transpile(block, supported):
                    return True
    return False


def _worker_warm_up(threads: int, memory_budget_bytes: int) -> tuple[_WorkerState, dict[str, Any]]:
    t0 = time.perf_counter()
    import qiskit
    import qiskit_aer
    from qiskit import QuantumCircuit, qpy
    from qiskit.circuit.library import QFTGate
    from qiskit.transpiler import generate_preset_pass_manager
    from qiskit_aer import AerSimulator

    from qscale.circuits import METHODS, dump_qpy, load_qpy, max_statevector_qubits

    sim = AerSimulator()
    supported = frozenset(sim.target.operation_names) | {"barrier"}
    max_memory_mb = max(1, memory_budget_bytes >> 20)
    # A tiny run and a tiny transpile load Aer's controller and the transpiler's passes, and a QPY
    # round trip loads its reader: the first shard pays none of it.
    probe = QuantumCircuit(3)
    probe.append(QFTGate(3), [0, 1, 2])
    probe.measure_all()
    probe = load_qpy(dump_qpy(probe))
    pass_manager = generate_preset_pass_manager(optimization_level=0, backend=sim, seed_transpiler=0)
    probe = pass_manager.run(probe)
    result = sim.run(probe, shots=8, seed_simulator=1, max_parallel_threads=threads).result()
    if not result.success:
        raise RuntimeError(f"Aer failed its warm-up run: {result.status}")
    available = set(sim.available_methods())
    info = {
        "pid": os.getpid(),
        "methods": tuple(m for m in METHODS if m in available),
        "qpy_version": int(qpy.QPY_VERSION),
        "qiskit_version": str(qiskit.__version__),
        "aer_version": str(qiskit_aer.__version__),
        "max_statevector_qubits": int(max_statevector_qubits(memory_budget_bytes)),
        "warmup_s": time.perf_counter() - t0,
    }
    state = _WorkerState(
        sim=sim, supported=supported, pass_manager=pass_manager, threads=threads, max_memory_mb=max_memory_mb,
        cache_entries=0, cache_bytes=0,
    )
    return state, info


def _worker_aer_error(result: Any) -> str:
    for exp in getattr(result, "results", None) or ():
        if not getattr(exp, "success", True):
            status = str(getattr(exp, "status", "") or "").strip()
            break
    else:
        status = str(getattr(result, "status", "") or "").strip()
    if status.upper().startswith("ERROR:"):
        status = status[6:].strip()
    return f"AerError: {status or 'simulation failed'}"[:_ERROR_MAX_CHARS]


def _worker_method_run(result: Any, position: int) -> str:
    """The method Aer reports it ran experiment ``position`` with (its result metadata), or ""."""
    metadata = getattr(result.results[position], "metadata", None) or {}
    method = metadata.get("method", "") if isinstance(metadata, dict) else ""
    return method if isinstance(method, str) else ""


def _worker_noise_model(state: _WorkerState, text: str) -> Any:
    """The shard's noise model, parsed once per distinct JSON text."""
    if not text:
        return None
    if state.noise_key != text:
        import json
        import warnings

        from qiskit_aer.noise import NoiseModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            state.noise = NoiseModel.from_dict(json.loads(text))
        state.noise_key = text
    return state.noise


def _worker_check_unwritten_clbits(circuit: Any, circuit_index: int) -> None:
    """Raise unless ``circuit`` has classical bits and nothing writes them (no ``measure`` and no
    ``store``, in control-flow blocks too): only then may the missing counts read all zeros."""
    if circuit.num_clbits == 0:
        raise ValueError(f"circuit {circuit_index} gave no counts: it measures no classical bit")

    def writes(block: Any) -> bool:
        for inst in block.data:
            if inst.name in ("measure", "store"):
                return True
            if inst.is_control_flow() and any(writes(b) for b in inst.operation.blocks):
                return True
        return False

    if writes(circuit):
        raise ValueError(f"circuit {circuit_index} gave no counts although it writes classical bits "
                         "(Aer reports none for bits set only by store)")


class _AerFailure(Exception):
    """Aer reported a failed simulation; the message is the shard's error."""


def _worker_bindings(circuit: Any, entry: Any, values: Mapping[int, tuple[int, list[str], Any]]
                     ) -> dict[Any, list[float]]:
    """Aer's ``parameter_binds`` for one entry's parameter sets (empty without parameters)."""
    if not circuit.parameters:
        return {}
    if entry.circuit_index not in values:
        raise ValueError(f"circuit {entry.circuit_index} has parameters but the shard has no values")
    first, names, rows = values[entry.circuit_index]
    if entry.set_start < first or entry.set_start + entry.set_count > first + len(rows):
        raise ValueError(f"circuit {entry.circuit_index}: parameter sets out of range")
    block = rows[entry.set_start - first : entry.set_start - first + entry.set_count]
    return {p: block[:, names.index(p.name)].tolist() for p in circuit.parameters}


def _worker_expectation_values(state: _WorkerState, assignment: Any, chunk: Any, payloads: Mapping[int, bytes],
                               values: Mapping[int, tuple[int, list[str], Any]],
                               observables: Mapping[int, tuple[str, ...]], noise: Any) -> common_pb2.ShardResult:
    """One estimator chunk: for each entry, the exact expectation value of every observable for
    each of its parameter sets (Aer's ``save_expectation_value``, as qiskit-aer's EstimatorV2).

    Each experiment (parameter set) is simulated by one thread, and the threads of the slot
    run different parameter sets: a value is then the same bits however the sets are split
    into shards and chunks, and whatever the node's thread count (Aer's multi-threaded state
    update sums in another order)."""
    import numpy as np

    out = common_pb2.ShardResult()
    for entry in chunk.entries:
        labels = observables.get(entry.circuit_index)
        if not labels:
            raise ValueError(f"circuit {entry.circuit_index} has no observables")
        circuit = state.expectation_circuit(entry.circuit_index, payloads, labels)
        binds = _worker_bindings(circuit, entry, values)
        result = state.sim.run(
            [circuit] if binds else [circuit] * entry.set_count,
            shots=1,
            seed_simulator=int(chunk.seed) & SEED_MASK,
            method=assignment.method or "automatic",
            max_parallel_threads=state.threads,
            max_parallel_experiments=state.threads,
            statevector_parallel_threshold=64,
            max_memory_mb=state.max_memory_mb,
            noise_model=noise,
            parameter_binds=[binds] if binds else None,
        ).result()
        if not result.success:
            raise _AerFailure(_worker_aer_error(result))
        if len(result.results) != entry.set_count:
            raise ValueError(f"Aer returned {len(result.results)} experiments, expected {entry.set_count}")
        block = np.empty((entry.set_count, len(labels)), dtype="<f8")
        for row in range(entry.set_count):
            data = result.data(row)
            block[row] = [np.real(data[f"e{j}"]) for j in range(len(labels))]
        out.results.add(circuit_index=entry.circuit_index, set_index=entry.set_start, set_count=entry.set_count,
                        expectation_values=block.tobytes(), method=_worker_method_run(result, 0))
    return out


def _worker_run_shard(state: _WorkerState, conn: Connection, data: bytes) -> None:
    """Run every chunk of a shard and report each one; then done, or failed with a short error."""
    from qscale.circuits import memory_width, pack_memory, unpack_parameter_values
    from qscale.outcomes import Outcomes

    t0 = time.perf_counter()
    try:
        assignment = node_pb2.ShardAssignment.FromString(data)
        payloads = {p.circuit_index: p.qpy for p in assignment.circuits}
        values = {
            p.circuit_index: (p.first_set, list(p.parameters.names),
                              unpack_parameter_values(p.parameters.names, p.parameters.num_sets, p.parameters.values))
            for p in assignment.circuits if p.HasField("parameters")
        }
        method = assignment.method or "automatic"
        noise = _worker_noise_model(state, assignment.noise_model)
        observables = {p.circuit_index: tuple(p.observables) for p in assignment.circuits if p.observables}
        for chunk_index, chunk in enumerate(assignment.chunks):
            tc = time.perf_counter()
            if observables:
                out = _worker_expectation_values(state, assignment, chunk, payloads, values, observables, noise)
                conn.send(("chunk", chunk_index, out.SerializeToString(), time.perf_counter() - tc))
                continue
            if chunk.shots <= 0:
                raise ValueError(f"chunk {chunk_index} asks for {chunk.shots} shots")
            if not chunk.entries:
                raise ValueError(f"chunk {chunk_index} names no circuit")
            circuits: list[Any] = []
            binds: list[dict[Any, list[float]]] = []
            experiments: list[tuple[int, int, int]] = []  # (circuit, set, memory width), Aer's result order
            for entry in chunk.entries:
                circuit = state.circuit(entry.circuit_index, payloads)
                sets = range(entry.set_start, entry.set_start + entry.set_count)
                if circuit.parameters:
                    circuits.append(circuit)
                    binds.append(_worker_bindings(circuit, entry, values))
                else:
                    circuits.extend([circuit] * entry.set_count)
                    binds.extend({} for _ in sets)
                width = memory_width(circuit.num_clbits)
                experiments.extend((entry.circuit_index, s, width) for s in sets)
            result = state.sim.run(
                circuits,
                shots=int(chunk.shots),
                seed_simulator=int(chunk.seed) & SEED_MASK,
                method=method,
                max_parallel_threads=state.threads,
                max_memory_mb=state.max_memory_mb,
                memory=assignment.memory,
                noise_model=noise,
                parameter_binds=binds if any(binds) else None,
            ).result()
            if not result.success:
                conn.send(("failed", _worker_aer_error(result), False))
                return
            if len(result.results) != len(experiments):
                raise ValueError(f"Aer returned {len(result.results)} experiments, expected {len(experiments)}")
            out = common_pb2.ShardResult()
            for pos, (circuit_index, set_index, width) in enumerate(experiments):
                data_i = result.data(pos)
                ran = _worker_method_run(result, pos)
                if "counts" not in data_i:
                    # Aer reports counts only for circuits that measure: classical bits that
                    # nothing writes read all zeros (as in Qiskit's samplers and BasicSimulator).
                    circuit = state.circuit(circuit_index, payloads)
                    _worker_check_unwritten_clbits(circuit, circuit_index)
                    item = out.results.add(circuit_index=circuit_index, set_index=set_index,
                                           outcomes=Outcomes.of(width, 0, chunk.shots).to_proto(), method=ran)
                    if assignment.memory:
                        item.memory = bytes(width * chunk.shots)
                    continue
                outcomes = Outcomes.from_hex_counts(data_i["counts"], width)  # packed once, here
                if outcomes.shots != chunk.shots:
                    raise ValueError(f"circuit {circuit_index}: counts sum to {outcomes.shots}, "
                                     f"expected {chunk.shots} shots")
                item = out.results.add(circuit_index=circuit_index, set_index=set_index,
                                       outcomes=outcomes.to_proto(), method=ran)
                if assignment.memory:
                    item.memory = pack_memory(data_i["memory"], width)
            conn.send(("chunk", chunk_index, out.SerializeToString(), time.perf_counter() - tc))
        conn.send(("done", time.perf_counter() - t0))
    except _AerFailure as exc:
        conn.send(("failed", str(exc), False))
    except MemoryError as exc:
        conn.send(("failed", _short_error(exc), True))  # the heap may be in a bad way: restart
    except Exception as exc:  # noqa: BLE001 - any failure of a shard is reported, not raised
        name = type(exc).__name__
        if name == "AerError" or name.endswith("Error") and type(exc).__module__.startswith("qiskit_aer"):
            message = f"AerError: {str(exc).strip()}"[:_ERROR_MAX_CHARS]
        else:
            message = _short_error(exc)
        conn.send(("failed", message, False))


def _worker_main(
    conn: Connection,
    parent_pid: int,
    threads: int,
    memory_budget_bytes: int,
    cache_entries: int,
    cache_bytes: int,
) -> None:
    """Entry point of a worker process: warm up, then run shards until told to stop."""
    _worker_die_with_parent(parent_pid)
    # OpenMP reads this when Aer's library loads: set it before anything imports qiskit_aer.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    # The daemon drains on SIGINT/SIGTERM and stops its workers itself; a Ctrl-C or a SIGTERM
    # sent to the whole process group must not kill the shards it is finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        state, info = _worker_warm_up(threads, memory_budget_bytes)
        state.cache_entries, state.cache_bytes = cache_entries, cache_bytes
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which logs it
        try:
            conn.send(("fatal", _short_error(exc)))
        finally:
            conn.close()
        return
    conn.send(("ready", info))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            conn.close()
            return
        if msg[0] == "run":
            try:
                _worker_run_shard(state, conn, msg[1])
            except (BrokenPipeError, OSError):
                return
