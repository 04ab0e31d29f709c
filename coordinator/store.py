"""Durable coordinator state in SQLite (WAL, ``synchronous=FULL``).

What is written here survives a coordinator restart: accepted jobs with their circuits and
parameter values, every counted shard result, and final job states. A new job is committed
before its submitter hears of it; shard results and final states are committed in groups by
the runtime's writer thread (:meth:`Store.apply`), in the order they were decided, before a
job is reported final. A lock file keeps a second coordinator off the same state directory.

Retention (:mod:`qscale.coordinator.retention`, :meth:`Store.prune`, also on the writer thread)
deletes the results of old finished jobs and, later, their status records.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from qscale.circuits import CircuitInfo
from qscale.coordinator.decisions import FinishJob, RecordShard
from qscale.coordinator.jobs import CANCELLED, DONE, FAILED, QUEUED, Job
from qscale.coordinator.migrations import migrate
from qscale.coordinator.planner import PlanningPolicy
from qscale.coordinator.retention import PRUNE_BATCH, PrunedJob
from qscale.errors import FailedPreconditionError
from qscale.proto.v1 import common_pb2

__all__ = ["Store", "JobRow", "SCHEMA_VERSION"]

Results = dict[int, list[common_pb2.CircuitCounts]]
"""Counted results of a job's shards: shard index -> one result per experiment."""

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4

_FINAL = f"state IN ({DONE}, {FAILED}, {CANCELLED})"
"""The SQL condition of a final job, spelt exactly as in the partial index ``jobs_kept`` (SQLite
uses a partial index only for a query whose WHERE clause contains its condition)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    state INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    method TEXT NOT NULL,
    policy TEXT NOT NULL,
    num_circuits INTEGER NOT NULL,
    shots_total INTEGER NOT NULL,
    memory INTEGER NOT NULL,
    noise_model TEXT NOT NULL,
    request_key TEXT,
    error TEXT NOT NULL DEFAULT '',
    finished_at REAL NOT NULL DEFAULT 0,
    user TEXT NOT NULL DEFAULT 'default',
    priority INTEGER NOT NULL DEFAULT 2,
    pruned_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs(created_at);
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs(user, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request_key ON jobs(request_key) WHERE request_key IS NOT NULL;
-- Retention: finished jobs whose results are kept, and pruned jobs, each by the time they
-- finished. Each holds only the jobs it names, so pruning costs what it prunes.
CREATE INDEX IF NOT EXISTS jobs_kept ON jobs(finished_at) WHERE pruned_at = 0 AND {_FINAL};
CREATE INDEX IF NOT EXISTS jobs_pruned ON jobs(finished_at) WHERE pruned_at > 0;
CREATE TABLE IF NOT EXISTS circuits (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    info TEXT NOT NULL,
    shots INTEGER NOT NULL,
    params BLOB,
    qpy BLOB NOT NULL,
    observables TEXT,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS shard_results (
    job_id TEXT NOT NULL,
    shard_index INTEGER NOT NULL,
    result BLOB NOT NULL,
    node_id TEXT NOT NULL,
    attempt TEXT NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (job_id, shard_index)
);
""".replace("{_FINAL}", _FINAL)


class JobRow(NamedTuple):
    """A job's status as the ``jobs`` table holds it (job lists; see ``views.row_status``)."""

    job_id: str
    created_at: float
    state: int
    shots_total: int
    num_circuits: int
    error: str
    finished_at: float
    user: str
    priority: int
    pruned: bool


_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(CircuitInfo))


def _info_to_json(info: CircuitInfo) -> str:
    return json.dumps({name: getattr(info, name) for name in _INFO_FIELDS})  # asdict() is 5x slower


def _info_from_json(text: str) -> CircuitInfo:
    data = json.loads(text)
    data["creg_sizes"] = tuple(tuple(x) for x in data["creg_sizes"])
    data["parameters"] = tuple(data.get("parameters", ()))
    data["creg_clbits"] = tuple(tuple(x) for x in data.get("creg_clbits", ()))
    return CircuitInfo(**data)


class Store:
    """The coordinator's SQLite database under a state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / "coordinator.lock", "a+")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise FailedPreconditionError(
                f"another coordinator is using the state directory {self.path}; "
                "stop it or choose another --state-dir"
            ) from None
        self._db = sqlite3.connect(self.path / "state.sqlite3", isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
            if tables:
                version = migrate(self._db, version, SCHEMA_VERSION)
            if tables and version != SCHEMA_VERSION:
                raise FailedPreconditionError(
                    f"the state in {self.path} has schema {version}, this qscale uses {SCHEMA_VERSION}; "
                    "finish its jobs with the qscale that wrote it, or start from an empty --state-dir")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # Writes happen off the event loop, each thread on its connection: new jobs from
            # intake threads, results and final states from the writer thread.
            self._intake_db = self._connect()
            self._intake_lock = threading.Lock()
            self._write_db = self._connect()
            self._pruned_count: int | None = None
            """Status records of pruned jobs (only :meth:`prune` changes it; counted at its first call)."""
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path / "state.sqlite3", isolation_level=None, check_same_thread=False, timeout=30.0)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def close(self) -> None:
        """Close the database and release the directory lock."""
        self._db.close()
        for name in ("_intake_db", "_write_db"):
            db = getattr(self, name, None)
            if db is not None:
                db.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def insert_job(self, job: Job) -> bool:
        """Persist a newly accepted job with its circuits, in one transaction. Safe to call from
        another thread than the other methods. Returns False (and writes nothing) when its
        request key already names a job."""
        with self._intake_lock:
            try:
                self._insert_job(job)
            except sqlite3.IntegrityError:
                if job.request_key and self.job_for_request_key(job.request_key, intake=True) is not None:
                    return False
                raise
        return True

    def _insert_job(self, job: Job) -> None:
        with _Transaction(self._intake_db) as db:
            db.execute(
                "INSERT INTO jobs (job_id, created_at, state, seed, method, policy, num_circuits, shots_total,"
                " memory, noise_model, request_key, user, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.job_id, job.created_at, QUEUED, job.seed, job.method,
                 json.dumps(dataclasses.asdict(job.policy)), len(job.infos), job.shots_total, int(job.memory),
                 job.noise_model, job.request_key or None, job.user, int(job.priority)),
            )
            db.executemany(
                "INSERT INTO circuits (job_id, idx, info, shots, params, qpy, observables)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((job.job_id, i, _info_to_json(info), shots, p.SerializeToString() if p is not None else None, qpy,
                  json.dumps(job.observables[i]) if job.estimator else None)
                 for i, (info, shots, p, qpy) in enumerate(zip(job.infos, job.shots, job.params, job.qpy))),
            )

    def job_for_request_key(self, key: str, *, intake: bool = False) -> str | None:
        """The id of the job a Submit with this idempotency key created, if any."""
        row = (self._intake_db if intake else self._db).execute("SELECT job_id FROM jobs WHERE request_key = ?", (key,)).fetchone()
        return row[0] if row else None

    def apply(self, writes: Sequence[RecordShard | FinishJob]) -> None:
        """Commit shard results and final job states in one transaction (one fsync), in order.
        A shard that already has a stored result keeps it. Call from one thread at a time."""
        with _Transaction(self._write_db) as db:
            for w in writes:
                if isinstance(w, RecordShard):
                    db.execute(
                        "INSERT OR IGNORE INTO shard_results (job_id, shard_index, result, node_id, attempt,"
                        " finished_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (w.job_id, w.shard_index, w.result.SerializeToString(), w.node_id, w.attempt, w.at))
                else:
                    db.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE job_id = ?",
                               (w.state, w.error, w.at, w.job_id))

    def load_job(self, job_id: str, *, with_payloads: bool = True) -> tuple[Job, Results] | None:
        """One job with its shard results, or None. A pruned job is a
        :class:`~qscale.coordinator.retention.PrunedJob`, without results. Read in one
        transaction: a prune committed meanwhile is seen whole or not at all."""
        with _Transaction(self._db, "BEGIN"):
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return self._job_from_row(row, with_payloads) if row else None

    def unfinished_jobs(self, final_states: tuple[int, ...]) -> Iterator[tuple[Job, Results]]:
        """Every job not in one of ``final_states``, oldest first."""
        marks = ",".join("?" * len(final_states))
        rows = self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state NOT IN ({marks}) ORDER BY created_at", final_states
        ).fetchall()
        for row in rows:
            yield self._job_from_row(row, True)

    def list_jobs(self, limit: int, user: str | None = None) -> list[JobRow]:
        """The newest jobs (of ``user`` only, when given), newest first, as status rows."""
        columns = ("job_id, created_at, state, shots_total, num_circuits, error, finished_at, user, priority,"
                   " pruned_at > 0")
        if user is None:
            rows = self._db.execute(f"SELECT {columns} FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._db.execute(
                f"SELECT {columns} FROM jobs WHERE user = ? ORDER BY created_at DESC LIMIT ?", (user, limit))
        return [JobRow(*row[:9], bool(row[9])) for row in rows]

    def prune(self, keep: int, older_than_wall: float | None, keep_pruned: int, *, now_wall: float | None = None,
              limit: int = PRUNE_BATCH, pruned_ids: list[str] | None = None) -> tuple[int, int]:
        """Apply retention in one transaction; returns (jobs pruned, status records deleted).

        Among finished jobs (done, failed, cancelled) not pruned yet, all but the newest ``keep``
        by ``finished_at`` (``keep`` 0: no count limit), and those finished before
        ``older_than_wall`` (None: no time limit), are *pruned*: their circuits and shard results
        are deleted, their noise model and planning policy cleared, ``pruned_at`` set to
        ``now_wall``; their status stays (state, error, times, user, priority, shots and circuits
        asked for, request key). Then the status records of pruned jobs beyond the newest
        ``keep_pruned`` are deleted (0: no limit). At most ``limit`` jobs are pruned and
        ``limit`` records deleted per call (the oldest first); the ids of the jobs pruned are
        appended to ``pruned_ids``. Partial indexes hold only the rows it looks at, and the
        pruned records are counted once: the cost follows what it prunes (plus a count of the
        jobs whose results are kept), not the size of the table. Call from the writer thread
        (the one that calls :meth:`apply`)."""
        started = time.perf_counter()
        now_wall = time.time() if now_wall is None else now_wall
        try:
            ids, deleted = self._prune(keep, older_than_wall, keep_pruned, now_wall, limit)
        except BaseException:
            self._pruned_count = None  # rolled back: count again next time
            raise
        if pruned_ids is not None:
            pruned_ids.extend(ids)
        if ids or deleted:
            log.info("retention: results of %d finished job(s) pruned, %d pruned job record(s) deleted (%.1f ms)",
                     len(ids), deleted, 1000 * (time.perf_counter() - started))
        return len(ids), deleted

    def _prune(self, keep: int, older_than_wall: float | None, keep_pruned: int, now_wall: float, limit: int
               ) -> tuple[list[str], int]:
        with _Transaction(self._write_db) as db:
            oldest = f"SELECT job_id FROM jobs WHERE pruned_at = 0 AND {_FINAL}"
            victims: dict[str, None] = {}
            if keep > 0:
                kept = db.execute(f"SELECT count(*) FROM jobs WHERE pruned_at = 0 AND {_FINAL}").fetchone()[0]
                if kept > keep:
                    victims.update(dict.fromkeys(
                        r[0] for r in db.execute(f"{oldest} ORDER BY finished_at LIMIT ?", (min(kept - keep, limit),))))
            if older_than_wall is not None and len(victims) < limit:
                victims.update(dict.fromkeys(r[0] for r in db.execute(
                    f"{oldest} AND finished_at < ? ORDER BY finished_at LIMIT ?", (older_than_wall, limit))))
            ids = list(victims)[:limit]
            if ids:
                rows = [(job_id,) for job_id in ids]
                db.executemany("DELETE FROM circuits WHERE job_id = ?", rows)
                db.executemany("DELETE FROM shard_results WHERE job_id = ?", rows)
                # The record is written again, small, at the end of the table (not updated in place):
                # the pages of the old records empty out and are used again; shrunk in place, they
                # would stay mostly empty.
                kept_columns = [c for c in _COLUMNS if c not in ("policy", "noise_model", "pruned_at")]
                records = [db.execute(f"SELECT {', '.join(kept_columns)} FROM jobs WHERE job_id = ?", row).fetchone()
                           for row in rows]
                db.executemany("DELETE FROM jobs WHERE job_id = ?", rows)
                db.executemany(
                    f"INSERT INTO jobs ({', '.join(kept_columns)}, policy, noise_model, pruned_at)"
                    f" VALUES ({', '.join('?' * len(kept_columns))}, '{{}}', '', ?)",
                    (record + (max(now_wall, 1e-6),) for record in records))
            if self._pruned_count is None:  # (once: a count over the index of pruned jobs)
                self._pruned_count = db.execute("SELECT count(*) FROM jobs WHERE pruned_at > 0").fetchone()[0]
            else:
                self._pruned_count += len(ids)
            deleted = 0
            if 0 < keep_pruned < self._pruned_count:
                deleted = db.execute(
                    "DELETE FROM jobs WHERE job_id IN"
                    " (SELECT job_id FROM jobs WHERE pruned_at > 0 ORDER BY finished_at LIMIT ?)",
                    (min(self._pruned_count - keep_pruned, limit),)).rowcount
                self._pruned_count -= deleted
        return ids, deleted

    def oldest_kept(self) -> float | None:
        """``finished_at`` of the oldest finished job whose results are kept (None: none). Call
        from the writer thread."""
        row = self._write_db.execute(
            f"SELECT finished_at FROM jobs WHERE pruned_at = 0 AND {_FINAL} ORDER BY finished_at LIMIT 1").fetchone()
        return row[0] if row else None

    def _job_from_row(self, row: tuple, with_payloads: bool) -> tuple[Job, Results]:
        (job_id, created_at, state, seed, method, policy, memory, noise_model, error, finished_at, user, priority,
         pruned_at, shots_total, num_circuits) = row
        if pruned_at > 0:
            return PrunedJob(
                job_id=job_id, created_at=created_at, state=state, seed=seed, method=method,
                policy=PlanningPolicy.from_dict(json.loads(policy)), infos=[], shots=[], params=[], qpy=[],
                memory=bool(memory), error=error, finished_at=finished_at, user=user, priority=priority,
                stored_shots_total=shots_total, stored_num_circuits=num_circuits, pruned_at=pruned_at), {}
        circuits = self._db.execute(
            f"SELECT info, shots, params, observables{', qpy' if with_payloads else ''} FROM circuits WHERE job_id = ?"
            " ORDER BY idx", (job_id,)
        ).fetchall()
        results = self._db.execute(
            "SELECT shard_index, result FROM shard_results WHERE job_id = ?", (job_id,)
        ).fetchall()
        job = Job(
            job_id=job_id, created_at=created_at, state=state, seed=seed, method=method,
            policy=PlanningPolicy.from_dict(json.loads(policy)),
            infos=[_info_from_json(c[0]) for c in circuits],
            shots=[c[1] for c in circuits],
            params=[common_pb2.ParameterValues.FromString(c[2]) if c[2] is not None else None for c in circuits],
            qpy=[c[4] for c in circuits] if with_payloads else [],
            memory=bool(memory), noise_model=noise_model, error=error, finished_at=finished_at,
            user=user, priority=priority,
            observables=[tuple(json.loads(c[3])) for c in circuits] if circuits and circuits[0][3] else [],
        )
        return job, {idx: list(common_pb2.ShardResult.FromString(blob).results) for idx, blob in results}

_COLUMNS = ("job_id", "created_at", "state", "seed", "method", "policy", "num_circuits", "shots_total", "memory",
            "noise_model", "request_key", "error", "finished_at", "user", "priority", "pruned_at")
"""Every column of ``jobs``."""

_JOB_COLUMNS = ("job_id, created_at, state, seed, method, policy, memory, noise_model, error, finished_at, user,"
                " priority, pruned_at, shots_total, num_circuits")


class _Transaction:
    """``BEGIN IMMEDIATE`` (a write: takes the write lock at once) or ``BEGIN`` (a consistent read)
    ... ``COMMIT``, or ``ROLLBACK`` on an error."""

    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self.db = db
        self.begin = begin

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute(self.begin)
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
