"""Node deaths, hangs and coordinator restarts on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import free_port, HEARTBEAT_TIMEOUT, fast_config, slow_circuit, wait_until
from qscale.client import Client
from qscale.coordinator.server import EmbeddedCoordinator
from qscale.local import LocalCluster


def node_process(cluster: LocalCluster, node_name: str) -> subprocess.Popen[bytes]:
    return cluster.processes[int(node_name.rsplit("-", 1)[1])]


def busy_node(client: Client) -> object:
    return next((n for n in client.nodes() if n.state == "alive" and n.running > 0), None)


def signal_busy_node(cluster: LocalCluster, sig: int, *, simulating: bool = False
                     ) -> tuple[object, subprocess.Popen[bytes], float]:
    """Wait until a node holds a shard and send it ``sig``; returns (node, process, when).

    ``simulating``: wait until the node's worker process is simulating, not only until the
    coordinator has dispatched a shard to it (which may still sit in the node's queue)."""

    def victim() -> object:
        node = busy_node(cluster.client)
        if node is None or not simulating:
            return node
        pids = worker_pids(node_process(cluster, node.name).pid)
        return node if pids and not all(cpu_idle(pid, 0.05) for pid in pids) else None

    node = wait_until(victim, 60, "a node running a shard")
    proc = node_process(cluster, node.name)
    proc.send_signal(sig)
    return node, proc, time.time()


def test_sigkill_node_mid_job_is_reassigned_with_exact_totals(make_cluster) -> None:
    # Two shards on two nodes of two slots each: the survivor has a free slot for the retry.
    cluster = make_cluster(2, slots_per_node=2)
    client = cluster.client
    job = client.submit(slow_circuit(), shots=2000, seed=77)
    victim, proc, killed_at = signal_busy_node(cluster, signal.SIGKILL)
    proc.wait(10)
    result = job.result(timeout=180)
    assert result.shots == 2000 and sum(result.counts[0].values()) == 2000
    held = {a.shard_index for a in result.attempts if a.node_id == victim.node_id and a.started_at < killed_at}
    assert held, "the killed node held no shard"
    assert all(a.outcome in ("lost", "cancelled") for a in result.attempts
               if a.node_id == victim.node_id and a.shard_index in held and a.outcome != "done")
    delays = []
    for index in held:
        copies = [b.started_at for b in result.attempts
                  if b.shard_index == index and b.node_id != victim.node_id and b.started_at >= killed_at]
        if any(a.outcome == "done" for a in result.attempts if a.node_id == victim.node_id and a.shard_index == index):
            continue  # it finished before the kill
        assert copies, f"shard {index} never ran elsewhere"
        delays.append(min(copies) - killed_at)
    # A SIGKILL breaks the stream at once: the node is suspected and its shards get copies on
    # free slots at once; the heartbeat timeout only declares it lost.
    assert delays and max(delays) < HEARTBEAT_TIMEOUT, delays
    assert_counted_once(result)
    print(f"SIGKILL: shard restarted elsewhere after {max(delays) * 1000:.0f} ms")

    # The same seed without the failure gives identical counts.
    reference = make_cluster(1).client.submit(slow_circuit(), shots=2000, seed=77).result(timeout=180)
    assert reference.counts == result.counts


def test_sigstopped_node_is_reaped_its_late_results_ignored_and_it_rejoins(make_cluster) -> None:
    cluster = make_cluster(2)
    client = cluster.client
    job = client.submit(slow_circuit(), shots=3000, seed=5)
    # Its worker must be simulating: a shard still queued in the stopped daemon never runs, and
    # the coordinator's cancel reaches it first when it wakes (nothing late to drop).
    victim, proc, stopped_at = signal_busy_node(cluster, signal.SIGSTOP, simulating=True)
    try:
        wait_until(lambda: all(n.node_id != victim.node_id or n.state == "lost" for n in client.nodes()),
                   HEARTBEAT_TIMEOUT * 4, "the stopped node to be declared lost")
        lost_after = time.time() - stopped_at
        # The other node finishes the job, the stopped node's shard included. Only the daemon
        # is stopped: its worker process finishes the shard too, and its result waits in the
        # stopped daemon.
        result = job.result(timeout=180)
        wait_until(lambda: all(cpu_idle(w) for w in worker_pids(proc.pid)), 120,
                   "the stopped node's worker to finish its shard")
        before = client.job(job.job_id).result(timeout=5).stale_results_dropped
    finally:
        proc.send_signal(signal.SIGCONT)
    assert result.shots == 3000 and sum(result.counts[0].values()) == 3000
    # The node comes back (under its old id: it is listed once) and gets work again.
    wait_until(lambda: sum(n.state == "alive" for n in client.nodes()) == 2, 30, "the node to rejoin")
    assert sorted(n.name for n in client.nodes()) == sorted({n.name for n in client.nodes()})
    # What it finished while stopped arrives late, after the job ended: it is dropped and
    # counted as stale, never merged (the counts and totals stay as they were).
    wait_until(lambda: client.job(job.job_id).result(timeout=5).stale_results_dropped > before, 30,
               "the stopped node's late results to arrive and be dropped")
    final = client.job(job.job_id).result(timeout=5)
    assert final.counts == result.counts and final.shots == 3000
    assert_counted_once(final)
    print(f"stopped node lost after {lost_after:.2f} s; {final.stale_results_dropped - before} late message(s) "
          "dropped")
    again = client.submit(slow_circuit(), shots=3000, seed=5).result(timeout=180)
    assert again.counts == result.counts


def assert_counted_once(result: object) -> None:
    """Every shard of the job was counted by exactly one attempt."""
    done = [a.shard_index for a in result.attempts if a.outcome == "done"]  # type: ignore[attr-defined]
    assert sorted(done) == sorted(set(done)) and len(done) == result.status.shards_total  # type: ignore[attr-defined]


def test_node_started_before_coordinator_joins_and_survives_a_restart(tmp_path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    config = fast_config(listen=address, state_dir=str(tmp_path / "state"))
    cluster = LocalCluster(0, cores_per_node=1, config=config, log_dir=tmp_path / "logs")
    procs = [cluster.add_node(coordinator=address) for _ in range(2)]  # no coordinator yet
    coordinator = EmbeddedCoordinator(config)
    client = Client(address)
    try:
        assert all(p.poll() is None for p in procs)
        coordinator.start()
        client.wait_for_nodes(2, timeout=60)
        first = client.submit(slow_circuit(10, 2), shots=2000, seed=1).result(timeout=120)
        assert first.shots == 2000

        # Restart the coordinator in the middle of a job, on the same port and state dir.
        job = client.submit(slow_circuit(), shots=3000, seed=9)
        wait_until(lambda: job.status().shards_done >= 1, 120, "one shard to finish")
        coordinator.stop()
        coordinator = EmbeddedCoordinator(config)
        coordinator.start()
        client.wait_for_nodes(2, timeout=60)  # the same processes registered again
        assert all(p.poll() is None for p in procs)
        result = job.result(timeout=180)
        assert result.shots == 3000 and sum(result.counts[0].values()) == 3000
        reference = client.submit(slow_circuit(), shots=3000, seed=9).result(timeout=180)
        assert reference.counts == result.counts
    finally:
        client.close()
        cluster.stop()
        coordinator.stop()


def cpu_idle(pid: int, window: float = 0.3) -> bool:
    """True if the process used no CPU time during ``window`` seconds."""

    def cpu() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu()
    time.sleep(window)
    return cpu() == before


def worker_pids(node_pid: int) -> list[int]:
    """The simulation worker processes of a node (spawned children, not the resource tracker)."""
    pids = []
    for task in Path(f"/proc/{node_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                pids.append(int(child))
    return pids


def test_worker_crash_is_a_shard_failure_and_the_node_lives_on(make_cluster) -> None:
    cluster = make_cluster(1)
    client = cluster.client
    (node_proc,) = cluster.processes
    job = client.submit(slow_circuit(), shots=2000, seed=3)
    wait_until(lambda: busy_node(client), 60, "the node to run a shard")
    (worker,) = wait_until(lambda: worker_pids(node_proc.pid), 10, "the worker process")
    os.kill(worker, signal.SIGKILL)
    result = job.result(timeout=180)
    assert result.shots == 2000
    failed = [a for a in result.attempts if a.outcome == "failed"]
    assert len(failed) == 1 and "worker process died" in failed[0].error
    assert node_proc.poll() is None
    assert [n.state for n in client.nodes()] == ["alive"]


def test_sigterm_drains_a_busy_node(make_cluster) -> None:
    cluster = make_cluster(2)
    client = cluster.client
    job = client.submit(slow_circuit(), shots=4000, seed=12)
    victim, proc, _ = signal_busy_node(cluster, signal.SIGTERM)
    assert proc.wait(60) == 0  # it finished (or handed back) its shard and left cleanly
    result = job.result(timeout=180)
    assert result.shots == 4000 and sum(result.counts[0].values()) == 4000
    outcomes = {a.outcome for a in result.attempts if a.node_id == victim.node_id}
    assert outcomes <= {"done", "refused"}, outcomes
    assert not any(a.outcome in ("lost", "failed") for a in result.attempts)
