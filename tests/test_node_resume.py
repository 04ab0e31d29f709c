"""The node's side of resuming after a blip (qscale.node.daemon): a real NodeDaemon, with a real
worker slot running qiskit-aer, against a fake coordinator that each test scripts, served by a
real gRPC server on a loopback port the OS picks.

The worker slot is a :class:`WorkerSlot` that pauses a shard after its first chunk (the daemon's
callback for the chunk does not return) until the test opens its gate or the daemon aborts the
shard: the shard is then running, from the daemon's point of view, for as long as the test needs.
Every wait is bounded; the daemon, its worker and the server are stopped whatever happens.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from qiskit import QuantumCircuit

from conftest import bell, dense_circuit, uniform
from qscale.circuits import dump_qpy
from qscale.node.config import NodeConfig
from qscale.node.daemon import NodeDaemon, _Outbox
from qscale.node.worker import ChunkOutcome, ShardOutcome, WorkerSlot
from qscale.outcomes import Outcomes
from qscale.proto.v1 import common_pb2, node_pb2, node_pb2_grpc

pytestmark = pytest.mark.timeout(120)

WAIT_S = 30.0
SLOT_MEMORY = 256 << 20
HEARTBEAT_INTERVAL_S = 0.1


def _assignment(
    token: str,
    job_id: str,
    circuits: dict[int, QuantumCircuit | None],
    chunks: list[tuple[list[int], int, int]],
) -> node_pb2.CoordinatorMessage:
    """A shard of ``chunks`` (circuit indices, shots, seed); a circuit given as None is marked as
    sent earlier on the stream (cached)."""
    payloads = [
        node_pb2.CircuitPayload(circuit_index=i, cached=True) if qc is None
        else node_pb2.CircuitPayload(circuit_index=i, qpy=dump_qpy(qc))
        for i, qc in circuits.items()
    ]
    return node_pb2.CoordinatorMessage(assign=node_pb2.ShardAssignment(
        job_id=job_id,
        shard_index=0,
        attempt_token=token,
        chunks=[common_pb2.Chunk(entries=[common_pb2.ChunkEntry(circuit_index=i, set_count=1) for i in idx],
                                 shots=shots, seed=seed) for idx, shots, seed in chunks],
        circuits=payloads,
        method="automatic",
        memory_bytes=1 << 20,
    ))


def _token(msg: node_pb2.NodeMessage) -> str:
    kind = msg.WhichOneof("kind")
    return getattr(msg, kind).attempt_token if kind in ("chunk", "done", "failed") else ""


def _about(messages: list[node_pb2.NodeMessage], token: str) -> list[tuple[str, int]]:
    """(kind, chunk index or -1) of the messages about attempt ``token``, in order."""
    return [(m.WhichOneof("kind"), m.chunk.chunk_index if m.WhichOneof("kind") == "chunk" else -1)
            for m in messages if _token(m) == token]


# ---- the fake coordinator ---------------------------------------------------------------------


class _Stream:
    """One Work stream, as the fake coordinator sees it."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.received: list[node_pb2.NodeMessage] = []  # everything but heartbeats
        self.heartbeats: list[node_pb2.Heartbeat] = []
        self.answer_heartbeats = True
        self.known = True  # what its heartbeat replies say
        self.outgoing: queue.Queue[node_pb2.CoordinatorMessage] = queue.Queue()
        self.broken = threading.Event()
        self.reader: threading.Thread | None = None

    def send(self, msg: node_pb2.CoordinatorMessage) -> None:
        self.outgoing.put(msg)


class FakeCoordinator(node_pb2_grpc.NodeServiceServicer):
    """Answers Register and Work (and the heartbeats on it) as the test says: ``resume`` gives a
    node its previous id back, ``adopt`` adopts every attempt it presents, ``away`` refuses every
    call and leaves heartbeats unanswered."""

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.cond = threading.Condition()
        self.registers: list[node_pb2.RegisterRequest] = []
        self.streams: list[_Stream] = []
        self.resume = True
        self.adopt = True
        self.away = False
        self.last_contact = 0.0  # when the coordinator last sent on a stream (a heartbeat reply included)
        self._ids = itertools.count(1)

    # ---- scripting

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"timed out after {timeout}s waiting for {what}")
                self.cond.wait(min(left, 0.1))

    def stream(self, index: int) -> _Stream:
        """The ``index``-th Work stream (from 0), once it is open."""
        return self.wait_for(lambda: len(self.streams) > index and self.streams[index], f"work stream {index}")

    def register(self, index: int) -> node_pb2.RegisterRequest:
        return self.wait_for(lambda: len(self.registers) > index and self.registers[index], f"register {index}")

    def received(self, stream: _Stream, token: str, kind: str, chunk: int = -1) -> None:
        self.wait_for(lambda: (kind, chunk) in _about(stream.received, token), f"{kind} {chunk} of {token}")

    def go_away(self) -> None:
        """The coordinator becomes unreachable: every call fails, every stream breaks."""
        with self.cond:
            self.away = True
            for s in self.streams:
                s.broken.set()

    def come_back(self) -> None:
        with self.cond:
            self.away = False

    def close(self) -> None:
        for s in self.streams:
            s.broken.set()

    def join_readers(self) -> None:
        for s in self.streams:
            if s.reader is not None:
                s.reader.join(10.0)
                assert not s.reader.is_alive(), "a fake stream reader outlived its stream"

    # ---- NodeService

    def _refuse_if_away(self, context: grpc.ServicerContext) -> None:
        if self.away:
            context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator away (test)")

    def Register(self, request: node_pb2.RegisterRequest, context: grpc.ServicerContext) -> node_pb2.RegisterReply:
        self._refuse_if_away(context)
        with self.cond:
            self.registers.append(request)
            self.cond.notify_all()
            resumed = self.resume and request.previous_node_id
            node_id = request.previous_node_id if resumed else f"node-{next(self._ids)}"
            adopted = list(request.attempts_in_hand) if self.adopt else []
        return node_pb2.RegisterReply(node_id=node_id, heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                                      heartbeat_timeout_s=self.heartbeat_timeout_s, adopted_attempts=adopted)

    def Work(self, request_iterator: Iterator[node_pb2.NodeMessage], context: grpc.ServicerContext
             ) -> Iterator[node_pb2.CoordinatorMessage]:
        self._refuse_if_away(context)
        hello = next(request_iterator)
        assert hello.WhichOneof("kind") == "hello"
        stream = _Stream(hello.hello.node_id)
        stream.reader = threading.Thread(target=self._read, args=(stream, request_iterator), daemon=True)
        stream.reader.start()
        with self.cond:
            self.streams.append(stream)
            self.cond.notify_all()
        while context.is_active() and not stream.broken.is_set():
            try:
                msg = stream.outgoing.get(timeout=0.02)
            except queue.Empty:
                continue
            with self.cond:
                self.last_contact = time.monotonic()
            yield msg
        if stream.broken.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")

    def _read(self, stream: _Stream, requests: Iterator[node_pb2.NodeMessage]) -> None:
        try:
            for msg in requests:
                with self.cond:
                    if msg.WhichOneof("kind") == "heartbeat":
                        stream.heartbeats.append(msg.heartbeat)
                        if not self.away and stream.answer_heartbeats:
                            stream.send(node_pb2.CoordinatorMessage(heartbeat_reply=node_pb2.HeartbeatReply(
                                sequence=msg.heartbeat.sequence, known=stream.known,
                                heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                                heartbeat_timeout_s=self.heartbeat_timeout_s)))
                    else:
                        stream.received.append(msg)
                    self.cond.notify_all()
        except grpc.RpcError:
            pass  # the call ended


# ---- the worker slot --------------------------------------------------------------------------


class GatedSlot(WorkerSlot):
    """A real worker slot whose shards pause after chunk 0 until :attr:`gate` opens; an abort
    opens it (the worker is killed meanwhile, so the shard ends aborted)."""

    def __init__(self, index: int) -> None:
        super().__init__(index, threads=1, memory_budget_bytes=SLOT_MEMORY, ready_timeout_s=90.0)
        self.gate = threading.Event()
        self.paused = threading.Event()
        self.aborts: list[tuple[str, str, float]] = []  # (token, reason, when)
        self.outcomes: dict[str, ShardOutcome] = {}

    def abort(self, attempt_token: str, reason: str = "aborted") -> bool:
        self.aborts.append((attempt_token, reason, time.monotonic()))
        try:
            return super().abort(attempt_token, reason)
        finally:
            self.gate.set()

    def run(self, assignment: Any, on_chunk: Callable[[ChunkOutcome], None] | None = None, *,
            timeout: float | None = None) -> ShardOutcome:
        def gated(chunk: ChunkOutcome) -> None:
            if on_chunk is not None:
                on_chunk(chunk)
            if chunk.chunk_index == 0:
                self.paused.set()
                self.gate.wait(WAIT_S)

        outcome = super().run(assignment, gated, timeout=timeout)
        self.outcomes[assignment.attempt_token] = outcome
        return outcome


def _wait(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value


# ---- fixtures ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _coordinator(heartbeat_timeout_s: float) -> Iterator[tuple[FakeCoordinator, int]]:
    fake = FakeCoordinator(heartbeat_timeout_s)
    server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-coordinator"))
    node_pb2_grpc.add_NodeServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port, "could not bind a loopback port"
    server.start()
    try:
        yield fake, port
    finally:
        fake.close()
        server.stop(grace=None).wait(10.0)
        fake.join_readers()


@contextlib.contextmanager
def _node(port: int) -> Iterator[tuple[NodeDaemon, GatedSlot]]:
    slot = GatedSlot(0)
    config = NodeConfig(coordinator=f"127.0.0.1:{port}", name="resume-test", slots=1, cores=1,
                        memory_budget=SLOT_MEMORY, reconnect_min_s=0.05, reconnect_max_s=0.2)
    daemon = NodeDaemon(config, slot_factory=lambda index: slot)
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(daemon.run()), name="node-under-test", daemon=True)
    thread.start()
    try:
        yield daemon, slot
    finally:
        daemon.stop()
        slot.gate.set()
        thread.join(30.0)
        slot.close(timeout=5.0)
        assert not thread.is_alive(), "the daemon did not stop"
        assert exit_codes == [0]
        assert slot.pid is None


@pytest.fixture
def node_and_coordinator(request: pytest.FixtureRequest) -> Iterator[tuple[NodeDaemon, GatedSlot, FakeCoordinator]]:
    timeout = getattr(request, "param", 30.0)
    with _coordinator(timeout) as (fake, port), _node(port) as (daemon, slot):
        yield daemon, slot, fake


def _start_paused_shard(fake: FakeCoordinator, slot: GatedSlot, token: str, job_id: str,
                        circuits: dict[int, QuantumCircuit | None],
                        chunks: list[tuple[list[int], int, int]]) -> _Stream:
    """Assign a shard on the first stream; return once its chunk 0 reached the coordinator and
    the shard is paused."""
    first = fake.stream(0)
    assert first.node_id == "node-1"
    first.send(_assignment(token, job_id, circuits, chunks))
    fake.received(first, token, "chunk", 0)
    _wait(slot.paused.is_set, "the shard to pause after chunk 0")
    return first


# ---- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("finish_during_blip", [False, True], ids=["running", "finished-unsent"])
def test_adopted_attempt_reports_on_the_new_stream(
    node_and_coordinator: tuple[NodeDaemon, GatedSlot, FakeCoordinator],
    finish_during_blip: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qscale.node.daemon")
    daemon, slot, fake = node_and_coordinator
    first = _start_paused_shard(fake, slot, "t-a", "job-a", {0: bell(), 1: uniform()},
                                [([0], 100, 1), ([1], 100, 2), ([0, 1], 100, 3)])
    if finish_during_blip:
        # The coordinator is away while the shard ends: its results wait in the outbox.
        fake.go_away()
        _wait(lambda: daemon.node_id is None, "the node to notice the broken stream")
        slot.gate.set()
        _wait(lambda: "t-a" in slot.outcomes, "the shard to end")
        assert slot.outcomes["t-a"].ok
        fake.come_back()
    else:
        first.broken.set()

    again = fake.register(1)
    assert again.previous_node_id == "node-1"
    assert list(again.attempts_in_hand) == ["t-a"]
    second = fake.stream(1)
    assert second.node_id == "node-1"
    slot.gate.set()
    fake.received(second, "t-a", "done")

    about = _about(second.received, "t-a")
    # Chunk 0 went out on the old stream before it broke: it may have been lost, so it is sent
    # again, before everything else about the attempt; each chunk once, then the done.
    assert about == [("chunk", 0), ("chunk", 1), ("chunk", 2), ("done", -1)]
    assert ("done", -1) not in _about(first.received, "t-a")
    chunk0 = next(m.chunk for m in second.received if _token(m) == "t-a")
    assert Outcomes.from_proto(chunk0.counts[0].outcomes).shots == 100
    assert "node node-1: resumed: 1 attempt(s) adopted, 0 dropped" in caplog.text

    # Resumed under the same id, the node kept the job's circuits: a later shard may refer to them.
    slot.paused.clear()
    second.send(_assignment("t-a2", "job-a", {0: None}, [([0], 50, 4)]))
    fake.received(second, "t-a2", "done")
    assert not [m for m in second.received if m.WhichOneof("kind") == "failed"]


def test_attempt_not_adopted_is_aborted_and_never_reported(
    node_and_coordinator: tuple[NodeDaemon, GatedSlot, FakeCoordinator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qscale.node.daemon")
    _, slot, fake = node_and_coordinator
    first = _start_paused_shard(fake, slot, "t-b", "job-b", {0: bell(), 1: dense_circuit(22, 24)},
                                [([0], 100, 1), ([1], 100, 2)])
    with fake.cond:
        fake.resume = fake.adopt = False
    first.broken.set()

    again = fake.register(1)
    assert again.previous_node_id == "node-1" and list(again.attempts_in_hand) == ["t-b"]
    second = fake.stream(1)
    assert second.node_id == "node-2"
    _wait(lambda: "t-b" in slot.outcomes, "the shard to be aborted")
    assert slot.outcomes["t-b"].aborted
    assert [(token, reason.split(":")[0]) for token, reason, _ in slot.aborts] == [("t-b", "given away")]
    assert "node node-2: registered again as a new node (was node-1): 0 attempt(s) adopted, 1 dropped" in caplog.text

    # A new node id: the job's circuits are gone, a shard that refers to them is refused.
    second.send(_assignment("t-b2", "job-b", {0: None}, [([0], 10, 3)]))
    fake.received(second, "t-b2", "failed")
    refusal = next(m.failed for m in second.received if _token(m) == "t-b2")
    assert refusal.refused and "no longer in this node's cache" in refusal.error
    # The slot runs one shard at a time and the outbox is a FIFO: whatever the node had to say
    # about t-b would arrive before the done of the next shard.
    slot.paused.clear()
    second.send(_assignment("t-b3", "job-b3", {0: bell()}, [([0], 10, 4)]))
    fake.received(second, "t-b3", "done")
    assert _about(second.received, "t-b") == []


@pytest.mark.parametrize("node_and_coordinator", [1.0], indirect=True)
def test_attempts_are_abandoned_when_the_lease_runs_out(
    node_and_coordinator: tuple[NodeDaemon, GatedSlot, FakeCoordinator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qscale.node.daemon")
    _, slot, fake = node_and_coordinator
    _start_paused_shard(fake, slot, "t-c", "job-c", {0: bell(), 1: dense_circuit(22, 24)},
                        [([0], 100, 1), ([1], 100, 2)])
    fake.go_away()
    with fake.cond:
        last_contact = fake.last_contact

    _wait(lambda: slot.aborts, "the lease to run out", timeout=15.0)
    [(token, reason, when)] = slot.aborts
    assert token == "t-c" and reason.startswith("lease over")
    assert when >= last_contact + fake.heartbeat_timeout_s  # kept for the whole lease
    _wait(lambda: "t-c" in slot.outcomes, "the shard to end")
    assert slot.outcomes["t-c"].aborted
    assert "lease over: dropped 0 queued and stopped 1 running shard(s)" in caplog.text
    assert len(fake.registers) == 1  # every register while away was refused

    fake.come_back()
    again = fake.register(1)
    assert again.previous_node_id == "node-1" and list(again.attempts_in_hand) == []
    second = fake.stream(1)
    slot.paused.clear()
    second.send(_assignment("t-c2", "job-c2", {0: bell()}, [([0], 10, 3)]))
    fake.received(second, "t-c2", "done")
    assert _about(second.received, "t-c") == []


# ---- liveness on the stream -------------------------------------------------------------------


@pytest.mark.parametrize("node_and_coordinator", [1.0], indirect=True)
@pytest.mark.parametrize("coordinator", ["silent", "forgot the node"])
def test_session_ends_when_stream_heartbeats_go_unanswered_or_the_node_is_unknown(
    node_and_coordinator: tuple[NodeDaemon, GatedSlot, FakeCoordinator],
    coordinator: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qscale.node.daemon")
    daemon, _, fake = node_and_coordinator
    first = fake.stream(0)
    # Answered, heartbeats keep the session for several timeouts: numbered 1, 2, 3, ... on the stream.
    time.sleep(3 * fake.heartbeat_timeout_s)
    assert len(fake.registers) == 1 and daemon.node_id == "node-1"
    with fake.cond:
        beats = [h.sequence for h in first.heartbeats]
        if coordinator == "silent":
            first.answer_heartbeats = False  # the stream stays open: only the replies stop
        else:
            first.known = False
        changed_at = time.monotonic()
    assert len(beats) >= 3 * fake.heartbeat_timeout_s / HEARTBEAT_INTERVAL_S / 2 and beats == list(range(1, len(beats) + 1)), beats

    again = fake.register(1)
    ended_after = time.monotonic() - changed_at
    assert again.previous_node_id == "node-1"
    if coordinator == "silent":
        # The first heartbeat left unanswered was sent after the change, give or take the one on its way.
        assert ended_after >= fake.heartbeat_timeout_s - 2 * HEARTBEAT_INTERVAL_S, ended_after
        assert "session ended: no heartbeat reply for" in caplog.text
    else:
        assert ended_after < fake.heartbeat_timeout_s, ended_after  # at the first reply
        assert "session ended: the coordinator does not know node node-1" in caplog.text
    # The new session heartbeats on its own stream, numbered from 1 again.
    second = fake.stream(1)
    fake.wait_for(lambda: len(second.heartbeats) >= 2, "heartbeats on the new stream")
    assert [h.sequence for h in second.heartbeats[:2]] == [1, 2]


# ---- the outbox -------------------------------------------------------------------------------


def _chunk(token: str, index: int, payload: int = 0) -> node_pb2.NodeMessage:
    counts = [common_pb2.CircuitCounts(circuit_index=0, outcomes=Outcomes.of(1, 0, 1).to_proto())] * max(1, payload)
    return node_pb2.NodeMessage(chunk=node_pb2.ChunkResult(attempt_token=token, chunk_index=index, counts=counts))


def _done(token: str) -> node_pb2.NodeMessage:
    return node_pb2.NodeMessage(done=node_pb2.ShardDone(attempt_token=token))


def _take_all(outbox: _Outbox) -> list[tuple[str, str, int]]:
    open_stream = threading.Event()
    taken = []
    while (msg := outbox.get(0.0, open_stream.is_set)) is not None:
        kind = msg.WhichOneof("kind")
        taken.append((kind, _token(msg), msg.chunk.chunk_index if kind == "chunk" else -1))
    return taken


def test_outbox_resends_the_sent_chunks_of_adopted_attempts_first() -> None:
    outbox = _Outbox()
    for token in ("a", "b", "c"):
        outbox.track(token)
    outbox.put(_chunk("a", 0))
    outbox.put(_chunk("b", 0))
    outbox.put(_chunk("c", 0))
    outbox.put(_done("c"))  # c's final message goes out: its chunks are no longer kept
    assert len(_take_all(outbox)) == 4
    outbox.put(_chunk("a", 1))
    outbox.put(_chunk("b", 1))
    outbox.put(node_pb2.NodeMessage(draining=node_pb2.Draining()))
    outbox.put(_done("a"))
    assert outbox.final_tokens() == ["a"]

    outbox.resume({"a"})  # b was given away: its chunks are not sent again, its queued one goes (stale)
    assert _take_all(outbox) == [("chunk", "a", 0), ("chunk", "a", 1), ("chunk", "b", 1), ("draining", "", -1),
                                 ("done", "a", -1)]
    outbox.resume({"a"})  # a's final message went out: nothing more to send again
    assert len(outbox) == 0

    ended = threading.Event()
    ended.set()
    outbox.put(_chunk("a", 2))
    assert outbox.get(0.0, ended.is_set) is None and len(outbox) == 1  # kept for the next stream


def test_outbox_bounds_the_chunks_it_keeps() -> None:
    budget = 2 * _chunk("x", 0, payload=50).ByteSize() + 10
    outbox = _Outbox(sent_budget=budget)
    outbox.track("small")
    outbox.track("big")
    outbox.put(_chunk("small", 0))
    for index in range(3):
        outbox.put(_chunk("big", index, payload=50))
    _take_all(outbox)
    assert outbox.overflowed() == {"big"}  # not presented for adoption: its chunks are not all kept
    outbox.forget("big")
    assert outbox.overflowed() == set()
    outbox.resume({"small"})
    assert _take_all(outbox) == [("chunk", "small", 0)]
