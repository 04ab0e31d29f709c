"""The scheduler's rules, driven with an explicit clock (no sleeping, no network)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from qiskit import QuantumCircuit

from qscale.circuits import describe, dump_qpy, qpy_version
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.intake import PreparedJob
from qscale.coordinator.planner import PlanningPolicy
from qscale.coordinator.scheduler import CANCELLED, DONE, FAILED, Scheduler
from qscale.coordinator.store import Store
from qscale.errors import FailedPreconditionError, NoCapableNodeError
from qscale.proto.v1 import common_pb2, node_pb2


class Sink(list):
    def put_nowait(self, item: object) -> None:
        self.append(item)

    def assignments(self) -> list[node_pb2.ShardAssignment]:
        return [m.assign for m in self if m is not None and m.WhichOneof("kind") == "assign"]


def _caps(name: str, slots: int = 1, memory: int = 1 << 30) -> node_pb2.NodeCapabilities:
    return node_pb2.NodeCapabilities(name=name, slots=slots, cores=1, memory_budget_bytes=memory,
                                     methods=["statevector", "stabilizer"])


def _ghz(n: int = 3) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure_all()
    return qc


@pytest.fixture
def core(tmp_path):
    store = Store(tmp_path / "state")
    config = CoordinatorConfig(heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0, prefetch_per_slot=0,
                               policy=PlanningPolicy(shots_per_shard=100))
    yield Scheduler(config, store)
    store.close()


def _node(core: Scheduler, name: str, now: float = 0.0, **kw) -> tuple[str, Sink]:
    node = core.register_node(_caps(name, **kw), now)
    sink = Sink()
    core.attach_stream(node.node_id, sink, now)
    return node.node_id, sink


def _submit(core: Scheduler, circuit: QuantumCircuit, shots: int, now: float = 0.0):
    job = PreparedJob([describe(circuit)], [dump_qpy(circuit)], [shots], [None], seed=7, method="automatic")
    return core.submit(job, now)


def _complete(core: Scheduler, node_id: str, a: node_pb2.ShardAssignment, now: float, key: str = "0x0") -> None:
    for k, chunk in enumerate(a.chunks):
        counts = [common_pb2.CircuitCounts(circuit_index=e.circuit_index, set_index=s, counts={key: chunk.shots})
                  for e in chunk.entries for s in range(e.set_start, e.set_start + e.set_count)]
        core.chunk_result(node_id, node_pb2.ChunkResult(attempt_token=a.attempt_token, chunk_index=k,
                                                        counts=counts), now)
    core.shard_done(node_id, a.attempt_token, now)


def test_silent_node_is_reaped_and_late_results_are_dropped(core: Scheduler) -> None:
    a_id, a_sink = _node(core, "a")
    job = _submit(core, _ghz(), shots=200)  # Clifford: 2 shards of 100
    b_id, b_sink = _node(core, "b", now=0.5)
    (first,) = a_sink.assignments()
    (second,) = b_sink.assignments()
    core.heartbeat(b_id, 4.0)
    assert core.reap(5.5) == [a_id]  # a silent for 5.5 s > 5 s
    assert a_sink[-1] is not None  # its stream stays open: late messages arrive and are dropped
    _complete(core, b_id, second, 6.0)
    requeued = b_sink.assignments()[-1]
    assert requeued.shard_index == first.shard_index and requeued.attempt_token != first.attempt_token
    _complete(core, a_id, first, 6.5, key="0x7")  # the zombie comes back: ignored
    assert job.stale_dropped == len(first.chunks) + 1
    _complete(core, b_id, requeued, 7.0)
    assert job.state == DONE
    assert job.counts == [[{"0x0": 200}]] and job.shots_done == 200


def test_shard_failing_on_three_nodes_fails_the_job(core: Scheduler) -> None:
    nodes = [_node(core, name) for name in ("a", "b", "c", "d")]
    qc = QuantumCircuit(2, 2, name="bad-one")
    qc.rx(0.3, 0)
    qc.measure([0, 1], [0, 1])
    job = _submit(core, qc, shots=10)
    tried = []
    for _ in range(3):
        node_id, sink = next((n, s) for n, s in nodes if s.assignments() and n not in tried)
        tried.append(node_id)
        core.shard_failed(node_id, sink.assignments()[-1].attempt_token, "AerError: boom", False, 1.0)
    assert job.state == FAILED
    assert "circuit 0 ('bad-one')" in job.error and "AerError: boom" in job.error
    assert len(set(tried)) == 3  # retried on a different node each time


def test_refusal_moves_the_shard_without_counting_a_failure(core: Scheduler) -> None:
    a_id, a_sink = _node(core, "a")
    job = _submit(core, _ghz(), shots=50)
    (a,) = a_sink.assignments()
    core.shard_failed(a_id, a.attempt_token, "node draining", True, 1.0)
    b_id, b_sink = _node(core, "b", now=1.0)
    (b,) = b_sink.assignments()
    assert job.shards[0].failures == []
    _complete(core, b_id, b, 2.0)
    assert job.state == DONE


def test_too_wide_circuit_is_refused_when_no_node_can_hold_it(core: Scheduler) -> None:
    _node(core, "small", memory=1 << 20)
    qc = QuantumCircuit(30, 30)
    qc.rx(0.1, range(30))
    qc.measure(range(30), range(30))
    with pytest.raises(NoCapableNodeError, match="30 qubits"):
        _submit(core, qc, shots=10)


def test_cancel_tells_the_node(core: Scheduler) -> None:
    a_id, a_sink = _node(core, "a")
    job = _submit(core, _ghz(), shots=50)
    core.cancel(job.job_id, 1.0)
    assert job.state == CANCELLED
    assert [m.WhichOneof("kind") for m in a_sink[-2:]] == ["cancel", "forget"]
    assert not core.nodes[a_id].running


def test_second_stream_for_a_node_is_refused(core: Scheduler) -> None:
    a_id, _ = _node(core, "a")
    with pytest.raises(FailedPreconditionError):
        core.attach_stream(a_id, Sink(), 1.0)
    assert a_id not in core.nodes


def test_restart_recovers_unfinished_jobs(tmp_path) -> None:
    config = CoordinatorConfig(prefetch_per_slot=0, policy=PlanningPolicy(shots_per_shard=100))
    store = Store(tmp_path / "s")
    core = Scheduler(config, store)
    a_id, a_sink = _node(core, "a", slots=2)
    job = _submit(core, _ghz(), shots=300)
    first, second = a_sink.assignments()
    _complete(core, a_id, first, 1.0)
    store.close()  # the coordinator dies here

    store = Store(tmp_path / "s")
    core = Scheduler(config, store)
    assert core.recover(2.0) == 1
    again = core.get_job(job.job_id)
    assert again.shards_done == 1 and again.shots_done == 100
    b_id, b_sink = _node(core, "b", now=2.0, slots=4)
    assert sorted(a.shard_index for a in b_sink.assignments()) == [1, 2]
    for a in b_sink.assignments():
        _complete(core, b_id, a, 3.0)
    assert again.state == DONE and again.counts == [[{"0x0": 300}]]
    store.close()


def test_state_dir_is_exclusive(tmp_path) -> None:
    store = Store(tmp_path / "s")
    try:
        with pytest.raises(FailedPreconditionError, match="another coordinator"):
            Store(tmp_path / "s")
    finally:
        store.close()


def test_old_finished_jobs_leave_memory_but_stay_readable(tmp_path) -> None:
    store = Store(tmp_path / "s")
    core = Scheduler(CoordinatorConfig(finished_jobs_in_memory=2), store)
    a_id, a_sink = _node(core, "a")
    jobs = []
    for k in range(4):
        job = _submit(core, _ghz(), shots=10, now=float(k))
        _complete(core, a_id, a_sink.assignments()[-1], float(k))
        jobs.append(job)
    assert [j.job_id in core.jobs for j in jobs] == [False, False, True, True]
    again = core.get_job(jobs[0].job_id)
    assert again.state == DONE and again.counts == [[{"0x0": 10}]] and again.shots_done == 10
    store.close()


def test_shards_only_go_to_nodes_that_read_their_qpy_version(core: Scheduler) -> None:
    old = _caps("old")
    old.qpy_version = 12
    core.register_node(old, 0.0)
    circuit = _ghz()
    payload = dump_qpy(circuit)
    info = replace(describe(circuit), qpy_version=qpy_version(payload))
    assert info.qpy_version > 12
    with pytest.raises(NoCapableNodeError, match="QPY version"):
        core.submit(PreparedJob([info], [payload], [10], [None], seed=1, method=""), 0.0)


def _prefetching_core(tmp_path, **kw) -> Scheduler:
    config = CoordinatorConfig(heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0,
                               policy=PlanningPolicy(shots_per_shard=100), **kw)
    return Scheduler(config, Store(tmp_path / "p"))


def test_a_node_has_its_next_shard_in_hand_and_circuits_travel_once(tmp_path) -> None:
    core = _prefetching_core(tmp_path, prefetch_per_slot=1)
    a_id, a_sink = _node(core, "a")
    job = _submit(core, _ghz(), shots=400)  # Clifford: 4 shards of 100
    first, second = a_sink.assignments()  # one running, one in hand
    assert [p.cached for p in first.circuits] == [False] and first.circuits[0].qpy
    assert [p.cached for p in second.circuits] == [True] and not second.circuits[0].qpy
    b_id, b_sink = _node(core, "b", now=0.1)
    (third, fourth) = b_sink.assignments()  # another node gets the circuit once as well
    assert third.circuits[0].qpy and fourth.circuits[0].cached
    for node_id, a in ((a_id, first), (a_id, second), (b_id, third), (b_id, fourth)):
        _complete(core, node_id, a, 1.0)
    assert job.state == DONE and job.shots_done == 400
    # The job is over: both nodes are told to drop what they kept of it.
    assert a_sink[-1].WhichOneof("kind") == "forget" and b_sink[-1].forget.job_id == job.job_id


def test_slow_shard_gets_a_backup_copy_and_the_first_result_wins(tmp_path) -> None:
    core = _prefetching_core(tmp_path, prefetch_per_slot=0, backup_after_s=1.0, backup_slowdown=2.0)
    a_id, a_sink = _node(core, "a")
    b_id, b_sink = _node(core, "b")
    job = _submit(core, _ghz(), shots=200)  # 2 shards, one on each node
    (on_a,) = a_sink.assignments()
    (on_b,) = b_sink.assignments()
    _complete(core, b_id, on_b, 0.2)  # b is quick; a's shard lingers
    assert core.speculate(0.3) == 0  # not slow yet
    core.heartbeat(a_id, 3.0)
    core.heartbeat(b_id, 3.0)
    assert core.speculate(3.0) == 1
    backup = b_sink.assignments()[-1]
    assert backup.shard_index == on_a.shard_index and backup.attempt_token != on_a.attempt_token
    assert core.speculate(3.1) == 0  # one backup per shard
    _complete(core, b_id, backup, 3.2)
    assert job.state == DONE and job.shots_done == 200
    cancels = [m.cancel.attempt_token for m in a_sink if m is not None and m.WhichOneof("kind") == "cancel"]
    assert cancels == [on_a.attempt_token]
    before = core.stale_dropped
    _complete(core, a_id, on_a, 3.3)  # the loser's late result is dropped, never counted
    assert job.shots_done == 200 and core.stale_dropped > before


def test_losing_the_node_of_one_copy_keeps_the_other(tmp_path) -> None:
    core = _prefetching_core(tmp_path, prefetch_per_slot=0, backup_after_s=1.0)
    a_id, a_sink = _node(core, "a")
    b_id, b_sink = _node(core, "b")
    job = _submit(core, _ghz(), shots=200)
    (on_a,) = a_sink.assignments()
    _complete(core, b_id, b_sink.assignments()[0], 0.2)
    core.heartbeat(b_id, 3.0)
    assert core.speculate(3.0) == 1
    backup = b_sink.assignments()[-1]
    core.detach_stream(a_id, a_sink, 3.1, "work stream closed")  # a is lost: b's copy runs on
    assert not core.queue or all(s.status != "queued" for s in job.shards)
    _complete(core, b_id, backup, 3.2)
    assert job.state == DONE and job.shots_done == 200
    assert job.shards[on_a.shard_index].losses == 0


def test_reaping_looks_only_at_silent_nodes(tmp_path) -> None:
    core = _prefetching_core(tmp_path)
    ids = [_node(core, f"n{i}", now=float(i))[0] for i in range(5)]
    for node_id in ids[::2] + ids[1::2]:  # even ones at 10 s, odd ones at 11 s
        core.heartbeat(node_id, 10.0 if node_id in ids[::2] else 11.0)
    assert core.reap(15.5) == [ids[0], ids[2], ids[4]]
    assert sorted(core.nodes) == sorted(ids[1::2])
