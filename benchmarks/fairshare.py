"""qscale fair-sharing benchmark: priority classes, fair share between users and between jobs,
and per-user quotas, measured on a real local cluster.

What runs
---------
One :class:`qscale.LocalCluster` for the whole run: the coordinator in this process and
``--nodes`` real ``qscale-node`` processes (``--slots`` slots each, one simulation thread per
slot, real qiskit-aer) on ``127.0.0.1``, ports chosen by the OS. Authentication is on: a client
tokens file in a temporary directory names the users (``alice``, ``bob``: weight 1; ``carol``:
weight 3, ``dave``: weight 1; ``quota``: ``max-jobs=2 max-queued-shots=20000``; ``root``:
admin), and each user submits through a client of their own (``LocalCluster.client_for``). The
coordinator plans with ``target_shards`` = ``--target-shards`` (64), so that a job of 40
circuits, each sampled from one final state (its shots are never split), is cut into one shard
per circuit (the plan's explanation is printed).

Work: "layered" circuits: ``--qubits`` (18) qubits, layers of a ``u`` gate with random angles
on every qubit and ``cx`` between random pairs, all measured, 100 shots (seeded, so every run
simulates the same circuits); the long job's have ``--long-layers`` (40) layers, 0.8-2 s of
simulation each on one core of a 2-core VM (depending on what else runs); the backlog jobs'
``--layers`` (15). The short job: 2 circuits of
10 qubits and 4 layers.

Phases and what is measured
---------------------------
1. ``short``: a short job's time alone (median of 3 runs on the idle cluster, submit to
   result, measured by the client); then user ``alice`` submits the long job (40 long
   circuits), and ``--short-after`` (3) s later the short job. Printed: the long job's shard
   duration (median and max of its attempts' run times, from its JobResult attempts), the
   short job's time behind it and the long job's total time. Target: the short job finishes
   within one shard (the longest of the long job's) plus its time alone, plus 0.5 s of slack,
   and in under 10 s (in arrival order it would wait for the whole long job).
2. ``equal`` and ``weighted``: two users (``alice`` and ``bob``, then ``carol`` (weight 3) and
   ``dave``), each with a thread that keeps ``--in-flight`` (3) jobs of theirs unfinished
   (``--circuits`` (6) circuits each), for ``--duration`` (60) s after a ``--settle`` (3) s
   start. Measured: each user's slot-seconds over the window, from ``ListUsers``
   ``slot_seconds`` (an admin's view) read at the window's start and end; cross-checked with
   the attempts of every job (their JobResults): each attempt's run time, clipped to the
   window. Then the jobs left run to their end (not cancelled: cancelling a running shard kills
   its node's worker, and the fresh one takes seconds to start). Target: 50 % +/- 10 points
   each, then 75 / 25 +/- 10 points.
3. ``priority``: ``alice`` queues ``--backlog`` (3) normal jobs of ``--circuits`` circuits, and
   2 s later a HIGH priority job of 4 circuits. Measured, in seconds after its acceptance (when
   ``Submit`` returned: the coordinator places what it can of a job before it answers; the
   Submit call's duration, and when the job's circuits were decoded (its ``created_at``), are
   printed too): its first attempt's dispatch, its first attempt's run start, and the end of the
   first normal shard to end after that (the next free slot); also when the high job and the
   backlog finished, and how many normal attempts began to run after its acceptance and before
   its last shard did. Target: the high job starts running by the next free slot (its first run
   start at most 0.5 s after the first normal shard end after its acceptance).
4. ``quota``: ``quota`` (``max-jobs=2 max-queued-shots=20000``) holds 2 unfinished jobs (1,000
   shots each, waiting behind a HIGH priority job of ``bob``'s); a third submission, then
   (after cancelling one) a job of 19,500 shots. Measured: the refusals' codes, messages and
   latencies. Target per quota: RESOURCE_EXHAUSTED (``ResourceExhaustedError``) within 1 s, the
   message naming the limit (``max-jobs`` / ``max-queued-shots``) and the user's usage (2
   unfinished jobs / 1,000 queued).

Run times of attempts: a JobResult attempt's ``started_at`` is when it was dispatched, which may
be before it runs (a node holds one more shard per slot, waiting; an overbooked shard waits for
the next free slot). A node runs at most ``--slots`` attempts at once, so an attempt's run is
reconstructed from the attempts of its node: it starts when it was dispatched or when a slot
freed (an earlier attempt of that node ended), whichever is later. The coordinator's own record
of the run start (``Attempt.running_at``, read in-process) is printed beside it for the high job.

Every process started (nodes, the coordinator's sandboxes) is stopped at the end, on Ctrl-C,
SIGTERM or an error (``LocalCluster.stop`` in ``finally``; the nodes also exit when this process
dies). Nothing is written except with ``--json`` (the figures) and ``--coordinator-log`` (the
coordinator's log, INFO: every dispatch, ``ahead`` marking an overbooked shard).

Usage::

    python benchmarks/fairshare.py                    # every phase, 60 s windows (~3 minutes on 2 cores)
    python benchmarks/fairshare.py --quick            # smoke run: 12 s windows, a 16-circuit long job (~1 min)
    python benchmarks/fairshare.py --only short       # phase 1 alone
    python benchmarks/fairshare.py --nodes 4 --slots 2 --json /tmp/fairshare.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from qiskit import QuantumCircuit

from qscale.client import Client, Job
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.planner import PlanningPolicy
from qscale.errors import QScaleError, ResourceExhaustedError
from qscale.local import LocalCluster
from qscale.proto.v1 import jobs_pb2
from qscale.results import AttemptRecord, JobResult

PHASES = ("short", "equal", "weighted", "priority", "quota")
SHOTS = 100
USERS = {  # name -> options on its line of the client tokens file
    "alice": "", "bob": "", "carol": "weight=3", "dave": "weight=1",
    "quota": "max-jobs=2 max-queued-shots=20000", "root": "admin",
}
SLACK_S = 0.5  # timing slack of the short-job and priority targets
SHARE_TOLERANCE = 0.10  # +/- on a user's share of slot-seconds
QUOTA_LATENCY_S = 1.0


class Terminated(BaseException):
    """SIGTERM reached the benchmark: unwind through every ``finally`` like Ctrl-C does."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


# ------------------------------------------------------------------------------- workload

def layered(num_qubits: int, layers: int, seed: int) -> QuantumCircuit:
    """``layers`` layers of a random ``u`` on every qubit and ``cx`` between random pairs, all
    measured: a statevector simulation whose cost grows evenly with ``layers``."""
    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(num_qubits, name=f"layered{num_qubits}x{layers}-{seed}")
    for _ in range(layers):
        for q in range(num_qubits):
            qc.u(*rng.uniform(0.0, 2 * np.pi, 3), q)
        order = rng.permutation(num_qubits)
        for a, b in zip(order[::2], order[1::2]):
            qc.cx(int(a), int(b))
    qc.measure_all()
    return qc


def write_tokens(directory: Path) -> dict[str, str]:
    """A client tokens file (mode 600) with one fresh token per user of :data:`USERS`; returns
    user -> token."""
    tokens = {user: f"{user}-{secrets.token_urlsafe(18)}" for user in USERS}
    path = directory / "client.tokens"
    path.touch(mode=0o600)
    path.write_text("".join(f"{tokens[u]} {u} {opts}\n" for u, opts in USERS.items()))
    return tokens


# ---------------------------------------------------------------------- attempts and runs

def run_intervals(results: Iterable[JobResult], slots: int) -> dict[int, tuple[float, float]]:
    """When each attempt (by ``id`` of its :class:`AttemptRecord`) ran: per node, in the order
    the attempts ended, each starts when it was dispatched or when the earliest of the node's
    ``slots`` slots freed, whichever is later (see the module's docstring)."""
    by_node: dict[str, list[AttemptRecord]] = defaultdict(list)
    for result in results:
        for attempt in result.attempts:
            if attempt.ended_at:
                by_node[attempt.node_id].append(attempt)
    runs: dict[int, tuple[float, float]] = {}
    for attempts in by_node.values():
        free = [0.0] * max(1, slots)
        for attempt in sorted(attempts, key=lambda a: a.ended_at):
            start = max(attempt.started_at, heapq.heappop(free))
            start = min(start, attempt.ended_at)
            runs[id(attempt)] = (start, attempt.ended_at)
            heapq.heappush(free, attempt.ended_at)
    return runs


def any_result(client: Client, job: Job, timeout: float = 120.0) -> JobResult:
    """The result of a final job, cancelled or failed ones too (``Job.result`` raises on those)."""
    job.wait(timeout)
    reply = client._stub.GetResult(jobs_pb2.JobRef(job_id=job.job_id), timeout=30)
    return JobResult.from_proto(reply)


def timed_result(job: Job, submitted: float, timeout: float) -> float:
    """Seconds from ``submitted`` (monotonic) until the job's result is in hand."""
    job.result(timeout=timeout)
    return time.monotonic() - submitted


def verdict(met: bool) -> str:
    return "target met" if met else "target MISSED"


# ---------------------------------------------------------------------------- the phases

class Bench:
    """The cluster and the users' clients for every phase."""

    def __init__(self, args: argparse.Namespace, cluster: LocalCluster, tokens: dict[str, str]) -> None:
        self.args = args
        self.cluster = cluster
        self.tokens = tokens
        self.admin = cluster.client_for(tokens["root"])

    def client(self, user: str) -> Client:
        return self.cluster.client_for(self.tokens[user])

    def circuits(self, count: int, layers: int, seed: int) -> list[QuantumCircuit]:
        return [layered(self.args.qubits, layers, seed + i) for i in range(count)]

    # ------------------------------------------------------------------ 1. short behind long

    def short(self) -> dict[str, Any]:
        args = self.args
        alice = self.client("alice")
        short = [layered(10, 4, 1), layered(10, 4, 2)]
        alone = []
        for k in range(3):
            t = time.monotonic()
            alone.append(timed_result(alice.submit(short, shots=1000, seed=k), t, 120))
        short_alone = statistics.median(alone)
        long_circuits = self.circuits(args.long_circuits, args.long_layers, 1000)
        t_long = time.monotonic()
        long_job = alice.submit(long_circuits, shots=SHOTS, seed=7)
        plan = long_job.status().plan
        time.sleep(args.short_after)
        t_short = time.monotonic()
        short_job = alice.submit(short, shots=1000, seed=0)
        short_behind = timed_result(short_job, t_short, 300)
        long_total = timed_result(long_job, t_long, 900)
        long_result = long_job.result(timeout=60)
        short_result = short_job.result(timeout=60)
        runs = run_intervals([long_result, short_result], args.slots)
        durations = [end - start for a in long_result.attempts if a.outcome == "done"
                     for start, end in [runs[id(a)]]]
        shard_median, shard_max = statistics.median(durations), max(durations)
        bound = shard_max + short_alone + SLACK_S
        met = short_behind <= bound and short_behind < 10.0
        out = {
            "long_circuits": len(long_circuits), "long_shards": long_result.status.shards_total,
            "long_plan": plan.explanation if plan else "", "short_shards": short_result.status.shards_total,
            "long_shard_s_median": shard_median, "long_shard_s_max": shard_max, "short_alone_s": short_alone,
            "short_alone_runs_s": alone, "short_behind_long_s": short_behind, "long_total_s": long_total,
            "short_submitted_after_s": args.short_after, "bound_s": bound, "met": met,
        }
        print(f"[short] long job: {out['long_circuits']} circuits -> {out['long_shards']} shards ({out['long_plan']})")
        print(f"[short] long job's shards ran {shard_median:.2f} s (median), {shard_max:.2f} s (max); "
              f"long job total {long_total:.1f} s")
        print(f"[short] short job ({out['short_shards']} shard(s)): alone {short_alone:.2f} s "
              f"(runs {', '.join(f'{x:.2f}' for x in alone)}); submitted {args.short_after:g} s after the long job: "
              f"{short_behind:.2f} s")
        print(f"[short] {verdict(met)}: {short_behind:.2f} s <= longest shard {shard_max:.2f} + alone "
              f"{short_alone:.2f} + {SLACK_S} = {bound:.2f} s, and < 10 s")
        return out

    # ------------------------------------------------------------------ 2. shares

    def share(self, users: tuple[str, str], expected: tuple[float, float], name: str) -> dict[str, Any]:
        args = self.args
        stop = threading.Event()
        jobs: dict[str, list[Job]] = {u: [] for u in users}
        errors: list[BaseException] = []

        def feed(user: str, seed: int) -> None:
            client = self.client(user)
            unfinished: list[Job] = []
            k = 0
            try:
                while not stop.is_set():
                    unfinished = [j for j in unfinished if not j.done()]
                    while len(unfinished) < args.in_flight and not stop.is_set():
                        job = client.submit(self.circuits(args.circuits, args.layers, seed + 100 * k),
                                            shots=SHOTS, seed=k)
                        k += 1
                        unfinished.append(job)
                        jobs[user].append(job)
                    stop.wait(0.25)
            except BaseException as exc:  # surfaced by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=feed, args=(u, 10_000 * (i + 1)), name=f"feed-{u}", daemon=True)
                   for i, u in enumerate(users)]
        try:
            for thread in threads:
                thread.start()
            time.sleep(args.settle)
            before, t0 = self._slot_seconds(users), time.time()
            stop.wait(args.duration)
            after, t1 = self._slot_seconds(users), time.time()
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        if errors:
            raise errors[0]
        # What is left of the backlog runs to its end, unmeasured: cancelling a running shard kills
        # its node's worker, and the fresh one takes seconds to start (the next phase would see it).
        results = {u: [any_result(self.client(u), j, timeout=600) for j in jobs[u]] for u in users}
        runs = run_intervals([r for rs in results.values() for r in rs], args.slots)
        checked = {u: sum(max(0.0, min(end, t1) - max(start, t0))
                          for r in results[u] for a in r.attempts for start, end in [runs.get(id(a), (0.0, 0.0))])
                   for u in users}
        used = {u: after[u] - before[u] for u in users}
        total, total_checked = sum(used.values()), sum(checked.values())
        shares = {u: used[u] / total if total else 0.0 for u in users}
        shares_checked = {u: checked[u] / total_checked if total_checked else 0.0 for u in users}
        met = all(abs(shares[u] - e) <= SHARE_TOLERANCE for u, e in zip(users, expected))
        capacity = args.nodes * args.slots * (t1 - t0)
        out = {"users": list(users), "expected": list(expected), "window_s": t1 - t0,
               "slot_seconds": used, "shares": shares, "slot_seconds_from_attempts": checked,
               "shares_from_attempts": shares_checked, "utilisation": total / capacity if capacity else 0.0,
               "jobs_submitted": {u: len(jobs[u]) for u in users},
               "jobs_done": {u: sum(0 < r.status.finished_at <= t1 for r in results[u]) for u in users},
               "met": met}
        a, b = users
        print(f"[{name}] {a} vs {b} over {t1 - t0:.1f} s ({out['utilisation']:.0%} of "
              f"{args.nodes * args.slots} slots busy): ListUsers slot-seconds {used[a]:.1f} / {used[b]:.1f} "
              f"= {shares[a]:.1%} / {shares[b]:.1%}; from the attempts {checked[a]:.1f} / {checked[b]:.1f} "
              f"= {shares_checked[a]:.1%} / {shares_checked[b]:.1%}; jobs done by its end {out['jobs_done'][a]} / "
              f"{out['jobs_done'][b]} of {len(jobs[a])} / {len(jobs[b])} submitted")
        print(f"[{name}] {verdict(met)}: {expected[0]:.0%} / {expected[1]:.0%} +/- {SHARE_TOLERANCE:.0%}")
        return out

    def _slot_seconds(self, users: Iterable[str]) -> dict[str, float]:
        seen = {u.name: u.slot_seconds for u in self.admin.users()}
        return {u: seen.get(u, 0.0) for u in users}

    # ------------------------------------------------------------------ 3. priority

    def priority(self) -> dict[str, Any]:
        args = self.args
        alice = self.client("alice")
        backlog = [alice.submit(self.circuits(args.circuits, args.layers, 20_000 + 100 * k), shots=SHOTS, seed=k)
                   for k in range(args.backlog)]
        time.sleep(2.0)
        submitted_wall, t = time.time(), time.monotonic()
        high = alice.submit(self.circuits(4, args.layers, 30_000), shots=SHOTS, seed=1, priority="high")
        accepted = time.time()  # Submit returns once the job is accepted, and placed if it can be
        high_s = timed_result(high, t, 300)
        done_backlog = [job.wait(600) for job in backlog]
        high_result = high.result(timeout=60)
        normal = [job.result(timeout=60) for job in backlog]
        decoded = high_result.status.created_at  # stamped once its circuits are decoded
        runs = run_intervals([high_result, *normal], args.slots)
        high_runs = sorted(runs[id(a)] for a in high_result.attempts)
        first_dispatch = min(a.started_at for a in high_result.attempts) - accepted
        first_run = high_runs[0][0] - accepted
        next_free = min((a.ended_at for r in normal for a in r.attempts if a.ended_at > accepted),
                        default=float("nan")) - accepted
        high_last_start = high_runs[-1][0]
        overtaking = sum(1 for r in normal for a in r.attempts if accepted < runs[id(a)][0] < high_last_start)
        recorded = self._running_at(high.job_id)
        first_run_recorded = min(recorded) - accepted if recorded else float("nan")
        met = first_run <= next_free + SLACK_S
        out = {"backlog_jobs": len(backlog), "backlog_shards": sum(r.status.shards_total for r in normal),
               "high_shards": high_result.status.shards_total, "submit_call_s": accepted - submitted_wall,
               "submit_to_decoded_s": decoded - submitted_wall,
               "first_dispatch_s": first_dispatch, "first_run_s": first_run,
               "first_run_recorded_s": first_run_recorded, "next_normal_end_s": next_free,
               "high_done_s": high_s - (accepted - submitted_wall),
               "backlog_done_s": max(s.finished_at for s in done_backlog) - accepted,
               "normal_started_meanwhile": overtaking, "met": met}
        print(f"[priority] HIGH job ({out['high_shards']} shards) behind {len(backlog)} normal jobs "
              f"({out['backlog_shards']} shards); Submit took {out['submit_call_s']:.2f} s (decoded after "
              f"{out['submit_to_decoded_s']:.2f} s); seconds after it returned: first attempt dispatched "
              f"{first_dispatch:.2f}, running "
              f"{first_run:.2f} (coordinator's record {first_run_recorded:.2f}); next normal shard end "
              f"{next_free:.2f}; high job done {out['high_done_s']:.2f}, backlog done {out['backlog_done_s']:.2f}; "
              f"normal attempts that began running before its last shard did: {overtaking}")
        print(f"[priority] {verdict(met)}: first run {first_run:.2f} s <= next free slot {next_free:.2f} + {SLACK_S} s")
        return out

    def _running_at(self, job_id: str) -> list[float]:
        """The coordinator's record of when each attempt of a job began to run (in-process)."""
        coordinator = self.cluster.coordinator
        if coordinator is None:
            return []

        def read() -> list[float]:
            job = coordinator.server.core.jobs.get(job_id)
            return [a.running_at for a in job.attempts if a.running_at] if job is not None else []

        return coordinator.call(read)

    # ------------------------------------------------------------------ 4. quotas

    def quota(self) -> dict[str, Any]:
        args = self.args
        client = self.client("quota")
        # A backlog ahead of the user's jobs keeps them unfinished while the quotas are tried.
        blocker = self.client("bob").submit(self.circuits(args.circuits, args.long_layers, 40_000), shots=SHOTS,
                                            priority="high")
        held = [client.submit(self.circuits(2, args.layers, 41_000 + 10 * k), shots=500, seed=k) for k in range(2)]
        out: dict[str, Any] = {}
        try:
            out["max_jobs"] = self._refusal(lambda: client.submit(layered(4, 2, 0), shots=10), "max-jobs",
                                            ("2 unfinished",))
            held.pop().cancel()
            out["max_queued_shots"] = self._refusal(lambda: client.submit(layered(4, 2, 0), shots=19_500),
                                                    "max-queued-shots", ("1,000 queued", "20,000"))
            out["jobs_left_unfinished"] = sum(not j.done() for j in held)
        finally:
            for job in (blocker, *held):
                job.cancel()
        for key in ("max_jobs", "max_queued_shots"):
            r = out[key]
            print(f"[quota] over {r['limit']}: {r['error']} in {r['latency_s'] * 1000:.0f} ms: {r['message']!r}")
            print(f"[quota] {verdict(r['met'])}: RESOURCE_EXHAUSTED within {QUOTA_LATENCY_S:g} s, naming the limit "
                  f"and the usage ({', '.join(r['usage'])})")
        out["met"] = out["max_jobs"]["met"] and out["max_queued_shots"]["met"]
        return out

    @staticmethod
    def _refusal(submit: Callable[[], Job], limit: str, usage: tuple[str, ...]) -> dict[str, Any]:
        t = time.monotonic()
        try:
            job = submit()
        except QScaleError as exc:
            latency = time.monotonic() - t
            message = str(exc)
            met = (isinstance(exc, ResourceExhaustedError) and latency <= QUOTA_LATENCY_S and limit in message
                   and all(u in message for u in usage))
            return {"limit": limit, "usage": list(usage), "error": type(exc).__name__, "message": message,
                    "latency_s": latency, "met": met}
        job.cancel()
        return {"limit": limit, "usage": list(usage), "error": "none: accepted", "message": "",
                "latency_s": time.monotonic() - t, "met": False}


# ------------------------------------------------------------------------------ driver

def run(args: argparse.Namespace) -> dict[str, Any]:
    phases = args.only.split(",") if args.only else list(PHASES)
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                           "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qscale-fairshare-") as tmp:
        tokens = write_tokens(Path(tmp))
        config = CoordinatorConfig(policy=PlanningPolicy(target_shards=args.target_shards))
        cluster = LocalCluster(args.nodes, slots_per_node=args.slots, cores_per_node=1, config=config,
                               client_tokens_file=Path(tmp) / "client.tokens")
        try:
            t = time.monotonic()
            cluster.start()
            print(f"cluster: coordinator {cluster.address}, {args.nodes} node(s) x {args.slots} slot(s) up in "
                  f"{time.monotonic() - t:.1f} s")
            bench = Bench(args, cluster, tokens)
            bench.client("alice").submit(layered(4, 2, 0), shots=10).result(timeout=120)  # warm-up
            if "short" in phases:
                out["short"] = bench.short()
            if "equal" in phases:
                out["equal"] = bench.share(("alice", "bob"), (0.5, 0.5), "equal")
            if "weighted" in phases:
                out["weighted"] = bench.share(("carol", "dave"), (0.75, 0.25), "weighted")
            if "priority" in phases:
                out["priority"] = bench.priority()
            if "quota" in phases:
                out["quota"] = bench.quota()
        finally:
            cluster.stop()
    out["wall_s"] = time.monotonic() - started
    ran = [p for p in PHASES if p in out]
    summary = ", ".join(f"{p}: {verdict(out[p]['met'])}" for p in ran)
    print(f"targets met: {sum(out[p]['met'] for p in ran)} of {len(ran)} ({summary}); {out['wall_s']:.0f} s in all")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2, help="node processes (default 2)")
    p.add_argument("--slots", type=int, default=1, help="slots per node (default 1)")
    p.add_argument("--duration", type=float, default=60.0, help="each share window, seconds (default 60)")
    p.add_argument("--quick", action="store_true", help="smoke run: 12 s windows, a 16-circuit long job")
    p.add_argument("--only", help=f"comma-separated phases ({', '.join(PHASES)}); default all")
    p.add_argument("--qubits", type=int, default=18, help="width of the layered circuits (default 18)")
    p.add_argument("--long-layers", type=int, default=40, help="layers of the long job's circuits (default 40)")
    p.add_argument("--long-circuits", type=int, default=40, help="circuits of the long job (default 40)")
    p.add_argument("--layers", type=int, default=15, help="layers of the backlog jobs' circuits (default 15)")
    p.add_argument("--circuits", type=int, default=6, help="circuits per backlog job (default 6)")
    p.add_argument("--in-flight", type=int, default=3, help="unfinished jobs each user keeps (default 3)")
    p.add_argument("--backlog", type=int, default=3, help="normal jobs ahead of the high one (default 3)")
    p.add_argument("--short-after", type=float, default=3.0, help="short job's delay after the long one (3 s)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before a share window opens (default 3)")
    p.add_argument("--target-shards", type=int, default=64, help="the coordinator's target_shards (default 64)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--coordinator-log", type=Path, help="write the coordinator's log (INFO) here")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 12.0)
        args.long_circuits = min(args.long_circuits, 16)
        args.settle = min(args.settle, 2.0)
    signal.signal(signal.SIGTERM, _on_sigterm)
    handler = None
    if args.coordinator_log:  # the coordinator runs in this process: its records go through logging
        handler = logging.FileHandler(args.coordinator_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("qscale").addHandler(handler)
        logging.getLogger("qscale").setLevel(logging.INFO)
    try:
        out = run(args)
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"{'interrupted' if isinstance(exc, KeyboardInterrupt) else 'terminated'}; everything was stopped",
              file=sys.stderr)
        return 130
    finally:
        if handler is not None:
            logging.getLogger("qscale").removeHandler(handler)
            handler.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
