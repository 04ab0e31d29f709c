"""Decoding and inspection of untrusted circuits in sandboxed subprocesses.

Everything a client submits is decoded here, never in the coordinator's own process: QPY
(:func:`~qscale.circuits.load_qpy`), OpenQASM (:func:`~qscale.circuits.parse_qasm`, which scans
the source before parsing it), the allow-list and operation count
(:func:`~qscale.circuits.check_operations`), the qubit and clbit limits, the summary the planner
needs (:func:`~qscale.circuits.describe`) and, for OpenQASM, the QPY the nodes will read. The
JSON noise model is parsed here too (qiskit-aer reads it).

A :class:`SandboxPool` keeps up to ``Limits.decode_workers`` long-lived processes (fresh
interpreters, not forks of the coordinator): one from the start, more when requests overlap or a
long batch comes. Each one:

- warms up (imports the parsers), then limits its own address space with
  ``RLIMIT_AS`` = its warmed-up size + ``Limits.decode_memory_bytes``, turns off core dumps,
  and gives itself a CPU-time limit before each payload (a backstop for the parent's timer);
- takes a batch of payloads per round trip (a job of 10,000 small circuits is one or two
  round trips, not 10,000), and writes the index of the payload it is working on to shared
  memory, so the parent knows which one to blame;
- answers with JSON and raw QPY bytes, never a pickle: the coordinator never unpickles what a
  process that has read hostile bytes sends back.

The parent kills a process that spends longer than ``Limits.decode_timeout_s`` on one payload;
a process that dies (out of memory, a parser crash, the timer) is replaced, and the request gets
``InvalidArgumentError("circuit N could not be decoded safely: ...")``. The coordinator itself
never runs out of memory or crashes on a payload.

The coordinator's server opens a pool with :func:`open_pool` when it starts and closes it when it
stops; :func:`pool_for` finds the open pool for a set of limits (intake uses it).
:class:`InProcessDecoder` runs the same checks without a sandbox, for trusted input and tests.
"""

from __future__ import annotations

import atexit
import json
import logging
import mmap
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from qiskit import qpy

from qscale.circuits import (
    CircuitInfo,
    check_operations,
    describe,
    dump_qpy,
    load_qpy,
    parse_qasm,
    qpy_version,
)
from qscale.coordinator.config import Limits
from qscale.errors import InvalidArgumentError, UnavailableError

__all__ = [
    "Source",
    "Decoded",
    "Decoder",
    "SandboxPool",
    "InProcessDecoder",
    "open_pool",
    "release",
    "pool_for",
    "inspect_source",
]

log = logging.getLogger(__name__)

#: Batches at least this long are split over the idle processes of the pool.
SPLIT_MIN = 512
_STARTUP_TIMEOUT_S = 120.0
_POLL_S = 0.05
_MAX_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class Source:
    """One submitted circuit: ``kind`` is ``"qpy"`` (bytes) or ``"qasm"`` (text)."""

    kind: str
    data: bytes | str
    name: str = ""


@dataclass(frozen=True)
class Decoded:
    """A circuit that passed: its summary, and the QPY to store (None: the submitted bytes)."""

    info: CircuitInfo
    qpy: bytes | None


class Decoder(Protocol):
    """What intake needs: decode and check a job's circuits (and its noise model)."""

    def decode(self, sources: Sequence[Source], limits: Limits, *, noise_model: str = "") -> list[Decoded]:
        """One :class:`Decoded` per source, in order.

        Raises:
            InvalidArgumentError: ``"circuit N: ..."`` for the first source that fails (or
                ``"invalid noise model"``).
        """
        ...


# =============================================================================================
# The checks themselves: what a sandbox process runs on each payload.
# =============================================================================================

_LimitTuple = tuple[int, int, int, int, int]


def _limit_tuple(limits: Limits) -> _LimitTuple:
    return (limits.max_circuit_bytes, limits.max_qubits, limits.max_clbits, limits.max_operations,
            limits.max_nesting_depth)


def inspect_source(kind: str, data: bytes | str, name: str, limits: Limits | _LimitTuple) -> Decoded:
    """Decode and check one circuit in this process (the sandbox calls it on each payload).

    Raises:
        InvalidArgumentError: the payload is refused (message fit for a client).
        MemoryError: the decoder ran out of memory.
    """
    max_bytes, max_qubits, max_clbits, max_operations, max_depth = (
        _limit_tuple(limits) if isinstance(limits, Limits) else limits)
    if kind == "qpy" and isinstance(data, bytes):
        circuit = load_qpy(data, max_bytes=max_bytes)
        version, unique_names = qpy_version(data), False
    elif kind == "qasm" and isinstance(data, str):
        circuit = parse_qasm(data, max_chars=max_bytes, max_qubits=max_qubits, max_clbits=max_clbits,
                             max_operations=max_operations, max_nesting_depth=max_depth)
        version, unique_names = int(qpy.QPY_VERSION), True  # OpenQASM defines a gate name once
    else:
        raise InvalidArgumentError("empty: give QPY bytes or OpenQASM text")
    if circuit.num_qubits > max_qubits:
        raise InvalidArgumentError(f"{circuit.num_qubits} qubits; the limit is {max_qubits}")
    if circuit.num_clbits > max_clbits:
        raise InvalidArgumentError(f"{circuit.num_clbits} classical bits; the limit is {max_clbits}")
    check_operations(circuit, max_operations=max_operations, max_nesting_depth=max_depth,
                     unique_names=unique_names)
    info = replace(describe(circuit, name[:200]), qpy_version=version)
    if len(info.name) > 200:
        info = replace(info, name=info.name[:200])
    if any(len(text) > 200 for text in (*info.parameters, *(reg for reg, _ in info.creg_sizes))):
        raise InvalidArgumentError("parameter and register names may be at most 200 characters long")
    if kind == "qpy":
        return Decoded(info, None)
    data = dump_qpy(circuit)
    if len(data) > max_bytes:
        raise InvalidArgumentError(f"the circuit's QPY would be {len(data)} bytes; the limit is {max_bytes}")
    return Decoded(info, data)


def check_noise_model_text(text: str) -> None:
    """Parse a JSON noise model with qiskit-aer (in this process).

    Raises:
        InvalidArgumentError: it is not one.
        MemoryError: parsing it ran out of memory.
    """
    import warnings

    try:
        data = json.loads(text)
        from qiskit_aer.noise import NoiseModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            NoiseModel.from_dict(data)
    except MemoryError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # any failure is the payload's fault; its text is never passed on
        raise InvalidArgumentError("invalid noise model: it is not a NoiseModel.to_dict(serializable=True) "
                                   "JSON document qiskit-aer can read") from None


class InProcessDecoder:
    """Runs the sandbox's checks in this process, without its memory and time limits.

    For trusted input and tests only: a hostile payload can exhaust this process's memory.
    """

    def decode(self, sources: Sequence[Source], limits: Limits, *, noise_model: str = "") -> list[Decoded]:
        if noise_model:
            check_noise_model_text(noise_model)
        out = []
        for index, source in enumerate(sources):
            try:
                out.append(inspect_source(source.kind, source.data, source.name, limits))
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"circuit {index}: {exc}") from None
        return out


# =============================================================================================
# The wire between a sandbox process and the coordinator: JSON and raw bytes, no pickle upward.
# =============================================================================================

_HEADER = struct.Struct("!I")
_PROGRESS = struct.Struct("=q")


def _encode_reply(results: list[Any], blobs: list[bytes], restart: bool) -> bytes:
    head = json.dumps({"results": results, "restart": restart}, separators=(",", ":")).encode()
    return _HEADER.pack(len(head)) + head + b"".join(blobs)


def _info_to_json(info: CircuitInfo) -> list[Any]:
    return [getattr(info, f.name) for f in fields(CircuitInfo)]


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError("expected a list of integers")
    return tuple(value)


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= 1000 for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _pairs(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and type(v[1]) is int for v in value):
        raise ValueError("expected a list of (name, size)")
    return tuple((v[0], v[1]) for v in value)


def _ints_lists(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list of lists")
    return value


def _natural(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("expected a natural number")
    return value


def _boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("expected a boolean")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 1000:
        raise ValueError("expected a short string")
    return value


# Field types of CircuitInfo, by their annotation: a new field needs a parser here (fail closed).
_FIELD_PARSERS = {
    "str": _text,
    "int": _natural,
    "bool": _boolean,
    "tuple[tuple[str, int], ...]": _pairs,
    "tuple[str, ...]": _strs,
    "tuple[tuple[int, ...], ...]": lambda v: tuple(_ints(x) for x in _ints_lists(v)),
}


_PARSERS = tuple(_FIELD_PARSERS[str(f.type)] for f in fields(CircuitInfo))


def _info_from_json(values: Any) -> CircuitInfo:
    if type(values) is not list or len(values) != len(_PARSERS):
        raise ValueError("wrong number of fields")
    return CircuitInfo(*[parse(v) for parse, v in zip(_PARSERS, values)])


def _clean(message: Any) -> str:
    """A sandbox's error message, bounded and printable (it comes from a process that read
    hostile bytes: trusted as little as the rest of its reply)."""
    text = message if isinstance(message, str) else "invalid payload"
    text = "".join(ch if ch.isprintable() else "?" for ch in text[:_MAX_MESSAGE_CHARS])
    return text or "invalid payload"


def _decode_reply(data: bytes, expected: int) -> tuple[list[tuple[bool, Any, bytes | None]], bool]:
    """[(True, CircuitInfo or None, qpy or None) or (False, (kind, message), None)], restart.

    Raises:
        ValueError: the reply is malformed.
    """
    if len(data) < _HEADER.size:
        raise ValueError("short reply")
    (size,) = _HEADER.unpack_from(data)
    head = json.loads(data[_HEADER.size:_HEADER.size + size])
    results, restart = head.get("results"), head.get("restart")
    if not isinstance(results, list) or len(results) > expected or type(restart) is not bool:
        raise ValueError("malformed reply")
    out: list[tuple[bool, Any, bytes | None]] = []
    offset = _HEADER.size + size
    for item in results:
        if not isinstance(item, list) or not item:
            raise ValueError("malformed result")
        if item[0] == 1 and len(item) == 3:
            info = _info_from_json(item[1])
            length = item[2]
            if length is None:
                out.append((True, info, None))
                continue
            if type(length) is not int or length < 0 or offset + length > len(data):
                raise ValueError("malformed QPY length")
            out.append((True, info, data[offset:offset + length]))
            offset += length
        elif item[0] == 0 and len(item) == 3 and item[1] in ("error", "memory", "crash"):
            out.append((False, (item[1], _clean(item[2])), None))
        elif item[0] == 2 and len(item) == 1:  # the noise model passed
            out.append((True, None, None))
        else:
            raise ValueError("malformed result")
    if offset != len(data):
        raise ValueError("trailing bytes in reply")
    return out, restart


# =============================================================================================
# Sandbox process side. Everything here runs in the spawned process.
# =============================================================================================


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _die_with_parent(ppid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != ppid:
        os._exit(3)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _child_entry() -> None:
    """``python -c`` entry point of a sandbox process: ``CONN_FD PROGRESS_FD PARENT_PID MEMORY``."""
    conn_fd, progress_fd, parent_pid, memory_bytes = (int(arg) for arg in sys.argv[1:5])
    progress = _Progress(progress_fd)
    os.close(progress_fd)
    _child_main(Connection(conn_fd), progress, parent_pid, memory_bytes)


def _child_main(conn: Connection, progress: _Progress, parent_pid: int, memory_bytes: int) -> None:
    """Warm up, limit this process, then decode batches until told to stop."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource

        from qiskit import QuantumCircuit

        from qscale.circuits import dump_qpy

        probe = QuantumCircuit(1, 1)
        probe.h(0)
        probe.measure(0, 0)
        limits = _limit_tuple(Limits())
        inspect_source("qpy", dump_qpy(probe), "", limits)
        inspect_source("qasm", 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[1];\ncreg c[1];\nh q[0];\n'
                       "measure q[0] -> c[0];\n", "", limits)
        inspect_source("qasm", 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[1] q;\nbit[1] c;\nh q[0];\n'
                       "c[0] = measure q[0];\n", "", limits)
        check_noise_model_text('{"errors": []}')
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        base = _vm_size()
        if base is not None:
            cap = base + memory_bytes
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        sys.stderr = _Discard()  # ANTLR prints syntax errors (quoting the source) to stderr
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which logs it
        conn.send_bytes(b"F" + f"{type(exc).__name__}: {exc}"[:500].encode(errors="replace"))
        return
    conn.send_bytes(b"R")
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] != "batch":
            return
        _, limits, items, timeout = message
        results: list[Any] = []
        blobs: list[bytes] = []
        restart = False
        for index, (kind, data, name) in enumerate(items):
            progress.value = index
            used = resource.getrusage(resource.RUSAGE_SELF)
            budget = int(used.ru_utime + used.ru_stime + timeout) + 2
            if cpu_hard == resource.RLIM_INFINITY or budget < cpu_hard:
                resource.setrlimit(resource.RLIMIT_CPU, (budget, cpu_hard))
            try:
                if kind == "noise":
                    check_noise_model_text(data)
                    results.append([2])
                    continue
                decoded = inspect_source(kind, data, name, limits)
            except InvalidArgumentError as exc:
                results.append([0, "error", str(exc)])
                break
            except MemoryError:
                results.append([0, "memory", ""])
                restart = True  # the heap may be in a bad way
                break
            except RecursionError:
                results.append([0, "error", "it is nested too deeply"])
                break
            except BaseException:  # noqa: BLE001 - a decoder bug on hostile input: refuse the payload
                results.append([0, "crash", "the decoder failed on it"])
                restart = True
                break
            if decoded.qpy is None:
                results.append([1, _info_to_json(decoded.info), None])
            else:
                results.append([1, _info_to_json(decoded.info), len(decoded.qpy)])
                blobs.append(decoded.qpy)
        try:
            conn.send_bytes(_encode_reply(results, blobs, restart))
        except MemoryError:
            os._exit(4)
        if restart:
            conn.close()
            return


# =============================================================================================
# Coordinator side.
# =============================================================================================

_launcher_lock = threading.Lock()
_launcher_queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_launcher_thread: threading.Thread | None = None


def _launcher_loop() -> None:
    while True:
        start, fut = _launcher_queue.get()
        try:
            fut.set_result(start())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)


def _ensure_launcher() -> None:
    """Processes are started from one long-lived thread: the kernel's parent-death signal
    follows the thread that started a process, so a short-lived caller must not be that thread."""
    global _launcher_thread
    with _launcher_lock:
        if _launcher_thread is None or not _launcher_thread.is_alive():
            _launcher_thread = threading.Thread(target=_launcher_loop, name="qscale-sandbox-launcher", daemon=True)
            _launcher_thread.start()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "it stopped"
    if code < 0:
        try:
            return f"signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


class _Progress:
    """The index of the payload a sandbox process is working on, in 8 bytes of shared memory."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, _PROGRESS.size)

    @property
    def value(self) -> int:
        return int(_PROGRESS.unpack_from(self._map)[0])

    @value.setter
    def value(self, index: int) -> None:
        _PROGRESS.pack_into(self._map, 0, index)


# The working directory is not searched for modules: a source checkout there must not shadow the
# installed package (``qscale/`` in a checkout lacks ``qscale.coordinator``).
_CHILD_CODE = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
               "from qscale.coordinator.sandbox import _child_entry; _child_entry()")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|(^|_)KEY($|_)", re.I)


class _Process:
    """A sandbox process: ``python -c`` running :func:`_child_entry`, so that nothing of the
    coordinator's own ``__main__`` is imported again there (as multiprocessing's spawn would)."""

    def __init__(self, conn_fd: int, progress_fd: int, memory_bytes: int) -> None:
        # Nothing secret in the environment of a process that reads hostile bytes.
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("QSCALE_") and not _SECRET_NAME.search(name)}
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
            env[var] = "1"
        env["MALLOC_ARENA_MAX"] = "2"
        self.popen = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, str(conn_fd), str(progress_fd), str(os.getpid()), str(memory_bytes)],
            pass_fds=(conn_fd, progress_fd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
        )
        self.pid = self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def join(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()


class _Worker:
    """One sandbox process, its socket, and its progress word."""

    def __init__(self, pool: SandboxPool, number: int) -> None:
        parent, child = socket.socketpair()
        progress_fd = os.memfd_create(f"qscale-sandbox-{number}") if hasattr(os, "memfd_create") else -1
        if progress_fd < 0:
            progress_file = tempfile.TemporaryFile()
            progress_fd = os.dup(progress_file.fileno())
            progress_file.close()
        try:
            os.ftruncate(progress_fd, _PROGRESS.size)
            self.progress = _Progress(progress_fd)
            self.progress.value = -1
            fut: Future[_Process] = Future()
            _launcher_queue.put((lambda: _Process(child.fileno(), progress_fd, pool.memory_bytes), fut))
            _ensure_launcher()
            self.proc = fut.result()
        finally:
            child.close()  # the process holds the only other end: its death is EOF here
            os.close(progress_fd)
        self.conn = Connection(parent.detach())
        self.ready = False
        self.started = time.monotonic()

    def wait_ready(self, deadline: float) -> None:
        """Block until the process has warmed up. Raises UnavailableError if it cannot."""
        while not self.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnavailableError("the circuit decoder did not start in time; see the coordinator log")
            try:
                if not self.conn.poll(min(left, 1.0)):
                    if not self.proc.is_alive() and not self.conn.poll(0):
                        raise EOFError
                    continue
                message = self.conn.recv_bytes(4096)
            except (EOFError, OSError):
                self.proc.join(1.0)
                log.error("sandbox process %s died while warming up (%s)", self.proc.pid,
                          _describe_exit(self.proc.exitcode))
                raise UnavailableError("the circuit decoder could not start; see the coordinator log") from None
            if message == b"R":
                self.ready = True
                log.debug("sandbox process %s ready in %.2f s", self.proc.pid, time.monotonic() - self.started)
            else:
                log.error("sandbox process %s failed to warm up: %s", self.proc.pid,
                          message[1:].decode(errors="replace"))
                self.kill()
                raise UnavailableError("the circuit decoder could not start; see the coordinator log")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5.0)
        self.conn.close()

    def ask_to_stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        self.ask_to_stop()
        self.proc.join(1.0)
        self.kill()


@dataclass
class _Part:
    worker: _Worker
    offset: int
    count: int
    deadline: float
    max_reply: int = 64 << 20
    """Longest reply accepted (QPY made from OpenQASM, and JSON): a bound on what a process that
    read hostile bytes can make the coordinator allocate."""
    seen: int = -1
    reply: bytes | None = None
    results: list[tuple[bool, Any, bytes | None]] = field(default_factory=list)
    failure: tuple[int, str, str] | None = None
    """(index in the part, kind, message) when the process failed or answered badly."""


class SandboxPool:
    """Long-lived sandbox processes that decode untrusted payloads (see the module docstring).

    Thread-safe: several intake threads may call :meth:`decode` at once; each call takes one
    process, or several idle ones for a long batch.
    """

    def __init__(self, *, workers: int = 2, memory_bytes: int = 2 << 30, timeout_s: float = 10.0) -> None:
        self.workers = max(1, int(workers))
        self.memory_bytes = int(memory_bytes)
        self.timeout_s = float(timeout_s)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._all: set[_Worker] = set()
        self._closed = False
        self._started = False
        self._starting = 0
        self._count = 0

    @classmethod
    def for_limits(cls, limits: Limits) -> SandboxPool:
        return cls(workers=limits.decode_workers, memory_bytes=limits.decode_memory_bytes,
                   timeout_s=limits.decode_timeout_s)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> SandboxPool:
        """Start the first process; returns at once (it warms up in the background). More start
        when requests overlap or a long batch comes, up to ``workers``."""
        with self._lock:
            if self._started or self._closed:
                return self
            self._started = True
        self._idle.put(self._spawn())
        return self

    def _grow(self) -> _Worker | None:
        """A new process, if the pool may have one more."""
        with self._lock:
            if len(self._all) + self._starting >= self.workers or self._closed:
                return None
            self._starting += 1
        try:
            return self._spawn()
        finally:
            with self._lock:
                self._starting -= 1

    def close(self) -> None:
        """Stop every process (a decode in progress fails with UnavailableError). Idempotent."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.ask_to_stop()
        deadline = time.monotonic() + 1.0
        for worker in workers:
            worker.proc.join(max(0.0, deadline - time.monotonic()))
            worker.kill()

    @property
    def closed(self) -> bool:
        return self._closed

    def pids(self) -> list[int]:
        """Process ids of the sandbox processes (for tests and diagnostics)."""
        with self._lock:
            return [w.proc.pid for w in self._all if w.proc.pid is not None]

    def _spawn(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise UnavailableError("the coordinator is shutting down")
            self._count += 1
            number = self._count
        worker = _Worker(self, number)
        with self._lock:
            if self._closed:
                worker.kill()
                raise UnavailableError("the coordinator is shutting down")
            self._all.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        """Kill a process that failed or may be unhealthy; put a fresh one in its place."""
        with self._lock:
            self._all.discard(worker)
        worker.kill()
        try:
            self._idle.put(self._spawn())
        except UnavailableError:
            pass
        except Exception:  # pragma: no cover - e.g. out of file descriptors
            log.exception("could not start a sandbox process")

    def _take(self, deadline: float) -> _Worker:
        if not self._started:
            self.start()
        failures = 0
        while True:
            if self._closed:
                raise UnavailableError("the coordinator is shutting down")
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                grown = self._grow()  # every process is busy: start another if allowed
                try:
                    worker = grown or self._idle.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise UnavailableError("the circuit decoder is overloaded; try again") from None
                    continue
            if worker.ready and worker.proc.is_alive():
                return worker
            if not worker.ready:
                try:
                    worker.wait_ready(deadline)
                    return worker
                except UnavailableError:
                    failures += 1
                    self._retire(worker)
                    if failures >= 2:
                        raise
                    continue
            self._retire(worker)  # died while idle

    def _give_back(self, worker: _Worker) -> None:
        if self._closed:
            worker.stop()
        else:
            self._idle.put(worker)

    # ---- decoding -----------------------------------------------------------------------------

    def decode(self, sources: Sequence[Source], limits: Limits, *, noise_model: str = "") -> list[Decoded]:
        """Decode and check ``sources`` (and ``noise_model``) in the sandbox; see :class:`Decoder`."""
        items: list[tuple[str, bytes | str, str]] = []
        if noise_model:
            items.append(("noise", noise_model, ""))
        items.extend((source.kind, source.data, source.name) for source in sources)
        if not items:
            return []
        results, failure = self._run(items, _limit_tuple(limits))
        if failure is not None:
            index, kind, message = failure
            if kind == "closed":
                raise UnavailableError("the coordinator is shutting down; submit again")
            what = "the noise model" if noise_model and index == 0 else f"circuit {index - bool(noise_model)}"
            if kind == "timeout":
                raise InvalidArgumentError(f"{what} could not be decoded safely: it took longer than the "
                                           f"{self.timeout_s:g} s limit")
            if kind == "memory":
                raise InvalidArgumentError(f"{what} could not be decoded safely: it needs more memory than the "
                                           f"{_gib(self.memory_bytes)} limit")
            if kind == "crash":
                raise InvalidArgumentError(f"{what} could not be decoded safely: {message}")
            raise InvalidArgumentError(message if what == "the noise model" else f"{what}: {message}")
        out = [Decoded(info, blob) for info, blob in results if info is not None]
        if len(out) != len(sources):
            raise InvalidArgumentError("the job could not be decoded safely: the decoder lost track of it")
        return out

    def _run(self, items: list[tuple[str, bytes | str, str]], limits: _LimitTuple
             ) -> tuple[list[tuple[Any, bytes | None]], tuple[int, str, str] | None]:
        """Run ``items`` on one process, or split over idle ones. Returns the results up to the
        first failure, and that failure as (item index, kind, message) or None."""
        workers = [self._take(time.monotonic() + _STARTUP_TIMEOUT_S)]
        if len(items) >= SPLIT_MIN and self._idle.empty():
            grown = self._grow()  # warms up while this batch runs: the next long one is split
            if grown is not None:
                self._idle.put(grown)
        while (len(items) >= SPLIT_MIN and len(workers) < self.workers
               and len(items) // (len(workers) + 1) >= SPLIT_MIN // 2):
            try:
                extra = self._idle.get_nowait()
            except queue.Empty:
                break
            if not (extra.ready and extra.proc.is_alive()):
                self._idle.put(extra)
                break
            workers.append(extra)
        size = -(-len(items) // len(workers))
        parts: list[_Part] = []
        try:
            for number, worker in enumerate(workers):
                chunk = items[number * size:(number + 1) * size]
                worker.progress.value = -1
                part = _Part(worker, number * size, len(chunk), time.monotonic() + self.timeout_s,
                             max_reply=(64 << 20) + 8 * sum(len(data) for _, data, _ in chunk))
                parts.append(part)
                try:
                    worker.conn.send(("batch", limits, chunk, self.timeout_s))
                except (OSError, ValueError):
                    part.failure = (0, "crash", "the decoder stopped")
            self._wait(parts)
        finally:
            for part in parts:
                self._settle(part)
        results: list[tuple[Any, bytes | None]] = []
        for part in parts:
            if part.failure is not None:
                index, kind, message = part.failure
                return results, (part.offset + index, kind, message)
            for position, (ok, value, blob) in enumerate(part.results):
                if not ok:
                    kind, message = value
                    return results, (part.offset + position, kind, message)
                results.append((value, blob))
        return results, None

    def _settle(self, part: _Part) -> None:
        """Read a part's reply, and give its process back or replace it."""
        worker = part.worker
        if part.failure is None and part.reply is None:  # left early (an exception while waiting)
            part.failure = (0, "crash", "the decoder stopped")
        if part.failure is None:
            try:
                part.results, restart = _decode_reply(part.reply or b"", part.count)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                log.error("sandbox process %s sent a malformed reply; replaced", worker.proc.pid)
                part.failure = (len(part.results), "crash", "the decoder failed on it")
                restart = True
            if not restart and len(part.results) < part.count and (not part.results or part.results[-1][0]):
                part.failure = (len(part.results), "crash", "the decoder stopped")  # answered too few
                restart = True
            if not restart:
                self._give_back(worker)
                return
        self._retire(worker)

    def _wait(self, parts: list[_Part]) -> None:
        """Until every part has replied or failed."""
        pending = {p.worker.conn: p for p in parts if p.failure is None}
        while pending:
            ready = wait(list(pending), timeout=_POLL_S)
            now = time.monotonic()
            for conn in ready:
                part = pending.pop(conn)  # type: ignore[index]
                try:
                    part.reply = conn.recv_bytes(part.max_reply)  # type: ignore[union-attr]
                except (EOFError, OSError):  # it died, or sent more than a reply can hold
                    part.worker.proc.join(1.0)
                    if part.worker.proc.is_alive():
                        part.worker.kill()
                    index = max(0, part.worker.progress.value)
                    code = part.worker.proc.exitcode
                    if self._closed:
                        part.failure = (index, "closed", "")
                    elif code == -signal.SIGXCPU:
                        part.failure = (index, "timeout", "")
                    else:
                        part.failure = (index, "crash", f"the decoder crashed ({_describe_exit(code)})")
                    log.warning("sandbox process %s died on a payload (%s)", part.worker.proc.pid,
                                _describe_exit(code))
            for conn, part in list(pending.items()):
                value = part.worker.progress.value
                if value != part.seen:
                    part.seen, part.deadline = value, now + self.timeout_s
                elif now > part.deadline:
                    log.warning("sandbox process %s spent over %g s on one payload; killed",
                                part.worker.proc.pid, self.timeout_s)
                    part.worker.kill()
                    part.failure = (max(0, value), "timeout", "")
                    del pending[conn]


# =============================================================================================
# Pools by settings: the server opens one, intake finds it.
# =============================================================================================

_pools_lock = threading.Lock()
_pools: dict[tuple[int, int, float], tuple[SandboxPool, int]] = {}


def _key(limits: Limits) -> tuple[int, int, float]:
    return (limits.decode_workers, limits.decode_memory_bytes, limits.decode_timeout_s)


def open_pool(limits: Limits) -> SandboxPool:
    """The pool for these limits' sandbox settings, started if new; every call needs a
    :func:`release`. Returns at once: the processes warm up in the background."""
    with _pools_lock:
        pool, users = _pools.get(_key(limits), (None, 0))
        if pool is None or pool.closed:
            pool, users = SandboxPool.for_limits(limits), 0
        _pools[_key(limits)] = (pool, users + 1)
    return pool.start()


def release(pool: SandboxPool) -> None:
    """Give back a pool from :func:`open_pool`; the last user's release closes it."""
    with _pools_lock:
        for key, (known, users) in list(_pools.items()):
            if known is pool:
                if users > 1:
                    _pools[key] = (known, users - 1)
                    return
                del _pools[key]
                break
    pool.close()


def pool_for(limits: Limits) -> SandboxPool:
    """The open pool for these limits' sandbox settings; if none is open (``prepare_job`` called
    outside a server), one is opened and kept until the process exits."""
    with _pools_lock:
        found = _pools.get(_key(limits))
        if found is not None and not found[0].closed:
            return found[0]
    pool = open_pool(limits)
    atexit.register(pool.close)
    return pool
