"""Sharing the cluster: fair share between users and jobs, priority classes, per-user quotas.

The scheduler runs against simulated nodes on a simulated clock: each node holds what it is sent
and runs it as a real node does (highest run order first, arrival order among equals), every
shard taking a fixed time. No sleeping, no network: a minute of a busy cluster takes a fraction
of a second, so the shares can be checked exactly."""

from __future__ import annotations

from collections import defaultdict

import pytest
from qiskit import QuantumCircuit

from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.fairshare import FairQueue
from qscale.coordinator.jobs import Job
from qscale.coordinator.planner import PlanningPolicy
from qscale.coordinator.scheduler import Scheduler
from qscale.coordinator.users import User
from qscale.errors import ResourceExhaustedError
from qscale.proto.v1 import common_pb2, node_pb2
from test_scheduler import Cluster, Stream, _caps, make_job

LOW, NORMAL, HIGH = common_pb2.PRIORITY_LOW, common_pb2.PRIORITY_NORMAL, common_pb2.PRIORITY_HIGH


def clifford(width: int = 2) -> QuantumCircuit:
    """A Clifford circuit: the stabilizer method pays per shot, so shots_per_shard cuts it."""
    qc = QuantumCircuit(width)
    qc.h(0)
    for q in range(1, width):
        qc.cx(0, q)
    qc.measure_all()
    return qc


class SimNode:
    """A node that runs what it is sent: slots, a queue of held shards, a fixed time per shard."""

    def __init__(self, sim: Sim, name: str, slots: int) -> None:
        self.sim = sim
        node, _, decisions = sim.core.register(_caps(name, slots=slots), sim.now)
        self.node_id = node.node_id
        self.slots = slots
        self.stream = Stream(name)
        sim.apply(decisions)
        sim.apply(sim.core.attach_stream(self.node_id, self.stream, sim.now))
        self.read = 0
        self.queue: list[node_pb2.ShardAssignment] = []
        self.running: dict[str, tuple[float, node_pb2.ShardAssignment]] = {}

    def poll(self) -> None:
        """Read new messages, then fill free slots as a node does."""
        self.read_messages()
        self.fill()

    def read_messages(self) -> None:
        """Take what the coordinator sent (messages arrive at once)."""
        for message in self.stream.messages[self.read:]:
            kind = message.WhichOneof("kind")
            if kind == "assign":
                self.queue.append(message.assign)
            elif kind == "cancel":
                token = message.cancel.attempt_token
                self.queue = [a for a in self.queue if a.attempt_token != token]
                self.running.pop(token, None)
        self.read = len(self.stream.messages)

    def fill(self) -> None:
        while self.queue and len(self.running) < self.slots:
            best = max(range(len(self.queue)), key=lambda i: (self.queue[i].priority, -i))
            a = self.queue.pop(best)
            self.running[a.attempt_token] = (self.sim.now + self.sim.duration(a), a)
            self.sim.started.append((self.sim.now, a.job_id, a.shard_index))

    def finish_due(self) -> bool:
        self.read_messages()
        due = [t for t, (end, _) in self.running.items() if end <= self.sim.now]
        for token in due:  # a freed slot takes the next shard in hand before the node reports
            end, a = self.running.pop(token)
            self.sim.ran.append((end - self.sim.duration(a), end, a.job_id))
            self.fill()
            self.sim.complete(self.node_id, a, self.sim.now)
        return bool(due)


class Sim(Cluster):
    """A scheduler with users, simulated nodes and a simulated clock."""

    def __init__(self, users: dict[str, User] | None = None, shard_s: float = 1.0, **config: object) -> None:
        config.setdefault("prefetch_per_slot", 1)
        config.setdefault("policy", PlanningPolicy(shots_per_shard=100))
        super().__init__(**config)
        known = users or {}
        self.core = Scheduler(CoordinatorConfig(**config), wall=lambda: self.wall,  # type: ignore[arg-type]
                              users=lambda name: known.get(name, User(name)))
        self.now = 0.0
        self.shard_s = shard_s
        self.shard_seconds: dict[str, float] = {}
        self.nodes: list[SimNode] = []
        self.started: list[tuple[float, str, int]] = []
        self.ran: list[tuple[float, float, str]] = []
        self.owner: dict[str, str] = {}

    def duration(self, a: node_pb2.ShardAssignment) -> float:
        return self.shard_seconds.get(a.job_id, self.shard_s)

    def add_nodes(self, count: int, slots: int = 1) -> None:
        for n in range(count):
            self.nodes.append(SimNode(self, f"n{len(self.nodes)}", slots))

    def job(self, user: str, shards: int, priority: int = NORMAL, shard_s: float | None = None) -> Job:
        job = make_job(clifford(), 100 * shards, policy=self.core.config.policy)
        job.user, job.priority = user, priority
        self.core.admit(job)
        self.owner[job.job_id] = user
        if shard_s is not None:
            self.shard_seconds[job.job_id] = shard_s
        self.apply(self.core.accept(job, self.core.plan(job), self.now))
        assert len(job.shards) == shards
        self.poll()
        return job

    def poll(self) -> None:
        for node in self.nodes:
            node.poll()

    def run_until(self, end: float, keep_busy: dict[str, int] | None = None) -> None:
        """Advance the clock to ``end``; ``keep_busy``: user -> shards per job, submitted again
        whenever that user has nothing queued (a user who is always backlogged)."""
        for _ in range(1_000_000):
            if keep_busy:
                for user, shards in keep_busy.items():
                    usage = self.core.usage.get(user)
                    if usage is None or usage.jobs_unfinished < 3:
                        self.job(user, shards)
            ends = [e for node in self.nodes for e, _ in node.running.values()]
            nxt = min(ends, default=end)
            if nxt > end:
                self.now = end
                return
            self.now = nxt
            for node in self.nodes:
                node.finish_due()
            self.poll()
            if not ends and nxt >= end:
                return
        raise AssertionError("simulation did not reach its end")

    def slot_seconds(self, start: float, end: float) -> dict[str, float]:
        used: dict[str, float] = defaultdict(float)
        for a, b, job_id in self.ran:
            used[self.owner[job_id]] += max(0.0, min(b, end) - max(a, start))
        for node in self.nodes:
            for e, a in node.running.values():
                used[self.owner[a.job_id]] += max(0.0, min(e, end) - max(e - self.duration(a), start))
        return used


def shares(sim: Sim, start: float, end: float) -> dict[str, float]:
    used = sim.slot_seconds(start, end)
    total = sum(used.values())
    return {user: seconds / total for user, seconds in used.items()}


@pytest.mark.parametrize("weights", [(1, 1), (3, 1)])
def test_backlogged_users_share_slot_seconds_by_weight(weights: tuple[int, int]) -> None:
    sim = Sim({"alice": User("alice", weight=weights[0]), "bob": User("bob", weight=weights[1])})
    sim.add_nodes(2, slots=2)
    # alice was there first with a long backlog; bob comes 10 s later; both stay backlogged.
    sim.job("alice", 200)
    sim.run_until(10.0)
    sim.run_until(70.0, keep_busy={"alice": 20, "bob": 20})
    got = shares(sim, 10.0, 70.0)
    want = weights[0] / sum(weights)
    assert got["alice"] == pytest.approx(want, abs=0.05), got
    assert got["bob"] == pytest.approx(1 - want, abs=0.05), got


def test_jobs_of_one_user_share_and_a_short_job_starts_on_one_of_the_next_free_slots() -> None:
    sim = Sim()
    sim.add_nodes(2, slots=1)
    long = sim.job("alice", 40)
    sim.run_until(3.5)
    short = sim.job("alice", 2)
    sim.run_until(60.0)
    starts = [t for t, job_id, _ in sim.started if job_id == short.job_id]
    ends = [b for _, b, job_id in sim.ran if job_id == short.job_id]
    # The next slots free at 4.0: its first shard starts there, ahead of the long job's shard
    # waiting on that node; its second goes next in fair order, behind one waiting shard. In
    # arrival order it would have waited for the 40 shards of the long job (20 s on two slots).
    assert starts[0] == 4.0 and starts[1] <= 4.0 + 2 * sim.shard_s, starts
    assert max(ends) <= 4.0 + 3 * sim.shard_s
    assert long.state == common_pb2.JOB_STATE_DONE and short.state == common_pb2.JOB_STATE_DONE


def test_high_priority_starts_on_the_next_free_slot_and_nothing_running_is_stopped() -> None:
    sim = Sim(shard_s=1.0)
    sim.add_nodes(3, slots=1)
    for n in range(4):
        sim.job(f"user{n % 2}", 30)
    sim.run_until(5.25)
    running_before = {a.attempt_token for node in sim.nodes for _, a in node.running.values()}
    urgent = sim.job("carol", 3, priority=HIGH)
    # Every node holds a shard ahead of its waiting ones: they all start at the next free slots.
    sim.run_until(6.0)
    assert sorted(t for t, job_id, _ in sim.started if job_id == urgent.job_id) == [6.0, 6.0, 6.0]
    cancels = [m for node in sim.nodes for m in node.stream.messages if m.WhichOneof("kind") == "cancel"]
    assert not cancels and running_before.isdisjoint(a.attempt_token for node in sim.nodes
                                                     for _, a in node.running.values())
    sim.run_until(200.0)
    assert all(job.state == common_pb2.JOB_STATE_DONE for job in sim.core.jobs.values())


def test_a_lower_class_waits_while_a_higher_one_has_work() -> None:
    sim = Sim()
    sim.add_nodes(2, slots=1)
    low = sim.job("alice", 4, priority=LOW)
    normal = sim.job("bob", 6)
    sim.run_until(100.0)
    last_normal = max(b for _, b, job_id in sim.ran if job_id == normal.job_id)
    low_starts = sorted(t for t, job_id, _ in sim.started if job_id == low.job_id)
    # The first two low shards took the empty nodes before bob submitted; after that low waits.
    assert low_starts[2] >= last_normal - sim.shard_s, (low_starts, last_normal)


def test_slot_quota_caps_what_a_user_holds_and_others_use_the_rest() -> None:
    sim = Sim({"alice": User("alice", max_slots=2)}, prefetch_per_slot=0)
    sim.add_nodes(4, slots=1)
    sim.job("alice", 20)
    sim.poll()
    assert sim.core.usage["alice"].in_hand == 2
    assert sum(len(n.running) for n in sim.nodes) == 2  # two nodes idle: nobody else has work
    sim.job("bob", 20)
    assert sum(len(n.running) for n in sim.nodes) == 4
    sim.run_until(30.0)
    assert max(sim.core.usage["alice"].in_hand, 0) <= 2


def test_job_and_shot_quotas_refuse_with_the_limit_and_the_usage_and_change_nothing() -> None:
    sim = Sim({"alice": User("alice", max_jobs=2, max_queued_shots=2500)})
    sim.add_nodes(1)
    first = sim.job("alice", 10)
    sim.job("alice", 5)
    before = (dict(vars(sim.core.usage["alice"])), set(sim.core.jobs), len(sim.core.fair))
    with pytest.raises(ResourceExhaustedError, match=r"'alice' has 2 unfinished job\(s\).*max-jobs 2"):
        sim.job("alice", 1)
    assert (dict(vars(sim.core.usage["alice"])), set(sim.core.jobs), len(sim.core.fair)) == before
    sim.apply(sim.core.cancel(first, sim.now))
    with pytest.raises(ResourceExhaustedError, match=r"asks for 2,100 shot.*has 500 queued.*at most 2,500"):
        sim.job("alice", 21)
    sim.job("alice", 20)  # 500 + 2,000 fit (the cancelled job's shots left the queue)
    sim.job("bob", 30)  # other users are not affected
    sim.run_until(100.0)
    assert sim.core.usage["alice"].jobs_unfinished == 0 and sim.core.usage["alice"].shots_queued == 0


def test_fair_queue_orders_classes_users_and_jobs() -> None:
    queue = FairQueue(lambda user: {"a": 3.0}.get(user, 1.0))
    queue.add("j1", "a", NORMAL, range(5))
    queue.add("j2", "b", NORMAL, range(5))
    queue.add("j3", "b", HIGH, range(1))
    assert queue.best().job_id == "j3"
    queue.get("j3").shards.clear()
    queue.taken(queue.get("j3"))
    served: dict[str, int] = defaultdict(int)
    for _ in range(8):  # a (weight 3) is served three times as often as b
        entry = queue.best()
        served[entry.user] += 1
        entry.shards.popleft()
        queue.taken(entry)
        queue.charge(entry.job_id, 1.0)
        if not entry.shards:
            queue.requeue(entry.job_id, 0)
    assert served == {"a": 6, "b": 2}


def test_a_node_runs_the_highest_run_order_it_holds_first_and_arrival_order_among_equals() -> None:
    from collections import deque
    from types import SimpleNamespace

    from qscale.coordinator.jobs import run_order
    from qscale.node.daemon import NodeDaemon

    orders = [run_order(NORMAL), run_order(NORMAL), run_order(LOW), run_order(NORMAL, ahead=True),
              run_order(HIGH), run_order(NORMAL, ahead=True)]
    node = SimpleNamespace(_queue=deque(node_pb2.ShardAssignment(attempt_token=f"t{i}", priority=order)
                                        for i, order in enumerate(orders)))
    taken = [NodeDaemon._next_assignment(node).attempt_token for _ in orders]  # type: ignore[arg-type]
    assert taken == ["t4", "t3", "t5", "t0", "t1", "t2"]


def test_a_new_job_never_starts_behind_every_job_of_its_user() -> None:
    """Estimates charged at dispatch that turn out too high are taken back at the end, so a job's
    service can fall below the high-water mark where new jobs start: a new job starts at the
    lower of the two (else a short job would wait until the long one caught up)."""
    queue = FairQueue()
    long = queue.add("long", "a", NORMAL, range(10))
    for _ in range(2):
        entry = queue.best()
        entry.shards.popleft()
        queue.taken(entry)
        queue.charge("long", 10.0)  # estimated at dispatch
    queue.charge("long", -15.0)  # the first ran 5 s less than estimated
    short = queue.add("short", "a", NORMAL, range(1))
    assert short.service <= long.service == 5.0


def test_a_chunk_from_a_shard_thought_waiting_corrects_the_guess_of_what_runs() -> None:
    from qscale.coordinator.jobs import Attempt
    from qscale.coordinator.nodes import Node

    node = Node("n-00000000", _caps("n", slots=1), 0.0, 0.0)
    guessed = Attempt("j:0:a", "j", 0, node.node_id, 0.0, 0.0, user="u", running_at=5.0, running_since=5.0)
    ahead = Attempt("k:0:b", "k", 0, node.node_id, 0.0, 0.0, user="u", priority=HIGH)
    node.hold(guessed)
    node.hold(ahead)
    assert node.lowest_waiting == HIGH
    node.confirm_running(ahead, 6.0, 6.0)  # its first chunk came: the node runs it, not the guess
    assert (ahead.running_since, guessed.running_since) == (6.0, 0.0)
    assert node.waiting == {NORMAL: 1} and node.next_waiting() is guessed
