"""The cost of one Watch progress update on the coordinator's event loop, by number of distinct
outcomes: a job of one 20-bit circuit whose counted results hold 1 to 2**20 distinct outcomes
(and a running shard's partial chunk of 1,000 more), asked for its top 10 outcomes, as the CLI's
progress view does. The outcomes are merged and selected as arrays, once per change of the job
(an update after a change pays the merge; one with nothing new reads the cached top k), and
only the 10 shown are formatted.

Usage::

    python benchmarks/progress.py            # prints a table; --json FILE to keep it
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from qiskit import QuantumCircuit

from qscale.circuits import describe, dump_qpy
from qscale.coordinator import views
from qscale.coordinator.jobs import Job
from qscale.coordinator.planner import PlanningPolicy
from qscale.outcomes import Outcomes
from qscale.proto.v1 import common_pb2

BITS = 20


def job_with(outcomes: int) -> Job:
    qc = QuantumCircuit(BITS)
    qc.h(range(BITS))
    qc.measure_all()
    job = Job("bench", 0.0, 1, "automatic", PlanningPolicy(), [describe(qc)], [outcomes], [None], [dump_qpy(qc)])
    job.start(job.plan(), {})
    counted = Outcomes(3, np.arange(outcomes, dtype=np.uint64), 1 + np.arange(outcomes, dtype=np.int64) % 7)
    job.count(job.shards[0], [common_pb2.CircuitCounts(circuit_index=0, set_index=0, outcomes=counted.to_proto())])
    job.totals[0].add_partial(Outcomes(3, np.arange(1000, dtype=np.uint64), np.ones(1000, dtype=np.int64)))
    return job


def measure(outcomes: int, repeat: int) -> tuple[float, float]:
    """Median seconds of an update (after a one-outcome chunk arrived; with nothing new)."""
    job = job_with(outcomes)
    chunk = Outcomes(3, np.array([5], dtype=np.uint64), np.ones(1, dtype=np.int64))
    changed, unchanged = [], []
    for i in range(repeat):
        job.totals[0].add_partial(chunk, 1 if i % 2 == 0 else -1)
        start = time.perf_counter()
        views.job_progress(job, True, 10)
        mid = time.perf_counter()
        views.job_progress(job, True, 10)
        changed.append(mid - start)
        unchanged.append(time.perf_counter() - mid)
    return statistics.median(changed), statistics.median(unchanged)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = {}
    for exponent in (0, 10, 16, 20):
        changed, unchanged = rows[2**exponent] = measure(2**exponent, args.repeat)
        print(f"{2**exponent:>9,} distinct outcomes: {changed * 1e6:9.1f} us per update after a chunk arrived, "
              f"{unchanged * 1e6:7.1f} us with nothing new (top 10)")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
