"""qscale coordinator scale test: many fake nodes heartbeating while jobs flow.

What runs
---------
* A real coordinator process (``python -m qscale.coordinator serve``) on ``127.0.0.1``, port chosen
  by the OS (``--listen 127.0.0.1:0 --address-file``), a fresh ``--state-dir``, heartbeat interval
  ``--heartbeat-interval`` (1 s) and timeout ``--heartbeat-timeout`` (5 s). Its own environment is
  cleared of ``QSCALE_*`` variables, so nothing from the caller's shell changes its settings.
* ``--procs`` load processes (multiprocessing, ``spawn``), each running asyncio + ``grpc.aio`` over
  ``--channels`` channels (one TCP connection each) and hosting ``--nodes / --procs`` *fake nodes*.
  A fake node speaks the real protocol: ``NodeService.Register`` with plausible capabilities
  (1 slot, 1 core, 1 GiB, every Aer method, 25-qubit statevectors, this Qiskit's QPY version),
  then the bidirectional ``Work`` stream opened with a ``hello``, on which it sends a
  ``heartbeat`` (sequence number, attempts in hand, free slots) every ``heartbeat_interval_s``
  of the replies (first one at a random phase, then on a fixed schedule) and reads the
  coordinator's ``heartbeat_reply`` to each. It writes on its stream one message at a time (a
  heartbeat may wait for a result being written, as on a real node).
  It answers every ``ShardAssignment`` without simulating: after ``--shard-ms`` of sleep (modelled
  work), one ``ChunkResult`` per chunk with one ``CircuitCounts`` per planned experiment, packed
  outcomes "outcome 0, ``shots`` times" (valid for the job driver's one-bit circuits), then ``ShardDone``. Shards are
  handled one at a time, like a 1-slot node; a cancelled attempt is skipped.
* A job driver in this process: ``--jobs-in-flight`` threads sharing one ``qscale.Client``, each
  submitting a job of ``--circuits`` one-qubit circuits (``h``, ``measure``) x ``--shots`` shots,
  waiting for its result and checking that every circuit got exactly its shots.
* ``--users N`` (default 0: no authentication) turns authentication on: the coordinator gets a
  client tokens file of N users (``user0`` ... , one API token each) and a node tokens file of
  one join token, both mode 600 in the temporary directory; the fake nodes present the join
  token (``authorization: Bearer <token>`` metadata on ``Register`` and ``Work``), and the job
  driver submits through N clients, one per user, taking turns (round robin over the
  submissions of all its threads), so the coordinator shares the nodes between N users.

Phases: start the coordinator; start the load processes and let them connect; register every
node (timed: from the go signal until ``ListNodes`` shows all of them alive); run one warm-up job
(it also tells how the planner cuts a job); the *idle window* (``--idle-window`` s, heartbeats
only: the baseline); then the *load window*: jobs flow for ``--duration`` seconds, after which no
new job is submitted and the ones in flight are awaited (the window ends when the last one is
back); then ``ListNodes`` is read, and everything is stopped (in ``finally``, also on Ctrl-C,
SIGTERM or errors; the coordinator, in its own session, also gets SIGTERM if this process dies).

What is measured (over the load window unless said otherwise)
-------------------------------------------------------------
* heartbeat latency: round trip of each heartbeat, as seen by the fake node: from just before
  it writes the ``heartbeat`` on its stream to the moment it reads the ``heartbeat_reply`` that
  echoes its sequence number (a heartbeat left unanswered for the heartbeat timeout counts with
  that wait, as error ``NO_REPLY``); p50 / p99 / max in ms;
* false node losses: fake nodes that kept heartbeating but were declared lost: a heartbeat reply
  with ``known == False``, a ``Work`` stream closed or broken by the coordinator, or a node that
  ``ListNodes`` no longer shows as alive at the end. Counted over the whole run. The reasons the
  coordinator logged ("node ... lost (...)") are reported too;
* shards per second: ``ShardDone`` messages the fake nodes sent, over the window; jobs completed
  and failed (a failed job: an error, a timeout, or totals that are not the shots asked for);
* coordinator CPU: user + system seconds of the coordinator process (``/proc/PID/stat``) as % of
  one core over the window; its sandbox (circuit decoding) child processes separately;
* coordinator memory: ``VmRSS`` (sampled every 0.5 s: at start of the window, end, peak) and
  ``VmHWM`` (peak) from ``/proc/PID/status``;
* also: registration time, job round-trip times, the load processes' own event-loop lag and
  heartbeat send delay, the load processes' and this process's CPU, the machine's busy %, the
  same heartbeat and CPU figures for the idle window, and a per-second timeline of heartbeat
  latency (JSON ``timeline``; the report prints the slowest seconds).

Targets (pass/miss in the report): heartbeat p99 < 100 ms, 0 false losses, coordinator peak
memory (VmHWM) < 1 GiB.

Caveat
------
Everything shares one machine: the load processes, the job driver (QPY encoding, result
decoding) and the coordinator compete for the same cores. On a small machine (2 cores) a
heartbeat's round trip includes time the *load process* waited for a CPU, so the latency is an
upper bound on what the coordinator adds; the report shows the load processes' own event-loop
lag and CPU and the machine's busy % to tell the two apart. The coordinator's CPU % is its own
process only (what one coordinator core would have to sustain). For a clean measurement, pin
the coordinator and the load to different cores, or run the load from another machine.

Diagnosis: ``--profile FILE`` samples the coordinator with py-spy (``pip install py-spy``) during
the load window, writes its collapsed stacks to FILE, and reports the share of samples on the
event-loop thread and the top functions. ``--gc-trace`` starts the coordinator through a small
wrapper (``python -c``, hooking ``gc.callbacks``, then running ``qscale.coordinator`` as
``__main__``) that records its garbage-collection pauses; the report counts them and puts the GC
milliseconds of each second beside the heartbeat latency of that second.

Usage::

    python benchmarks/scale.py --quick                       # 100 nodes, 2 procs, 15 s
    python benchmarks/scale.py                               # 1,000 nodes, 8 procs, 60 s
    python benchmarks/scale.py --gc-trace --profile /tmp/coordinator.stacks   # why is it slow?
    python benchmarks/scale.py --nodes 2000 --duration 120 --shots 100000  # more nodes, 29 shards a job
    python benchmarks/scale.py --quick --users 4 --output /tmp/scale.json   # 4 users taking turns

Exit status: 0 every target met and every job right; 1 a target missed or a job failed;
2 the benchmark could not run (coordinator did not start, nodes did not register, ...).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import dataclasses
import datetime as _dt
import itertools
import json
import multiprocessing
import os
import platform
import queue as queue_mod
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "scale-results.json"

TARGET_P99_MS = 100.0
TARGET_FALSE_LOSSES = 0
TARGET_MEMORY_BYTES = 1 << 30
METHODS = ("automatic", "statevector", "stabilizer", "density_matrix", "matrix_product_state")
NODE_MEMORY_BYTES = 1 << 30
NODE_MAX_STATEVECTOR_QUBITS = 25

_START_TIMEOUT_S = 60.0  # coordinator start, load processes start
_REGISTER_BASE_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 20.0
_LAG_TICK_S = 0.05


# ============================================================================================
# Load processes: fake nodes
# ============================================================================================


@dataclass(frozen=True)
class LoadSpec:
    """What one load process does (pickled to a spawned process)."""

    index: int
    address: str
    nodes: int
    channels: int
    shard_ms: float
    qpy_version: int
    qiskit_version: str
    aer_version: str
    qscale_version: str
    register_concurrency: int
    max_life_s: float
    """Hard bound on the process's life, in case the parent vanishes without telling it."""
    node_token: str = ""
    """Join token the fake nodes present on ``Register`` and ``Work`` ("": none, no authentication)."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata of a fake node: its join token, if any."""
        return (("authorization", f"Bearer {self.node_token}"),) if self.node_token else None


@dataclass
class LoadStats:
    """Counters of one load process, sent back to the parent at the end (picklable)."""

    index: int
    hb_sent: int = 0
    hb_ok: int = 0
    hb_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    hb_unknown: int = 0
    hb_t: array.array = field(default_factory=lambda: array.array("d"))
    """monotonic time each heartbeat was sent"""
    hb_lat: array.array = field(default_factory=lambda: array.array("d"))
    """its round trip, seconds"""
    hb_delay: array.array = field(default_factory=lambda: array.array("d"))
    """how late it was sent compared to its schedule, seconds"""
    register_lat: array.array = field(default_factory=lambda: array.array("d"))
    register_errors: list[str] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)
    assigned: int = 0
    shards_done: int = 0
    shard_done_t: array.array = field(default_factory=lambda: array.array("d"))
    chunks_sent: int = 0
    cancels: int = 0
    skipped_cancelled: int = 0
    forgets: int = 0
    write_errors: int = 0
    losses: list[tuple[str, str, float]] = field(default_factory=list)
    """(node id, why, monotonic time) of every node the coordinator dropped while it was alive"""
    lag_t: array.array = field(default_factory=lambda: array.array("d"))
    lag: array.array = field(default_factory=lambda: array.array("d"))
    """event-loop lag samples: how late a ``_LAG_TICK_S`` sleep woke up"""
    cpu_s: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        """A plain dict (the class lives in ``__main__``, which the parent cannot unpickle by name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LoadStats:
        return cls(**data)


class FakeNode:
    """One node: Register, then on the Work stream: heartbeat on schedule, answer shards."""

    def __init__(self, spec: LoadSpec, number: int, stub: Any, stats: LoadStats) -> None:
        self.spec = spec
        self.number = number
        self.stub = stub
        self.stats = stats
        self.node_id = ""
        self.interval = 1.0
        self.timeout = 5.0
        self.stopping = False
        self.lost = False
        self.call: Any = None
        self.in_hand: dict[str, Any] = {}
        self.cancelled: set[str] = set()
        self.work: asyncio.Queue[Any] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.write_lock = asyncio.Lock()  # one write at a time on the stream
        self.sequence = 0
        self.unanswered: dict[int, tuple[float, float]] = {}
        """sequence -> (sent, due) of each heartbeat not answered yet, oldest first"""

    def capabilities(self) -> Any:
        from qscale.proto.v1 import node_pb2

        return node_pb2.NodeCapabilities(
            name=f"scale-{self.spec.index}-{self.number}", hostname=socket.gethostname(), cores=1, slots=1,
            memory_budget_bytes=NODE_MEMORY_BYTES, methods=list(METHODS),
            max_statevector_qubits=NODE_MAX_STATEVECTOR_QUBITS, qpy_version=self.spec.qpy_version,
            qscale_version=self.spec.qscale_version, qiskit_version=self.spec.qiskit_version,
            aer_version=self.spec.aer_version)

    async def start(self, sem: asyncio.Semaphore) -> None:
        """Register and open the Work stream; then heartbeats and work run as tasks."""
        from qscale.proto.v1 import node_pb2

        async with sem:
            t0 = time.monotonic()
            reply = await self.stub.Register(node_pb2.RegisterRequest(capabilities=self.capabilities()),
                                             timeout=30.0, metadata=self.spec.metadata)
            self.stats.register_lat.append(time.monotonic() - t0)
            self.node_id = reply.node_id
            self.interval = reply.heartbeat_interval_s or self.interval
            self.timeout = reply.heartbeat_timeout_s or self.timeout
            self.call = self.stub.Work(metadata=self.spec.metadata)
            await self.call.write(node_pb2.NodeMessage(hello=node_pb2.StreamHello(node_id=self.node_id)))
        self.stats.node_ids.append(self.node_id)
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._work()),
                      asyncio.create_task(self._heartbeats())]

    def _lose(self, why: str) -> None:
        if not self.lost and not self.stopping:
            self.lost = True
            self.stats.losses.append((self.node_id, why, time.monotonic()))

    async def _write(self, message: Any) -> bool:
        """Write ``message`` on the stream (one write at a time); False when the stream is closed
        (the node is then counted lost, unless it is stopping)."""
        try:
            async with self.write_lock:
                await self.call.write(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a write on a closed stream
            if not self.stopping:
                self.stats.write_errors += 1
                self._lose(f"work stream write failed: {type(exc).__name__}")
            return False
        return True

    async def _heartbeats(self) -> None:
        from qscale.proto.v1 import node_pb2

        await asyncio.sleep(random.uniform(0.0, self.interval))
        due = time.monotonic()
        while not self.stopping and not self.lost:
            sent = time.monotonic()
            self._expire(sent)
            self.sequence += 1
            self.unanswered[self.sequence] = (sent, due)
            self.stats.hb_sent += 1
            if not await self._write(node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(
                    sequence=self.sequence, attempts_in_hand=list(self.in_hand),
                    free_slots=max(0, 1 - len(self.in_hand))))):
                return
            due += self.interval
            now = time.monotonic()
            if due < now:  # fell behind (a slow write): keep the rate, do not burst
                due = now
            await asyncio.sleep(due - now)

    def _expire(self, now: float) -> None:
        """Count the heartbeats unanswered for the timeout as failed (with the time waited)."""
        while self.unanswered:
            sequence, (sent, due) = next(iter(self.unanswered.items()))
            if now - sent <= self.timeout:
                return
            del self.unanswered[sequence]
            self.stats.hb_errors["NO_REPLY"] += 1
            self._record_heartbeat(sent, due)

    def _on_heartbeat_reply(self, reply: Any) -> None:
        entry = self.unanswered.pop(reply.sequence, None)
        if entry is None:
            return  # counted as unanswered already
        self._record_heartbeat(*entry)
        self.stats.hb_ok += 1
        if not reply.known:
            self.stats.hb_unknown += 1
            self._lose("heartbeat reply known=False")
            return
        self.interval = reply.heartbeat_interval_s or self.interval
        self.timeout = reply.heartbeat_timeout_s or self.timeout

    def _record_heartbeat(self, sent: float, due: float) -> None:
        self.stats.hb_t.append(sent)
        self.stats.hb_lat.append(time.monotonic() - sent)
        self.stats.hb_delay.append(max(0.0, sent - due))

    async def _read(self) -> None:
        import grpc

        try:
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    self._lose("work stream closed by the coordinator")
                    return
                kind = msg.WhichOneof("kind")
                if kind == "assign":
                    self.stats.assigned += 1
                    self.in_hand[msg.assign.attempt_token] = msg.assign
                    self.work.put_nowait(msg.assign)
                elif kind == "cancel":
                    self.stats.cancels += 1
                    self.cancelled.add(msg.cancel.attempt_token)
                elif kind == "forget":
                    self.stats.forgets += 1
                elif kind == "heartbeat_reply":
                    self._on_heartbeat_reply(msg.heartbeat_reply)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._lose(f"work stream broke: {exc.code().name}")
        except Exception as exc:  # noqa: BLE001 - recorded as a loss, never silent
            self._lose(f"work stream error: {type(exc).__name__}: {exc}")

    async def _work(self) -> None:
        from qscale.proto.v1 import common_pb2, node_pb2

        while True:
            assignment = await self.work.get()
            token = assignment.attempt_token
            try:
                if token in self.cancelled:
                    self.stats.skipped_cancelled += 1
                    continue
                started = time.monotonic()
                if self.spec.shard_ms > 0:
                    await asyncio.sleep(self.spec.shard_ms / 1000.0)
                if token in self.cancelled:
                    self.stats.skipped_cancelled += 1
                    continue
                for index, chunk in enumerate(assignment.chunks):
                    counts = [
                        common_pb2.CircuitCounts(circuit_index=entry.circuit_index, set_index=s,
                                                 outcomes=common_pb2.Outcomes(
                                                     width=1, values=b"\x00", counts=chunk.shots.to_bytes(8, "little")),
                                                 memory=bytes(chunk.shots) if assignment.memory else b"")
                        for entry in chunk.entries for s in range(entry.set_start, entry.set_start + entry.set_count)
                    ]
                    if not await self._write(node_pb2.NodeMessage(chunk=node_pb2.ChunkResult(
                            attempt_token=token, chunk_index=index, counts=counts,
                            seconds=time.monotonic() - started))):
                        return
                    self.stats.chunks_sent += 1
                if not await self._write(node_pb2.NodeMessage(done=node_pb2.ShardDone(
                        attempt_token=token, seconds=time.monotonic() - started))):
                    return
                self.stats.shards_done += 1
                self.stats.shard_done_t.append(time.monotonic())
            finally:
                self.in_hand.pop(token, None)
                self.cancelled.discard(token)

    async def close(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        if self.call is not None:
            self.call.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _load_main(spec: LoadSpec, go: Any, stop: Any, out: Any) -> None:
    import grpc

    from qscale.proto.v1 import node_pb2_grpc

    born = time.monotonic()
    parent = os.getppid()
    stats = LoadStats(spec.index)
    options = [("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
               ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    channels = [grpc.aio.insecure_channel(spec.address, options=options) for _ in range(spec.channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), _START_TIMEOUT_S)
        stubs = [node_pb2_grpc.NodeServiceStub(c) for c in channels]
        out.put(("ready", spec.index))
        while not go.is_set():
            if stop.is_set() or time.monotonic() - born > _START_TIMEOUT_S * 2:
                return
            await asyncio.sleep(0.01)

        nodes = [FakeNode(spec, i, stubs[i % len(stubs)], stats) for i in range(spec.nodes)]
        sem = asyncio.Semaphore(spec.register_concurrency)
        outcomes = await asyncio.gather(*(n.start(sem) for n in nodes), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                stats.register_errors.append(f"{type(outcome).__name__}: {outcome}"[:300])
        out.put(("registered", spec.index, list(stats.node_ids), list(stats.register_errors)))

        async def lag_monitor() -> None:
            loop = asyncio.get_running_loop()
            while True:
                t0 = loop.time()
                await asyncio.sleep(_LAG_TICK_S)
                stats.lag_t.append(time.monotonic())
                stats.lag.append(max(0.0, loop.time() - t0 - _LAG_TICK_S))

        lag = asyncio.create_task(lag_monitor())
        while not stop.is_set():
            if os.getppid() != parent or time.monotonic() - born > spec.max_life_s:
                break  # orphaned, or the parent never said stop: do not outlive it
            await asyncio.sleep(0.05)
        lag.cancel()
        await asyncio.wait_for(asyncio.gather(*(n.close() for n in nodes), return_exceptions=True), 10.0)
    finally:
        for c in channels:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(grace=None), 2.0)
        times = os.times()
        stats.cpu_s = times.user + times.system
        out.put(("stats", spec.index, stats.to_wire()))


def load_process(spec: LoadSpec, go: Any, stop: Any, out: Any) -> None:
    """Entry point of a load process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (Ctrl-C there)
    try:
        asyncio.run(_load_main(spec, go, stop, out))
    except BaseException:
        out.put(("error", spec.index, traceback.format_exc()[-3000:]))
        raise


# ============================================================================================
# The coordinator process and /proc readings
# ============================================================================================

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields_ = text[text.rindex(")") + 2:].split()
    return (int(fields_[11]) + int(fields_[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes; (0, 0) when it is gone."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def descendants(pid: int) -> list[int]:
    """Every live descendant of a process."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(text[text.rindex(")") + 2:].split()[1])
            children[ppid].append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("grpcio", "qiskit", "qiskit-aer", "qscale"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = ""
    return {
        "cpu_model": model or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "versions": versions,
    }


class SessionProcess:
    """A subprocess in its own session (Ctrl-C reaches only us), its environment cleared of
    ``QSCALE_*`` variables (nothing from the caller's shell changes its settings), its output in
    ``log_path``; it gets SIGTERM if this process dies."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``command`` in ``cwd``, with ``env`` added to the cleared environment."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("QSCALE_")}
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=full_env, cwd=cwd, start_new_session=True,
                                         preexec_fn=_terminate_with_parent)
        return self.proc

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10.0)
        # Its children (the coordinator's sandboxes) follow it; anything left of its session group goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


class Coordinator(SessionProcess):
    """A ``qscale-coordinator serve`` subprocess in its own session (Ctrl-C reaches only us)."""

    def __init__(self, workdir: Path, interval: float, timeout: float, log_level: str, log_path: Path,
                 gc_trace: Path | None = None, tokens: Tokens | None = None) -> None:
        self.workdir = workdir
        self.address_file = workdir / "address"
        self.gc_trace = gc_trace
        launch = ["-c", _GC_TRACE_CODE] if gc_trace is not None else ["-m", "qscale.coordinator"]
        auth = ["--client-tokens-file", str(tokens.client_file), "--node-tokens-file", str(tokens.node_file)] \
            if tokens is not None else []
        super().__init__([sys.executable, *launch, "serve", "--listen", "127.0.0.1:0",
                          "--state-dir", str(workdir / "state"), "--heartbeat-interval", str(interval),
                          "--heartbeat-timeout", str(timeout), "--address-file", str(self.address_file),
                          "--log-level", log_level, *auth], log_path)
        self.address = ""

    def start(self) -> str:
        (self.workdir / "state").mkdir(parents=True, exist_ok=True)
        self.launch(self.workdir, {"SCALE_BENCH_GC_TRACE": str(self.gc_trace)} if self.gc_trace is not None else None)
        assert self.proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.address:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"the coordinator exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the coordinator did not start within {_START_TIMEOUT_S:.0f}s:\n"
                                     f"{self.log_tail()}")
            with contextlib.suppress(OSError):
                text = self.address_file.read_text()
                if text.endswith("\n"):
                    self.address = text.strip()
            time.sleep(0.05)
        self._wait_serving(deadline)
        return self.address

    def _wait_serving(self, deadline: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service="qscale.v1.NodeService"), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                    raise BenchmarkError(f"the coordinator on {self.address} never reported SERVING:\n"
                                         f"{self.log_tail()}")
                time.sleep(0.1)


@dataclass(frozen=True)
class Tokens:
    """The credentials of an authenticated run (``--users``): one API token per user, one join
    token for every fake node, and the coordinator's token files that hold them."""

    users: dict[str, str]
    """user name -> API token"""
    node: str
    client_file: Path
    node_file: Path

    @classmethod
    def create(cls, workdir: Path, users: int) -> Tokens:
        """Fresh tokens for ``users`` users (``user0`` ...), written to files (mode 600) in ``workdir``."""
        names = {f"user{i}": f"scale-{i}-{secrets.token_urlsafe(24)}" for i in range(users)}
        node = f"scale-node-{secrets.token_urlsafe(24)}"
        client_file, node_file = workdir / "client.tokens", workdir / "node.tokens"
        for path, text in ((client_file, "".join(f"{token} {name}\n" for name, token in names.items())),
                           (node_file, f"{node} scale-nodes\n")):
            path.touch(mode=0o600)
            path.write_text(text)
        return cls(names, node, client_file, node_file)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata with an API token (any user's: ListNodes is open to every user)."""
        return (("authorization", f"Bearer {next(iter(self.users.values()))}"),)


class BenchmarkError(RuntimeError):
    """The benchmark could not run (as opposed to a target missed)."""


class Terminated(BaseException):
    """SIGTERM reached the benchmark: unwind through every ``finally`` like Ctrl-C does."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def run_guarded(run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace, what: str
                ) -> dict[str, Any] | int:
    """``run(args)``, with SIGTERM unwinding like Ctrl-C: its report, or the exit code when it
    could not finish (2: it could not run; 130: interrupted or terminated, everything stopped)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(args)
    except BenchmarkError as exc:
        print(f"{what} could not run: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"{'interrupted' if isinstance(exc, KeyboardInterrupt) else 'terminated'}; everything was stopped",
              file=sys.stderr)
        return 130


def _terminate_with_parent() -> None:
    """In the coordinator's child before exec: get SIGTERM if this process dies (even SIGKILLed),
    so that a coordinator in its own session never outlives the benchmark (Linux; best effort)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class MemorySampler(threading.Thread):
    """Samples the coordinator's VmRSS every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss, hwm = proc_memory(self.pid)
            if rss:
                self.samples.append((time.monotonic(), rss, hwm))
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5.0)

    def peak_rss(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((rss for t, rss, _ in self.samples if start <= t <= end), default=0)


# ============================================================================================
# The job driver
# ============================================================================================


@dataclass
class DriverStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    shards: int = 0
    attempts: int = 0
    per_user: collections.Counter[str] = field(default_factory=collections.Counter)
    """Jobs completed per user (``--users``)."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class JobDriver:
    """``in_flight`` threads submitting jobs back to back until :meth:`stop`, through ``clients``
    (user name -> client) taking turns: each submission goes through the next one."""

    def __init__(self, clients: dict[str, Any], circuits: list[Any], shots: int, in_flight: int,
                 job_timeout: float) -> None:
        self.clients = clients
        self._turns = itertools.cycle(list(clients.items()))
        self._turn_lock = threading.Lock()
        self.circuits = circuits
        self.shots = shots
        self.job_timeout = job_timeout
        self.stats = DriverStats()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, name=f"job-driver-{i}", daemon=True)
                        for i in range(in_flight)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def run_one(self) -> tuple[bool, str, Any]:
        """Submit one job through the next client and check its result: (ok, problem, result)."""
        with self._turn_lock:
            user, client = next(self._turns)
        job = client.submit(self.circuits, shots=self.shots)
        result = job.result(timeout=self.job_timeout)
        ok, problem = check_result(result, len(self.circuits), self.shots)
        if ok and len(self.clients) > 1 and result.status.user != user:
            ok, problem = False, f"job of user {user!r} listed as {result.status.user!r}'s"
        return ok, problem, result

    def _loop(self) -> None:
        from qscale.errors import QScaleError

        while not self._stop.is_set():
            t0 = time.monotonic()
            with self.stats.lock:
                self.stats.submitted += 1
            try:
                ok, problem, result = self.run_one()
            except QScaleError as exc:
                ok, problem, result = False, f"{type(exc).__name__}: {exc}", None
            except Exception as exc:  # noqa: BLE001 - counted as a failed job, never kills the driver
                ok, problem, result = False, f"unexpected {type(exc).__name__}: {exc}", None
            with self.stats.lock:
                if ok:
                    self.stats.completed += 1
                    self.stats.per_user[result.status.user] += 1
                    self.stats.latencies.append(time.monotonic() - t0)
                    self.stats.shards += result.status.shards_total
                    self.stats.attempts += len(result.attempts)
                else:
                    self.stats.failed += 1
                    self.stats.errors[problem[:200]] += 1


def check_result(result: Any, circuits: int, shots: int) -> tuple[bool, str]:
    if len(result.results) != circuits:
        return False, f"{len(result.results)} circuit results, expected {circuits}"
    if result.shots != circuits * shots:
        return False, f"total shots {result.shots}, expected {circuits * shots}"
    for r in result.results:
        if r.shots != shots or sum(r.counts.values()) != shots:
            return False, f"circuit {r.index}: {r.shots} shots, counts add up to {sum(r.counts.values())}"
    return True, ""


def make_circuits(n: int) -> list[Any]:
    from qiskit import QuantumCircuit

    circuits = []
    for i in range(n):
        qc = QuantumCircuit(1, 1, name=f"h{i}")
        qc.h(0)
        qc.measure(0, 0)
        circuits.append(qc)
    return circuits


# ============================================================================================
# Profiling (py-spy)
# ============================================================================================


def start_profiler(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or (str(Path(sys.executable).with_name("py-spy"))
                                      if Path(sys.executable).with_name("py-spy").exists() else None)
    if exe is None:
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "100", "--format", "raw", "--nonblocking", "--output", str(path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


_FRAME_LINE = re.compile(r":\d+\)$")
_OWN_CODE = ("coordinator/", "qscale/", "node/")
_GENERIC = ("cli.py", "__main__.py", "_unary.<locals>.wrapper", "_streaming.<locals>.wrapper")


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """What py-spy's collapsed stacks say: the share of samples on the event-loop thread (the one
    that serves every RPC, heartbeats included) and in other threads, the functions with the
    most samples of their own, and the project's functions by inclusive samples, per thread kind.
    Percentages are of all samples (py-spy records only threads that are not idle)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = {"loop": collections.Counter(), "threads": collections.Counter()}
    total = loop = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_short_frame(f) for f in stack.split(";") if f]
            if not frames:
                continue
            on_loop = any(f.startswith("BaseEventLoop._run_once ") for f in frames)
            total += count
            loop += count if on_loop else 0
            own[frames[-1]] += count
            for frame in set(frames):
                if any(c in frame for c in _OWN_CODE) and not any(g in frame for g in _GENERIC):
                    inclusive["loop" if on_loop else "threads"][frame] += count

    def pct(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "event_loop_pct": round(100.0 * loop / total, 1) if total else 0.0,
            "self_pct": pct(own), "loop_inclusive_pct": pct(inclusive["loop"]),
            "threads_inclusive_pct": pct(inclusive["threads"])}


def _short_frame(frame: str) -> str:
    frame = _FRAME_LINE.sub(")", frame.strip())
    # "fn (/long/path/site-packages/grpc/aio/_server.py)" -> "fn (grpc/aio/_server.py)"
    m = re.match(r"^(.*) \((.*)\)$", frame)
    if not m:
        return frame
    name, file = m.groups()
    parts = Path(file).parts
    for anchor in ("site-packages", "main", "lib"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor):]
            break
    return f"{name} ({'/'.join(parts[-3:])})"


# ============================================================================================
# Statistics and report
# ============================================================================================


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def window(times: Iterable[float], values: Iterable[float], start: float, end: float) -> list[float]:
    return [v for t, v in zip(times, values) if start <= t < end]


_LOST_LINE = re.compile(r"node (\S+) lost \((.*)\); requeueing")


def logged_losses(log_path: Path, upto: int) -> collections.Counter[str]:
    """Reasons of the "node ... lost (...)" lines in the first ``upto`` bytes of the log."""
    reasons: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(OSError), log_path.open("rb") as fh:
        text = fh.read(upto).decode(errors="replace")
        for m in _LOST_LINE.finditer(text):
            reasons[re.sub(r"[\d.]+s\b", "Ns", m.group(2))] += 1
    return reasons


def log_level_counts(log_path: Path, upto: int) -> dict[str, int]:
    counts = {"WARNING": 0, "ERROR": 0}
    with contextlib.suppress(OSError), log_path.open("rb") as fh:
        for line in fh.read(upto).decode(errors="replace").splitlines():
            for level in counts:
                if f" {level} " in line:
                    counts[level] += 1
    return counts


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    hb, cpu, mem, targets = report["heartbeat"], report["cpu"], report["memory"], report["targets"]
    idle = report.get("heartbeat_idle")
    table = Table(title=f"qscale coordinator scale test: {report['nodes']} nodes, {report['procs']} load processes, "
                        f"{report['duration_s']:.0f} s of jobs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows: list[tuple[str, str, str]] = [
        ("registration (until all alive)", f"{report['registration_s']:.2f} s", ""),
        ("load window", f"{report['load_window_s']:.1f} s", ""),
        ("heartbeats sent (window / whole run)", f"{hb['sent']:,} / {hb['sent_total']:,}", ""),
        ("heartbeats per second (window)", f"{hb['per_s']:.0f}", ""),
        ("heartbeat latency p50 / p90", f"{hb['p50_ms']:.1f} / {hb['p90_ms']:.1f} ms", ""),
        ("heartbeat latency p99", f"{hb['p99_ms']:.1f} ms", _mark(targets["heartbeat_p99"], "< 100 ms")),
        ("heartbeat latency max", f"{hb['max_ms']:.1f} ms", ""),
    ]
    if idle:
        rows.append(("  idle window (no jobs) p50 / p99 / max",
                     f"{idle['p50_ms']:.1f} / {idle['p99_ms']:.1f} / {idle['max_ms']:.1f} ms", ""))
    rows += [
        ("heartbeat errors", f"{sum(hb['errors'].values())} {dict(hb['errors']) or ''}", ""),
        ("false node losses", f"{report['false_losses']['count']}", _mark(targets["false_losses"], "0")),
        ("shards completed (nodes' ShardDone)", f"{report['shards']['completed']:,}", ""),
        ("shards per second", f"{report['shards']['per_s']:.1f}", ""),
        ("jobs completed / failed", f"{report['jobs']['completed']} / {report['jobs']['failed']}", ""),
        ("jobs per second", f"{report['jobs']['per_s']:.1f}", ""),
        ("job round trip p50 / p99", f"{report['jobs']['latency_p50_s']:.2f} / {report['jobs']['latency_p99_s']:.2f} s",
         ""),
        ("coordinator CPU (window)", f"{cpu['coordinator_pct']:.1f} % of a core", ""),
    ]
    if cpu.get("idle"):
        rows.append(("  idle window (heartbeats only)", f"{cpu['idle']['coordinator_pct']:.1f} % of a core", ""))
    rows += [
        ("  registration", f"{cpu['registration'].get('coordinator_pct', 0.0):.1f} % of a core", ""),
        ("sandbox processes CPU (window)", f"{cpu['sandbox_pct']:.1f} % of a core", ""),
        ("load processes CPU (window)", f"{cpu['load_pct']:.1f} % of a core", ""),
        ("job driver (this process) CPU", f"{cpu['driver_pct']:.1f} % of a core", ""),
        ("machine busy (window)", f"{cpu['machine_busy_pct']:.1f} % of {report['machine']['cores']} cores", ""),
        ("coordinator RSS start / end / peak", f"{mem['rss_start_mib']:.0f} / {mem['rss_end_mib']:.0f} / "
                                               f"{mem['rss_peak_mib']:.0f} MiB", ""),
        ("coordinator VmHWM", f"{mem['hwm_mib']:.0f} MiB", _mark(targets["memory"], "< 1024 MiB")),
        ("load processes' loop lag p99 / max",
         f"{report['load']['loop_lag_p99_ms']:.1f} / {report['load']['loop_lag_max_ms']:.1f} ms", ""),
        ("heartbeat send delay p99 / max", f"{hb['send_delay_p99_ms']:.1f} / {hb['send_delay_max_ms']:.1f} ms", ""),
    ]
    if report.get("gc"):
        g = report["gc"]["load"]
        rows.append(("coordinator GC (window): full / max / total",
                     f"{g['full_collections']} / {g['max_ms']:.0f} ms / {g['total_ms']:.0f} ms", ""))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    m = report["machine"]
    console.print(f"machine: {m['cpu_model']}, {m['cores']} cores, load average at start "
                  f"{m['load_average_at_start'][0]:.2f}; coordinator {report['coordinator']['address']}")
    worst = sorted(report["timeline"], key=lambda r: -r["max_ms"])[:5]
    console.print("slowest seconds of the window (t, heartbeats, p99, max" + (", GC ms" if report.get("gc") else "")
                  + "): " + "; ".join(f"t={r['t']}s n={r['n']} p99={r['p99_ms']:.0f} max={r['max_ms']:.0f}"
                                      + (f" gc={r['gc_ms']:.0f}" if "gc_ms" in r else "") for r in worst))
    if report["false_losses"]["count"]:
        console.print(f"[red]false losses[/red]: {report['false_losses']['by_reason']} "
                      f"(first: {report['false_losses']['examples'][:3]})")
    if report["logged_losses"]:
        console.print(f"coordinator logged node losses: {report['logged_losses']}")
    if report["jobs"].get("completed_per_user"):
        console.print(f"{report['workload']['users']} users: jobs completed per user "
                      f"{report['jobs']['completed_per_user']}")
    if report["jobs"]["errors"]:
        console.print(f"[red]job errors[/red]: {report['jobs']['errors']}")
    if report.get("profile"):
        p = report["profile"]
        console.print(f"py-spy profile of the coordinator: {p['samples']} samples, {p['event_loop_pct']}% on the "
                      f"event-loop thread ({p.get('path', '')})")
        for title, key in (("self", "self_pct"), ("event loop, inclusive", "loop_inclusive_pct"),
                           ("other threads, inclusive", "threads_inclusive_pct")):
            console.print(f"  {title}: " + "; ".join(f"{n} {v}%" for n, v in p[key][:10]))
        if p.get("error"):
            console.print(f"  py-spy: {p['error']}")
    verdict = "PASS" if report["passed"] else "MISS"
    console.print(f"targets: [bold]{verdict}[/bold]  (p99 heartbeat < {TARGET_P99_MS:.0f} ms, "
                  f"{TARGET_FALSE_LOSSES} false losses, coordinator memory < 1 GiB, every job right)")


def _mark(ok: bool, target: str) -> str:
    return f"{target} {'[green]pass[/green]' if ok else '[red]miss[/red]'}"


# ============================================================================================
# The run
# ============================================================================================


def _collect(out: Any, kind: str, indices: set[int], timeout: float, procs: list[Any],
             into: dict[int, Any]) -> None:
    """Wait for one ``kind`` message from every load process in ``indices`` (bounded)."""
    deadline = time.monotonic() + timeout
    pending = set(indices) - set(into)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchmarkError(f"load processes {sorted(pending)} sent no {kind!r} within {timeout:.0f}s")
        try:
            msg = out.get(timeout=min(0.5, remaining))
        except queue_mod.Empty:
            dead = [i for i in pending if not procs[i].is_alive() and procs[i].exitcode not in (None, 0)]
            if dead:
                raise BenchmarkError(f"load processes {dead} died (exit codes "
                                     f"{[procs[i].exitcode for i in dead]})") from None
            continue
        if msg[0] == "error":
            raise BenchmarkError(f"load process {msg[1]} failed:\n{msg[2]}")
        if msg[0] == kind:
            into[msg[1]] = msg[2:]
            pending.discard(msg[1])
        elif msg[0] == "stats":  # a process that stopped early: keep its numbers for later
            early_stats[msg[1]] = msg[2]


early_stats: dict[int, Any] = {}


@dataclass
class CpuSnapshot:
    """CPU seconds of everything involved, at one moment."""

    t: float
    coordinator: float
    children: dict[int, float]
    load: float
    driver: float
    busy: int
    total: int

    @classmethod
    def take(cls, pid: int, load_pids: Sequence[int]) -> CpuSnapshot:
        busy, total = machine_busy_ticks()
        return cls(time.monotonic(), proc_cpu_seconds(pid), {k: proc_cpu_seconds(k) for k in descendants(pid)},
                   sum(proc_cpu_seconds(p) for p in load_pids), sum(os.times()[:2]), busy, total)

    def since(self, start: CpuSnapshot) -> dict[str, float]:
        """% of one core over [start, self] (machine busy: % of all cores)."""
        span = max(1e-9, self.t - start.t)
        sandbox = sum(v - start.children.get(k, 0.0) for k, v in self.children.items())
        return {"seconds": round(span, 3),
                "coordinator_s": round(self.coordinator - start.coordinator, 3),
                "coordinator_pct": round(100.0 * (self.coordinator - start.coordinator) / span, 1),
                "sandbox_pct": round(100.0 * sandbox / span, 1),
                "load_pct": round(100.0 * (self.load - start.load) / span, 1),
                "driver_pct": round(100.0 * (self.driver - start.driver) / span, 1),
                "machine_busy_pct": round(100.0 * (self.busy - start.busy) / max(1, self.total - start.total), 1)}


@dataclass
class Measured:
    """What :func:`run` gathered, for :func:`build_report`."""

    address: str = ""
    shards_per_job: int = 0
    registration_s: float = 0.0
    registration_cpu: dict[str, float] = field(default_factory=dict)
    register_errors: list[str] = field(default_factory=list)
    node_ids: set[str] = field(default_factory=set)
    idle: tuple[float, float] = (0.0, 0.0)
    idle_cpu: dict[str, float] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)
    load_cpu: dict[str, float] = field(default_factory=dict)
    rss_start: int = 0
    rss_end: int = 0
    hwm: int = 0
    listed_lost: list[str] = field(default_factory=list)
    stale_dropped: int = 0
    log_path: Path = Path()
    log_upto: int = 0
    profile: dict[str, Any] | None = None
    gc_pauses: list[tuple[float, int, float]] | None = None
    """(monotonic time, generation, seconds) of the coordinator's slow or full collections"""


# Runs the coordinator's CLI after hooking its garbage collector: full (generation 2)
# collections and any collection over 2 ms are written as "monotonic generation seconds".
_GC_TRACE_CODE = r"""
import gc, os, runpy, sys, time
_out = open(os.environ.pop("SCALE_BENCH_GC_TRACE"), "w", buffering=1)
_t = [0.0]
def _gc_trace(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
    else:
        d = time.perf_counter() - _t[0]
        if info["generation"] == 2 or d > 0.002:
            _out.write("%.6f %d %.6f\n" % (time.monotonic() - d, info["generation"], d))
gc.callbacks.append(_gc_trace)
runpy.run_module("qscale.coordinator", run_name="__main__", alter_sys=True)
"""


def read_gc_trace(path: Path) -> list[tuple[float, int, float]]:
    pauses = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                pauses.append((float(parts[0]), int(parts[1]), float(parts[2])))
    return pauses


def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    import qiskit
    from qiskit import qpy

    import qscale
    from qscale.proto.v1 import jobs_pb2, jobs_pb2_grpc

    started_at = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_info()
    ctx = multiprocessing.get_context("spawn")
    workdir = Path(tempfile.mkdtemp(prefix="qscale-scale-"))
    m = Measured(log_path=Path(args.coordinator_log) if args.coordinator_log else workdir / "coordinator.log")
    gc_path = workdir / "gc-trace.txt" if args.gc_trace else None
    tokens = Tokens.create(workdir, args.users) if args.users else None
    auth = tokens.metadata if tokens is not None else None
    coordinator = Coordinator(workdir, args.heartbeat_interval, args.heartbeat_timeout, args.log_level, m.log_path,
                              gc_path, tokens)
    go, stop = ctx.Event(), ctx.Event()
    out = ctx.Queue()
    procs: list[Any] = []
    driver: JobDriver | None = None
    sampler: MemorySampler | None = None
    profiler: subprocess.Popen[bytes] | None = None
    clients: dict[str, Any] = {}
    try:
        m.address = address = coordinator.start()
        pid = coordinator.pid
        sampler = MemorySampler(pid)
        sampler.start()
        print(f"coordinator pid {pid} on {address} (log: {m.log_path})", flush=True)

        per_proc = [args.nodes // args.procs + (1 if i < args.nodes % args.procs else 0) for i in range(args.procs)]
        max_life = (_START_TIMEOUT_S * 3 + _register_timeout(args.nodes) + args.idle_window + args.duration
                    + args.job_timeout + 120)
        try:
            aer_version = metadata.version("qiskit-aer")
        except metadata.PackageNotFoundError:
            aer_version = ""
        for i, n in enumerate(per_proc):
            spec = LoadSpec(i, address, n, args.channels, args.shard_ms, qpy.QPY_VERSION, qiskit.__version__,
                            aer_version, qscale.__version__, args.register_concurrency, max_life,
                            tokens.node if tokens is not None else "")
            p = ctx.Process(target=load_process, args=(spec, go, stop, out), name=f"scale-load-{i}", daemon=True)
            p.start()
            procs.append(p)
        load_pids = [p.pid for p in procs]
        ready: dict[int, Any] = {}
        _collect(out, "ready", set(range(len(procs))), _START_TIMEOUT_S, procs, ready)

        # ---- registration: from "go" until ListNodes shows every registered node alive
        cpu_a = CpuSnapshot.take(pid, load_pids)
        go.set()
        registered: dict[int, Any] = {}
        _collect(out, "registered", set(range(len(procs))), _register_timeout(args.nodes), procs, registered)
        m.node_ids = {nid for ids, _ in registered.values() for nid in ids}
        m.register_errors = [e for _, errs in registered.values() for e in errs]
        channel = grpc.insecure_channel(address)
        jobs_stub = jobs_pb2_grpc.JobServiceStub(channel)
        deadline = time.monotonic() + 30.0
        while True:
            reply = jobs_stub.ListNodes(jobs_pb2.ListNodesRequest(), timeout=10.0, metadata=auth)
            alive = {n.node_id for n in reply.nodes if n.state == "alive"}
            if m.node_ids <= alive:
                break
            if time.monotonic() > deadline:
                raise BenchmarkError(f"only {len(alive & m.node_ids)} of {len(m.node_ids)} registered nodes alive "
                                     "after 30 s")
            time.sleep(0.1)
        cpu_b = CpuSnapshot.take(pid, load_pids)
        m.registration_s = cpu_b.t - cpu_a.t
        m.registration_cpu = cpu_b.since(cpu_a)
        print(f"{len(m.node_ids)} nodes registered and alive in {m.registration_s:.2f} s "
              f"({len(m.register_errors)} registration errors)", flush=True)
        if len(m.node_ids) < args.nodes and not args.allow_register_errors:
            raise BenchmarkError(f"only {len(m.node_ids)} of {args.nodes} nodes registered: {m.register_errors[:5]}")

        # ---- warm-up job (checks the whole path before timing anything)
        if tokens is None:
            clients = {"": qscale.Client(address, token="")}
        else:
            clients = {user: qscale.Client(address, token=token) for user, token in tokens.users.items()}
        circuits = make_circuits(args.circuits)
        driver = JobDriver(clients, circuits, args.shots, args.jobs_in_flight, args.job_timeout)
        ok, problem, warm = driver.run_one()  # also tells how the planner cuts the job
        if not ok:
            raise BenchmarkError(f"warm-up job wrong: {problem}")
        m.shards_per_job = warm.status.shards_total

        # ---- idle window: heartbeats only, no jobs (the baseline)
        if args.idle_window > 0:
            print(f"idle: heartbeats only for {args.idle_window:.0f} s", flush=True)
            cpu_a = CpuSnapshot.take(pid, load_pids)
            _watch(coordinator, args.idle_window)
            cpu_b = CpuSnapshot.take(pid, load_pids)
            m.idle, m.idle_cpu = (cpu_a.t, cpu_b.t), cpu_b.since(cpu_a)

        # ---- load window
        print(f"load: {args.jobs_in_flight} jobs in flight, each {args.circuits} circuits x {args.shots} shots "
              f"({m.shards_per_job} shards), for {args.duration:.0f} s", flush=True)
        cpu_a = CpuSnapshot.take(pid, load_pids)
        m.rss_start = proc_memory(pid)[0]
        if args.profile:
            profiler = start_profiler(pid, args.duration, Path(args.profile))
        driver.start()
        _watch(coordinator, args.duration, driver)
        driver.stop()
        if not driver.join(args.job_timeout + 30.0):
            print("warning: some jobs were still in flight when the driver was given up", file=sys.stderr)
        cpu_b = CpuSnapshot.take(pid, load_pids)
        m.load, m.load_cpu = (cpu_a.t, cpu_b.t), cpu_b.since(cpu_a)
        m.rss_end, m.hwm = proc_memory(pid)

        # ---- what the coordinator thinks of our nodes, before they leave
        reply = jobs_stub.ListNodes(jobs_pb2.ListNodesRequest(), timeout=30.0, metadata=auth)
        states = {n.node_id: n.state for n in reply.nodes}
        m.listed_lost = sorted(nid for nid in m.node_ids if states.get(nid) != "alive")
        m.stale_dropped = reply.stale_results_dropped
        m.log_upto = m.log_path.stat().st_size
        channel.close()
        if gc_path is not None:
            m.gc_pauses = read_gc_trace(gc_path)

        # ---- stop the load and gather its numbers
        stop.set()
        wire: dict[int, Any] = {i: (v,) for i, v in early_stats.items()}
        _collect(out, "stats", set(range(len(procs))), 60.0, procs, wire)
        stats = {i: LoadStats.from_wire(v[0]) for i, v in wire.items()}

        if profiler is not None:
            try:
                profiler.wait(30.0)
            except subprocess.TimeoutExpired:
                profiler.kill()
            m.profile = summarize_profile(Path(args.profile))
            m.profile["path"] = str(args.profile)
            if m.profile["samples"] == 0 and profiler.stderr is not None:
                m.profile["error"] = profiler.stderr.read().decode(errors="replace")[-2000:]

        return build_report(args, machine, started_at, m, stats, driver, sampler)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        if driver is not None:
            driver.stop()
        stop.set()
        deadline = time.monotonic() + 15.0
        while procs and any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            with contextlib.suppress(queue_mod.Empty):
                out.get(timeout=0.2)  # drain, so that the processes can flush and exit
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        if profiler is not None and profiler.poll() is None:
            profiler.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(5.0)
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.close()
        if driver is not None:
            driver.join(5.0)
        if sampler is not None:
            sampler.stop()
        status = coordinator.stop()
        if status not in (0, None, -signal.SIGTERM):
            print(f"note: the coordinator exited with status {status}", file=sys.stderr)
        out.close()
        out.cancel_join_thread()
        shutil.rmtree(workdir, ignore_errors=True)


def _watch(coordinator: Coordinator, seconds: float, driver: JobDriver | None = None) -> None:
    """Let ``seconds`` pass, printing progress every 10 s; fail at once if the coordinator dies."""
    t0 = time.monotonic()
    next_note = t0 + 10.0
    while (elapsed := time.monotonic() - t0) < seconds:
        time.sleep(min(0.5, seconds - elapsed))
        if coordinator.proc is not None and coordinator.proc.poll() is not None:
            raise BenchmarkError(f"the coordinator died:\n{coordinator.log_tail()}")
        if driver is not None and time.monotonic() >= next_note:
            next_note += 10.0
            s = driver.stats
            print(f"  {time.monotonic() - t0:5.0f} s: {s.completed} jobs done, {s.failed} failed, "
                  f"coordinator RSS {proc_memory(coordinator.pid)[0] / 2**20:.0f} MiB", flush=True)


def _register_timeout(nodes: int) -> float:
    return _REGISTER_BASE_TIMEOUT_S + nodes / 20.0


def heartbeat_summary(stats: Iterable[LoadStats], start: float, end: float) -> dict[str, Any]:
    lat: list[float] = []
    delays: list[float] = []
    for s in stats:
        lat += window(s.hb_t, s.hb_lat, start, end)
        delays += window(s.hb_t, s.hb_delay, start, end)
    span = end - start
    return {"sent": len(lat), "per_s": round(len(lat) / span, 1) if span > 0 else 0.0,
            "p50_ms": round(percentile(lat, 50) * 1000, 3), "p90_ms": round(percentile(lat, 90) * 1000, 3),
            "p99_ms": round(percentile(lat, 99) * 1000, 3), "p999_ms": round(percentile(lat, 99.9) * 1000, 3),
            "max_ms": round(max(lat, default=0.0) * 1000, 3),
            "send_delay_p99_ms": round(percentile(delays, 99) * 1000, 3),
            "send_delay_max_ms": round(max(delays, default=0.0) * 1000, 3)}


def timeline(stats: Iterable[LoadStats], start: float, end: float,
             gc_pauses: list[tuple[float, int, float]] | None) -> list[dict[str, Any]]:
    """Per second of a window: heartbeats, their p50/p99/max latency (ms), and the coordinator's
    GC pause time started in that second (ms, with --gc-trace)."""
    buckets: dict[int, list[float]] = collections.defaultdict(list)
    for s in stats:
        for t, v in zip(s.hb_t, s.hb_lat):
            if start <= t < end:
                buckets[int(t - start)].append(v)
    gc_ms: dict[int, float] = collections.defaultdict(float)
    for t, _, d in gc_pauses or ():
        if start <= t < end:
            gc_ms[int(t - start)] += d * 1000
    rows = []
    for second in range(int(end - start) + 1):
        values = buckets.get(second, [])
        row: dict[str, Any] = {"t": second, "n": len(values), "p50_ms": round(percentile(values, 50) * 1000, 1),
                               "p99_ms": round(percentile(values, 99) * 1000, 1),
                               "max_ms": round(max(values, default=0.0) * 1000, 1)}
        if gc_pauses is not None:
            row["gc_ms"] = round(gc_ms.get(second, 0.0), 1)
        rows.append(row)
    return rows


def gc_summary(pauses: list[tuple[float, int, float]], start: float, end: float) -> dict[str, Any]:
    inside = [(g, d) for t, g, d in pauses if start <= t < end]
    full = [d for g, d in inside if g == 2]
    return {"full_collections": len(full), "full_max_ms": round(max(full, default=0.0) * 1000, 1),
            "full_total_ms": round(sum(full) * 1000, 1),
            "slow_young_collections": sum(1 for g, _ in inside if g < 2),
            "max_ms": round(max((d for _, d in inside), default=0.0) * 1000, 1),
            "total_ms": round(sum(d for _, d in inside) * 1000, 1),
            "over_50ms": sum(1 for _, d in inside if d > 0.05)}


def build_report(args: argparse.Namespace, machine: dict[str, Any], started_at: _dt.datetime, m: Measured,
                 stats: dict[int, LoadStats], driver: JobDriver, sampler: MemorySampler) -> dict[str, Any]:
    t0, t1 = m.load
    window_s = t1 - t0
    loads = list(stats.values())
    hb = heartbeat_summary(loads, t0, t1)
    hb["sent_total"] = sum(s.hb_sent for s in loads)
    errors: collections.Counter[str] = collections.Counter()
    for s in loads:
        errors.update(s.hb_errors)
    hb["errors"] = dict(errors)
    lags = [v for s in loads for v in window(s.lag_t, s.lag, t0, t1)]
    shard_t = [t for s in loads for t in s.shard_done_t]
    shards_window = sum(1 for t in shard_t if t0 <= t < t1)
    losses = [loss for s in loads for loss in s.losses]
    lost_ids = {nid for nid, _, _ in losses} | set(m.listed_lost)
    by_reason = collections.Counter(why for _, why, _ in losses)
    for nid in set(m.listed_lost) - {nid for nid, _, _ in losses}:
        by_reason["ListNodes shows it not alive"] += 1
    d = driver.stats
    peak_memory = max(m.hwm, sampler.peak_rss())
    targets = {"heartbeat_p99": bool(hb["sent"]) and hb["p99_ms"] < TARGET_P99_MS,
               "false_losses": len(lost_ids) <= TARGET_FALSE_LOSSES,
               "memory": peak_memory < TARGET_MEMORY_BYTES}
    register_lat = [x for s in loads for x in s.register_lat]
    report: dict[str, Any] = {
        "benchmark": "qscale coordinator scale test",
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "nodes": args.nodes,
        "nodes_registered": len(m.node_ids),
        "procs": args.procs,
        "channels_per_proc": args.channels,
        "duration_s": args.duration,
        "load_window_s": round(window_s, 3),
        "idle_window_s": round(m.idle[1] - m.idle[0], 3),
        "heartbeat_interval_s": args.heartbeat_interval,
        "heartbeat_timeout_s": args.heartbeat_timeout,
        "workload": {"circuits_per_job": args.circuits, "shots": args.shots, "jobs_in_flight": args.jobs_in_flight,
                     "shard_ms": args.shard_ms, "shards_per_job": m.shards_per_job, "users": args.users},
        "registration_s": round(m.registration_s, 3),
        "registration_errors": m.register_errors[:20],
        "heartbeat": hb,
        "heartbeat_idle": heartbeat_summary(loads, *m.idle) if m.idle[1] > m.idle[0] else None,
        "false_losses": {"count": len(lost_ids), "by_reason": dict(by_reason),
                         "examples": [f"{nid}: {why}" for nid, why, _ in losses[:10]] + m.listed_lost[:10]},
        "logged_losses": dict(logged_losses(m.log_path, m.log_upto)),
        "coordinator_log_levels": log_level_counts(m.log_path, m.log_upto),
        "stale_results_dropped": m.stale_dropped,
        "shards": {"completed": shards_window, "completed_total": len(shard_t),
                   "per_s": shards_window / window_s if window_s else 0.0,
                   "assigned_total": sum(s.assigned for s in loads),
                   "chunks_sent_total": sum(s.chunks_sent for s in loads),
                   "cancels": sum(s.cancels for s in loads),
                   "in_completed_jobs": d.shards, "attempts_in_completed_jobs": d.attempts},
        "jobs": {"completed": d.completed, "failed": d.failed, "submitted": d.submitted,
                 "per_s": d.completed / window_s if window_s else 0.0,
                 "latency_p50_s": round(percentile(d.latencies, 50), 3),
                 "latency_p99_s": round(percentile(d.latencies, 99), 3),
                 "latency_max_s": round(max(d.latencies, default=0.0), 3),
                 "errors": dict(d.errors.most_common(5)),
                 "completed_per_user": dict(sorted(d.per_user.items())) if args.users else None},
        "cpu": {**m.load_cpu, "registration": m.registration_cpu, "idle": m.idle_cpu},
        "memory": {"rss_start_mib": round(m.rss_start / 2**20, 1), "rss_end_mib": round(m.rss_end / 2**20, 1),
                   "rss_peak_mib": round(sampler.peak_rss() / 2**20, 1), "hwm_mib": round(m.hwm / 2**20, 1)},
        "load": {"loop_lag_p99_ms": round(percentile(lags, 99) * 1000, 3),
                 "loop_lag_max_ms": round(max(lags, default=0.0) * 1000, 3),
                 "register_p50_ms": round(percentile(register_lat, 50) * 1000, 3),
                 "register_max_ms": round(max(register_lat, default=0.0) * 1000, 3),
                 "write_errors": sum(s.write_errors for s in loads),
                 "cpu_s": round(sum(s.cpu_s for s in loads), 2)},
        "coordinator": {"address": m.address, "log_level": args.log_level, "gc_trace": args.gc_trace},
        "machine": machine,
        "targets": targets,
        "passed": all(targets.values()) and d.failed == 0,
        "timeline": timeline(loads, t0, t1, m.gc_pauses),
    }
    if m.gc_pauses is not None:
        report["gc"] = {"load": gc_summary(m.gc_pauses, t0, t1),
                        "idle": gc_summary(m.gc_pauses, *m.idle) if m.idle[1] > m.idle[0] else None}
    if m.profile is not None:
        report["profile"] = m.profile
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000, help="fake nodes in all")
    p.add_argument("--procs", type=int, default=8, help="load processes hosting them")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels (TCP connections) per load process")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of job submissions")
    p.add_argument("--idle-window", type=float, default=10.0,
                   help="seconds of heartbeats alone (no jobs) before the load, as a baseline (0: none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 100 nodes, 2 procs, 15 s (5 s idle window)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="coordinator's heartbeat interval, s")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0, help="coordinator's heartbeat timeout, s")
    p.add_argument("--shard-ms", type=float, default=5.0, help="modelled work per shard on a fake node, ms")
    p.add_argument("--circuits", type=int, default=200, help="one-qubit circuits per job")
    p.add_argument("--shots", type=int, default=100, help="shots per circuit")
    p.add_argument("--jobs-in-flight", type=int, default=2,
                   help="jobs submitted and awaited at once (on 2 cores, 2 already saturate the coordinator: "
                        "4 gives the same jobs per second with twice the queueing)")
    p.add_argument("--job-timeout", type=float, default=120.0, help="longest wait for one job's result, s")
    p.add_argument("--users", type=int, default=0,
                   help="users with an API token each, submitting in turn (0: no authentication)")
    p.add_argument("--register-concurrency", type=int, default=32, help="Register calls in flight per process")
    p.add_argument("--allow-register-errors", action="store_true", help="go on if some nodes failed to register")
    p.add_argument("--log-level", default="INFO", help="the coordinator's log level")
    p.add_argument("--coordinator-log", default=None,
                   help="keep the coordinator's log here (else it goes with the temporary directory)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="sample the coordinator with py-spy during the window; collapsed stacks to FILE")
    p.add_argument("--gc-trace", action="store_true",
                   help="start the coordinator through a wrapper that records its garbage-collector pauses")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON results")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.procs, args.duration, args.idle_window = 100, 2, 15.0, min(args.idle_window, 5.0)
    if args.nodes < 1 or args.procs < 1 or args.channels < 1 or args.jobs_in_flight < 1 or args.circuits < 1:
        p.error("--nodes, --procs, --channels, --jobs-in-flight and --circuits must be >= 1")
    if args.users < 0:
        p.error("--users must be >= 0")
    args.procs = min(args.procs, args.nodes)
    if args.duration <= 0 or args.heartbeat_timeout <= args.heartbeat_interval:
        p.error("--duration must be > 0 and --heartbeat-timeout longer than --heartbeat-interval")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_guarded(run, args, "scale test")
    if isinstance(report, int):
        return report
    print_report(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results written to {output}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
