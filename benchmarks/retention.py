"""qscale coordinator state under retention: the SQLite file's size and the time one prune takes
while a steady stream of small jobs is submitted, finished and pruned.

What runs
---------
Only the coordinator's :class:`~qscale.coordinator.store.Store`, in this process, on a fresh
state directory (a temporary one unless ``--state-dir``): no gRPC, no nodes. Per round ("one
second" of a busy coordinator) ``--per-round`` jobs of one 2-qubit circuit each (a Bell pair,
its QPY as a client sends it) are inserted as intake does (one transaction each), then one
counted shard result of about ``--result-bytes`` and the final state of each are committed in
one transaction (as the writer thread groups them), then :meth:`Store.prune` runs once with
``--keep``, ``--keep-pruned`` (no time limit), as the runtime's tick does at most once a second.
Transactions are fsynced as in production (``synchronous=FULL``) unless ``--no-sync``.

What is measured
----------------
Every ``--report`` jobs: the rows of ``jobs``, ``circuits`` and ``shard_results``; the size
of ``state.sqlite3`` and of its WAL file; the pages on SQLite's free list; and the time of the
prunes since the last report (median and largest, milliseconds, wall clock around the call).
At the end: the file's size once the limits were reached against its size at the end (freed
pages are used again, so it should barely move).

Usage::

    python benchmarks/retention.py                                  # 10,000 jobs, keep 1,000 / 2,000
    python benchmarks/retention.py --jobs 150000 --keep 10000 --keep-pruned 100000 --no-sync

Nothing is written inside the checkout. Exit status: 0; 1 when the file grew by more than half
after the limits were reached.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from qiskit import QuantumCircuit

from qscale.circuits import describe, dump_qpy
from qscale.coordinator.decisions import FinishJob, RecordShard
from qscale.coordinator.jobs import DONE, Job
from qscale.coordinator.planner import PlanningPolicy
from qscale.coordinator.store import Store
from qscale.proto.v1 import common_pb2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in all (default 10,000)")
    parser.add_argument("--per-round", type=int, default=100, help="jobs finished between two prunes (100)")
    parser.add_argument("--keep", type=int, default=1000, help="keep_jobs: results kept (1,000)")
    parser.add_argument("--keep-pruned", type=int, default=2000, help="keep_pruned_jobs: records kept (2,000)")
    parser.add_argument("--result-bytes", type=int, default=200, help="size of each job's shard result (200)")
    parser.add_argument("--report", type=int, default=1000, help="print a line every this many jobs (1,000)")
    parser.add_argument("--no-sync", action="store_true", help="no fsync per transaction (synchronous=OFF)")
    parser.add_argument("--state-dir", help="state directory (default: a temporary one, removed)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    info, qpy = describe(qc), dump_qpy(qc)
    payload = common_pb2.ShardResult(results=[common_pb2.CircuitCounts(
        circuit_index=0, set_index=0, memory=b"\x00" * max(0, args.result_bytes - 20))])
    with tempfile.TemporaryDirectory(prefix="qscale-retention-") as temp:
        store = Store(args.state_dir or temp)
        if args.no_sync:
            for db in (store._intake_db, store._write_db):
                db.execute("PRAGMA synchronous=OFF")
        path = Path(store.path) / "state.sqlite3"
        wal = path.with_name(path.name + "-wal")
        print(f"{args.jobs:,} jobs, {args.per_round} per prune, keep {args.keep:,} results and {args.keep_pruned:,} "
              f"records, {'no fsync' if args.no_sync else 'fsync'}; state in {store.path}")
        print(f"{'jobs':>8} {'jobs rows':>9} {'circuits':>8} {'results':>8} {'file MiB':>8} {'wal MiB':>8} "
              f"{'free pg':>8} {'prune ms':>9} {'max ms':>7} {'s':>6}")
        started = time.perf_counter()
        wall = time.time()
        prune_ms: list[float] = []
        size_at_limit = 0
        size = 0
        try:
            done = 0
            while done < args.jobs:
                batch = [Job(uuid.uuid4().hex[:16], wall, 7, "automatic", PlanningPolicy(), [info], [100], [None],
                             [qpy]) for _ in range(min(args.per_round, args.jobs - done))]
                for job in batch:
                    store.insert_job(job)
                wall += 1.0
                writes: list[RecordShard | FinishJob] = []
                for job in batch:
                    writes.append(RecordShard(job.job_id, 0, payload, "node", f"{job.job_id}:0:x", wall))
                    writes.append(FinishJob(job.job_id, DONE, "", wall))
                store.apply(writes)
                t0 = time.perf_counter()
                store.prune(args.keep, None, args.keep_pruned, now_wall=wall)
                prune_ms.append(1000 * (time.perf_counter() - t0))
                before, done = done, done + len(batch)
                size = path.stat().st_size
                if not size_at_limit and done >= args.keep + args.keep_pruned:
                    size_at_limit = size
                if done // args.report != before // args.report or done == args.jobs:
                    db = store._db
                    rows = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                            for t in ("jobs", "circuits", "shard_results")]
                    free = db.execute("PRAGMA freelist_count").fetchone()[0]
                    print(f"{done:>8,} {rows[0]:>9,} {rows[1]:>8,} {rows[2]:>8,} {size / 2**20:>8.2f} "
                          f"{(wal.stat().st_size if wal.exists() else 0) / 2**20:>8.2f} {free:>8,} "
                          f"{statistics.median(prune_ms):>9.2f} {max(prune_ms):>7.2f} "
                          f"{time.perf_counter() - started:>6.1f}")
                    prune_ms = []
        finally:
            store.close()
    if size_at_limit:
        print(f"file once the limits were reached: {size_at_limit / 2**20:.2f} MiB; at the end: {size / 2**20:.2f} MiB "
              f"({size / size_at_limit:.2f}x)")
        return 1 if size > 1.5 * size_at_limit else 0
    print("the limits were not reached: run more jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
