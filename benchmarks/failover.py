"""Failure detection, measured on real processes with the coordinator's default liveness settings.

Two measurements:

* ``restart``: a node running a shard is stopped with SIGSTOP (it holds its work and answers
  nothing, as a hung machine or a partition would). Measured: seconds from the SIGSTOP to the
  start of the shard's copy on another node (the job's attempts tell), for ``--repeat`` runs.
  Three nodes of one slot; the job has two shards, so a free slot waits for the copy. After each
  run the node is resumed, and the job's counts must equal those of an undisturbed run with the
  same seed, every shard counted exactly once.
* ``starved``: for ``--starve-seconds`` the nodes run at nice 19 (every thread of every node
  process and its workers) under ``--hogs`` busy-looping processes at nice 0, while seeded jobs
  keep flowing. Measured: nodes suspected, nodes declared lost (false losses: no node dies), and
  node entries listed afterwards (a machine must appear once); jobs must finish with exact totals.

Usage::

    python benchmarks/failover.py                 # both, 3 restarts, 60 s starved
    python benchmarks/failover.py --only restart --repeat 5
    python benchmarks/failover.py --starve-seconds 20 --json out.json

Prints the figures; writes JSON only with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.planner import PlanningPolicy
from qscale.local import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import slow_circuit  # noqa: E402 - the fault tests' circuit: every shot a simulation


def _tasks(pid: int) -> list[int]:
    """Every thread of ``pid`` and of its child processes (nice is per thread on Linux)."""
    tids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            tids.append(int(task.name))
            for child in (task / "children").read_text().split():
                tids.extend(_tasks(int(child)))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return tids


def _hog(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def measure_restart(repeat: int) -> dict[str, Any]:
    config = CoordinatorConfig(listen="127.0.0.1:0", policy=PlanningPolicy(target_shards=2, max_shard_seconds=600))
    circuit = slow_circuit(14, 6)
    delays, stale = [], []
    with LocalCluster(3, cores_per_node=1, config=config) as cluster:
        client = cluster.client
        reference = client.submit(circuit, shots=4000, seed=11).result(timeout=900)
        for _ in range(repeat):
            job = client.submit(circuit, shots=4000, seed=11)
            deadline = time.monotonic() + 120
            victim = None
            while victim is None and time.monotonic() < deadline:
                victim = next((n for n in client.nodes() if n.state == "alive" and n.running), None)
                time.sleep(0.05)
            if victim is None:
                raise SystemExit("no node picked up a shard within 120 s")
            time.sleep(0.5)  # let the shard get under way
            proc = cluster.processes[int(victim.name.rsplit("-", 1)[1])]
            proc.send_signal(signal.SIGSTOP)
            stopped = time.time()
            try:
                result = job.result(timeout=900)
            finally:
                proc.send_signal(signal.SIGCONT)
            held = {a.shard_index for a in result.attempts if a.node_id == victim.node_id and a.started_at < stopped}
            copies = [a.started_at - stopped for a in result.attempts
                      if a.shard_index in held and a.node_id != victim.node_id and a.started_at >= stopped]
            if not copies:
                raise SystemExit("the stopped node's shard never ran elsewhere")
            delays.append(min(copies))
            done = [a.shard_index for a in result.attempts if a.outcome == "done"]
            assert sorted(done) == sorted(set(done)), "a shard was counted twice"
            assert result.counts == reference.counts, "counts differ from the undisturbed run"
            assert sum(result.counts[0].values()) == 4000
            stale.append(result.stale_results_dropped)
            cluster.wait_for_nodes(3, timeout=60)
    return {"restart_s": delays, "restart_median_s": statistics.median(delays), "stale_dropped": stale,
            "settings": {"heartbeat_interval_s": config.heartbeat_interval_s,
                         "suspect_after_s": config.suspect_after, "heartbeat_timeout_s": config.heartbeat_timeout_s}}


def measure_starved(seconds: float, hogs: int) -> dict[str, Any]:
    config = CoordinatorConfig(listen="127.0.0.1:0")
    circuit = slow_circuit(8, 2)
    with LocalCluster(2, cores_per_node=1, config=config) as cluster:
        client = cluster.client
        metrics = cluster.coordinator.server.metrics  # type: ignore[union-attr]
        reference = client.submit(circuit, shots=400, seed=3).result(timeout=300)
        for proc in cluster.processes:
            for tid in _tasks(proc.pid):
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, 19)
                except OSError:
                    pass
        ctx = multiprocessing.get_context("spawn")
        stop_at = time.time() + seconds
        workers = [ctx.Process(target=_hog, args=(stop_at,), daemon=True) for _ in range(hogs)]
        for w in workers:
            w.start()
        load = []
        jobs = mismatched = 0
        try:
            while time.time() < stop_at:
                result = client.submit(circuit, shots=400, seed=3).result(timeout=600)
                jobs += 1
                mismatched += result.counts != reference.counts
                load.append(os.getloadavg()[0])
        finally:
            for w in workers:
                w.join(max(0.0, stop_at - time.time()) + 5)
                if w.is_alive():
                    w.kill()
        listed = client.nodes()  # (read before the cluster stops: its nodes drain then)
        figures = {"suspected": _total(metrics.suspected), "false_losses": _total(metrics.nodes_lost)}
    return {"seconds": seconds, "hogs": hogs, "jobs": jobs, "jobs_mismatched": mismatched,
            "load_avg_max": max(load, default=0.0), **figures, "nodes_listed": len(listed),
            "nodes_alive": sum(n.state == "alive" for n in listed)}


def _total(counter: Any) -> float:
    """A counter's value over all its labels."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("restart", "starved"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--starve-seconds", type=float, default=60.0)
    p.add_argument("--hogs", type=int, default=4 * (os.cpu_count() or 1))
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    out: dict[str, Any] = {}
    if args.only in (None, "restart"):
        out["restart"] = r = measure_restart(args.repeat)
        print(f"restart of a silent node's shard: median {r['restart_median_s']:.2f} s "
              f"(runs: {', '.join(f'{d:.2f}' for d in r['restart_s'])}; settings {r['settings']}); "
              f"stale results dropped per run: {r['stale_dropped']}")
    if args.only in (None, "starved"):
        out["starved"] = s = measure_starved(args.starve_seconds, args.hogs)
        print(f"starved nodes ({s['seconds']:.0f} s at nice 19 under {s['hogs']} CPU hogs, load avg up to "
              f"{s['load_avg_max']:.1f}): {s['jobs']} jobs ({s['jobs_mismatched']} with other counts), "
              f"{s['suspected']:.0f} suspicions, {s['false_losses']:.0f} false losses, "
              f"{s['nodes_listed']} node entries listed ({s['nodes_alive']} alive)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    failed = out.get("starved", {}).get("jobs_mismatched", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
