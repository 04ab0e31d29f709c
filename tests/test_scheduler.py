"""The scheduler's rules, as events in and decisions out: an explicit clock, no sleeping, no
network and no SQLite (the store has tests of its own at the end)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from collections import Counter
from dataclasses import replace

import pytest
from google.protobuf import message_factory
from qiskit import QuantumCircuit

from qscale.circuits import describe, dump_qpy, qpy_version
from qscale.coordinator import messages, migrations
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.decisions import CloseStream, FinishJob, Notify, RecordShard, Send
from qscale.coordinator.jobs import Job, Totals
from qscale.coordinator.planner import PlanningPolicy
from qscale.coordinator.runtime import JobEvents, Runtime
from qscale.coordinator.scheduler import CANCELLED, DONE, FAILED, Scheduler
from qscale.coordinator.store import Store
from qscale.errors import FailedPreconditionError, NoCapableNodeError
from qscale.outcomes import Outcomes
from qscale.proto.v1 import common_pb2, node_pb2


class Stream:
    """A node's Work stream as the scheduler sees it: a handle named in decisions."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: list[node_pb2.CoordinatorMessage] = []
        self.closed = False

    def assignments(self) -> list[node_pb2.ShardAssignment]:
        return [m.assign for m in self.messages if m.WhichOneof("kind") == "assign"]

    def kinds(self) -> list[str]:
        return [m.WhichOneof("kind") for m in self.messages]

    def put_nowait(self, message: node_pb2.CoordinatorMessage | None) -> None:  # as the runtime sends
        if message is None:
            self.closed = True
        else:
            self.messages.append(message)


class Cluster:
    """A scheduler and what its decisions did: messages per stream, writes, notifications."""

    def __init__(self, **config: object) -> None:
        config.setdefault("heartbeat_interval_s", 1.0)
        config.setdefault("heartbeat_timeout_s", 5.0)
        config.setdefault("prefetch_per_slot", 0)
        config.setdefault("policy", PlanningPolicy(shots_per_shard=100))
        self.wall = 1_700_000_000.0
        self.core = Scheduler(CoordinatorConfig(**config), wall=lambda: self.wall)  # type: ignore[arg-type]
        self.writes: list[RecordShard | FinishJob] = []
        self.notified: list[str] = []

    def apply(self, decisions: list) -> list:
        for d in decisions:
            if isinstance(d, Send):
                d.stream.messages.append(d.message)
            elif isinstance(d, CloseStream):
                d.stream.closed = True
            elif isinstance(d, Notify):
                self.notified.append(d.job_id)
            else:
                self.writes.append(d)
        return decisions

    def node(self, name: str, now: float = 0.0, **kw: int) -> tuple[str, Stream]:
        node, adopted, decisions = self.core.register(_caps(name, **kw), now)
        self.apply(decisions)
        stream = Stream(name)
        self.apply(self.core.attach_stream(node.node_id, stream, now))
        return node.node_id, stream

    def submit(self, circuit: QuantumCircuit, shots: int, now: float = 0.0, seed: int = 7) -> Job:
        job = make_job(circuit, shots, seed, self.core.config.policy)
        self.apply(self.core.accept(job, self.core.plan(job), now))
        return job

    def complete(self, node_id: str, a: node_pb2.ShardAssignment, now: float, key: str = "0x0") -> None:
        for k, chunk in enumerate(a.chunks):
            counts = [common_pb2.CircuitCounts(circuit_index=e.circuit_index, set_index=s,
                                               outcomes=_packed({key: chunk.shots}))
                      for e in chunk.entries for s in range(e.set_start, e.set_start + e.set_count)]
            self.apply(self.core.chunk_result(node_id, node_pb2.ChunkResult(
                attempt_token=a.attempt_token, chunk_index=k, counts=counts), now))
        self.apply(self.core.shard_done(node_id, a.attempt_token, now))

    def heartbeat(self, node_id: str, now: float, in_hand: list[str] | None = None) -> bool:
        if in_hand is None:
            in_hand = list(self.core.nodes[node_id].running) if node_id in self.core.nodes else []
        known, decisions = self.core.heartbeat(node_id, now, in_hand)
        self.apply(decisions)
        return known

    def tick(self, now: float) -> None:
        self.apply(self.core.tick(now))


def make_job(circuit: QuantumCircuit, shots: int, seed: int = 7, policy: PlanningPolicy | None = None,
             info_changes: dict | None = None) -> Job:
    info = describe(circuit)
    if info_changes:
        info = replace(info, **info_changes)
    return Job(uuid.uuid4().hex[:16], 0.0, seed, "automatic", policy or PlanningPolicy(shots_per_shard=100), [info],
               [shots], [None], [dump_qpy(circuit)])


def _caps(name: str, slots: int = 1, memory: int = 1 << 30) -> node_pb2.NodeCapabilities:
    return node_pb2.NodeCapabilities(name=name, hostname="host-" + name, slots=slots, cores=1,
                                     memory_budget_bytes=memory, methods=["statevector", "stabilizer"])


def _packed(hex_counts: dict[str, int]) -> common_pb2.Outcomes:
    return Outcomes.from_hex_counts(hex_counts, 1).to_proto()


def _set_counts(job: Job) -> list[list[dict[str, int]]]:
    """Counted outcomes per circuit and parameter set, as Aer's hexadecimal counts."""
    return [[totals.merged().hex_dict() for totals in sets] for sets in job.set_outcomes]


def _ghz(n: int = 3) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure_all()
    return qc


@pytest.fixture
def c() -> Cluster:
    return Cluster()


# ------------------------------------------------------------------ liveness


def test_silent_node_is_suspected_then_lost_and_late_results_are_dropped(c: Cluster) -> None:
    a_id, a = c.node("a")
    job = c.submit(_ghz(), shots=200)  # Clifford: 2 shards of 100
    b_id, b = c.node("b", now=0.5)
    (first,) = a.assignments()
    (second,) = b.assignments()
    c.heartbeat(b_id, 1.9)
    c.tick(1.9)
    assert c.core.nodes[a_id].status == "alive"
    c.heartbeat(b_id, 2.1)
    c.tick(2.1)  # a silent for 2.1 s > two intervals: suspected; its shard waits for a free slot
    assert c.core.nodes[a_id].status == "suspected"
    c.complete(b_id, second, 2.2)
    backup = b.assignments()[-1]
    assert backup.shard_index == first.shard_index and backup.attempt_token != first.attempt_token
    c.heartbeat(b_id, 5.0)
    c.tick(5.5)  # silent past the 5 s timeout: lost
    assert a_id not in c.core.nodes and not a.closed  # its stream stays open: late messages are dropped
    c.complete(a_id, first, 6.5, key="0x7")  # the zombie comes back: ignored
    assert job.stale_dropped == len(first.chunks) + 1
    c.complete(b_id, backup, 7.0)
    assert job.state == DONE and _set_counts(job) == [[{"0x0": 200}]] and job.shots_done == 200
    assert [a.outcome for a in job.attempts] == ["lost", "done", "done"]


def test_a_suspected_node_that_speaks_again_keeps_its_work_and_the_first_result_wins(c: Cluster) -> None:
    a_id, a = c.node("a")
    b_id, b = c.node("b")
    job = c.submit(_ghz(), shots=100)  # one shard, on a
    (on_a,) = a.assignments()
    c.heartbeat(b_id, 2.5)
    c.tick(2.5)  # a suspected: a backup copy on b at once
    (backup,) = b.assignments()
    assert backup.shard_index == on_a.shard_index
    c.heartbeat(a_id, 2.6)  # a was only slow
    assert c.core.nodes[a_id].status == "alive"
    c.complete(a_id, on_a, 2.7)  # a wins: the backup is cancelled, nothing counted twice
    assert job.state == DONE and job.shots_done == 100
    assert b.messages[-2].cancel.attempt_token == backup.attempt_token
    assert Counter(x.outcome for x in job.attempts) == {"done": 1, "cancelled": 1}
    c.complete(b_id, backup, 2.8)
    assert job.shots_done == 100 and job.stale_dropped == len(backup.chunks) + 1
    assert c.core.nodes[a_id].state == "alive" and a_id in c.core.nodes


def test_a_coordinator_that_stalled_suspects_but_does_not_lose(c: Cluster) -> None:
    a_id, a = c.node("a")
    c.submit(_ghz(), shots=100)
    c.tick(30.0)  # the loop was blocked for 30 s: every heartbeat of a waits behind this tick
    assert c.core.nodes[a_id].status == "suspected"
    c.heartbeat(a_id, 30.01)
    c.tick(30.02)
    assert c.core.nodes[a_id].status == "alive"


def test_a_broken_stream_suspects_at_once_and_the_node_resumes_its_attempts(c: Cluster) -> None:
    a_id, a = c.node("a", slots=2)
    b_id, b = c.node("b")
    job = c.submit(_ghz(), shots=300)  # 3 shards: 2 on a, 1 on b
    on_a = a.assignments()
    c.apply(c.core.detach_stream(a_id, a, 0.1, "work stream closed"))
    assert c.core.nodes[a_id].status == "suspected"
    c.complete(b_id, b.assignments()[0], 0.2)  # b is free: one of a's shards gets a backup there
    assert b.assignments()[-1].shard_index in {x.shard_index for x in on_a}
    # a registers again with its id and its attempts: it keeps both; a second stream works
    node, adopted, decisions = c.core.register(_caps("a", slots=2), 0.3, a_id, [x.attempt_token for x in on_a])
    c.apply(decisions)
    assert node.node_id == a_id and sorted(adopted) == sorted(x.attempt_token for x in on_a)
    a2 = Stream("a2")
    c.apply(c.core.attach_stream(a_id, a2, 0.3))
    for x in on_a:
        c.complete(a_id, x, 0.4)
    assert job.state == DONE and job.shots_done == 300
    assert [n.node_id for n in c.core.registry.listed()] == [a_id, b_id]


def test_a_node_whose_stream_broke_for_good_is_lost_even_if_it_heartbeats(c: Cluster) -> None:
    a_id, a = c.node("a")
    c.apply(c.core.detach_stream(a_id, a, 0.5, "work stream closed"))
    for t in range(1, 6):
        c.heartbeat(a_id, float(t))
        c.tick(float(t))
    assert c.core.nodes[a_id].status == "suspected"
    c.heartbeat(a_id, 5.6)
    c.tick(5.6)
    assert a_id not in c.core.nodes


def test_a_heartbeat_counts_only_on_the_nodes_current_stream(c: Cluster) -> None:
    a_id, a = c.node("a")
    assert c.core.heartbeat(a_id, 1.0, [], stream=a) == (True, [])
    c.apply(c.core.detach_stream(a_id, a, 1.5, "work stream closed"))
    node, _, decisions = c.core.register(_caps("a"), 1.6, a_id, [])  # it resumes on a new stream
    c.apply(decisions)
    a2 = Stream("a2")
    c.apply(c.core.attach_stream(a_id, a2, 1.7))
    # A heartbeat late on the old stream is not the node speaking: that session should register again.
    assert c.core.heartbeat(a_id, 2.0, [], stream=a) == (False, [])
    assert node.last_heard == 1.7 and node.last_heartbeat == 1.0
    assert c.core.heartbeat(a_id, 2.1, [], stream=a2) == (True, [])
    assert node.last_heard == 2.1 and node.last_heartbeat == 2.1
    # Declared lost, its stream stays open; heartbeats on it are answered "unknown".
    c.tick(5.0)
    c.tick(9.0)
    assert a_id not in c.core.nodes and not a2.closed
    assert c.core.heartbeat(a_id, 9.1, [], stream=a2) == (False, [])


def test_resume_drops_what_the_node_no_longer_holds(c: Cluster) -> None:
    a_id, a = c.node("a")
    job = c.submit(_ghz(), shots=100)
    (on_a,) = a.assignments()
    c.apply(c.core.detach_stream(a_id, a, 0.1, "work stream closed"))
    node, adopted, decisions = c.core.register(_caps("a"), 0.2, a_id, ["not-a-token", "x:1:2"])
    c.apply(decisions)
    assert adopted == []
    a2 = Stream("a2")
    c.apply(c.core.attach_stream(a_id, a2, 0.2))
    (again,) = a2.assignments()  # the shard was not in hand any more: sent again
    assert again.shard_index == on_a.shard_index and again.circuits[0].qpy
    c.complete(a_id, again, 0.3)
    assert job.state == DONE


def test_after_a_coordinator_restart_a_node_keeps_the_shards_it_holds() -> None:
    c = Cluster()
    job = c.submit(_ghz(), shots=200)
    # A fresh scheduler (the coordinator restarted) recovers the job; the node comes back
    # with the attempt it was running under the old coordinator.
    token = f"{job.job_id}:1:{'ab' * 8}"
    node, adopted, decisions = c.core.register(_caps("a"), 1.0, "a-0123abcd", [token, f"{job.job_id}:9:x"])
    c.apply(decisions)
    assert node.node_id == "a-0123abcd" and adopted == [token]
    a = Stream("a")
    c.apply(c.core.attach_stream(node.node_id, a, 1.0))
    assert a.assignments() == []  # its one slot holds the adopted shard
    held = messages.assignment(job, job.shards[1].plan, token, cached=set(), noise_cached=False).assign
    c.complete(node.node_id, held, 1.5)
    (other,) = a.assignments()
    assert other.shard_index == 0
    c.complete(node.node_id, other, 2.0)
    assert job.state == DONE and job.shots_done == 200


def test_heartbeats_are_reconciled_with_what_the_node_holds(c: Cluster) -> None:
    a_id, a = c.node("a", slots=2)
    b_id, b = c.node("b")
    job = c.submit(_ghz(), shots=300)
    first, second = a.assignments()
    # a no longer has `first` (say its queue lost it): two heartbeats without it, each sent a
    # heartbeat interval after the dispatch, and it runs elsewhere
    c.heartbeat(a_id, 1.0, [second.attempt_token])
    c.heartbeat(a_id, 2.0, [second.attempt_token])
    assert first.attempt_token in c.core.nodes[a_id].running
    c.heartbeat(a_id, 3.0, [second.attempt_token])
    assert first.attempt_token not in c.core.nodes[a_id].running
    again = a.assignments()[-1]  # a has a free slot again: sent anew, under a new token
    assert again.shard_index == first.shard_index and again.attempt_token != first.attempt_token
    c.complete(b_id, b.assignments()[0], 3.1)
    # a reports an attempt that is not current: it is told to cancel it
    c.heartbeat(a_id, 4.0, [second.attempt_token, first.attempt_token])
    assert a.messages[-1].cancel.attempt_token == first.attempt_token
    c.complete(a_id, second, 4.1)
    c.complete(a_id, again, 4.2)
    assert job.state == DONE and job.shots_done == 300


def test_a_fresh_attempt_is_not_taken_for_a_missing_one(c: Cluster) -> None:
    a_id, a = c.node("a")
    c.heartbeat(a_id, 1.0, [])
    c.submit(_ghz(), shots=100, now=1.5)
    (x,) = a.assignments()
    c.heartbeat(a_id, 1.6, [])  # built before the assignment arrived
    c.heartbeat(a_id, 2.6, [x.attempt_token])
    c.heartbeat(a_id, 3.6, [x.attempt_token])
    assert x.attempt_token in c.core.nodes[a_id].running


def test_lost_nodes_are_listed_once_and_age_out() -> None:
    c = Cluster(lost_node_ttl_s=60.0)
    a_id, a = c.node("a")
    c.tick(6.0)
    c.tick(12.0)
    assert [n.status for n in c.core.registry.listed()] == ["lost"]
    again, _ = c.node("a", now=13.0)  # the same machine under a new id replaces its entry
    assert [n.node_id for n in c.core.registry.listed()] == [again]
    b_id, _ = c.node("b", now=13.0)
    c.heartbeat(again, 100.0)
    c.tick(100.0)
    c.heartbeat(again, 105.0)
    c.tick(105.0)
    assert [n.status for n in c.core.registry.listed()] == ["alive", "lost"]
    c.heartbeat(again, 200.0)
    c.tick(200.0)
    assert [n.node_id for n in c.core.registry.listed()] == [again]
    # a node process restarted (a new id) while its old entry was still only suspected
    c.apply(c.core.detach_stream(again, c.core.nodes[again].stream, 200.5, "work stream closed"))
    newer, _ = c.node("a", now=201.0)
    c.heartbeat(newer, 210.0)
    c.tick(211.0)
    assert [n.node_id for n in c.core.registry.listed()] == [newer]


def test_liveness_ignores_the_wall_clock(c: Cluster) -> None:
    a_id, _ = c.node("a")
    c.wall -= 3600  # an NTP step backwards (or forwards): liveness does not read it
    c.heartbeat(a_id, 1.0)
    c.tick(1.5)
    c.wall += 7200
    c.tick(2.0)
    assert c.core.nodes[a_id].status == "alive"


def test_reaping_looks_only_at_silent_nodes(c: Cluster) -> None:
    ids = [c.node(f"n{i}", now=float(i))[0] for i in range(5)]
    for node_id in ids[::2] + ids[1::2]:  # even ones at 10 s, odd ones at 11 s
        c.heartbeat(node_id, 10.0 if node_id in ids[::2] else 11.0)
    suspect, lose = c.core.registry.silent(12.5, 2.0, 5.0)
    assert [n.node_id for n in suspect] == ids[::2] and lose == []


# ------------------------------------------------------------- failures


def test_shard_failing_on_three_nodes_fails_the_job(c: Cluster) -> None:
    nodes = [c.node(name) for name in ("a", "b", "c", "d")]
    qc = QuantumCircuit(2, 2, name="bad-one")
    qc.rx(0.3, 0)
    qc.measure([0, 1], [0, 1])
    job = c.submit(qc, shots=10)
    tried = []
    for _ in range(3):
        node_id, stream = next((n, s) for n, s in nodes if s.assignments() and n not in tried)
        tried.append(node_id)
        c.apply(c.core.shard_failed(node_id, stream.assignments()[-1].attempt_token, "AerError: boom", False, 1.0))
    assert job.state == FAILED
    assert "circuit 0 ('bad-one')" in job.error and "AerError: boom" in job.error
    assert len(set(tried)) == 3  # retried on a different node each time
    assert [w for w in c.writes if isinstance(w, FinishJob)] == [FinishJob(job.job_id, FAILED, job.error, c.wall)]


def test_a_node_loss_that_fails_the_job_ends_each_attempt_once() -> None:
    c = Cluster(max_shard_losses=1)
    a_id, a = c.node("a", slots=2)
    job = c.submit(_ghz(), shots=200)
    assert len(a.assignments()) == 2
    c.tick(10.0)
    c.tick(20.0)  # a lost: its first shard's loss fails the job, which cancels the other attempt
    assert job.state == FAILED and "were lost 1 times" in job.error
    assert len(job.attempts) == 2
    assert sorted(x.outcome for x in job.attempts) == ["cancelled", "lost"]
    assert c.core.metrics.attempts.labels("lost")._value.get() + \
        c.core.metrics.attempts.labels("cancelled")._value.get() == 2


def test_refusal_moves_the_shard_without_counting_a_failure(c: Cluster) -> None:
    a_id, a = c.node("a")
    job = c.submit(_ghz(), shots=50)
    (x,) = a.assignments()
    c.apply(c.core.node_draining(a_id, 0.9))
    c.apply(c.core.shard_failed(a_id, x.attempt_token, "node draining", True, 1.0))
    b_id, b = c.node("b", now=1.0)
    (y,) = b.assignments()
    assert job.shards[0].failures == [] and job.shards[0].refusals == {}
    c.complete(b_id, y, 2.0)
    assert job.state == DONE


def test_a_refusal_for_an_evicted_cache_is_transient_on_a_one_node_cluster() -> None:
    c = Cluster(prefetch_per_slot=1)
    a_id, a = c.node("a")
    job = c.submit(_ghz(), shots=300)
    first, second = a.assignments()
    assert second.circuits[0].cached
    # the node evicted the job's circuits: it refuses the shard that refers to them
    c.apply(c.core.shard_failed(a_id, second.attempt_token, "circuit 0 is no longer in this node's cache",
                                True, 0.5))
    again = a.assignments()[-1]
    assert again.shard_index == second.shard_index and again.circuits[0].qpy  # sent again, with its QPY
    for x in (first, again):
        c.complete(a_id, x, 1.0)
    c.complete(a_id, a.assignments()[-1], 1.5)
    assert job.state == DONE and job.shots_done == 300


def test_a_shard_refused_over_and_over_fails_its_job_instead_of_spinning(c: Cluster) -> None:
    a_id, a = c.node("a")
    job = c.submit(_ghz(), shots=50)
    now = 0.0
    c.apply(c.core.shard_failed(a_id, a.assignments()[-1].attempt_token, "cannot", True, now))
    c.apply(c.core.shard_failed(a_id, a.assignments()[-1].attempt_token, "cannot", True, now))
    assert len(a.assignments()) == 2  # the first refusal is retried at once, the next ones back off
    c.tick(now + 0.05)
    assert len(a.assignments()) == 2
    c.tick(now + 0.15)
    assert len(a.assignments()) == 3
    for _ in range(100):
        if job.final:
            break
        now += 11.0
        c.heartbeat(a_id, now)
        c.tick(now)
        c.apply(c.core.shard_failed(a_id, a.assignments()[-1].attempt_token, "cannot", True, now))
    assert job.state == FAILED and "refused 20 times" in job.error


def test_too_wide_circuit_is_refused_when_no_node_can_hold_it(c: Cluster) -> None:
    c.node("small", memory=1 << 20)
    qc = QuantumCircuit(30, 30)
    qc.rx(0.1, range(30))
    qc.measure(range(30), range(30))
    with pytest.raises(NoCapableNodeError, match="30 qubits"):
        c.submit(qc, shots=10)


def test_shards_only_go_to_nodes_that_read_their_qpy_version(c: Cluster) -> None:
    old = _caps("old")
    old.qpy_version = 12
    c.apply(c.core.register(old, 0.0)[2])
    circuit = _ghz()
    job = make_job(circuit, 10, info_changes={"qpy_version": qpy_version(dump_qpy(circuit))})
    assert job.infos[0].qpy_version > 12
    with pytest.raises(NoCapableNodeError, match="QPY version"):
        c.core.plan(job)


def test_cancel_tells_the_node(c: Cluster) -> None:
    a_id, a = c.node("a")
    job = c.submit(_ghz(), shots=50)
    c.apply(c.core.cancel(job, 1.0))
    assert job.state == CANCELLED
    assert a.kinds()[-2:] == ["cancel", "forget"]
    assert not c.core.nodes[a_id].running


def test_second_stream_for_a_node_is_refused(c: Cluster) -> None:
    a_id, a = c.node("a")
    with pytest.raises(FailedPreconditionError):
        c.core.attach_stream(a_id, Stream("again"), 1.0)
    assert c.core.nodes[a_id].stream is a  # the first stream goes on


# --------------------------------------------------------------- placement


def test_a_node_has_its_next_shard_in_hand_and_circuits_travel_once() -> None:
    c = Cluster(prefetch_per_slot=1)
    a_id, a = c.node("a")
    job = c.submit(_ghz(), shots=400)  # Clifford: 4 shards of 100
    first, second = a.assignments()  # one running, one in hand
    assert [p.cached for p in first.circuits] == [False] and first.circuits[0].qpy
    assert [p.cached for p in second.circuits] == [True] and not second.circuits[0].qpy
    b_id, b = c.node("b", now=0.1)
    third, fourth = b.assignments()  # another node gets the circuit once as well
    assert third.circuits[0].qpy and fourth.circuits[0].cached
    for node_id, x in ((a_id, first), (a_id, second), (b_id, third), (b_id, fourth)):
        c.complete(node_id, x, 1.0)
    assert job.state == DONE and job.shots_done == 400
    # The job is over: both nodes are told to drop what they kept of it.
    assert a.kinds()[-1] == "forget" and b.messages[-1].forget.job_id == job.job_id


def test_slow_shard_gets_a_backup_copy_and_the_first_result_wins() -> None:
    c = Cluster(backup_after_s=1.0, backup_slowdown=2.0)
    a_id, a = c.node("a")
    b_id, b = c.node("b")
    job = c.submit(_ghz(), shots=200)  # 2 shards, one on each node
    (on_a,) = a.assignments()
    (on_b,) = b.assignments()
    c.complete(b_id, on_b, 0.2)  # b is quick; a's shard lingers
    c.tick(0.3)
    assert len(b.assignments()) == 1  # not slow yet
    c.heartbeat(a_id, 1.5)
    c.heartbeat(b_id, 1.5)
    c.tick(1.5)
    backup = b.assignments()[-1]
    assert backup.shard_index == on_a.shard_index and backup.attempt_token != on_a.attempt_token
    c.tick(1.6)
    assert len(b.assignments()) == 2  # one backup per shard
    c.complete(b_id, backup, 1.7)
    assert job.state == DONE and job.shots_done == 200
    assert [m.cancel.attempt_token for m in a.messages if m.WhichOneof("kind") == "cancel"] == [on_a.attempt_token]
    before = c.core.stale_dropped
    c.complete(a_id, on_a, 1.8)  # the loser's late result is dropped, never counted
    assert job.shots_done == 200 and c.core.stale_dropped > before


def test_losing_the_node_of_one_copy_keeps_the_other() -> None:
    c = Cluster(backup_after_s=1.0)
    a_id, a = c.node("a")
    b_id, b = c.node("b")
    job = c.submit(_ghz(), shots=200)
    (on_a,) = a.assignments()
    c.complete(b_id, b.assignments()[0], 0.2)
    c.heartbeat(a_id, 1.5)
    c.heartbeat(b_id, 1.5)
    c.tick(1.5)
    backup = b.assignments()[-1]
    c.heartbeat(b_id, 3.0)
    c.tick(3.6)  # a silent since 1.5 s: suspected (b's copy already runs: no other one)
    assert c.core.nodes[a_id].status == "suspected"
    c.heartbeat(b_id, 6.0)
    c.tick(6.9)  # silent past the timeout, suspected for the rest of it: lost
    assert a_id not in c.core.nodes and len(b.assignments()) == 2  # no third copy: b's runs on
    c.complete(b_id, backup, 7.0)
    assert job.state == DONE and job.shots_done == 200
    assert job.shards[on_a.shard_index].losses == 0


# ------------------------------------------------------------------ results


def test_a_chunk_resent_after_a_resume_is_counted_once(c: Cluster) -> None:
    a_id, a = c.node("a")
    job = c.submit(_ghz(), shots=100)
    (x,) = a.assignments()
    msg = node_pb2.ChunkResult(attempt_token=x.attempt_token, chunk_index=0, counts=[
        common_pb2.CircuitCounts(circuit_index=0, set_index=0, outcomes=_packed({"0x0": 100}))])
    c.apply(c.core.chunk_result(a_id, msg, 0.1))
    c.apply(c.core.chunk_result(a_id, msg, 0.2))
    assert job.totals[0].progress_shots == 100
    c.apply(c.core.shard_done(a_id, x.attempt_token, 0.3))
    assert job.state == DONE and _set_counts(job) == [[{"0x0": 100}]]
    (record,) = [w for w in c.writes if isinstance(w, RecordShard)]
    assert record.job_id == job.job_id and record.shard_index == 0


def test_progress_shows_one_copy_of_each_running_shard(c: Cluster) -> None:
    a_id, a = c.node("a")
    b_id, b = c.node("b")
    job = c.submit(_ghz(), shots=100)
    (x,) = a.assignments()
    c.heartbeat(b_id, 2.5)
    c.tick(2.5)
    (y,) = b.assignments()

    def chunk(token: str) -> node_pb2.ChunkResult:
        return node_pb2.ChunkResult(attempt_token=token, chunk_index=0, counts=[
            common_pb2.CircuitCounts(circuit_index=0, set_index=0, outcomes=_packed({"0x0": 60, "0x7": 40}))])

    c.apply(c.core.chunk_result(b_id, chunk(y.attempt_token), 2.6))
    c.apply(c.core.chunk_result(a_id, chunk(x.attempt_token), 2.7))
    assert job.totals[0].top(0).hex_dict() == {"0x0": 60, "0x7": 40}  # b's copy, not both
    c.tick(20.0)  # a is lost; b's chunk still shows
    assert job.totals[0].top(0).hex_dict() == {"0x0": 60, "0x7": 40}
    c.apply(c.core.shard_done(b_id, y.attempt_token, 20.1))
    assert job.totals[0].top(1).hex_dict() == {"0x0": 60} and len(job.totals[0].partial.merged()) == 0


def test_top_outcomes_are_exact_at_any_number_of_outcomes() -> None:
    rng = random.Random(5)
    totals = Totals(2)
    truth: Counter[str] = Counter()
    for _ in range(60):
        counts = {hex(rng.randrange(2000)): rng.randrange(1, 50) for _ in range(rng.randrange(1, 200))}
        outcomes = Outcomes.from_hex_counts(counts, 2)
        if rng.random() < 0.7:
            totals.add_counted(outcomes)
            truth.update(counts)
        else:
            totals.add_partial(outcomes)
            truth.update(counts)
            if rng.random() < 0.5:
                totals.add_partial(outcomes, -1)
                truth.subtract(counts)
        assert totals.top(0).hex_dict() == dict(+truth)
        for k in (1, 5, 50, 300):
            got = totals.top(k).hex_dict()
            assert len(got) == min(k, len(+truth))
            assert all(truth[key] == value for key, value in got.items())
            floor = min(got.values())
            assert all(value <= floor for key, value in (+truth).items() if key not in got)


def test_job_events_keep_nothing_for_jobs_nobody_watches() -> None:
    events = JobEvents()

    async def watch_twice() -> None:
        with events.subscribe("a") as changed:
            events.notify("a")
            assert changed.is_set()
        with events.subscribe("b"):
            pass

    asyncio.run(watch_twice())
    events.notify("a")
    assert len(events) == 0


# -------------------------------------------------------------------- store


async def _one_shard_counted_then_stop(tmp_path, key: str = "0x0") -> Job:
    """A 3-shard job in a store under ``tmp_path``, its first shard counted (outcome ``key``),
    then the coordinator stops."""
    store = Store(tmp_path / "s")
    c = Cluster(prefetch_per_slot=0)
    runtime = Runtime(c.core, store, asyncio.get_running_loop())
    c.apply = lambda decisions: runtime.apply(decisions) or decisions  # type: ignore[method-assign]
    a_id, a = c.node("a", slots=2)
    job = make_job(_ghz(), 300)
    assert store.insert_job(job)
    c.apply(c.core.accept(job, c.core.plan(job), 0.0))
    first, _ = a.assignments()
    c.complete(a_id, first, 1.0, key=key)
    await runtime.writer.settled()
    runtime.close()
    store.close()
    return job


def _restarted(tmp_path) -> tuple[Store, Runtime]:
    store = Store(tmp_path / "s")
    core = Scheduler(CoordinatorConfig(prefetch_per_slot=0, policy=PlanningPolicy(shots_per_shard=100)))
    runtime = Runtime(core, store, asyncio.get_running_loop())
    assert runtime.recover(2.0) == 1
    return store, runtime


def test_restart_recovers_unfinished_jobs(tmp_path) -> None:
    async def run() -> None:
        job = await _one_shard_counted_then_stop(tmp_path)  # the coordinator dies here
        store, runtime = _restarted(tmp_path)
        again = runtime.get_job(job.job_id)
        assert again.shards_done == 1 and again.shots_done == 100 and again.state != DONE
        runtime.close()
        store.close()

    asyncio.run(run())


def test_a_schema_2_store_is_upgraded_with_its_counted_results(tmp_path) -> None:
    """Schema 2 stored counts as a map of hexadecimal keys: opening it rewrites them as packed
    outcomes, and a job half done before the upgrade finishes with exact totals."""
    async def run() -> None:
        job = await _one_shard_counted_then_stop(tmp_path, key="0x7")
        # Turn it into what schema 2 wrote.
        db = sqlite3.connect(tmp_path / "s" / "state.sqlite3")
        legacy = migrations._hex_shard_result()
        hex_counts = message_factory.GetMessageClass(legacy.DESCRIPTOR.fields_by_name["results"].message_type)
        old = legacy(results=[hex_counts(circuit_index=0, set_index=0, counts={"0x7": 100})])
        db.execute("UPDATE shard_results SET result = ?", (old.SerializeToString(),))
        db.execute("PRAGMA user_version=2")
        db.commit()
        db.close()

        store, runtime = _restarted(tmp_path)
        again = runtime.get_job(job.job_id)
        assert again.shards_done == 1 and _set_counts(again) == [[{"0x7": 100}]]
        runtime.close()
        store.close()
        assert sqlite3.connect(tmp_path / "s" / "state.sqlite3").execute("PRAGMA user_version").fetchone()[0] == 4

    asyncio.run(run())


def test_old_finished_jobs_leave_memory_but_stay_readable(tmp_path) -> None:
    async def run() -> None:
        store = Store(tmp_path / "s")
        c = Cluster(finished_jobs_in_memory=2)
        runtime = Runtime(c.core, store, asyncio.get_running_loop())
        c.apply = lambda decisions: runtime.apply(decisions) or decisions  # type: ignore[method-assign]
        a_id, a = c.node("a")
        jobs = []
        for k in range(4):
            job = make_job(_ghz(), 10)
            assert store.insert_job(job)
            c.apply(c.core.accept(job, c.core.plan(job), float(k)))
            c.complete(a_id, a.assignments()[-1], float(k))
            jobs.append(job)
        await runtime.writer.settled()
        assert [j.job_id in c.core.jobs for j in jobs] == [False, False, True, True]
        again = runtime.get_job(jobs[0].job_id)
        assert again.state == DONE and _set_counts(again) == [[{"0x0": 10}]] and again.shots_done == 10
        runtime.close()
        store.close()

    asyncio.run(run())


def test_state_dir_is_exclusive(tmp_path) -> None:
    store = Store(tmp_path / "s")
    try:
        with pytest.raises(FailedPreconditionError, match="another coordinator"):
            Store(tmp_path / "s")
    finally:
        store.close()
