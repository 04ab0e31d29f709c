"""The cost of one Watch progress update on the coordinator's event loop, by number of distinct
outcomes: a job of one 20-bit circuit whose counted results hold 1 to 2**20 distinct outcomes
(and a running shard's partial chunk of 1,000 more), asked for its top 10 outcomes, as the CLI's
progress view does. The update must cost the same whatever the number of outcomes.

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

from qiskit import QuantumCircuit

from qscale.circuits import describe, dump_qpy
from qscale.coordinator import views
from qscale.coordinator.jobs import Job
from qscale.coordinator.planner import PlanningPolicy
from qscale.proto.v1 import common_pb2

BITS = 20


def job_with(outcomes: int) -> Job:
    qc = QuantumCircuit(BITS)
    qc.h(range(BITS))
    qc.measure_all()
    job = Job("bench", 0.0, 1, "automatic", PlanningPolicy(), [describe(qc)], [outcomes], [None], [dump_qpy(qc)])
    job.start(job.plan(), {})
    counts = {hex(k): 1 + k % 7 for k in range(outcomes)}
    job.count(job.shards[0], [common_pb2.CircuitCounts(circuit_index=0, set_index=0, counts=counts)])
    job.totals[0].add_partial({hex(k): 1 for k in range(1000)}.items())
    return job


def measure(outcomes: int, repeat: int) -> float:
    job = job_with(outcomes)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        views.job_progress(job, True, 10)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = {}
    for exponent in (0, 10, 16, 20):
        rows[2**exponent] = measure(2**exponent, args.repeat)
        print(f"{2**exponent:>9,} distinct outcomes: {rows[2**exponent] * 1e6:8.1f} us per update (top 10)")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
