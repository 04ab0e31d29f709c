"""Screenshot of the dashboard's job page while a job runs, for the README (``docs/dashboard.png``).

A local cluster of three one-slot nodes runs a job of ``--shards`` shards of 1,000 shots (each
shot a simulation: the circuit measures mid-way, so a shard takes about a second); one node is
killed (SIGKILL) at ``--kill-at`` of the job, so the timeline shows its shards lost and run
again, and backup copies; at ``--shot-at`` headless Chromium takes the screenshot.

Usage::

    python tools/dashboard_screenshot.py                     # writes docs/dashboard.png
    python tools/dashboard_screenshot.py --output /tmp/d.png --page overview

Needs ``chromium`` (Debian: ``apt-get install chromium fonts-dejavu-core``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qiskit import QuantumCircuit

from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.planner import PlanningPolicy
from qscale.local import LocalCluster

REPO = Path(__file__).resolve().parent.parent


def skewed_circuit(n: int = 12) -> QuantumCircuit:
    """Outcomes far from uniform (a few dominate), sampled shot by shot (a mid-circuit
    measurement), so that every shard takes a while and the histogram has a shape."""
    qc = QuantumCircuit(n, n + 1, name=f"skewed-{n}q")
    for q in range(n):
        qc.ry(2 * math.asin(math.sqrt(0.03 + 0.3 * q / n)), q)
    for q in range(0, n - 1, 3):
        qc.cx(q, q + 1)
    for q in range(n):
        qc.rx(0.05 * (q + 1), q)
    qc.measure(0, n)
    qc.rz(0.2, 0)
    qc.measure(range(n), range(n))
    return qc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def screenshot(chromium: str, url: str, output: Path, width: int, height: int) -> None:
    profile = Path(tempfile.mkdtemp(prefix="qscale-shot-"))
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
           "--virtual-time-budget=3000", f"--user-data-dir={profile}", "--no-first-run", "--hide-scrollbars",
           "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
           f"--screenshot={output}", url]
    env = dict(os.environ, HOME=str(profile), XDG_CONFIG_HOME=str(profile / "config"),
               XDG_CACHE_HOME=str(profile / "cache"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise SystemExit(f"chromium exited with {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--page", choices=("job", "overview"), default="job")
    parser.add_argument("--shards", type=int, default=48, help="shards of 1,000 shots (default 48)")
    parser.add_argument("--kill-at", type=float, default=0.2, help="progress at which a node is killed")
    parser.add_argument("--shot-at", type=float, default=0.6, help="progress at which the screenshot is taken")
    parser.add_argument("--size", default="1280x900", help="window size (default 1280x900)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        raise SystemExit("chromium is not installed (Debian: apt-get install chromium fonts-dejavu-core)")
    width, height = (int(v) for v in args.size.split("x"))

    port = free_port()
    config = CoordinatorConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0, dashboard_port=port,
                               policy=PlanningPolicy(shots_per_shard=1000))
    with LocalCluster(3, slots_per_node=1, cores_per_node=1, config=config) as cluster:
        client = cluster.client
        client.submit(skewed_circuit(), shots=2000, seed=1).result(timeout=120)  # warm the nodes up
        job = client.submit(skewed_circuit(), shots=1000 * args.shards, seed=7)
        killed = False
        while True:
            status = job.status()
            done = status.shots_done / max(1, status.shots_total)
            if status.state.value not in ("queued", "running"):
                raise SystemExit(f"the job ended ({status.state.value}) before {args.shot_at:.0%}: use more --shards")
            if not killed and done >= args.kill_at:
                victim = next(n for n in client.nodes() if n.state == "alive" and n.running)
                proc = cluster.processes[int(victim.name.rsplit("-", 1)[1])]
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                killed = True
                print(f"killed node {victim.node_id} at {done:.0%}", flush=True)
            if done >= args.shot_at:
                break
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/" + (f"jobs/{job.job_id}" if args.page == "job" else "")
        screenshot(chromium, url, args.output, width, height)
        after = job.status()
        print(f"{args.output}: job {job.job_id} at {after.shots_done / after.shots_total:.0%} "
              f"({after.state.value}) when the screenshot was written", flush=True)
        job.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
