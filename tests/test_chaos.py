"""Chaos: seeded jobs of two users flow while nodes are SIGKILLed, SIGSTOPped and resumed, new
nodes join, and the coordinator is killed with SIGKILL and restarted on the same state
directory. Every job must finish with exact totals and the counts of an undisturbed run, and
each user's accounting (unfinished jobs, queued shots, slots) must come back to nothing."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter

from conftest import CoordinatorProcess, free_port, fast_config, ghz, slow_circuit, wait_until
from qscale.client import Client
from qscale.local import LocalCluster
from qscale.circuits import dump_qpy
from qscale.proto.v1 import jobs_pb2, jobs_pb2_grpc

CHAOS_SECONDS = 12.0
JOBS = 10
USERS = {"alice": "chaos-alice-token-0123456789abcdef", "bob": "chaos-bob-token-0123456789abcdefgh"}
ADMIN = "chaos-root-token-0123456789abcdefg"
NODE_TOKEN = "chaos-node-token-0123456789abcdefg"


def workload(k: int) -> tuple[list[QuantumCircuit], dict]:
    """Job ``k`` of the stream: shot-split, batched and swept circuits with their own seed."""
    theta = Parameter("t")
    sweep = QuantumCircuit(2, name="sweep")
    sweep.ry(theta, 0)
    sweep.cx(0, 1)
    sweep.measure_all()
    circuits = [slow_circuit(10, 2), ghz(4 + k % 3), sweep]
    values = [None, None, np.linspace(0, np.pi, 30 + k).reshape(-1, 1)]
    return circuits, {"shots": [2000, 3000, 50], "seed": 1000 + k, "parameter_values": values}


def submit(client: Client, k: int):
    circuits, kwargs = workload(k)
    return client.submit(circuits, **kwargs)


def _token_file(path: Path, lines: list[str]) -> Path:
    path.touch(mode=0o600)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_chaos(tmp_path: Path) -> None:
    rng = random.Random(20261124)
    address = f"127.0.0.1:{free_port()}"
    client_tokens = _token_file(tmp_path / "client.tokens",
                                [*(f"{token} {user}" for user, token in USERS.items()), f"{ADMIN} root admin"])
    node_tokens = _token_file(tmp_path / "node.tokens", [NODE_TOKEN])
    coordinator = CoordinatorProcess(address, tmp_path / "state", tmp_path / "coordinator.log",
                                     "--client-tokens-file", str(client_tokens), "--node-tokens-file", str(node_tokens))
    (tmp_path / "state").mkdir()
    nodes = LocalCluster(0, cores_per_node=1, log_dir=tmp_path / "logs", node_token=NODE_TOKEN,
                         client_tokens_file=client_tokens)
    clients = {user: Client(address, token=token, timeout=90) for user, token in USERS.items()}
    users = list(USERS)
    client = Client(address, token=ADMIN, timeout=90)
    faults: Counter[str] = Counter()
    stopped: list[subprocess.Popen[bytes]] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def alive() -> list[subprocess.Popen[bytes]]:
        return [p for p in nodes.processes if p.poll() is None and p not in stopped]

    def chaos() -> None:
        try:
            end = time.monotonic() + CHAOS_SECONDS
            while time.monotonic() < end and not done.is_set():
                time.sleep(rng.uniform(0.4, 1.4))
                for proc in list(stopped):  # resume nodes stopped a while ago
                    if rng.random() < 0.5:
                        proc.send_signal(signal.SIGCONT)
                        stopped.remove(proc)
                        faults["SIGCONT node"] += 1
                action = rng.choice(["kill node", "stop node", "start node", "kill coordinator"])
                candidates = alive()
                if action == "kill node" and len(candidates) > 1:
                    rng.choice(candidates).send_signal(signal.SIGKILL)
                elif action == "stop node" and len(candidates) > 1:
                    victim = rng.choice(candidates)
                    victim.send_signal(signal.SIGSTOP)
                    stopped.append(victim)
                elif action == "start node" and len(candidates) < 4:
                    nodes.add_node(coordinator=address)
                elif action == "kill coordinator":
                    coordinator.kill()
                    time.sleep(rng.uniform(0.0, 0.5))
                    coordinator.start()
                else:
                    continue
                faults[action] += 1
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
        finally:
            for proc in stopped:
                proc.send_signal(signal.SIGCONT)
            stopped.clear()

    driver = threading.Thread(target=chaos, name="chaos")
    try:
        coordinator.start()
        for _ in range(3):
            nodes.add_node(coordinator=address)
        client.wait_for_nodes(3, timeout=60)
        started = time.monotonic()
        driver.start()
        jobs = []
        for k in range(JOBS):  # the users take turns
            jobs.append(submit(clients[users[k % len(users)]], k))
            time.sleep(rng.uniform(0.2, 1.2))
        results = [job.result(timeout=120) for job in jobs]
        done.set()
        driver.join(30)
        assert not errors, errors
        chaos_wall = time.monotonic() - started
        stale = client._stub.ListNodes(jobs_pb2.ListNodesRequest(), timeout=10).stale_results_dropped
        # Every job is its submitter's; each user's accounting is back to nothing (across restarts).
        assert [r.status.user for r in results] == [users[k % len(users)] for k in range(JOBS)]
        for user, own in clients.items():
            assert {j.user for j in own.jobs()} == {user}
        wait_until(lambda: all((u.jobs_unfinished, u.shots_queued, u.slots_busy) == (0, 0, 0)
                               for u in client.users() if u.name in USERS), 30, "the users' accounting to settle")
    finally:
        done.set()
        if driver.is_alive():
            driver.join(30)
        client.close()
        for own in clients.values():
            own.close()
        nodes.stop()
        coordinator.stop()

    # Reference: the same jobs, undisturbed.
    with LocalCluster(2, cores_per_node=1, config=fast_config()) as quiet:
        reference = [submit(quiet.client, k).result(timeout=120) for k in range(JOBS)]

    shots_checked = 0
    for k, (result, ref) in enumerate(zip(results, reference)):
        _, kwargs = workload(k)
        for r, asked, values in zip(result.results, kwargs["shots"], kwargs["parameter_values"]):
            sets = 1 if values is None else len(values)
            assert r.shots == asked * sets, (k, r.index, r.shots)
            assert all(x.shots == asked and sum(x.counts.values()) == asked for x in r.sets)
            shots_checked += r.shots
        assert result.counts == ref.counts, f"job {k} differs from the undisturbed run"
        assert [[x.counts for x in r.sets] for r in result.results] == \
            [[x.counts for x in r.sets] for r in ref.results]
    injected = sum(faults.values())
    print(f"\nchaos: {injected} faults in {chaos_wall:.1f} s ({dict(faults)}); {len(results)} jobs and "
          f"{shots_checked} shots checked against an undisturbed run; lost: 0, double-counted: 0; "
          f"stale results dropped: {stale}")
    assert faults["kill coordinator"] >= 1 and faults["kill node"] + faults["stop node"] >= 2, faults


def test_same_request_key_creates_one_job(tmp_path: Path) -> None:
    with LocalCluster(1, cores_per_node=1, config=fast_config()) as cluster:
        channel = grpc.insecure_channel(cluster.address)
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        request = jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=dump_qpy(ghz(3)))], shots=100,
                                         request_key="retry-me")
        first = stub.Submit(request, timeout=30)
        second = stub.Submit(request, timeout=30)
        channel.close()
        assert first.job_id == second.job_id
        assert [j.job_id for j in cluster.client.jobs()] == [first.job_id]


def test_node_stops_its_shards_when_its_lease_runs_out(tmp_path: Path) -> None:
    """The coordinator hangs (SIGSTOP): past the lease the node stops its shards; when the
    coordinator resumes, the job still completes exactly."""
    address = f"127.0.0.1:{free_port()}"
    (tmp_path / "state").mkdir()
    # One shard (--target-shards 1) of ~5 s.
    coordinator = CoordinatorProcess(address, tmp_path / "state", tmp_path / "coordinator.log", "--target-shards", "1")
    nodes = LocalCluster(0, cores_per_node=1, log_dir=tmp_path / "logs")
    client = Client(address, timeout=60)
    try:
        coordinator.start()
        node = nodes.add_node(coordinator=address)
        client.wait_for_nodes(1, timeout=60)
        job = client.submit(slow_circuit(14, 6), shots=600, seed=3)
        wait_until(lambda: any(n.running for n in client.nodes()), 30, "the shard to start")
        assert coordinator.proc is not None
        coordinator.proc.send_signal(signal.SIGSTOP)
        log = nodes.log_dir / "local-0.log"
        try:
            wait_until(lambda: "lease over" in log.read_text(), 15, "the node to stop its shard")
        finally:
            coordinator.proc.send_signal(signal.SIGCONT)
        result = job.result(timeout=120)
        assert result.shots == 600 and sum(result.counts[0].values()) == 600
        assert node.poll() is None
    finally:
        client.close()
        nodes.stop()
        coordinator.stop()


def test_sigterm_on_the_coordinator_drains_and_a_restart_resumes(tmp_path: Path) -> None:
    """SIGTERM: health turns NOT_SERVING, watchers are told (UNAVAILABLE), nodes stay up and
    reconnect, the process exits 0; a new coordinator on the same state finishes the job."""
    from qscale.errors import UnavailableError

    address = f"127.0.0.1:{free_port()}"
    (tmp_path / "state").mkdir()
    coordinator = CoordinatorProcess(address, tmp_path / "state", tmp_path / "coordinator.log")
    nodes = LocalCluster(0, cores_per_node=1, log_dir=tmp_path / "logs")
    client = Client(address, timeout=60)
    channel = grpc.insecure_channel(address)
    try:
        coordinator.start()
        node = nodes.add_node(coordinator=address)
        client.wait_for_nodes(1, timeout=60)
        job = client.submit(slow_circuit(), shots=3000, seed=21)
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING
        updates = job.watch(counts=False, timeout=60)
        next(updates)
        assert coordinator.proc is not None
        coordinator.proc.terminate()
        statuses = []
        try:
            for reply in health:
                statuses.append(reply.status)
        except grpc.RpcError:
            pass
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        try:
            for _ in updates:
                pass
            raise AssertionError("the watch ended without an error")
        except UnavailableError as exc:
            assert "shutting down" in str(exc)
        assert coordinator.proc.wait(30) == 0
        assert node.poll() is None
        coordinator.start()
        result = job.result(timeout=120)
        assert result.shots == 3000 and sum(result.counts[0].values()) == 3000
    finally:
        channel.close()
        client.close()
        nodes.stop()
        coordinator.stop()
