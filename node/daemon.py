"""The node daemon: registers with the coordinator, heartbeats, holds the Work stream, and runs
the shards that come down it on simulation worker processes (:mod:`qscale.node.worker`).

Threads of a running :class:`NodeDaemon` (all in the parent process, which never imports qiskit):

* the caller of :meth:`NodeDaemon.run`: the control loop. It registers (again and again while
  the coordinator is away: gRPC paces the attempts, see below), opens the Work stream,
  re-registers when a session ends, drains, and watches the parent process;
* a heartbeat thread: a ``heartbeat`` message (attempts in hand, free slots, a sequence number)
  on the Work stream every ``heartbeat_interval_s`` of the latest reply, whatever the
  simulations are doing (they run in other processes); it ends the session when a heartbeat
  went unanswered (no ``heartbeat_reply`` echoing its sequence number or a later one) for the
  heartbeat timeout;
* a stream reader per session: assignments go to a local queue, cancels abort, heartbeat replies
  renew the session (interval, timeout, and ``known``: false ends it, and the node registers
  again);
* one thread per slot: takes queued assignments, runs them on its :class:`WorkerSlot` and puts
  the results in the outbox.

Everything the node sends after the ``hello`` goes through one outbox that outlives sessions.
A heartbeat does not queue behind results: the outbox holds the latest one apart and hands it to
the stream first (an unsent heartbeat is replaced by the next one, and dropped when the node
registers again).

Reaching the coordinator follows :mod:`qscale.rpc`: the channel reconnects with gRPC's backoff
(from ``reconnect_min_s``, 1.6 times longer each time, up to ``reconnect_max_s``) and gRPC retries ``Register`` on
``UNAVAILABLE``; the loop only calls again. A refused join token (``UNAUTHENTICATED`` or
``PERMISSION_DENIED``) is no passing trouble: :meth:`NodeDaemon.run` logs which setting to fix
and returns :data:`EXIT_REFUSED`, so a supervisor shows the node failed rather than retrying forever.

When a session ends (the stream broke, the coordinator forgot the node, heartbeats went
unanswered) the node keeps its attempts for as long as its lease lasts (the heartbeat timeout since
the coordinator was last heard from: any message on the stream, a heartbeat reply included) and
registers again, presenting its previous node id and the attempts in hand; the coordinator's reply
names those it adopts. The node keeps those (and sends their chunk results again, in case the old
stream lost some in flight) and drops or aborts the others; results of those already produced
still go out, and the coordinator drops and counts them as stale (it decides what counts). When
the lease runs out first, it abandons them all.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from qscale.node.capabilities import build_capabilities, qpy_num_qubits, statevector_width
from qscale.node.config import NodeConfig, format_bytes
from qscale.node.metrics import NodeHealth, NodeMetrics
from qscale.node.worker import ChunkOutcome, ShardOutcome, WorkerSlot, WorkerStartError
from qscale.proto.v1 import node_pb2, node_pb2_grpc
from qscale.rpc import transport_hint
from qscale.security import make_channel

__all__ = ["NodeDaemon", "MAX_MESSAGE_BYTES", "EXIT_REFUSED"]

logger = logging.getLogger(__name__)

#: Largest gRPC message the node sends or accepts.
MAX_MESSAGE_BYTES = 256 << 20
#: Exit code of a node whose join token (or role) the coordinator refused.
EXIT_REFUSED = 5
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# Failures that say the coordinator is away or slow: registering again at once is right, as gRPC
# paces the attempts (reconnect backoff, retries). Any other failure waits reconnect_max_s.
_PASSING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

_TICK_S = 0.1
_DEFAULT_HEARTBEAT_S = 2.0
_REGISTER_TIMEOUT_S = 10.0
_KEEPALIVE_MS = 5_000
_FLUSH_S = 5.0
_STREAM_CLOSE_WAIT_S = 3.0
_HEALTHY_SESSION_S = 10.0
_JOB_CACHE_BYTES = 512 << 20  # circuits and noise models kept for the coordinator's jobs
_SENT_CHUNKS_BYTES = 256 << 20  # chunk results kept after sending, to send again after a resume

# Why the daemon aborted a running attempt; decides what it reports. _GIVEN_AWAY: not adopted when
# the node registered again (like a cancel: what it still produces goes out, and the coordinator
# drops and counts it as stale).
_CANCEL, _DRAIN, _STOP, _GIVEN_AWAY = "cancel", "drain", "stop", "given away"
# Running attempts with these abort reasons are on their way out: not presented, not heartbeated.
_LETTING_GO = (_CANCEL, _STOP, _GIVEN_AWAY)


class _Outbox:
    """FIFO of NodeMessages waiting for a stream; outlives sessions.

    It also keeps, per attempt in hand (tracked from its assignment), the chunk results already
    handed to a stream, until the attempt's final message (done or failed) is handed to one: a
    stream that breaks may have lost them in flight. :meth:`resume` puts them back in front.
    They are bounded by ``sent_budget`` bytes: an attempt whose kept chunks would pass it keeps
    none (it is *overflowed*, and the node does not present it for adoption).

    The latest heartbeat waits apart (:meth:`beat`): it goes out before the queued messages and
    is never kept for another session.
    """

    def __init__(self, sent_budget: int = _SENT_CHUNKS_BYTES) -> None:
        self._items: collections.deque[node_pb2.NodeMessage] = collections.deque()
        self._beat: node_pb2.NodeMessage | None = None
        self._cond = threading.Condition()
        self._sent: dict[str, list[node_pb2.NodeMessage]] = {}  # tracked token -> chunks sent
        self._sent_size: dict[str, int] = {}  # their bytes, per tracked token
        self._sent_bytes = 0
        self._sent_budget = sent_budget
        self._overflowed: set[str] = set()

    def put(self, msg: node_pb2.NodeMessage) -> None:
        with self._cond:
            self._items.append(msg)
            self._cond.notify()

    def beat(self, msg: node_pb2.NodeMessage) -> None:
        """Send heartbeat ``msg`` next, in place of one not sent yet."""
        with self._cond:
            self._beat = msg
            self._cond.notify()

    def get(self, timeout: float, closed: Callable[[], bool]) -> node_pb2.NodeMessage | None:
        """The next message for a stream (the waiting heartbeat first), noted as sent; None
        when there is none within ``timeout`` or the stream is ``closed()`` (the messages then
        stay queued)."""
        with self._cond:
            if not self._items and self._beat is None and not closed():
                self._cond.wait(timeout)
            if closed():
                return None
            if self._beat is not None:
                msg, self._beat = self._beat, None
                return msg
            if not self._items:
                return None
            msg = self._items.popleft()
            self._note_sent(msg)
            return msg

    def track(self, token: str) -> None:
        """Keep the chunk results of attempt ``token`` once sent, until its final message is."""
        with self._cond:
            if token not in self._sent:
                self._sent[token], self._sent_size[token] = [], 0

    def forget(self, token: str) -> None:
        """Attempt ``token`` ended without a final message (cancelled, abandoned)."""
        with self._cond:
            self._untrack(token)

    def final_tokens(self) -> list[str]:
        """Attempts whose final message (done or failed) is still queued."""
        with self._cond:
            return [_token_of(m) for m in self._items if m.WhichOneof("kind") in ("done", "failed")]

    def overflowed(self) -> set[str]:
        """Tracked attempts whose chunk results already sent are not all kept."""
        with self._cond:
            return set(self._overflowed)

    def resume(self, keep: set[str]) -> None:
        """After registering again: put the chunk results already sent of the attempts in
        ``keep`` back in front (they are kept again when sent), and stop tracking the others.
        Queued messages of attempts not kept still go out: the coordinator drops them as stale
        and counts them, so its count of late results stays true (it decides what counts). A
        heartbeat not sent yet is dropped: it was about the old session."""
        with self._cond:
            self._beat = None
            resend = [m for t, sent in self._sent.items() if t in keep for m in sent]
            self._items = collections.deque(resend + list(self._items))
            for token in list(self._sent):
                if token in keep:
                    self._sent[token], self._sent_size[token] = [], 0
                else:
                    self._untrack(token)
            self._sent_bytes = 0
            self._overflowed &= keep
            self._cond.notify()

    def pending_results(self) -> int:
        """Messages other than ``draining`` still to send."""
        with self._cond:
            return sum(1 for m in self._items if m.WhichOneof("kind") != "draining")

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def _note_sent(self, msg: node_pb2.NodeMessage) -> None:
        kind, token = msg.WhichOneof("kind"), _token_of(msg)
        if kind in ("done", "failed"):
            self._untrack(token)
            return
        kept = self._sent.get(token) if kind == "chunk" else None
        if kept is None or token in self._overflowed:
            return
        size = msg.ByteSize()
        if self._sent_bytes + size > self._sent_budget:
            self._sent_bytes -= self._sent_size[token]
            self._sent[token], self._sent_size[token] = [], 0
            self._overflowed.add(token)
            return
        kept.append(msg)
        self._sent_size[token] += size
        self._sent_bytes += size

    def _untrack(self, token: str) -> None:
        self._sent.pop(token, None)
        self._sent_bytes -= self._sent_size.pop(token, 0)
        self._overflowed.discard(token)


def _token_of(msg: node_pb2.NodeMessage) -> str:
    """The attempt token a message is about; empty for ``hello``, ``draining`` and ``heartbeat``."""
    kind = msg.WhichOneof("kind")
    return getattr(msg, kind).attempt_token if kind in ("chunk", "done", "failed") else ""


@dataclasses.dataclass
class _JobCache:
    """Circuits (QPY) and noise model of one job, as the coordinator sent them."""

    qpy: dict[int, bytes] = dataclasses.field(default_factory=dict)
    noise_model: str | None = None
    size: int = 0


class _Session:
    """One registration: a node id, its Work stream and heartbeat timing."""

    def __init__(self, node_id: str, interval: float, timeout: float) -> None:
        now = time.monotonic()
        self.node_id = node_id
        self.interval = interval
        self.timeout = timeout
        self.started = now
        self.last_heard = now  # a reply or a stream message from the coordinator: the lease starts
        self.next_heartbeat = now
        self.sequence = 0  # of the last heartbeat sent
        self.answered = 0  # the highest sequence number the coordinator echoed (set by the reader)
        self.unanswered: collections.deque[tuple[int, float]] = collections.deque()
        """(sequence, when sent) of heartbeats not answered yet, oldest first (heartbeat thread)"""
        self.call: Any = None
        self.reader: threading.Thread | None = None
        self.ended = threading.Event()
        self.end_reason = ""
        self.graceful = False  # the request stream ends once the outbox is empty

    @property
    def lease_end(self) -> float:
        """When the coordinator may give this session's attempts away (monotonic clock)."""
        return self.last_heard + self.timeout

    def closed(self) -> bool:
        """The session ended, or its call did (before the stream reader noticed)."""
        if self.ended.is_set():
            return True
        call = self.call
        return call is not None and call.done()

    def end(self, reason: str) -> bool:
        """Mark the session over; True for the first caller."""
        if self.ended.is_set():
            return False
        self.end_reason = reason
        self.ended.set()
        return True

    def cancel_call(self) -> None:
        call = self.call
        if call is not None:
            try:
                call.cancel()
            except Exception:  # noqa: BLE001 - best effort on a dying call
                pass


class NodeDaemon:
    """A qscale node: joins the coordinator at ``config.coordinator`` and runs shards until it is
    drained or stopped.

    Args:
        config: the node's settings.
        slot_factory: builds the worker slot of each index (tests may inject their own);
            default: :class:`WorkerSlot` sized from ``config``.
    """

    def __init__(
        self, config: NodeConfig, *, slot_factory: Callable[[int], WorkerSlot] | None = None
    ) -> None:
        self.config = config
        self._slot_factory = slot_factory or self._default_slot
        self._slots: list[WorkerSlot] = []
        self._slot_threads: list[threading.Thread] = []
        self._broken_slots: set[int] = set()
        self._heartbeat_thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self._stub: node_pb2_grpc.NodeServiceStub | None = None
        self._capabilities: node_pb2.NodeCapabilities | None = None
        self._methods: frozenset[str] = frozenset()
        self._outbox = _Outbox()
        self._cond = threading.Condition()
        self._queue: collections.deque[node_pb2.ShardAssignment] = collections.deque()
        self._running: dict[str, WorkerSlot] = {}
        self._abort_reasons: dict[str, str] = {}
        self._attempts: dict[str, tuple[str, int]] = {}  # token -> (job id, shard index), for logs
        # What the coordinator sent once per job on this session (circuits, noise model): later
        # shards of the job refer to it. Oldest job first; bounded by _JOB_CACHE_BYTES.
        self._job_cache: collections.OrderedDict[str, _JobCache] = collections.OrderedDict()
        self._job_cache_bytes = 0
        self._session: _Session | None = None
        self._last_node_id: str | None = None
        # While no session: when the last one's lease runs out and the attempts in hand go.
        self._lease_until: float | None = None
        self._stopped = threading.Event()
        # Plain flags: request_drain() and stop() may run in a signal handler.
        self._drain_requested = False
        self._stop_requested = False
        self._draining = False
        self._drain_reason = ""
        self._drain_deadline = 0.0
        self._flush_deadline = 0.0
        self._drain_aborted = False
        self._ran = False
        self._health: NodeHealth | None = None
        self._metrics: NodeMetrics | None = None
        self.metrics_port = 0
        """Bound port of the metrics endpoint (0: off)."""
        self.health_port = 0
        """Bound port of the gRPC health service (0: off)."""
        self._state = "created"

    # ---- public ---------------------------------------------------------------------------------

    @property
    def node_id(self) -> str | None:
        """The node id of the current session (None while not registered)."""
        session = self._session
        return session.node_id if session is not None and not session.ended.is_set() else None

    @property
    def state(self) -> str:
        """``created``, ``starting``, ``connecting``, ``connected``, ``draining`` or ``stopped``."""
        return self._state

    def request_drain(self) -> None:
        """Drain: hand back queued shards, let running ones finish for up to ``drain_grace_s``,
        then leave. Safe from any thread and from a signal handler."""
        self._drain_requested = True

    def stop(self) -> None:
        """Leave now: abort running shards without handing them back (the coordinator notices the
        closed stream). Safe from any thread and from a signal handler."""
        self._stop_requested = True

    @property
    def _state(self) -> str:
        return self._state_value

    @_state.setter
    def _state(self, value: str) -> None:
        self._state_value = value
        if self._health is not None:
            self._health.set(serving=value not in ("draining", "stopped"), connected=value == "connected")

    def run(self) -> int:
        """Run until drained or stopped. Returns the process exit code: 0 after a drain or stop,
        1 when no simulation worker could start, 2 when its metrics or health port cannot be
        bound, :data:`EXIT_REFUSED` (5) when the coordinator refused its join token. Every
        worker process is stopped on return."""
        if self._ran:
            raise RuntimeError("NodeDaemon.run() can be called only once")
        self._ran = True
        try:
            try:
                self._start_endpoints()
            except OSError as exc:  # a port in use: a setting error, not a crash
                logger.error("node %r: cannot serve its metrics or health port: %s", self.config.name, exc)
                return 2
            return self._run()
        finally:
            self._shutdown()
            self._state = "stopped"
            if self._health is not None:
                self._health.close()
            if self._metrics is not None:
                self._metrics.close()

    def _start_endpoints(self) -> None:
        """Metrics and gRPC health, when their ports are set."""
        cfg = self.config
        if cfg.metrics_port:
            self._metrics = NodeMetrics(busy=lambda: len(self._running), total=lambda: len(self._slots),
                                        connected=lambda: 1.0 if self._state == "connected" else 0.0)
            self.metrics_port = self._metrics.serve(cfg.metrics_port)
        if cfg.health_port:
            self._health = NodeHealth(cfg.health_port)
            self.health_port = self._health.start()
            self._state = self._state  # publish the current status

    # ---- control loop ---------------------------------------------------------------------------

    def _default_slot(self, index: int) -> WorkerSlot:
        return WorkerSlot(
            index,
            threads=self.config.threads_per_worker,
            memory_budget_bytes=self.config.slot_memory_budget,
        )

    def _run(self) -> int:
        cfg = self.config
        self._state = "starting"
        logger.info(
            "node %r starting: coordinator %s, %d slot(s) x %d thread(s), memory budget %s (%s per slot)",
            cfg.name, cfg.coordinator, cfg.slots, cfg.threads_per_worker,
            format_bytes(cfg.memory_budget), format_bytes(cfg.slot_memory_budget),
        )
        parent_direct = cfg.parent_pid is not None and os.getppid() == cfg.parent_pid
        self._slots = [self._slot_factory(i) for i in range(cfg.slots)]
        for slot in self._slots:
            slot.start()
        info = None
        next_parent_check = 0.0
        while info is None:
            if self._stop_requested or self._drain_requested:
                logger.info("node %r: stopped before its workers were ready", cfg.name)
                return 0
            now = time.monotonic()
            if now >= next_parent_check:
                next_parent_check = now + 1.0
                if self._parent_gone(parent_direct):
                    logger.warning("node %r: parent process %s is gone; exiting", cfg.name, cfg.parent_pid)
                    return 0
            try:
                info = self._slots[0].wait_ready(timeout=0.2)
            except TimeoutError:
                continue
            except WorkerStartError as exc:
                logger.error("node %r: cannot start a simulation worker: %s", cfg.name, exc)
                return 1
        self._methods = frozenset(info.methods)
        self._capabilities = build_capabilities(cfg, info)

        self._channel = make_channel(
            cfg.coordinator,
            token=cfg.resolved_token(),
            tls=cfg.tls_config(),
            reconnect_backoff_s=(cfg.reconnect_min_s, cfg.reconnect_max_s),
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # A connection whose packets vanish (a partition: no reset) is found dead within
                # about 8 s and dialled again, instead of holding every call to its deadline.
                # (The coordinator accepts a ping every 2 s: 5 s leaves a margin.)
                ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
                ("grpc.keepalive_timeout_ms", 3_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        self._stub = node_pb2_grpc.NodeServiceStub(self._channel)
        for slot in self._slots:
            t = threading.Thread(target=self._slot_loop, args=(slot,), name=f"qscale-slot-{slot.index}", daemon=True)
            self._slot_threads.append(t)
            t.start()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="qscale-heartbeat", daemon=True)
        self._heartbeat_thread.start()

        next_attempt = 0.0
        unreachable_since: float | None = None
        last_error = ""
        early_ends = 0  # sessions in a row that ended before _HEALTHY_SESSION_S
        self._state = "connecting"
        while True:
            now = time.monotonic()
            if self._stop_requested:
                logger.info("node %s: stop requested; leaving without handing back", self._who())
                return 0
            if now >= next_parent_check:
                next_parent_check = now + 1.0
                if not self._draining and self._parent_gone(parent_direct):
                    self._begin_drain(f"parent process {cfg.parent_pid} is gone", grace=0.0, flush=1.0)
            if self._drain_requested and not self._draining:
                self._begin_drain("drain requested", grace=cfg.drain_grace_s, flush=_FLUSH_S)
            if self._draining:
                self._drain_step(now)
                if self._drain_finished(now):
                    self._close_session_gracefully()
                    logger.info("node %s: drained; leaving", self._who())
                    return 0

            session = self._session
            if session is not None and session.ended.is_set():
                self._teardown_session(session)
                # Register again at once after a healthy session. Sessions that keep ending early
                # (a coordinator that accepts a node and drops it) are spaced out, reconnect_min_s
                # after the first, twice that after the next, up to reconnect_max_s: gRPC paces
                # connection attempts and retries calls, not sessions that it saw succeed. (A
                # coordinator that is away is paced by the channel.)
                early_ends = 0 if now - session.started >= _HEALTHY_SESSION_S else early_ends + 1
                next_attempt = session.started + min(cfg.reconnect_max_s, cfg.reconnect_min_s * 2 ** early_ends) \
                    if early_ends else now
                if not self._draining:
                    self._state = "connecting"
            if self._session is None and self._lease_until is not None and now >= self._lease_until:
                self._lease_until = None
                self._abandon_in_hand()
            if self._session is None and now >= next_attempt:
                try:
                    self._open_session()
                except grpc.RpcError as err:
                    code = err.code() if hasattr(err, "code") else None
                    text = _rpc_error_text(err)
                    if code in _REFUSED:
                        logger.error(
                            "node %r: coordinator %s refused this node's join token (%s); set the join token the "
                            "coordinator accepts with --token-file FILE, $QSCALE_NODE_TOKEN_FILE or "
                            "$QSCALE_NODE_TOKEN (one of the coordinator's --node-tokens-file lines); exiting",
                            cfg.name, cfg.coordinator, text,
                        )
                        return EXIT_REFUSED
                    if code not in _PASSING:
                        next_attempt = time.monotonic() + cfg.reconnect_max_s
                    hint = transport_hint(text, tls=cfg.tls_config() is not None, client_cert=bool(cfg.tls_cert),
                                          python=False) if code == grpc.StatusCode.UNAVAILABLE else None
                    if unreachable_since is None or text.split(":", 1)[0] != last_error:
                        unreachable_since = unreachable_since or now
                        logger.warning(
                            "node %r: cannot register with coordinator %s: %s; trying again, %.1f-%.1f s apart",
                            cfg.name, cfg.coordinator, f"{hint} ({text})" if hint else text,
                            cfg.reconnect_min_s, cfg.reconnect_max_s,
                        )
                    else:
                        logger.debug("node %r: register failed again: %s", cfg.name, text)
                    last_error = text.split(":", 1)[0]
                else:
                    if unreachable_since is not None:
                        logger.info(
                            "node %s: coordinator %s reachable again after %.1f s",
                            self._who(), cfg.coordinator, time.monotonic() - unreachable_since,
                        )
                    unreachable_since, last_error = None, ""
            time.sleep(_TICK_S)

    def _who(self) -> str:
        session = self._session
        node_id = session.node_id if session is not None else self._last_node_id
        return f"{node_id or '-'} ({self.config.name})"

    def _parent_gone(self, direct: bool) -> bool:
        pid = self.config.parent_pid
        if pid is None:
            return False
        if direct and os.getppid() != pid:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    # ---- sessions -------------------------------------------------------------------------------

    def _open_session(self) -> None:
        """Register (presenting the previous node id and the attempts in hand, if any), settle
        the attempts in hand from the reply, and open the Work stream."""
        assert self._stub is not None and self._capabilities is not None
        previous = self._last_node_id or ""
        presented = self._in_hand() if previous else []
        reply = self._stub.Register(
            node_pb2.RegisterRequest(
                capabilities=self._capabilities, previous_node_id=previous, attempts_in_hand=presented
            ),
            timeout=_REGISTER_TIMEOUT_S,
        )
        interval = reply.heartbeat_interval_s if reply.heartbeat_interval_s > 0 else _DEFAULT_HEARTBEAT_S
        timeout = reply.heartbeat_timeout_s if reply.heartbeat_timeout_s > 0 else 5 * interval
        session = _Session(reply.node_id, interval, timeout)
        self._lease_until = None
        adopted, dropped = self._settle_in_hand(presented, reply.adopted_attempts)
        if reply.node_id != previous:  # a new node id: the coordinator sends every job's circuits again
            with self._cond:
                self._job_cache.clear()
                self._job_cache_bytes = 0
        if previous:
            how = "resumed" if reply.node_id == previous else f"registered again as a new node (was {previous})"
            logger.info("node %s: %s: %d attempt(s) adopted, %d dropped", reply.node_id, how, adopted, dropped)
        session.call = self._stub.Work(self._requests(session))
        session.reader = threading.Thread(
            target=self._read_stream, args=(session,), name=f"qscale-stream-{reply.node_id}", daemon=True
        )
        self._session = session
        self._last_node_id = reply.node_id
        session.reader.start()
        with self._cond:
            in_hand = len(self._queue) + len(self._running)
        if not self._draining:
            self._state = "connected"
        logger.info(
            "node %s: registered with coordinator %s; heartbeat every %.1f s (timeout %.1f s); "
            "%d shard(s) in hand, %d message(s) to send",
            self._who(), self.config.coordinator, interval, timeout, in_hand, len(self._outbox),
        )

    def _in_hand(self) -> list[str]:
        """Attempt tokens to present when registering again: queued, running (unless on their way
        out) and finished with their final message still unsent. Not those whose chunk results
        already sent were not all kept: they could not be completed on a new stream."""
        with self._cond:  # _run_on_slot queues the final message as it leaves _running
            tokens = [a.attempt_token for a in self._queue]
            tokens += [t for t in self._running if self._abort_reasons.get(t) not in _LETTING_GO]
            tokens += self._outbox.final_tokens()
            overflowed = self._outbox.overflowed()
        return [t for t in dict.fromkeys(tokens) if t not in overflowed]

    def _settle_in_hand(self, presented: list[str], adopted_attempts: Iterable[str]) -> tuple[int, int]:
        """Keep the presented attempts the coordinator adopted; drop the other queued ones and
        abort the other running ones (the coordinator gave those attempts away). Returns how
        many were kept and dropped."""
        keep = set(adopted_attempts) & set(presented)
        with self._cond:
            dropped = {a.attempt_token for a in self._queue if a.attempt_token not in keep}
            kept = [a for a in self._queue if a.attempt_token in keep]
            self._queue.clear()
            self._queue.extend(kept)
            for token in dropped:
                self._attempts.pop(token, None)
            given_away: list[tuple[str, WorkerSlot]] = []
            for token, slot in self._running.items():
                if token in keep:
                    continue
                if self._abort_reasons.get(token) not in _LETTING_GO:
                    given_away.append((token, slot))
                self._abort_reasons[token] = _GIVEN_AWAY
            dropped |= {token for token, _ in given_away}
            self._outbox.resume(keep)
        dropped |= set(presented) - keep
        for token, slot in given_away:
            logger.debug("node %s: aborting %s: not adopted", self._who(), self._describe(token))
            slot.abort(token, "given away: the coordinator did not adopt it when the node registered again")
        return len(keep), len(dropped)

    def _teardown_session(self, session: _Session) -> None:
        """The session ended: close its stream and start the lease (the attempts in hand are
        kept until a new session settles them, or until the lease runs out)."""
        session.cancel_call()
        if session.reader is not None:
            session.reader.join(_STREAM_CLOSE_WAIT_S)
        if self._session is session:
            self._session = None
        self._lease_until = session.lease_end
        logger.warning(
            "node %s: session ended: %s; registering again (keeping %d attempt(s) in hand for up to %.1f s)",
            session.node_id, session.end_reason, len(self._in_hand()), max(0.0, self._lease_until - time.monotonic()),
        )

    def _abandon_in_hand(self) -> None:
        """The lease of the ended session is over: the coordinator has (or will have) given its
        shards to other nodes, so stop working on them. Results already produced stay in the
        outbox: registering again presents them, and the coordinator may still adopt them."""
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
            running = [(t, s) for t, s in self._running.items() if self._abort_reasons.get(t) not in _LETTING_GO]
            for token, _ in running:
                self._abort_reasons[token] = _STOP
            for a in queued:
                self._attempts.pop(a.attempt_token, None)
                self._outbox.forget(a.attempt_token)
        if queued or running:
            logger.info("node %s: lease over: dropped %d queued and stopped %d running shard(s)",
                        self._who(), len(queued), len(running))
        for token, slot in running:
            slot.abort(token, "lease over: the coordinator lost contact with this node")

    def _close_session_gracefully(self) -> None:
        """End the request stream after the outbox is flushed; wait (bounded) for the coordinator
        to close its side, then cancel whatever is left."""
        session = self._session
        if session is None:
            return
        session.graceful = True
        if session.reader is not None and not session.ended.is_set():
            session.reader.join(_STREAM_CLOSE_WAIT_S)
        session.end("node left")
        session.cancel_call()
        self._session = None

    def _requests(self, session: _Session) -> Iterator[node_pb2.NodeMessage]:
        yield node_pb2.NodeMessage(hello=node_pb2.StreamHello(node_id=session.node_id))
        if self._draining:
            yield node_pb2.NodeMessage(draining=node_pb2.Draining())
        while True:
            msg = self._outbox.get(_TICK_S, session.closed)  # stays queued once the session is over
            if msg is None:
                if session.closed() or session.graceful:
                    return  # graceful: half-close, the coordinator sees the end of our stream
                continue
            yield msg

    def _read_stream(self, session: _Session) -> None:
        reason = "coordinator closed the work stream"
        try:
            for msg in session.call:
                session.last_heard = time.monotonic()
                kind = msg.WhichOneof("kind")
                if kind == "assign":
                    self._on_assign(session, msg.assign)
                elif kind == "cancel":
                    self._on_cancel(session, msg.cancel)
                elif kind == "forget":
                    self._forget_job(msg.forget.job_id)
                elif kind == "heartbeat_reply":
                    self._on_heartbeat_reply(session, msg.heartbeat_reply)
                else:
                    logger.warning("node %s: unknown message on the work stream: %r", session.node_id, kind)
        except grpc.RpcError as err:
            reason = f"work stream broke ({_rpc_error_text(err)})"
        except Exception as exc:  # noqa: BLE001 - never let the reader die silently
            logger.exception("node %s: error while reading the work stream", session.node_id)
            reason = f"error reading the work stream: {type(exc).__name__}: {exc}"
        finally:
            session.end(reason)

    # ---- heartbeats -----------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """A heartbeat on the session's stream every interval; the session ends when a heartbeat
        went unanswered for the heartbeat timeout (the coordinator, or the way to it, is gone or
        stuck)."""
        while not self._stopped.is_set():
            session = self._session
            if session is None or session.ended.is_set():
                self._stopped.wait(_TICK_S / 2)
                continue
            now = time.monotonic()
            unanswered = session.unanswered
            while unanswered and unanswered[0][0] <= session.answered:  # a reply answers the earlier ones too
                unanswered.popleft()
            if unanswered and now - unanswered[0][1] > session.timeout:
                if session.end(f"no heartbeat reply for {now - unanswered[0][1]:.1f} s"):
                    session.cancel_call()
                continue
            if session.graceful:  # the stream is closing: it ends once the outbox is empty
                self._stopped.wait(_TICK_S / 2)
                continue
            if now < session.next_heartbeat:
                self._stopped.wait(min(_TICK_S / 2, session.next_heartbeat - now))
                continue
            running, free = self._load()
            session.sequence += 1
            unanswered.append((session.sequence, now))
            self._outbox.beat(node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(
                sequence=session.sequence, attempts_in_hand=running, free_slots=free)))
            session.next_heartbeat = now + session.interval

    def _on_heartbeat_reply(self, session: _Session, reply: node_pb2.HeartbeatReply) -> None:
        """The coordinator answered a heartbeat of this session (from the stream reader)."""
        session.answered = max(session.answered, reply.sequence)
        if reply.heartbeat_interval_s > 0:
            session.interval = reply.heartbeat_interval_s
        if reply.heartbeat_timeout_s > 0:
            session.timeout = reply.heartbeat_timeout_s
        if not reply.known:
            reason = f"the coordinator does not know node {session.node_id} (it restarted, or declared the node lost)"
            if session.end(reason):
                session.cancel_call()

    def _load(self) -> tuple[list[str], int]:
        """Attempt tokens in hand (queued and running) and slots free for more work."""
        with self._cond:
            tokens = [a.attempt_token for a in self._queue]
            tokens += [t for t in self._running if self._abort_reasons.get(t) not in _LETTING_GO]
            busy = len(self._queue) + len(self._running)
        if self._draining:
            return tokens, 0
        return tokens, max(0, len(self._slots) - len(self._broken_slots) - busy)

    # ---- assignments ----------------------------------------------------------------------------

    def _describe(self, token: str) -> str:
        job_id, shard = self._attempts.get(token, ("?", -1))
        return f"job {job_id} shard {shard} attempt {token}"

    def _refusal(self, a: node_pb2.ShardAssignment) -> str | None:
        cfg = self.config
        if self._draining or self._drain_requested:
            return "node draining"
        if a.memory_bytes > cfg.slot_memory_budget:
            return (
                f"shard needs {format_bytes(a.memory_bytes)} but this node's slots hold "
                f"{format_bytes(cfg.slot_memory_budget)} each ({cfg.slots} slot(s) share "
                f"{format_bytes(cfg.memory_budget)})"
            )
        if a.method and a.method not in self._methods:
            offered = ", ".join(sorted(self._methods))
            return f"this node does not offer the Aer method {a.method!r} (it offers {offered})"
        if cfg.max_qubits > 0 and statevector_width(a.method, 0) is not None:
            # The circuits' widths from their QPY headers (cached ones from the job's cache; one
            # missing there is refused by _fill_from_cache), with the coordinator's own rule.
            with self._cond:
                cached = self._job_cache.get(a.job_id, _JobCache()).qpy
                payloads = [cached.get(p.circuit_index, b"") if p.cached else p.qpy for p in a.circuits]
            widths = [n for n in map(qpy_num_qubits, payloads) if n is not None]
            width = statevector_width(a.method, max(widths, default=0))
            if width is not None and width > cfg.max_qubits:
                return (
                    f"circuit needs a {width}-qubit statevector; this node accepts at most "
                    f"{cfg.max_qubits} (--max-qubits)"
                )
        return None

    def _fill_from_cache(self, a: node_pb2.ShardAssignment) -> str | None:
        """Complete an assignment with the circuits and noise model sent with earlier shards of
        its job, and keep what it brings for later ones. Returns a refusal if something is
        missing (evicted): the coordinator then sends the shard elsewhere."""
        with self._cond:
            entry = self._job_cache.get(a.job_id)
            if entry is None:
                entry = self._job_cache[a.job_id] = _JobCache()
            self._job_cache.move_to_end(a.job_id)
            for payload in a.circuits:
                if payload.cached:
                    qpy = entry.qpy.get(payload.circuit_index)
                    if qpy is None:
                        return f"circuit {payload.circuit_index} of job {a.job_id} is no longer in this node's cache"
                    payload.qpy = qpy
                    payload.cached = False
                elif payload.circuit_index not in entry.qpy:
                    entry.qpy[payload.circuit_index] = payload.qpy
                    entry.size += len(payload.qpy)
                    self._job_cache_bytes += len(payload.qpy)
            if a.noise_model_cached:
                if entry.noise_model is None:
                    return f"the noise model of job {a.job_id} is no longer in this node's cache"
                a.noise_model = entry.noise_model
                a.noise_model_cached = False
            elif a.noise_model and entry.noise_model is None:
                entry.noise_model = a.noise_model
                entry.size += len(a.noise_model)
                self._job_cache_bytes += len(a.noise_model)
            while self._job_cache_bytes > _JOB_CACHE_BYTES and len(self._job_cache) > 1:
                _, old = self._job_cache.popitem(last=False)
                self._job_cache_bytes -= old.size
        return None

    def _forget_job(self, job_id: str) -> None:
        with self._cond:
            entry = self._job_cache.pop(job_id, None)
            if entry is not None:
                self._job_cache_bytes -= entry.size

    def _on_assign(self, session: _Session, a: node_pb2.ShardAssignment) -> None:
        token = a.attempt_token
        refusal = self._refusal(a) or self._fill_from_cache(a)
        with self._cond:
            duplicate = token in self._running or any(q.attempt_token == token for q in self._queue)
            if not duplicate:
                self._attempts[token] = (a.job_id, a.shard_index)
                if refusal is None:
                    self._queue.append(a)
                    self._outbox.track(token)
                    self._cond.notify()
        if duplicate:
            logger.warning("node %s: attempt %s assigned twice; ignoring the second", session.node_id, token)
            return
        what = self._describe(token)
        if refusal is not None:
            logger.info("node %s: refused %s: %s", session.node_id, what, refusal)
            self._attempts.pop(token, None)
            self._send_failed(token, refusal, refused=True)
            return
        logger.info(
            "node %s: queued %s (%d chunk(s), %d circuit(s), method %s, needs %s)",
            session.node_id, what, len(a.chunks), len(a.circuits), a.method or "automatic",
            format_bytes(a.memory_bytes),
        )

    def _on_cancel(self, session: _Session, c: node_pb2.CancelAttempt) -> None:
        token = c.attempt_token
        what = self._describe(token)
        with self._cond:
            for queued in self._queue:
                if queued.attempt_token == token:
                    self._queue.remove(queued)
                    self._attempts.pop(token, None)
                    self._outbox.forget(token)
                    logger.info("node %s: dropped queued %s: cancelled (%s)", session.node_id, what, c.reason)
                    return
            slot = self._running.get(token)
            if slot is None:
                logger.debug("node %s: cancel for %s, which is not in hand", session.node_id, what)
                return
            self._abort_reasons[token] = _CANCEL
        logger.info("node %s: aborting running %s: cancelled (%s)", session.node_id, what, c.reason)
        slot.abort(token, f"cancelled: {c.reason}" if c.reason else "cancelled")

    def _send_failed(self, token: str, error: str, *, refused: bool) -> None:
        self._outbox.put(
            node_pb2.NodeMessage(failed=node_pb2.ShardFailed(attempt_token=token, error=error, refused=refused))
        )

    # ---- slots ----------------------------------------------------------------------------------

    def _slot_loop(self, slot: WorkerSlot) -> None:
        failures = 0
        while not self._stopped.is_set() and not slot.closed:
            try:
                slot.wait_ready(timeout=0.5)
            except TimeoutError:
                continue
            except WorkerStartError as exc:
                if self._stopped.is_set() or slot.closed:
                    return
                failures += 1
                self._broken_slots.add(slot.index)
                delay = min(30.0, 2.0 ** failures)
                logger.error("node %s: %s; retrying in %.0f s", self._who(), exc, delay)
                if self._stopped.wait(delay):
                    return
                continue
            failures = 0
            self._broken_slots.discard(slot.index)
            with self._cond:
                if not self._queue:
                    self._cond.wait(0.5)
                if not self._queue or self._stopped.is_set():
                    continue
                assignment = self._next_assignment()
                self._running[assignment.attempt_token] = slot
            try:
                self._run_on_slot(slot, assignment)
            except Exception:  # noqa: BLE001 - a bug here must not kill the slot
                logger.exception(
                    "node %s: error while running %s", self._who(), self._describe(assignment.attempt_token)
                )
                with self._cond:
                    self._running.pop(assignment.attempt_token, None)
                    if self._abort_reasons.pop(assignment.attempt_token, None) not in _LETTING_GO:
                        self._send_failed(
                            assignment.attempt_token, "internal error in the node; see its log", refused=False
                        )

    def _next_assignment(self) -> node_pb2.ShardAssignment:
        """Take the shard to run next (with ``_cond`` held, ``_queue`` not empty): the highest
        ``priority`` (the coordinator's run order: priority class, and shards sent to run ahead),
        the first received among equals."""
        queue = self._queue
        best = 0
        for position in range(1, len(queue)):
            if queue[position].priority > queue[best].priority:
                best = position
        assignment = queue[best]
        del queue[best]
        return assignment

    def _run_on_slot(self, slot: WorkerSlot, a: node_pb2.ShardAssignment) -> None:
        token = a.attempt_token
        what = self._describe(token)
        logger.info("node %s: slot %d running %s", self._who(), slot.index, what)

        def on_chunk(chunk: ChunkOutcome) -> None:
            msg = node_pb2.NodeMessage(
                chunk=node_pb2.ChunkResult(
                    attempt_token=token,
                    chunk_index=chunk.chunk_index,
                    counts=chunk.counts,
                    seconds=chunk.seconds,
                )
            )
            self._outbox.put(msg)
            logger.debug("node %s: %s chunk %d done in %.3f s", self._who(), what, chunk.chunk_index, chunk.seconds)

        outcome: ShardOutcome = slot.run(a, on_chunk)
        with self._cond:  # the final message is queued as the attempt leaves _running: a resume sees one
            self._running.pop(token, None)
            why = self._abort_reasons.pop(token, None)
            self._attempts.pop(token, None)
            report = self._final_message(token, outcome, why)
            if report is None:
                self._outbox.forget(token)
            else:
                self._outbox.put(report)
        self._count_outcome(outcome, why)
        self._log_outcome(what, outcome, why, report)

    def _final_message(self, token: str, outcome: ShardOutcome, why: str | None) -> node_pb2.NodeMessage | None:
        """What the node reports when an attempt stops running (None: nothing)."""
        if outcome.ok:
            return node_pb2.NodeMessage(done=node_pb2.ShardDone(attempt_token=token, seconds=outcome.seconds))
        if why in _LETTING_GO or (why is None and outcome.aborted):
            return None
        if why == _DRAIN:
            error = f"node draining: still running after the {self.config.drain_grace_s:g} s grace"
            if self._drain_reason.startswith("parent"):
                error = f"node draining: {self._drain_reason}"
            return node_pb2.NodeMessage(failed=node_pb2.ShardFailed(attempt_token=token, error=error, refused=True))
        return node_pb2.NodeMessage(failed=node_pb2.ShardFailed(attempt_token=token, error=outcome.error))

    def _count_outcome(self, outcome: ShardOutcome, why: str | None) -> None:
        if self._metrics is None:
            return
        self._metrics.simulation_seconds.inc(max(0.0, outcome.seconds))
        kind = "aborted" if why == _GIVEN_AWAY else "done" if outcome.ok else "handed_back" if why == _DRAIN else \
            "aborted" if why in (_CANCEL, _STOP) or outcome.aborted else "failed"
        self._metrics.shards.labels(kind).inc()
        if not outcome.ok and outcome.error.startswith("worker process died"):
            self._metrics.worker_crashes.inc()

    def _log_outcome(
        self, what: str, outcome: ShardOutcome, why: str | None, report: node_pb2.NodeMessage | None
    ) -> None:
        if why == _GIVEN_AWAY:
            logger.info("node %s: %s dropped: not adopted when the node registered again", self._who(), what)
        elif outcome.ok:
            logger.info(
                "node %s: %s done in %.2f s (%d chunk(s))", self._who(), what, outcome.seconds, outcome.chunks_done
            )
        elif why == _CANCEL:
            logger.info("node %s: %s aborted: %s", self._who(), what, outcome.error)
        elif why == _DRAIN and report is not None:
            logger.info("node %s: handed back %s: %s", self._who(), what, report.failed.error)
        elif why == _STOP or outcome.aborted:
            logger.info("node %s: %s abandoned: %s", self._who(), what, outcome.error)
        else:
            logger.warning("node %s: %s failed: %s", self._who(), what, outcome.error)

    # ---- draining -------------------------------------------------------------------------------

    def _begin_drain(self, reason: str, *, grace: float, flush: float) -> None:
        now = time.monotonic()
        self._draining = True
        self._state = "draining"
        self._drain_reason = reason
        self._drain_deadline = now + grace
        self._flush_deadline = now + grace + flush
        self._outbox.put(node_pb2.NodeMessage(draining=node_pb2.Draining()))
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
            running = len(self._running)
        logger.info(
            "node %s: draining (%s): handing back %d queued shard(s); %d running get %.0f s to finish",
            self._who(), reason, len(queued), running, grace,
        )
        for a in queued:
            logger.info("node %s: handed back %s: node draining", self._who(), self._describe(a.attempt_token))
            self._attempts.pop(a.attempt_token, None)
            self._send_failed(a.attempt_token, "node draining", refused=True)

    def _drain_step(self, now: float) -> None:
        if self._drain_aborted or now < self._drain_deadline:
            return
        self._drain_aborted = True
        with self._cond:
            running = list(self._running.items())
            for token, _ in running:
                self._abort_reasons[token] = _DRAIN
        for token, slot in running:
            logger.info("node %s: aborting %s: drain grace over", self._who(), self._describe(token))
            slot.close()  # kills its worker; closed, the slot starts no new one (the node is leaving)

    def _drain_finished(self, now: float) -> bool:
        with self._cond:
            if self._queue or self._running:
                return False
        if self._outbox.pending_results() == 0:
            return True
        if now >= self._flush_deadline:
            logger.warning(
                "node %s: leaving with %d unsent message(s): the coordinator could not be reached",
                self._who(), self._outbox.pending_results(),
            )
            return True
        return False

    # ---- shutdown -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._stopped.set()
        session = self._session
        if session is not None:
            session.end("node stopped")
            session.cancel_call()
            self._session = None
        with self._cond:
            running = list(self._running.items())
            for token, _ in running:
                self._abort_reasons.setdefault(token, _STOP)
            self._cond.notify_all()
        for token, slot in running:
            slot.abort(token, "node stopped")
        for slot in self._slots:
            try:
                slot.close()
            except Exception:  # noqa: BLE001 - keep closing the others
                logger.exception("node %s: error while stopping slot %d", self._who(), slot.index)
        for t in self._slot_threads:
            t.join(10.0)
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(15.0)
        if session is not None and session.reader is not None:
            session.reader.join(_STREAM_CLOSE_WAIT_S)
        if self._channel is not None:
            self._channel.close()
        alive = [s.pid for s in self._slots if s.pid is not None]
        if alive:  # pragma: no cover - close() kills and reaps
            logger.error("node %s: worker processes still alive after shutdown: %s", self._who(), alive)


def _rpc_error_text(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {details}" if details else name
