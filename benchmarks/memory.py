"""qscale coordinator memory: peak RSS while it holds a result of about 1,000,000 distinct outcomes.

What runs
---------
* A real coordinator process (``python -m qscale.coordinator serve``, started and stopped by
  ``benchmarks/scale.py``'s :class:`Coordinator`) on ``127.0.0.1``, port chosen by the OS, a fresh
  state directory, its environment cleared of ``QSCALE_*`` variables.
* A real node process (``python -m qscale.node --coordinator ADDRESS``) in its own session, with
  every core this process may use (``--cores``) and as many slots (``--slots``), so that the
  coordinator merges the outcomes of several shards as they come.
* This process as the client (``qscale.Client``): a warm-up job (the same circuit, 1,000 shots:
  circuit decoding, planning, the node's workers, the result path), an idle window (the
  baseline), then one job of ``--qubits`` qubits, H on each, all measured (``measure_all``),
  ``--shots`` shots, Aer's ``stabilizer`` method: every outcome equally likely, so about
  ``2**q * (1 - exp(-shots / 2**q))`` distinct outcomes (24 qubits x 1,031,000 shots: ~1.0M).
  Its result is fetched with ``job.result()`` once the job is done (timed), then once more as the
  raw ``GetResult`` message (to read its size). Everything started is stopped in ``finally``
  (also on Ctrl-C, SIGTERM or errors).

What is measured
----------------
The coordinator process's own memory, from ``/proc/PID/status`` (its sandbox children, which
decode circuits, are separate processes and not counted): ``VmRSS`` sampled every 0.1 s from
its start, and ``VmHWM`` (the kernel's high-water mark, catching peaks between samples).

* baseline: median ``VmRSS`` over the idle window after the warm-up job;
* held: ``VmRSS`` when the job is done, before its result is fetched;
* peak: the highest sampled ``VmRSS`` from submission until the result is fetched, or
  ``VmHWM`` at the end where it rose above its value at the baseline (it only counts peaks
  since the process started, which the warm-up may already hold);
* after: ``VmRSS`` ``--after`` seconds after the fetch;
* **bytes per distinct outcome** = (peak - baseline) / distinct outcomes (and the same for held);
* job wall time (submit to done, as the client sees it; and the coordinator's own figure),
  result fetch time (``job.result()``: ``GetResult`` plus decoding), the ``JobResult`` message's
  size and the distinct outcomes in it; the result's shots are checked against ``--shots``.

For comparison, unless ``--no-old-estimate``: an *estimate* of the representation before
packed outcomes (counts as a dict of Aer's hexadecimal strings to ints), built in this process
from the same outcomes and measured with ``tracemalloc``: one such dict, so a lower bound on
what the old coordinator held.

Usage::

    python benchmarks/memory.py                  # 24 qubits x 1,031,000 shots: ~1.0M outcomes (~1 min)
    python benchmarks/memory.py --quick          # 20 qubits x 100,000 shots: ~95,000 outcomes
    python benchmarks/memory.py --json /tmp/memory.json

Nothing is written inside the checkout unless ``--json`` says so. Exit status: 0 the result was
right; 1 its shots were not those asked for; 2 the benchmark could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.scale import (  # noqa: E402 - the repository root is on the path from here
    BenchmarkError,
    Coordinator,
    MemorySampler,
    SessionProcess,
    machine_info,
    proc_memory,
    run_guarded,
)

QUBITS, SHOTS = 24, 1_031_000
QUICK_QUBITS, QUICK_SHOTS = 20, 100_000
SAMPLE_PERIOD_S = 0.1
WARMUP_SHOTS = 1_000
_NODE_START_TIMEOUT_S = 60.0
MIB = 1 << 20


class Node(SessionProcess):
    """A ``qscale-node`` subprocess in its own session; stopped with SIGTERM (it drains), then SIGKILL
    of its session (its workers too)."""

    def __init__(self, address: str, slots: int, cores: int, log_path: Path, workdir: Path) -> None:
        super().__init__([sys.executable, "-m", "qscale.node", "--coordinator", address, "--name", "memory-bench",
                          "--slots", str(slots), "--cores", str(cores), "--parent-pid", str(os.getpid()),
                          "--drain-grace", "5"], log_path)
        self.workdir = workdir

    def start(self) -> None:
        self.launch(self.workdir)


def hadamard_circuit(qubits: int) -> Any:
    from qiskit import QuantumCircuit

    qc = QuantumCircuit(qubits, name=f"h{qubits}")
    qc.h(range(qubits))
    qc.measure_all()
    return qc


def expected_distinct(qubits: int, shots: int) -> float:
    space = 2.0 ** qubits
    return space * -math.expm1(-shots / space)


def raw_result_bytes(address: str, job_id: str, timeout: float) -> tuple[int, float]:
    """(serialized size of the ``JobResult`` message, seconds of the bare ``GetResult`` call)."""
    import grpc

    from qscale.proto.v1 import jobs_pb2, jobs_pb2_grpc

    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        start = time.perf_counter()
        reply = stub.GetResult(jobs_pb2.JobRef(job_id=job_id), timeout=timeout)
        seconds = time.perf_counter() - start
    return reply.ByteSize(), seconds


def old_encoding_estimate(outcomes: Any) -> dict[str, Any]:
    """Bytes of the outcomes as the old ``{"0x...": count}`` dict, built here under tracemalloc."""
    keys = outcomes.keys.tolist() if outcomes.width <= 8 else outcomes.integers()
    tracemalloc.start()
    try:
        counts = outcomes.counts.tolist()
        old = {hex(k): c for k, c in zip(keys, counts)}
        del counts
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    distinct = len(old)
    del old
    return {"representation": "dict of hexadecimal str -> int (estimate, built in the benchmark process)",
            "bytes": current, "bytes_per_outcome": current / distinct if distinct else 0.0}


def _window(sampler: MemorySampler, start: float, end: float) -> list[int]:
    return [rss for t, rss, _ in sampler.samples if start <= t <= end]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import qscale

    machine = machine_info()
    load = machine["load_average_at_start"]
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({machine['cores_usable']} cores)",
          flush=True)
    if load[0] >= 1.0:
        print("warning: the machine is busy (load >= 1.0): the timings will be slow; memory less so", flush=True)
    cores = args.cores or len(os.sched_getaffinity(0))
    slots = args.slots or cores
    circuit = hadamard_circuit(args.qubits)
    workdir = Path(tempfile.mkdtemp(prefix="qscale-memory-"))
    coordinator = Coordinator(workdir, 1.0, 10.0, args.log_level, workdir / "coordinator.log")
    node: Node | None = None
    sampler: MemorySampler | None = None
    client: Any = None
    started_at = _dt.datetime.now(_dt.timezone.utc)
    try:
        address = coordinator.start()
        sampler = MemorySampler(coordinator.pid, SAMPLE_PERIOD_S)
        sampler.start()
        node = Node(address, slots, cores, workdir / "node.log", workdir)
        node.start()
        client = qscale.Client(address, timeout=args.timeout)
        try:
            client.wait_for_nodes(1, timeout=_NODE_START_TIMEOUT_S)
        except qscale.QScaleError as exc:
            raise BenchmarkError(f"the node did not join: {exc}\n{node.log_tail()}") from exc
        print(f"cluster up: coordinator {address} (pid {coordinator.pid}), 1 node with {slots} slots, "
              f"{cores} cores", flush=True)

        try:
            warm = client.submit(circuit, shots=WARMUP_SHOTS, seed=args.seed, method=args.method)
            warm.result(timeout=args.timeout)
        except qscale.QScaleError as exc:
            raise BenchmarkError(f"the warm-up job failed: {exc}\n{coordinator.log_tail()}\n{node.log_tail()}") from exc
        idle_start = time.monotonic()
        time.sleep(args.idle)
        idle_end = time.monotonic()
        idle = _window(sampler, idle_start, idle_end)
        if not idle:
            raise BenchmarkError("no memory sample of the coordinator in the idle window")
        baseline = int(statistics.median(idle))
        hwm_baseline = proc_memory(coordinator.pid)[1]

        print(f"job: {args.qubits} qubits x {args.shots:,} shots ({args.method}), "
              f"~{expected_distinct(args.qubits, args.shots):,.0f} distinct outcomes expected", flush=True)
        submitted = time.monotonic()
        try:
            job = client.submit(circuit, shots=args.shots, seed=args.seed, method=args.method)
            job.wait(timeout=args.timeout)
            done = time.monotonic()
            held, hwm_done = proc_memory(coordinator.pid)
            result = job.result(timeout=args.timeout)
            fetched = time.monotonic()
        except qscale.QScaleError as exc:
            raise BenchmarkError(f"the job failed: {exc}\n{coordinator.log_tail()}\n{node.log_tail()}") from exc
        message_bytes, raw_fetch_s = raw_result_bytes(address, job.job_id, args.timeout)
        fetched_raw = time.monotonic()
        time.sleep(args.after)
        after, hwm_end = proc_memory(coordinator.pid)
        sampler.stop()
        peak_job = max(_window(sampler, submitted, done) + [held])
        peak_fetch = max(_window(sampler, done, fetched_raw) + [held])
        sampled_peak = max(peak_job, peak_fetch)
        circuit_result = result.results[0]
        outcomes = circuit_result.outcomes
        distinct = len(outcomes)
        shots_ok = circuit_result.shots == args.shots and outcomes.shots == args.shots
        peak = max(sampled_peak, hwm_end if hwm_end > hwm_baseline else 0)
        report: dict[str, Any] = {
            "benchmark": "memory",
            "started_at": started_at.isoformat(timespec="seconds"),
            "machine": machine,
            "qubits": args.qubits,
            "shots": args.shots,
            "method": args.method,
            "node": {"slots": slots, "cores": cores},
            "shards": len({a.shard_index for a in result.attempts}),
            "distinct_outcomes": distinct,
            "distinct_outcomes_expected": round(expected_distinct(args.qubits, args.shots)),
            "shots_counted": outcomes.shots,
            "shots_ok": shots_ok,
            "coordinator": {
                "baseline_rss": baseline,
                "baseline_rss_range": [min(idle), max(idle)],
                "baseline_hwm": hwm_baseline,
                "held_rss": held,
                "peak_rss_sampled": sampled_peak,
                "peak_rss_sampled_job": peak_job,
                "peak_rss_sampled_fetch": peak_fetch,
                "hwm_job_done": hwm_done,
                "hwm_end": hwm_end,
                "peak": peak,
                "after_rss": after,
                "peak_minus_baseline": peak - baseline,
                "held_minus_baseline": held - baseline,
                "bytes_per_outcome_peak": (peak - baseline) / distinct if distinct else None,
                "bytes_per_outcome_held": (held - baseline) / distinct if distinct else None,
                "samples": len(sampler.samples),
                "sample_period_s": SAMPLE_PERIOD_S,
            },
            "job_wall_s": done - submitted,
            "job_wall_coordinator_s": result.wall_time_s,
            "fetch_s": fetched - done,
            "fetch_raw_s": raw_fetch_s,
            "result_message_bytes": message_bytes,
            "result_packed_bytes": int(outcomes.keys.nbytes + outcomes.counts.nbytes),
        }
    finally:
        if sampler is not None:
            sampler.stop()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if node is not None:
            node.stop()
        coordinator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.no_old_estimate:
        report["old_encoding_estimate"] = old_encoding_estimate(outcomes)
    return report


def _mib(value: float) -> str:
    return f"{value / MIB:,.1f} MiB"


def print_report(report: dict[str, Any]) -> None:
    c = report["coordinator"]
    load = report["machine"]["load_average_at_start"]
    rows = [
        ("load average at start", f"{load[0]:.2f}"),
        ("job", f"{report['qubits']} qubits x {report['shots']:,} shots, {report['method']}, "
                f"{report['shards']} shards"),
        ("distinct outcomes (expected)", f"{report['distinct_outcomes']:,} ({report['distinct_outcomes_expected']:,})"),
        ("shots counted", f"{report['shots_counted']:,} ({'right' if report['shots_ok'] else 'WRONG'})"),
        ("coordinator baseline RSS (idle, median)", _mib(c["baseline_rss"])),
        ("coordinator RSS holding the result", _mib(c["held_rss"])),
        ("coordinator peak RSS sampled (job / fetch)",
         f"{_mib(c['peak_rss_sampled_job'])} / {_mib(c['peak_rss_sampled_fetch'])}"),
        ("coordinator VmHWM (baseline / job done / end)",
         f"{_mib(c['baseline_hwm'])} / {_mib(c['hwm_job_done'])} / {_mib(c['hwm_end'])}"),
        ("coordinator peak (sampled, or VmHWM if it rose)", _mib(c["peak"])),
        ("coordinator RSS after", _mib(c["after_rss"])),
        ("peak - baseline", _mib(c["peak_minus_baseline"])),
        ("bytes per distinct outcome (peak)", f"{c['bytes_per_outcome_peak']:.1f}"),
        ("bytes per distinct outcome (held)", f"{c['bytes_per_outcome_held']:.1f}"),
        ("job wall time (client / coordinator)", f"{report['job_wall_s']:.2f} s / {report['job_wall_coordinator_s']:.2f} s"),
        ("result fetch (job.result() / bare GetResult)", f"{report['fetch_s']:.3f} s / {report['fetch_raw_s']:.3f} s"),
        ("JobResult message", f"{report['result_message_bytes']:,} bytes "
                              f"({report['result_message_bytes'] / max(1, report['distinct_outcomes']):.1f} per outcome)"),
        ("packed outcomes on the client", f"{report['result_packed_bytes']:,} bytes"),
    ]
    old = report.get("old_encoding_estimate")
    if old:
        rows.append(("old encoding, ESTIMATE (hex-str dict, tracemalloc)",
                     f"{_mib(old['bytes'])}, {old['bytes_per_outcome']:.1f} bytes per outcome"))
    width = max(len(name) for name, _ in rows)
    print()
    print("qscale coordinator memory with one large result")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--qubits", type=int, default=None,
                   help=f"qubits of the all-H circuit, all measured (default {QUBITS}; {QUICK_QUBITS} with --quick)")
    p.add_argument("--shots", type=int, default=None,
                   help=f"shots of the job (default {SHOTS:,}; {QUICK_SHOTS:,} with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: a smaller job (unless --qubits, --shots say)")
    p.add_argument("--method", default="stabilizer", help="Aer method of the job (default stabilizer)")
    p.add_argument("--seed", type=int, default=1, help="job seed (default 1)")
    p.add_argument("--cores", type=int, default=0, help="the node's cores (default 0: every core this process may use)")
    p.add_argument("--slots", type=int, default=0, help="the node's slots (default 0: as many as its cores)")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of idle window for the baseline (default 3)")
    p.add_argument("--after", type=float, default=2.0, help="seconds after the fetch before the last reading (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for a job or a call, s (default 600)")
    p.add_argument("--log-level", default="WARNING", help="the coordinator's log level (default WARNING)")
    p.add_argument("--no-old-estimate", action="store_true",
                   help="skip the in-process estimate of the old hex-string encoding")
    p.add_argument("--json", metavar="FILE", default=None, help="write the figures to FILE as JSON")
    args = p.parse_args(argv)
    if args.qubits is None:
        args.qubits = QUICK_QUBITS if args.quick else QUBITS
    if args.shots is None:
        args.shots = QUICK_SHOTS if args.quick else SHOTS
    if not 1 <= args.qubits <= 63 or args.shots < 1 or args.cores < 0 or args.slots < 0:
        p.error("--qubits must be 1 to 63, --shots >= 1, --cores and --slots >= 0")
    if args.idle <= 0 or args.after < 0:
        p.error("--idle must be > 0 and --after >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_guarded(run, args, "memory benchmark")
    if isinstance(report, int):
        return report
    print_report(report)
    if args.json:
        output = Path(args.json)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"results written to {output}")
    if not report["shots_ok"]:
        print(f"wrong result: {report['shots_counted']:,} shots counted, {report['shots']:,} asked for",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
