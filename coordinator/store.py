"""Durable coordinator state in SQLite (WAL, ``synchronous=FULL``).

What is written here survives a coordinator restart: accepted jobs with their circuits and
parameter values, every counted shard result, and final job states. A new job is committed
before its submitter hears of it; shard results and final states are committed in groups by
the runtime's writer thread (:meth:`Store.apply`), in the order they were decided, before a
job is reported final. A lock file keeps a second coordinator off the same state directory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path

from qscale.circuits import CircuitInfo
from qscale.coordinator.decisions import FinishJob, RecordShard
from qscale.coordinator.jobs import QUEUED, Job
from qscale.coordinator.migrations import migrate
from qscale.coordinator.planner import PlanningPolicy
from qscale.errors import FailedPreconditionError
from qscale.proto.v1 import common_pb2

__all__ = ["Store", "SCHEMA_VERSION"]

Results = dict[int, list[common_pb2.CircuitCounts]]
"""Counted results of a job's shards: shard index -> one result per experiment."""

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

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
    finished_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs(created_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request_key ON jobs(request_key) WHERE request_key IS NOT NULL;
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
"""


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
                " memory, noise_model, request_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.job_id, job.created_at, QUEUED, job.seed, job.method,
                 json.dumps(dataclasses.asdict(job.policy)), len(job.infos), job.shots_total, int(job.memory),
                 job.noise_model, job.request_key or None),
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
        """One job with its shard results, or None."""
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

    def recent_jobs(self, limit: int) -> list[tuple[str, float, int, int, int, str, float]]:
        """(job_id, created_at, state, shots_total, num_circuits, error, finished_at) of the newest jobs."""
        return self._db.execute(
            "SELECT job_id, created_at, state, shots_total, num_circuits, error, finished_at"
            " FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
        ).fetchall()

    def _job_from_row(self, row: tuple, with_payloads: bool) -> tuple[Job, Results]:
        job_id, created_at, state, seed, method, policy, memory, noise_model, error, finished_at = row
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
            observables=[tuple(json.loads(c[3])) for c in circuits] if circuits and circuits[0][3] else [],
        )
        return job, {idx: list(common_pb2.ShardResult.FromString(blob).results) for idx, blob in results}

_JOB_COLUMNS = "job_id, created_at, state, seed, method, policy, memory, noise_model, error, finished_at"


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
