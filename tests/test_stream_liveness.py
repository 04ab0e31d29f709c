"""Node liveness on the Work stream: a node's heartbeats and the coordinator's replies travel on
the stream the node already holds; there is no unary Heartbeat call any more.

Real coordinators on 127.0.0.1 with OS-chosen ports (``fast_config``: heartbeat every 0.25 s,
suspected after 0.5 s of silence, lost after 1.5 s): a real ``qscale-node`` process, and a node
speaking the protocol by hand through a real gRPC channel. Every wait is bounded; every
process, stream and server is stopped in ``finally``.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from conftest import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, fast_config, wait_until
from qscale.coordinator.server import EmbeddedCoordinator
from qscale.local import LocalCluster
from qscale.proto.v1 import jobs_pb2, jobs_pb2_grpc, node_pb2, node_pb2_grpc

pytestmark = pytest.mark.timeout(180)

SUSPECT_AFTER = fast_config().suspect_after
WAIT_S = 30.0


def _states(address: str) -> Callable[[], dict[str, str]]:
    """A function reading every node's state (``alive``, ``suspected``, ``lost``...) by node id."""
    channel = grpc.insecure_channel(address)
    stub = jobs_pb2_grpc.JobServiceStub(channel)

    def read() -> dict[str, str]:
        return {n.node_id: n.state for n in stub.ListNodes(jobs_pb2.ListNodesRequest(), timeout=10).nodes}

    read.close = channel.close  # type: ignore[attr-defined]
    return read


def _watch_state(read: Callable[[], dict[str, str]], node_id: str, seconds: float) -> set[str]:
    """Every state the node was seen in over ``seconds`` (polled)."""
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(read().get(node_id, "gone"))
        time.sleep(0.02)
    return seen


def _metric(coordinator: EmbeddedCoordinator, name: str, **labels: str) -> float:
    return coordinator.server.metrics.registry.get_sample_value(name, labels) or 0.0


# ---- a real node process ----------------------------------------------------------------------


def test_a_real_node_heartbeats_on_its_stream_and_stays_alive_past_several_timeouts(make_cluster) -> None:
    cluster: LocalCluster = make_cluster(1)
    assert cluster.coordinator is not None
    assert not hasattr(node_pb2_grpc.NodeServiceServicer, "Heartbeat")
    with grpc.insecure_channel(cluster.address) as channel:  # the unary call is gone from the service
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/qscale.v1.NodeService/Heartbeat", request_serializer=None,
                                response_deserializer=None)(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    read = _states(cluster.address)
    try:
        (node_id,) = read()
        beats_before = _metric(cluster.coordinator, "qscale_heartbeat_lag_seconds_count")
        seen = _watch_state(read, node_id, 3 * HEARTBEAT_TIMEOUT)
        beats = _metric(cluster.coordinator, "qscale_heartbeat_lag_seconds_count") - beats_before
    finally:
        read.close()  # type: ignore[attr-defined]
    assert seen == {"alive"}, seen  # never suspected, never lost: heard on its stream all along
    assert beats >= 3 * HEARTBEAT_TIMEOUT / HEARTBEAT_INTERVAL / 2, beats  # heartbeats reached the scheduler
    assert _metric(cluster.coordinator, "qscale_nodes_suspected_total") == 0
    assert cluster.processes[0].poll() is None


def test_a_sigstopped_node_is_suspected_then_lost_and_comes_back_under_its_id(make_cluster) -> None:
    cluster: LocalCluster = make_cluster(1)
    assert cluster.coordinator is not None
    proc = cluster.processes[0]
    read = _states(cluster.address)
    try:
        (node_id,) = read()
        wait_until(lambda: _metric(cluster.coordinator, "qscale_heartbeat_lag_seconds_count") >= 2, WAIT_S,
                   "heartbeats on the stream")
        proc.send_signal(signal.SIGSTOP)  # its heartbeats stop; its stream (and TCP connection) stays open
        stopped = time.monotonic()
        try:
            suspected = wait_until(lambda: read()[node_id] != "alive" and time.monotonic(), WAIT_S,
                                   "the stopped node to be suspected") - stopped
            state_then = read()[node_id]
            lost = wait_until(lambda: read()[node_id] == "lost" and time.monotonic(), WAIT_S,
                              "the stopped node to be declared lost") - stopped
        finally:
            proc.send_signal(signal.SIGCONT)
        # It comes back (its heartbeats went unanswered, or are answered "unknown") under its id.
        wait_until(lambda: read().get(node_id) == "alive", WAIT_S, "the node to come back")
        assert list(read()) == [node_id]  # listed once
    finally:
        read.close()  # type: ignore[attr-defined]
    assert state_then in ("suspected", "lost")
    # Its last heartbeat may have left up to one interval before the stop.
    assert suspected >= SUSPECT_AFTER - HEARTBEAT_INTERVAL, suspected
    assert lost >= HEARTBEAT_TIMEOUT - HEARTBEAT_INTERVAL and lost >= suspected, (suspected, lost)
    # Lost by silence, not by a broken stream: its stream stayed open all along.
    assert _metric(cluster.coordinator, "qscale_nodes_lost_total", reason="timeout") == 1
    assert _metric(cluster.coordinator, "qscale_nodes_lost_total", reason="stream") == 0
    assert proc.poll() is None


# ---- the protocol by hand ---------------------------------------------------------------------


class _Stream:
    """A node's Work stream driven by the test: ``send`` puts a message on it, ``receive`` waits
    (bounded) for the next one from the coordinator."""

    def __init__(self, stub: node_pb2_grpc.NodeServiceStub, node_id: str) -> None:
        self._out: queue.Queue[node_pb2.NodeMessage | None] = queue.Queue()
        self._in: queue.Queue[Any] = queue.Queue()
        self._out.put(node_pb2.NodeMessage(hello=node_pb2.StreamHello(node_id=node_id)))
        self.call = stub.Work(self._requests(), timeout=120)
        self._reader = threading.Thread(target=self._read, name="test-stream-reader", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[node_pb2.NodeMessage]:
        while (msg := self._out.get()) is not None:
            yield msg

    def _read(self) -> None:
        try:
            for msg in self.call:
                self._in.put(msg)
        except grpc.RpcError as err:
            self._in.put(err)

    def send(self, msg: node_pb2.NodeMessage) -> None:
        self._out.put(msg)

    def heartbeat(self, sequence: int, in_hand: list[str] | None = None) -> None:
        self.send(node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(
            sequence=sequence, attempts_in_hand=in_hand or [], free_slots=1)))

    def receive(self, timeout: float = WAIT_S) -> node_pb2.CoordinatorMessage:
        msg = self._in.get(timeout=timeout)
        assert isinstance(msg, node_pb2.CoordinatorMessage), msg
        return msg

    def reply(self, timeout: float = WAIT_S) -> node_pb2.HeartbeatReply:
        msg = self.receive(timeout)
        assert msg.WhichOneof("kind") == "heartbeat_reply", msg
        return msg.heartbeat_reply

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()
        self._reader.join(10.0)
        assert not self._reader.is_alive()


@pytest.fixture
def coordinator() -> Iterator[EmbeddedCoordinator]:
    coord = EmbeddedCoordinator(fast_config(listen="127.0.0.1:0"))
    coord.start()
    try:
        yield coord
    finally:
        coord.stop()


def test_stream_heartbeats_are_echoed_reconciled_and_answered_unknown_once_the_node_is_lost(
        coordinator: EmbeddedCoordinator) -> None:
    channel = grpc.insecure_channel(coordinator.address)
    read = _states(coordinator.address)
    stream = None
    try:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        caps = node_pb2.NodeCapabilities(name="by-hand", hostname="test", cores=1, slots=1,
                                         memory_budget_bytes=1 << 30, methods=["statevector"])
        node_id = stub.Register(node_pb2.RegisterRequest(capabilities=caps), timeout=10).node_id
        stream = _Stream(stub, node_id)
        stream.heartbeat(1)
        reply = stream.reply()
        assert (reply.sequence, reply.known) == (1, True)
        assert (reply.heartbeat_interval_s, reply.heartbeat_timeout_s) == (HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT)

        # An attempt the node says it holds but was never given: told to cancel it, then answered.
        stream.heartbeat(2, ["job:0:not-given"])
        cancel = stream.receive()
        assert cancel.WhichOneof("kind") == "cancel" and cancel.cancel.attempt_token == "job:0:not-given"
        assert stream.reply().sequence == 2

        # Heartbeats alone keep it alive past several timeouts; each reply echoes its heartbeat.
        sequence = 2
        deadline = time.monotonic() + 3 * HEARTBEAT_TIMEOUT
        while time.monotonic() < deadline:
            sequence += 1
            stream.heartbeat(sequence)
            last_sent = time.monotonic()
            reply = stream.reply()
            assert (reply.sequence, reply.known) == (sequence, True)
            assert read()[node_id] == "alive"
            time.sleep(HEARTBEAT_INTERVAL)
        assert sequence >= 3 * HEARTBEAT_TIMEOUT / HEARTBEAT_INTERVAL / 2

        # Silent on an open stream (since its last heartbeat): suspected, then lost by timeout.
        silent = last_sent
        suspected = wait_until(lambda: read()[node_id] == "suspected" and time.monotonic(), WAIT_S,
                               "the silent node to be suspected") - silent
        lost = wait_until(lambda: read()[node_id] == "lost" and time.monotonic(), WAIT_S,
                          "the silent node to be declared lost") - silent
        assert SUSPECT_AFTER <= suspected < lost and lost >= HEARTBEAT_TIMEOUT, (suspected, lost)
        assert _metric(coordinator, "qscale_nodes_lost_total", reason="timeout") == 1

        # Its stream stayed open: the next heartbeat on it is answered "unknown" (register again).
        stream.heartbeat(sequence + 1)
        reply = stream.reply()
        assert (reply.sequence, reply.known) == (sequence + 1, False)
    finally:
        if stream is not None:
            stream.close()
        read.close()  # type: ignore[attr-defined]
        channel.close()
