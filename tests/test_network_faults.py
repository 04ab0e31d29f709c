"""Network faults on a real (virtual) network: the coordinator and every node run in network
namespaces that the test creates (see netns.py), joined by veth pairs with addresses from
198.18.0.0/15; faults are tc qdiscs on both ends of a link. Nothing here touches the host's own
interfaces or routes, and no packet goes anywhere but between those namespaces.

A partition is ``netem loss 100%``, or where the kernel lacks sch_netem a BPF filter that drops
every arriving frame (the same silent loss; see netns.py). The delay-and-loss case uses netem
where the kernel has it; where it does not, it falls back to a userspace emulation (relay.py): the
nodes dial a TCP relay in the coordinator's namespace that delays every chunk of bytes 150-250 ms
each way and holds 5 % of chunks 200-400 ms more, in place of 5 % packet loss (a retransmission
timeout's worth). That approximates netem's effect on a TCP stream; it drops no packet.

Each test starts a coordinator (quick liveness settings, tokens, listening on 0.0.0.0 inside its
namespace) and two nodes of one slot, runs a seeded job undisturbed, then the same job under the
fault, and checks that the job finishes with exact totals and the undisturbed counts, that late
results are counted, and that the nodes rejoin, each name once. Client calls go through an agent
process inside the coordinator's namespace (netns.py). Needs root and iproute2; skipped with the
reason otherwise. Every wait is bounded; processes and namespaces are removed in ``finally``.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import slow_circuit, wait_until
from netns import NetLab, NetLabUnavailable, our_namespaces, unavailable_reason
from relay import DESCRIPTION as RELAY_DESCRIPTION
from relay import RelayProcess
from qscale.circuits import dump_qpy

pytestmark = pytest.mark.timeout(150)

PORT = 50051  # inside the coordinator's fresh namespace nothing else listens
RELAY_PORT = 50052  # the delaying relay, on each link's coordinator-side address (no netem only)
RELAY_SEED = 2042
NODES = 2
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
SHOTS = 6000
SHOTS_PER_SHARD = 500
TARGET_SHARDS = SHOTS // SHOTS_PER_SHARD  # 12 shards of ~1.5 s each on one core
PARTITION_S = 9.0
COORDINATOR_PARTITION_S = 2.5 * HEARTBEAT_TIMEOUT
JOB_TIMEOUT = 120.0
HERE = Path(__file__).resolve().parent


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child: no QSCALE_* settings or secrets inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSCALE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        except ProcessLookupError:
            pass


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """conftest's bounded wait, polling less often: every poll is an RPC through the agent."""
    return wait_until(predicate, timeout, what, interval=interval)


class Agent:
    """The client agent (``netns.py agent``) running inside the coordinator's namespace."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=env, cwd=cwd, text=True, bufsize=1)
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="agent-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def call(self, reply_within: float, **request: object) -> object:
        """One request; the reply's value. Fails the test on an error reply or no reply within
        ``reply_within`` s (the agent's own calls are bounded below that)."""
        reply = self.try_call(reply_within, **request)
        if not reply["ok"]:
            pytest.fail(f"agent {request}: {reply['error']}")
        return reply["value"]

    def try_call(self, reply_within: float, **request: object) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._replies.get(timeout=reply_within)
        except queue.Empty:
            pytest.fail(f"no reply from the client agent within {reply_within:.0f} s to {request}")
        if line is None:
            pytest.fail(f"the client agent exited ({self.proc.poll()}) on {request}")
        return json.loads(line)

    def nodes(self) -> list[dict]:
        return self.call(30, op="nodes")  # type: ignore[return-value]

    def stop(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: the agent exits
            self.proc.wait(5)
        except (subprocess.TimeoutExpired, OSError):
            pass
        _stop(self.proc)
        self._reader.join(5)
        self._log.close()


class NetCluster:
    """A coordinator, its client agent and ``nodes`` nodes, each in its namespace of ``lab``.

    With ``relay``, a delaying relay (relay.py, calm until told otherwise) also runs in the
    coordinator's namespace and every node dials it instead of the coordinator."""

    def __init__(self, lab: NetLab, tmp: Path, relay: bool = False) -> None:
        self.lab, self.tmp, self.use_relay = lab, tmp, relay
        self.relay: RelayProcess | None = None
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.node_token, self.client_token = secrets.token_hex(32), secrets.token_hex(32)
        self.coordinator: subprocess.Popen | None = None
        self.agent: Agent | None = None
        self.nodes: list[subprocess.Popen] = []
        self.names = [f"netnode-{i}" for i in range(lab.nodes)]
        self.node_names: dict[str, str] = {}  # every node id seen -> its name

    def _popen(self, ns: str, argv: list[str], log: str, env: dict[str, str]) -> subprocess.Popen:
        with (self.logs / log).open("ab") as out:
            return subprocess.Popen(self.lab.exec_argv(ns, argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=self.tmp)

    def start(self) -> NetCluster:
        c = self.lab.coordinator_ns
        self.coordinator = self._popen(c, [
            sys.executable, "-m", "qscale.coordinator", "serve", "--listen", f"0.0.0.0:{PORT}",
            "--state-dir", str(self.tmp / "state"), "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
            "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--shots-per-shard", str(SHOTS_PER_SHARD),
            "--target-shards", str(TARGET_SHARDS)],
            "coordinator.log", _clean_env(QSCALE_NODE_TOKEN=self.node_token, QSCALE_CLIENT_TOKEN=self.client_token))
        self.agent = Agent(self.lab.exec_argv(c, [sys.executable, "-u", str(HERE / "netns.py"), "agent"]),
                           _clean_env(QSCALE_CLIENT_TOKEN=self.client_token, QSCALE_COORDINATOR=f"127.0.0.1:{PORT}"),
                           self.tmp, self.logs / "agent.log")

        def serving() -> bool:
            assert self.coordinator is not None
            if self.coordinator.poll() is not None:
                pytest.fail(f"the coordinator exited {self.coordinator.returncode}:\n{self.log_tail('coordinator')}")
            assert self.agent is not None
            return bool(self.agent.try_call(30, op="nodes")["ok"])

        wait_for(serving, 60, "the coordinator to serve", interval=0.25)
        port = PORT
        if self.use_relay:
            routes = [f"{self.lab.coordinator_ip(i)}:{RELAY_PORT}=127.0.0.1:{PORT}" for i in range(self.lab.nodes)]
            self.relay = RelayProcess(self.lab.exec_argv(c, []), routes, RELAY_SEED, self.logs / "relay.log")
            port = RELAY_PORT
        for i, name in enumerate(self.names):
            self.nodes.append(self._popen(self.lab.node_ns(i), [
                sys.executable, "-m", "qscale.node", "--coordinator", f"{self.lab.coordinator_ip(i)}:{port}",
                "--name", name, "--slots", "1", "--cores", "1", "--memory-budget", "1G",
                "--parent-pid", str(os.getpid()), "--drain-grace", "5"],
                f"{name}.log", _clean_env(QSCALE_NODE_TOKEN=self.node_token)))
        wait_for(lambda: self.alive_names() >= set(self.names), 90, f"{NODES} nodes to join")
        return self

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        for proc in self.nodes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.nodes:
            _stop(proc, 15)
        if self.relay is not None:
            self.relay.stop()
        if self.agent is not None:
            self.agent.stop()
        if self.coordinator is not None:
            _stop(self.coordinator, 15)

    # ---- views ---------------------------------------------------------------------------------

    def node_list(self) -> list[dict]:
        assert self.agent is not None
        nodes = self.agent.nodes()
        for n in nodes:
            self.node_names[n["node_id"]] = n["name"]
        return nodes

    def alive(self) -> list[dict]:
        return [n for n in self.node_list() if n["state"] == "alive"]

    def alive_names(self) -> set[str]:
        return {n["name"] for n in self.alive()}

    def states(self) -> dict[str, set[str]]:
        """Node name -> the states of the entries listed under it (a lost one may linger)."""
        out: dict[str, set[str]] = {name: set() for name in self.names}
        for n in self.node_list():
            out.setdefault(n["name"], set()).add(n["state"])
        return out

    def lost(self, name: str) -> bool:
        """No entry of ``name`` is alive, suspected or draining: all are lost, or none is listed."""
        return self.states()[name] <= {"lost"}

    def submit(self, qpy: Path, seed: int) -> str:
        assert self.agent is not None
        job = self.agent.call(30, op="submit", files=[str(qpy)], shots=SHOTS, seed=seed)
        return str(job)

    def result(self, job: str) -> dict:
        assert self.agent is not None
        result = self.agent.call(JOB_TIMEOUT + 10, op="result", job=job, timeout=JOB_TIMEOUT)
        assert isinstance(result, dict)
        return result

    def shards_done(self, job: str) -> int:
        assert self.agent is not None
        return self.agent.call(30, op="status", job=job)["shards_done"]  # type: ignore[index]

    def busy(self, name: str) -> bool:
        return any(n["name"] == name and n["state"] == "alive" and n["running"] > 0 for n in self.node_list())


@pytest.fixture
def lab() -> Iterator[NetLab]:
    reason = unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    netlab = NetLab(NODES)
    try:
        netlab.create()
    except NetLabUnavailable as exc:
        print(f"skipped: {exc}")
        pytest.skip(str(exc))
    try:
        yield netlab
    finally:
        leftovers = netlab.kill_leftovers()
        failed = netlab.destroy()
        if leftovers:
            print(f"killed processes left in the namespaces: {leftovers}")
        assert not failed, f"namespaces not deleted: {failed}"
        remaining = [ns for ns in our_namespaces() if netlab.suffix in ns]
        assert not remaining, f"namespaces still listed: {remaining}"


def _cluster(lab: NetLab, tmp_path: Path, request: pytest.FixtureRequest, relay: bool) -> Iterator[NetCluster]:
    c = NetCluster(lab, tmp_path, relay=relay)
    failed_before = request.session.testsfailed
    try:
        yield c.start()
    except BaseException:
        failed_before = -1
        raise
    finally:
        c.stop()
        if request.session.testsfailed != failed_before:  # the logs, for the failure report
            for name in ["coordinator", "agent", *(["relay"] if relay else []), *c.names]:
                print(f"--- {name}.log\n{c.log_tail(name)}")
        running = [p.pid for p in [*c.nodes, c.coordinator, c.relay and c.relay.proc] if p and p.poll() is None]
        assert not running, f"processes still running: {running}"


@pytest.fixture
def cluster(lab: NetLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NetCluster]:
    yield from _cluster(lab, tmp_path, request, relay=False)


@pytest.fixture
def delayable_cluster(lab: NetLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NetCluster]:
    """A cluster whose links can be delayed: plain where the kernel has netem; otherwise the nodes
    reach the coordinator through the (for now calm) userspace relay of relay.py."""
    yield from _cluster(lab, tmp_path, request, relay=lab.netem_unavailable() is not None)


@pytest.fixture
def qpy(tmp_path: Path) -> Path:
    path = tmp_path / "slow.qpy"
    path.write_bytes(dump_qpy(slow_circuit()))
    return path


# ------------------------------------------------------------------------------------ checks

def check_exact(result: dict, calm: dict, what: str) -> None:
    """Totals exact, counts those of the undisturbed run, every shard counted once."""
    assert result["status"] == "done", result["status"]
    for r in result["results"]:
        assert r["shots"] == SHOTS, f"{what}: circuit {r['index']} has {r['shots']} shots, {SHOTS} asked"
        assert sum(r["counts"].values()) == SHOTS, f"{what}: counts add up to {sum(r['counts'].values())}"
    assert [r["counts"] for r in result["results"]] == [r["counts"] for r in calm["results"]], \
        f"{what}: the seeded counts differ from the undisturbed run"
    # Nothing counted twice: every shard counted by exactly one attempt; whatever came late was
    # dropped (the stale count the figures print), never merged.
    done = sorted(a["shard_index"] for a in result["attempts"] if a["outcome"] == "done")
    assert done == list(range(result["metadata"]["shards"])), f"{what}: shards counted {done}"


def wait_rejoined(cluster: NetCluster, since: float, what: str, timeout: float = 60.0) -> float:
    """Wait until every node is alive again; then, past one heartbeat timeout (a duplicate the
    coordinator keeps would still be listed), check that exactly the expected nodes are alive,
    each name once. Returns the seconds from ``since`` to the rejoin."""
    wait_for(lambda: cluster.alive_names() >= set(cluster.names), timeout, f"the nodes to rejoin after {what}")
    rejoined = time.time() - since
    time.sleep(HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL)
    alive = cluster.alive()
    names = Counter(n["name"] for n in alive)
    twice = {name: [n["node_id"] for n in alive if n["name"] == name] for name, k in names.items() if k > 1}
    assert not twice, f"after {what}, a machine is listed more than once among the alive nodes: {twice}"
    assert sorted(names) == sorted(cluster.names), f"alive after {what}: {dict(names)}"
    return rejoined


def restarts_elsewhere(result: dict, cluster: NetCluster, victims: set[str],
                       fault_at: float) -> list[tuple[int, float]]:
    """(shard, seconds from the fault to its next attempt on another node) for every shard a
    victim node held at ``fault_at``, from the job's attempts."""
    ids = {nid for nid, name in cluster.node_names.items() if name in victims}
    attempts = result["attempts"]
    held = {a["shard_index"] for a in attempts
            if a["node_id"] in ids and a["started_at"] <= fault_at and a["ended_at"] >= fault_at}
    out = []
    for shard in sorted(held):
        later = [a["started_at"] for a in attempts
                 if a["shard_index"] == shard and a["node_id"] not in ids and a["started_at"] >= fault_at]
        if later:
            out.append((shard, min(later) - fault_at))
    return out


def describe_attempts(result: dict, cluster: NetCluster, t0: float) -> str:
    return "\n".join(f"  shard {a['shard_index']:2d} {cluster.node_names.get(a['node_id'], a['node_id']):10s} "
                     f"{a['started_at'] - t0:7.2f} .. {a['ended_at'] - t0:7.2f} {a['outcome']}"
                     for a in sorted(result["attempts"], key=lambda a: a["started_at"]))


# ------------------------------------------------------------------------------------- tests

def test_partitioned_node_is_replaced_and_rejoins(lab: NetLab, cluster: NetCluster, qpy: Path) -> None:
    """Node 0's link drops every packet (no reset) for PARTITION_S (9 s) in the middle of a job, then heals."""
    method = lab.partition_method()
    calm = cluster.result(cluster.submit(qpy, seed=41))
    victim = cluster.names[0]
    job = cluster.submit(qpy, seed=41)
    wait_for(lambda: cluster.shards_done(job) >= 2 and cluster.busy(victim), 60,
             f"two shards done and {victim} running one")
    fault_at = time.time()
    try:
        lab.partition(0)

        def not_alive() -> tuple[float, set[str]] | None:
            states = cluster.states()[victim]
            return None if "alive" in states else (time.time(), states)

        unheard = wait_for(not_alive, 4 * HEARTBEAT_TIMEOUT, f"{victim} to be no longer alive")
        lost = wait_for(lambda: cluster.lost(victim) and time.time(), 4 * HEARTBEAT_TIMEOUT,
                        f"{victim} to be declared lost")
        time.sleep(max(0.0, fault_at + PARTITION_S - time.time()))
    finally:
        healed_at = time.time()
        lab.heal(0)
    rejoin = wait_rejoined(cluster, healed_at, "the heal")
    result = cluster.result(job)
    check_exact(result, calm, "the partitioned run")
    restarts = restarts_elsewhere(result, cluster, {victim}, fault_at)
    assert restarts, f"no shard {victim} held was started on another node:\n" + \
        describe_attempts(result, cluster, fault_at)
    assert min(d for _, d in restarts) < PARTITION_S, f"restarted only after the heal: {restarts}"
    meta, calm_meta = result["metadata"], calm["metadata"]
    print(f"\npartition ({method}) of {victim} for {PARTITION_S:.0f} s, job of {meta['shards']} shards: "
          f"not alive after {unheard[0] - fault_at:.2f} s ({'/'.join(sorted(unheard[1])) or 'unlisted'}), "
          f"lost after {lost - fault_at:.2f} s; its shard(s) restarted elsewhere after "
          + ", ".join(f"{d:.2f} s (shard {s})" for s, d in restarts)
          + f"; rejoined {rejoin:.2f} s after the heal; job {meta['wall_time_s']:.1f} s vs "
          f"{calm_meta['wall_time_s']:.1f} s calm ({meta['attempts']} vs {calm_meta['attempts']} attempts); "
          f"stale results dropped: {meta['stale_results_dropped']}")


def test_delay_and_loss_on_every_link_for_a_whole_job(lab: NetLab, delayable_cluster: NetCluster,
                                                      qpy: Path) -> None:
    """200 ms +- 50 ms delay and 5 % loss each way on every node's link for a whole job.

    With ``tc netem delay 200ms 50ms loss 5%`` where the kernel has sch_netem. Where it does not,
    with the userspace emulation of relay.py (the nodes' only way to the coordinator): every chunk
    of bytes delayed a uniform 150-250 ms each way, 5 % of chunks held 200-400 ms more in place
    of 5 % packet loss (what a lost segment costs a TCP stream: about one retransmission
    timeout). It approximates netem's effect on the nodes' TCP connections; no packet is lost."""
    cluster = delayable_cluster
    relay = cluster.relay
    if relay is None:
        fault = "netem delay 200ms 50ms loss 5% each way"
    else:
        fault = "EMULATED delay 150-250ms + 5% of chunks held 200-400ms (userspace relay, no netem) each way"
        print(f"\n{lab.netem_unavailable()}; so the delay and loss are emulated by {RELAY_DESCRIPTION}")
    calm = cluster.result(cluster.submit(qpy, seed=42))
    try:
        if relay is None:
            for i in range(NODES):
                lab.impair(i, "delay", "200ms", "50ms", "loss", "5%")
        else:
            relay.impair()
        started = time.time()
        result = cluster.result(cluster.submit(qpy, seed=42))
        lossy_wall = time.time() - started
        still_alive = sorted(cluster.alive_names())
    finally:
        healed_at = time.time()
        if relay is None:
            for i in range(NODES):
                lab.heal(i)
        else:
            relay_stats = relay.calm()
    check_exact(result, calm, "the delayed run")
    rejoin = wait_rejoined(cluster, healed_at, "the delay ends")
    meta, calm_meta = result["metadata"], calm["metadata"]
    outcomes = Counter(a["outcome"] for a in result["attempts"])
    relayed = ""
    if relay is not None:
        delayed = relay_stats["delayed"]
        assert delayed > 0, f"the relay delayed nothing: {relay_stats}"
        mean_ms = relay_stats["delay_s"] / max(1, delayed) * 1000
        relayed = (f"; relay: {delayed} chunks delayed (mean {mean_ms:.0f} ms), {relay_stats['held']} of them held "
                   f"longer, longest stay {relay_stats['max_wait_s'] * 1000:.0f} ms, "
                   f"{relay_stats['connections']} connections")
    print(f"\n{fault} on {NODES} links: job {meta['wall_time_s']:.1f} s "
          f"(client saw {lossy_wall:.1f} s) vs {calm_meta['wall_time_s']:.1f} s calm; attempts {dict(outcomes)}; "
          f"alive at the end of the job: {still_alive}; all alive {rejoin:.2f} s after the delay ended; "
          f"stale results dropped: {meta['stale_results_dropped']}{relayed}")


def test_coordinator_partitioned_from_all_nodes_then_healed(lab: NetLab, cluster: NetCluster, qpy: Path) -> None:
    """Every link drops every packet for longer than the heartbeat timeout, mid-job."""
    method = lab.partition_method()
    calm = cluster.result(cluster.submit(qpy, seed=43))
    job = cluster.submit(qpy, seed=43)
    wait_for(lambda: cluster.shards_done(job) >= 2 and all(cluster.busy(n) for n in cluster.names), 60,
             "two shards done and both nodes running one")
    fault_at = time.time()
    try:
        for i in range(NODES):
            lab.partition(i)
        unheard = wait_for(lambda: not cluster.alive_names() and time.time(), 4 * HEARTBEAT_TIMEOUT,
                           "no node to be alive")
        lost = wait_for(lambda: all(cluster.lost(n) for n in cluster.names) and time.time(), 4 * HEARTBEAT_TIMEOUT,
                        "the coordinator to declare every node lost")
        time.sleep(max(0.0, fault_at + COORDINATOR_PARTITION_S - time.time()))
    finally:
        healed_at = time.time()
        for i in range(NODES):
            lab.heal(i)
    rejoin = wait_rejoined(cluster, healed_at, "the heal")
    result = cluster.result(job)
    check_exact(result, calm, "the run with the coordinator cut off")
    meta, calm_meta = result["metadata"], calm["metadata"]
    print(f"\ncoordinator cut off ({method}) from {NODES} nodes for {COORDINATOR_PARTITION_S:.1f} s: none alive "
          f"after {unheard - fault_at:.2f} s, all lost after {lost - fault_at:.2f} s; all rejoined {rejoin:.2f} s "
          f"after the heal; job "
          f"{meta['wall_time_s']:.1f} s vs {calm_meta['wall_time_s']:.1f} s calm ({meta['attempts']} vs "
          f"{calm_meta['attempts']} attempts); stale results dropped: {meta['stale_results_dropped']}")
