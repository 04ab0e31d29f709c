"""Retention: the state keeps the results of the newest ``keep_jobs`` finished jobs (for at most
``keep_jobs_for_s``), then only their status (``pruned``), then (past ``keep_pruned_jobs``)
nothing; the state file stops growing; a pruned job reads back as such and its result is
NOT_FOUND with a message that says why. Also the upgrade of a schema-3 state (user, priority and
retention columns)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

import pytest
from qiskit import QuantumCircuit

from qscale.circuits import describe, dump_qpy
from qscale.coordinator import views
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.decisions import FinishJob, RecordShard
from qscale.coordinator.jobs import CANCELLED, DONE, FAILED, Job
from qscale.coordinator.planner import PlanningPolicy
from qscale.coordinator.retention import PrunedJob, format_span
from qscale.coordinator.runtime import Runtime
from qscale.coordinator.scheduler import Scheduler
from qscale.coordinator.store import SCHEMA_VERSION, Store
from qscale.errors import NotFoundError
from qscale.outcomes import Outcomes
from qscale.proto.v1 import common_pb2, jobs_pb2

from conftest import fast_config, wait_until


@cache
def _bell() -> tuple[object, bytes]:
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    return describe(qc), dump_qpy(qc)


def _job(user: str = "default", priority: int = common_pb2.PRIORITY_NORMAL, shots: int = 10) -> Job:
    info, qpy = _bell()
    return Job(uuid.uuid4().hex[:16], time.time(), 7, "automatic", PlanningPolicy(shots_per_shard=100),
               [info], [shots], [None], [qpy], user=user, priority=priority)  # type: ignore[list-item]


def _result(shots: int = 10) -> common_pb2.ShardResult:
    outcomes = Outcomes.from_hex_counts({"0x0": shots // 2, "0x3": shots - shots // 2}, 1).to_proto()
    return common_pb2.ShardResult(results=[common_pb2.CircuitCounts(circuit_index=0, set_index=0, outcomes=outcomes)])


def _finish(store: Store, jobs: Sequence[Job], at: float | Sequence[float], state: int = DONE) -> None:
    """Count each job's one shard and make it final, in one transaction (as the writer does)."""
    times = [at] * len(jobs) if isinstance(at, float | int) else list(at)
    writes: list[RecordShard | FinishJob] = []
    for job, when in zip(jobs, times):
        writes.append(RecordShard(job.job_id, 0, _result(job.shots[0]), "node-1", f"{job.job_id}:0:x", when))
        writes.append(FinishJob(job.job_id, state, "" if state == DONE else "it went wrong", when))
    store.apply(writes)


def _rows(store: Store, table: str) -> int:
    return store._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "s")
    for db in (store._intake_db, store._write_db):  # (speed only: no fsync per test transaction)
        db.execute("PRAGMA synchronous=OFF")
    yield store
    store.close()


# ------------------------------------------------------------------------------------------ store


def test_prune_keeps_the_newest_finished_jobs_and_the_status_of_the_others(store: Store) -> None:
    jobs = [_job(user=f"user{k % 2}", priority=common_pb2.PRIORITY_HIGH if k == 0 else common_pb2.PRIORITY_NORMAL)
            for k in range(10)]
    for job in jobs:
        assert store.insert_job(job)
    _finish(store, jobs[:6], [100.0 + k for k in range(6)])
    _finish(store, jobs[6:8], [106.0, 107.0], state=FAILED)  # jobs 8 and 9 are still running
    assert _rows(store, "circuits") == 10 and _rows(store, "shard_results") == 8

    ids: list[str] = []
    assert store.prune(3, None, 0, now_wall=200.0, pruned_ids=ids) == (5, 0)
    assert ids == [j.job_id for j in jobs[:5]]  # the oldest first
    assert store.prune(3, None, 0, now_wall=201.0) == (0, 0)  # nothing more to do
    assert _rows(store, "circuits") == 5 and _rows(store, "shard_results") == 3

    pruned, results = store.load_job(jobs[0].job_id)  # type: ignore[misc]
    assert isinstance(pruned, PrunedJob) and pruned.pruned and results == {}
    assert (pruned.state, pruned.finished_at, pruned.pruned_at) == (DONE, 100.0, 200.0)
    assert (pruned.user, pruned.priority, pruned.shots_total, pruned.num_circuits) == (
        "user0", common_pb2.PRIORITY_HIGH, 10, 1)
    status = views.job_status(pruned)
    assert (status.pruned, status.num_circuits, status.shots_total, status.shots_done, status.user) == (
        True, 1, 10, 10, "user0")
    with pytest.raises(NotFoundError, match=f"job {jobs[0].job_id} finished at .* pruned by retention"):
        views.job_result(pruned)

    kept, results = store.load_job(jobs[5].job_id)  # type: ignore[misc]
    assert not kept.pruned and kept.user == "user1" and len(kept.qpy) == 1 and list(results) == [0]
    assert [j.job_id for j, _ in store.unfinished_jobs((DONE, FAILED, CANCELLED))] == [j.job_id for j in jobs[8:]]

    rows = {r.job_id: r for r in store.list_jobs(100)}
    assert [rows[j.job_id].pruned for j in jobs] == [True] * 5 + [False] * 5
    mine = store.list_jobs(100, user="user0")
    assert {r.job_id for r in mine} == {j.job_id for j in jobs[0::2]}
    assert [r.created_at for r in mine] == sorted((r.created_at for r in mine), reverse=True)
    assert views.row_status(rows[jobs[0].job_id]).pruned and views.row_status(rows[jobs[6].job_id]).error


def test_prune_by_age_then_delete_the_oldest_records(store: Store) -> None:
    jobs = [_job() for _ in range(8)]
    for job in jobs:
        store.insert_job(job)
    _finish(store, jobs, [100.0 + k for k in range(8)])
    assert store.prune(0, 103.0, 0, now_wall=200.0) == (3, 0)  # finished before 103: 100, 101, 102
    assert store.prune(0, 103.5, 0, now_wall=201.0) == (1, 0)
    assert store.prune(0, 105.5, 0, now_wall=202.0, limit=1) == (1, 0)  # a batch limit
    assert store.prune(0, 105.5, 0, now_wall=203.0) == (1, 0)
    assert store.prune(6, 104.5, 0, now_wall=204.0) == (0, 0)  # both rules: the larger set
    # 6 pruned; keep the records of the newest 4 of them.
    assert store.prune(0, None, 4, now_wall=205.0, limit=1) == (0, 1)
    assert store.prune(0, None, 4, now_wall=206.0) == (0, 1)
    assert [store.load_job(j.job_id) is None for j in jobs] == [True] * 2 + [False] * 6
    assert store.prune(1, None, 4, now_wall=207.0) == (1, 1)  # pruned and counted at once
    assert _rows(store, "jobs") == 5 and _rows(store, "circuits") == 1 and _rows(store, "shard_results") == 1


def test_the_state_file_stops_growing(store: Store) -> None:
    """10,000 small jobs in a steady stream, keeping 1,000 results and 2,000 status records: the
    file after 10,000 jobs is about as large as after 3,000 (freed pages are used again).
    ``benchmarks/retention.py`` prints the figures."""
    path = store.path / "state.sqlite3"
    sizes: dict[int, int] = {}
    wall = 1000.0
    for done in range(100, 10_001, 100):
        jobs = [_job() for _ in range(100)]
        for job in jobs:
            store.insert_job(job)
        _finish(store, jobs, [wall + k / 100 for k in range(100)])
        wall += 1.0
        store.prune(1000, None, 2000, now_wall=wall)
        sizes[done] = path.stat().st_size
    assert _rows(store, "jobs") == 3000 and _rows(store, "shard_results") == 1000 and _rows(store, "circuits") == 1000
    assert sizes[10_000] <= 1.5 * sizes[3000], sizes


def test_a_schema_3_state_is_upgraded_with_its_jobs_and_results(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    jobs = [_job() for _ in range(3)]
    for job in jobs:
        store.insert_job(job)
    _finish(store, jobs[:2], [100.0, 101.0])
    store.close()
    # What schema 3 had: the jobs table without the new columns and their indexes.
    db = sqlite3.connect(tmp_path / "s" / "state.sqlite3")
    for index in ("jobs_by_user", "jobs_kept", "jobs_pruned"):
        db.execute(f"DROP INDEX {index}")
    for column in ("user", "priority", "pruned_at"):
        db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()

    store = Store(tmp_path / "s")
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        done, results = store.load_job(jobs[0].job_id)  # type: ignore[misc]
        assert (done.state, done.user, done.priority, done.pruned) == (DONE, "default", common_pb2.PRIORITY_NORMAL,
                                                                      False)
        assert list(results) == [0] and len(done.qpy) == 1
        assert [j.job_id for j, _ in store.unfinished_jobs((DONE, FAILED, CANCELLED))] == [jobs[2].job_id]
        assert store.prune(1, None, 0, now_wall=200.0) == (1, 0)
        assert store.load_job(jobs[0].job_id)[0].pruned  # type: ignore[index]
        indexes = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"jobs_by_user", "jobs_kept", "jobs_pruned"} <= indexes
    finally:
        store.close()


# ---------------------------------------------------------------------------------------- runtime


def test_the_runtime_prunes_on_the_writer_thread_and_forgets_pruned_jobs(tmp_path: Path) -> None:
    async def run() -> None:
        store = Store(tmp_path / "s")
        core = Scheduler(CoordinatorConfig(keep_jobs=2, keep_jobs_for_s=0, keep_pruned_jobs=3))
        runtime = Runtime(core, store, asyncio.get_running_loop())
        try:
            jobs = [_job() for _ in range(6)]
            for job in jobs:
                store.insert_job(job)
            _finish(store, jobs, [100.0 + k for k in range(6)])
            in_memory = runtime.get_job(jobs[1].job_id)  # read back: kept in memory
            assert jobs[1].job_id in core.jobs and not in_memory.pruned and in_memory.shots_done == 10

            assert runtime.maybe_prune(1000.0)  # due at start
            assert not runtime.maybe_prune(1000.1)  # one at a time, once a second
            await runtime.writer.settled()
            assert jobs[1].job_id not in core.jobs  # pruned: gone from memory too
            with pytest.raises(NotFoundError, match="no job"):
                runtime.get_job(jobs[0].job_id)  # pruned, then its record deleted (3 records kept)
            pruned = runtime.get_job(jobs[1].job_id)
            assert pruned.pruned and pruned.job_id not in core.jobs
            status = views.job_status(pruned)
            assert (status.pruned, status.state, status.shots_total, status.num_circuits) == (True, DONE, 10, 1)
            message = (f"job {jobs[1].job_id} finished at 1970-01-01 00:01:41 UTC and its results were pruned by "
                       "retention (the coordinator keeps the results of the newest 2 finished jobs)")
            with pytest.raises(NotFoundError, match=re.escape(message)):
                views.job_result(runtime.get_job(jobs[1].job_id))
            newest = runtime.get_job(jobs[5].job_id)
            assert views.job_result(newest).results[0].shots == 10

            assert not runtime.maybe_prune(1002.0)  # nothing finished since
            runtime.apply([FinishJob(jobs[4].job_id, CANCELLED, "again", 101.0)])  # (a job finishing)
            assert runtime.maybe_prune(1003.0)
            await runtime.writer.settled()
        finally:
            runtime.close()
            store.close()

    asyncio.run(run())


def test_the_runtime_prunes_results_once_they_are_too_old(tmp_path: Path) -> None:
    async def run() -> None:
        store = Store(tmp_path / "s")
        core = Scheduler(CoordinatorConfig(keep_jobs=0, keep_jobs_for_s=10, keep_pruned_jobs=0))
        runtime = Runtime(core, store, asyncio.get_running_loop())
        try:
            jobs = [_job() for _ in range(2)]
            for job in jobs:
                store.insert_job(job)
            _finish(store, jobs, [100.0, 105.0])
            assert runtime.maybe_prune(108.0)
            await runtime.writer.settled()
            assert not any(runtime.get_job(j.job_id).pruned for j in jobs)
            assert not runtime.maybe_prune(110.0)  # the oldest is 10 s old, not older
            assert runtime.maybe_prune(110.5)
            await runtime.writer.settled()
            assert [runtime.get_job(j.job_id).pruned for j in jobs] == [True, False]
            with pytest.raises(NotFoundError, match=r"keeps the results of finished jobs for at most 10 s\)"):
                views.job_result(runtime.get_job(jobs[0].job_id))
        finally:
            runtime.close()
            store.close()

    asyncio.run(run())


def test_retention_periods_read_as_words() -> None:
    assert [format_span(s) for s in (7 * 86400, 86400, 3 * 3600, 5400, 45, 0.5, 100_000)] == [
        "7 days", "1 day", "3 hours", "90 minutes", "45 s", "0.5 s", "28 hours"]


# ------------------------------------------------------------------------------------- end to end


def test_a_cluster_prunes_the_oldest_results(make_cluster) -> None:
    """Needs the coordinator's tick to call ``Runtime.maybe_prune`` (coordinator/server.py)."""
    cluster = make_cluster(1, config=fast_config(keep_jobs=2, keep_pruned_jobs=100))
    client = cluster.client
    qc = QuantumCircuit(1)
    qc.x(0)
    qc.measure_all()
    jobs = []
    for _ in range(4):
        job = client.submit(qc, shots=10, seed=1)
        job.result(timeout=60)
        jobs.append(job)

    def status(job_id: str) -> jobs_pb2.JobStatus:
        return client._call("GetJob", jobs_pb2.JobRef(job_id=job_id))

    wait_until(lambda: status(jobs[1].job_id).pruned, 10, "the two oldest jobs to be pruned")
    oldest = status(jobs[0].job_id)
    assert oldest.pruned and oldest.state == common_pb2.JOB_STATE_DONE and oldest.shots_total == 10
    assert oldest.num_circuits == 1
    with pytest.raises(NotFoundError, match=rf"job {jobs[0].job_id} finished at .* pruned by retention \(the "
                                            r"coordinator keeps the results of the newest 2 finished jobs, for at "
                                            r"most 7 days\)"):
        jobs[0].result(timeout=30)
    assert not status(jobs[3].job_id).pruned
    assert jobs[3].result(timeout=30).status.shots_done == 10
