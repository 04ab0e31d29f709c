"""The coordinator's state machine: node registry and liveness, job table, shard queue,
dispatch, and result accounting.

Plain synchronous code with no I/O of its own besides the :class:`~qscale.coordinator.store.Store`
and the per-node message sinks; every method that depends on time takes ``now`` (unix seconds),
so the logic is tested without sleeping. The gRPC servicers call it from one event-loop thread.

Accounting rules:
- every dispatch of a shard is an *attempt* with an unguessable token; a node's messages about
  a shard are accepted only for the token of the shard's current attempt, sent by the node that
  holds it; anything else (a node declared lost coming back, a cancelled attempt) is dropped
  and counted as stale;
- a shard's counts are written to the store before they are merged, and a shard has at most
  one stored result, so the merged counts of a job add up to exactly the shots asked for.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from qscale.circuits import CircuitInfo, memory_width, merge_counts
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.intake import PreparedJob
from qscale.coordinator.metrics import CoordinatorMetrics
from qscale.coordinator.planner import PlanningPolicy, ShardPlan, plan_job
from qscale.coordinator.store import Store, StoredJob
from qscale.errors import FailedPreconditionError, InvalidArgumentError, NoCapableNodeError, NotFoundError
from qscale.proto.v1 import common_pb2, node_pb2

__all__ = ["Scheduler", "NodeRecord", "JobRecord", "ShardState", "Attempt", "MessageSink", "FINAL_STATES"]

log = logging.getLogger(__name__)

QUEUED = common_pb2.JOB_STATE_QUEUED
RUNNING = common_pb2.JOB_STATE_RUNNING
DONE = common_pb2.JOB_STATE_DONE
FAILED = common_pb2.JOB_STATE_FAILED
CANCELLED = common_pb2.JOB_STATE_CANCELLED
FINAL_STATES = (DONE, FAILED, CANCELLED)
_LOST_NODES_KEPT = 100


class MessageSink(Protocol):
    """Where messages for a node go (its Work stream); ``None`` asks the stream to close."""

    def put_nowait(self, item: node_pb2.CoordinatorMessage | None) -> None: ...


@dataclass(eq=False)
class Attempt:
    """One dispatch of a shard to a node."""

    token: str
    job_id: str
    shard_index: int
    node_id: str
    started_at: float
    ended_at: float = 0.0
    outcome: str = "running"  # running, done, failed, refused, lost, cancelled
    error: str = ""
    backup: bool = False
    """A backup copy of a slow shard (the first result of the two counts)."""
    partial: dict[int, list[common_pb2.CircuitCounts]] = field(default_factory=dict)
    """chunk index -> one result per experiment of the chunk, as chunks finish."""


@dataclass(eq=False)
class ShardState:
    plan: ShardPlan
    status: str = "queued"  # queued, running, done
    live: list[Attempt] = field(default_factory=list)
    """Attempts running now: one, or two while a backup copy races the first."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    refused_by: set[str] = field(default_factory=set)
    losses: int = 0
    backups: int = 0

    @property
    def attempt(self) -> Attempt | None:
        """The oldest running attempt, if any."""
        return self.live[0] if self.live else None


@dataclass(eq=False)
class NodeRecord:
    node_id: str
    caps: node_pb2.NodeCapabilities
    registered_at: float
    last_heartbeat: float
    state: str = "alive"  # alive, draining, lost
    sink: MessageSink | None = None
    running: dict[str, Attempt] = field(default_factory=dict)
    """Attempts in hand: running, or queued on the node behind its busy slots."""
    shards_done: int = 0
    in_hand_limit: int = 1
    """Most attempts the node is given at once: its slots plus the prefetch."""
    sent: dict[str, set[int]] = field(default_factory=dict)
    """job id -> circuits whose QPY went to the node on its stream (sent once per job)."""
    noise_sent: set[str] = field(default_factory=set)
    """Jobs whose noise model went to the node."""
    pool: int | None = None
    """Where the scheduler files it: free slots (> 0), 0 for prefetch, None for neither."""

    @property
    def slot_memory(self) -> int:
        """Memory one slot may use: what the node itself checks before running a shard."""
        return self.caps.memory_budget_bytes // max(1, self.caps.slots)

    def can_hold(self, shard: ShardPlan) -> bool:
        """Whether the node offers the shard's method, reads its QPY, and has a slot big enough."""
        method = shard.method
        method_ok = method in ("", "automatic") or method in self.caps.methods
        qpy_ok = not self.caps.qpy_version or shard.qpy_version <= self.caps.qpy_version
        return method_ok and qpy_ok and shard.memory_bytes <= self.slot_memory


@dataclass(eq=False)
class JobRecord:
    job_id: str
    created_at: float
    seed: int
    method: str
    policy: PlanningPolicy
    infos: list[CircuitInfo]
    shots: list[int]
    """Shots per parameter set, per circuit."""
    params: list[common_pb2.ParameterValues | None]
    qpy: list[bytes]
    memory: bool = False
    noise_model: str = ""
    request_key: str = ""
    state: int = QUEUED
    error: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    shards: list[ShardState] = field(default_factory=list)
    counts: list[list[dict[str, int]]] = field(default_factory=list)
    """Counted hex counts per circuit, per parameter set."""
    set_shots: list[list[int]] = field(default_factory=list)
    memory_parts: dict[tuple[int, int], list[tuple[int, bytes]]] = field(default_factory=dict)
    """(circuit, set) -> (shard index, per-shot memory) of every counted shard."""
    attempts: list[Attempt] = field(default_factory=list)
    nodes_used: set[str] = field(default_factory=set)
    stale_dropped: int = 0
    shards_done: int = 0
    shards_queued: int = 0
    seconds_per_cost: list[float] = field(default_factory=list)
    """Wall seconds per estimated reference second of the shards done (backup decisions)."""

    @classmethod
    def from_stored(cls, stored: StoredJob) -> JobRecord:
        return cls(stored.job_id, stored.created_at, stored.seed, stored.method, stored.policy, stored.infos,
                   stored.shots, stored.params, stored.qpy, stored.memory, stored.noise_model,
                   state=stored.state, error=stored.error, finished_at=stored.finished_at)

    def plan(self) -> tuple[ShardPlan, ...]:
        return plan_job(self.infos, self.shots, self.num_sets, self.seed, self.method, self.policy,
                        noisy=bool(self.noise_model), memory=self.memory)

    @property
    def num_sets(self) -> list[int]:
        return [p.num_sets if p is not None else 1 for p in self.params]

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def shots_total(self) -> int:
        return sum(n * k for n, k in zip(self.shots, self.num_sets))

    @property
    def shots_done(self) -> int:
        return sum(sum(s) for s in self.set_shots)

    @property
    def shards_running(self) -> int:
        return sum(1 for s in self.shards if s.status == "running")

    def circuit_counts(self, index: int) -> dict[str, int]:
        """Counted hex counts of a circuit, merged over its parameter sets."""
        merged: dict[str, int] = {}
        for counts in self.counts[index]:
            merge_counts(merged, counts.items())
        return merged

    def partial_counts(self) -> list[dict[str, int]]:
        """Per circuit: counted results plus the chunks of running attempts that came in so far."""
        merged = [self.circuit_counts(i) for i in range(len(self.infos))]
        for shard in self.shards:
            if shard.status == "running" and shard.attempt is not None:
                for chunk in shard.attempt.partial.values():
                    for result in chunk:
                        merge_counts(merged[result.circuit_index], result.counts.items())
        return merged

    def set_memory(self, index: int, set_index: int) -> bytes:
        """Per-shot memory of one parameter set, in shot order (shards in plan order)."""
        return b"".join(part for _, part in sorted(self.memory_parts.get((index, set_index), ())))

    def describe_circuits(self, indices: Iterable[int]) -> str:
        idx = list(indices)
        if len(idx) == 1:
            return f"circuit {idx[0]} ({self.infos[idx[0]].name!r})"
        return f"circuits {idx[0]}-{idx[-1]}"


class Scheduler:
    """Node registry, job table and dispatcher. Not thread-safe: call it from one thread."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        *,
        on_job_change: Callable[[str], None] = lambda job_id: None,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.on_job_change = on_job_change
        self.metrics = metrics or CoordinatorMetrics()
        self.nodes: dict[str, NodeRecord] = {}
        self.lost_nodes: deque[NodeRecord] = deque(maxlen=_LOST_NODES_KEPT)
        self.jobs: dict[str, JobRecord] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # final jobs kept in memory, oldest first
        self.queue: deque[tuple[str, int]] = deque()
        self.attempts: dict[str, Attempt] = {}
        self.stale_dropped = 0
        self.shots_counted = 0
        """Shots of every shard counted since start (all jobs)."""
        # Indexes that keep the hot paths free of work proportional to the number of nodes:
        self._idle: dict[int, dict[str, NodeRecord]] = {}  # free slots -> nodes with that many, next first
        self._prefetch: dict[str, NodeRecord] = {}  # every slot busy, room for a shard in hand
        self._by_heartbeat: OrderedDict[str, NodeRecord] = OrderedDict()  # oldest heartbeat first
        self.slots_total = 0
        self.metrics.bind(
            nodes_alive=lambda: sum(1 for n in list(self.nodes.values()) if n.state == "alive"),
            nodes_draining=lambda: sum(1 for n in list(self.nodes.values()) if n.state == "draining"),
            slots_busy=lambda: len(self.attempts),
            slots_total=lambda: self.slots_total,
            shards_queued=lambda: sum(j.shards_queued for j in list(self.jobs.values()) if not j.final),
            shards_running=lambda: sum(j.shards_running for j in list(self.jobs.values()) if not j.final),
            jobs_queued=lambda: sum(1 for j in list(self.jobs.values()) if j.state == QUEUED),
            jobs_running=lambda: sum(1 for j in list(self.jobs.values()) if j.state == RUNNING),
        )

    # ------------------------------------------------------------------ nodes

    def register_node(self, caps: node_pb2.NodeCapabilities, now: float) -> NodeRecord:
        """Add a node; returns its record with a fresh id."""
        if caps.slots < 1 or caps.slots > 4096:
            raise InvalidArgumentError("node capabilities: slots must be between 1 and 4096")
        if caps.memory_budget_bytes < 0 or caps.cores < 0:
            raise InvalidArgumentError("node capabilities: cores and memory budget must be >= 0")
        if len(caps.name) > 200 or len(caps.hostname) > 255:
            raise InvalidArgumentError("node capabilities: name or hostname too long")
        label = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in caps.name)[:40] or "node"
        node = NodeRecord(f"{label}-{uuid.uuid4().hex[:8]}", caps, now, now,
                          in_hand_limit=caps.slots * (1 + self.config.prefetch_per_slot))
        self.nodes[node.node_id] = node
        self._by_heartbeat[node.node_id] = node
        self.slots_total += caps.slots
        log.info("node %s registered: %d slots, %d cores, %.1f GiB budget (%s)", node.node_id, caps.slots,
                 caps.cores, caps.memory_budget_bytes / 2**30, caps.hostname)
        return node

    def heartbeat(self, node_id: str, now: float) -> bool:
        """Record a heartbeat; False if the node is unknown (lost, or from before a restart)."""
        node = self.nodes.get(node_id)
        if node is None:
            return False
        self.metrics.heartbeat_lag.observe(max(0.0, now - node.last_heartbeat))
        node.last_heartbeat = now
        self._by_heartbeat.move_to_end(node_id)
        return True

    def attach_stream(self, node_id: str, sink: MessageSink, now: float) -> NodeRecord:
        """Bind a node's Work stream; shards start flowing to it."""
        node = self.nodes.get(node_id)
        if node is None:
            raise NotFoundError(f"unknown node {node_id}; register again")
        if node.sink is not None:
            self._lose_node(node, now, "node opened a second work stream")
            raise FailedPreconditionError(f"node {node_id} already had a work stream; register again")
        node.sink = sink
        node.last_heartbeat = now
        self._by_heartbeat.move_to_end(node_id)
        self._index(node)
        log.info("node %s work stream open", node_id)
        self.dispatch(now)
        return node

    def detach_stream(self, node_id: str, sink: MessageSink, now: float, reason: str) -> None:
        """A node's Work stream ended: the node is lost and its shards go back to the queue."""
        node = self.nodes.get(node_id)
        if node is not None and node.sink is sink:
            if node.state == "draining" and not node.running:
                reason = "left after draining"
            self._lose_node(node, now, reason)

    def node_draining(self, node_id: str, now: float) -> None:
        """The node assigns itself no more work; it hands back what it has not started."""
        node = self.nodes.get(node_id)
        if node is not None and node.state == "alive":
            node.state = "draining"
            self._index(node)
            log.info("node %s draining", node_id)

    def reap(self, now: float) -> list[str]:
        """Declare lost every node silent past the heartbeat timeout; returns their ids."""
        timeout = self.config.heartbeat_timeout_s
        silent = []
        for node in self._by_heartbeat.values():  # oldest first: stop at the first one in time
            if now - node.last_heartbeat <= timeout:
                break
            silent.append(node)
        for node in silent:
            # Its stream stays open: whatever a hung node sends later arrives there and is
            # dropped as stale; the node learns it was lost from its next heartbeat.
            self._lose_node(node, now, f"no heartbeat for {now - node.last_heartbeat:.1f}s", close_stream=False)
        return [n.node_id for n in silent]

    def _lose_node(self, node: NodeRecord, now: float, reason: str, *, close_stream: bool = True) -> None:
        node.state = "lost"
        del self.nodes[node.node_id]
        self.slots_total -= node.caps.slots
        kind = "drained" if reason == "left after draining" else "stream" if close_stream else "timeout"
        self.metrics.nodes_lost.labels(kind).inc()
        self._by_heartbeat.pop(node.node_id, None)
        self._index(node)
        self.lost_nodes.append(node)
        if node.sink is not None and close_stream:
            node.sink.put_nowait(None)
        level = logging.INFO if reason == "left after draining" else logging.WARNING
        log.log(level, "node %s lost (%s); requeueing %d shard(s)", node.node_id, reason, len(node.running))
        for attempt in list(node.running.values()):
            job = self.jobs[attempt.job_id]
            shard = job.shards[attempt.shard_index]
            self._end_attempt(attempt, now, "lost", reason)
            if shard.live or shard.status == "done":
                continue  # a backup copy of it runs on, or it was counted meanwhile
            shard.losses += 1
            if shard.losses >= self.config.max_shard_losses:
                self._fail_job(job, f"{job.describe_circuits(shard.plan.circuit_indices)}: the nodes running it "
                               f"were lost {shard.losses} times (last: {reason}); it may exhaust their memory",
                               now)
            else:
                self._requeue(job, shard, front=True)
        self.dispatch(now)

    # ------------------------------------------------------------------- jobs

    def existing_job(self, request_key: str) -> JobRecord | None:
        """The job an earlier Submit with this idempotency key created, if any."""
        if not request_key:
            return None
        if len(request_key) > 128:
            raise InvalidArgumentError("request key too long (at most 128 characters)")
        job_id = self.store.job_for_request_key(request_key)
        return self.get_job(job_id) if job_id is not None else None

    def submit(self, prepared: PreparedJob, now: float, request_key: str = "") -> JobRecord:
        """Plan, persist and queue a job (already validated by intake). A request key that
        already created a job returns that job instead. (The servicer does the same in three
        steps, writing the job from a thread: :meth:`plan_submission`, ``store.insert_job``,
        :meth:`accept`.)"""
        existing = self.existing_job(request_key)
        if existing is not None:
            return existing
        job, plan = self.plan_submission(prepared, now, request_key)
        if not self.store.insert_job(self.stored_form(job)):
            return self.existing_job(request_key) or job
        return self.accept(job, plan, now)

    def plan_submission(self, prepared: PreparedJob, now: float, request_key: str = ""
                        ) -> tuple[JobRecord, tuple[ShardPlan, ...]]:
        """A new job record and its plan; raises if no node of the cluster can hold a shard."""
        job = JobRecord(uuid.uuid4().hex[:16], now, prepared.seed, prepared.method, self.config.policy,
                        prepared.infos, prepared.shots, prepared.params, prepared.qpy, prepared.memory,
                        prepared.noise_model, request_key=request_key)
        plan = job.plan()
        self._check_capacity(job.infos, plan)
        return job, plan

    @staticmethod
    def stored_form(job: JobRecord) -> StoredJob:
        """What :meth:`Store.insert_job` writes for a new job."""
        return StoredJob(job.job_id, job.created_at, QUEUED, job.seed, job.method, job.policy, job.infos, job.shots,
                         job.params, job.qpy, job.memory, job.noise_model, request_key=job.request_key)

    def accept(self, job: JobRecord, plan: tuple[ShardPlan, ...], now: float) -> JobRecord:
        """Queue a planned job once it is in the store, and dispatch."""
        self._activate(job, plan, {})
        log.info("job %s accepted: %d circuit(s), %d experiment(s), %d shots, %d shard(s), seed %d, method %s%s",
                 job.job_id, len(job.infos), sum(job.num_sets), job.shots_total, len(plan), job.seed,
                 job.method or "automatic", ", noisy" if job.noise_model else "")
        self.dispatch(now)
        return job

    def _check_capacity(self, infos: list[CircuitInfo], plan: tuple[ShardPlan, ...]) -> None:
        live = [n for n in self.nodes.values() if n.state == "alive"]
        if not live:
            return  # nothing to judge by; the job waits for nodes
        for shard in plan:
            if not any(n.can_hold(shard) for n in live):
                widest = max(shard.circuit_indices, key=lambda i: infos[i].num_qubits)
                best = max(n.slot_memory for n in live)
                newest_qpy = max(n.caps.qpy_version for n in live)
                if newest_qpy and shard.qpy_version > newest_qpy:
                    raise NoCapableNodeError(
                        f"circuit {widest}: QPY version {shard.qpy_version} is newer than any node reads "
                        f"({newest_qpy}); upgrade qiskit on the nodes or dump with an older QPY version")
                raise NoCapableNodeError(
                    f"circuit {widest} ({infos[widest].name!r}, {infos[widest].num_qubits} qubits) needs "
                    f"{_gib(shard.memory_bytes)} with method {shard.method}; the largest node slot "
                    f"holds {_gib(best)}"
                )

    def _activate(self, job: JobRecord, plan: tuple[ShardPlan, ...],
                  done: dict[int, list[common_pb2.CircuitCounts]]) -> None:
        self._load_results(job, plan, done)
        self.jobs[job.job_id] = job
        queued = [(job.job_id, s.plan.index) for s in job.shards if s.status == "queued"]
        job.shards_queued = len(queued)
        self.queue.extend(queued)

    def _load_results(self, job: JobRecord, plan: tuple[ShardPlan, ...],
                      done: dict[int, list[common_pb2.CircuitCounts]]) -> None:
        job.shards = [ShardState(p) for p in plan]
        job.counts = [[{} for _ in range(k)] for k in job.num_sets]
        job.set_shots = [[0] * k for k in job.num_sets]
        for shard in job.shards:
            if shard.plan.index in done:
                self._merge(job, shard, done[shard.plan.index])

    def _merge(self, job: JobRecord, shard: ShardState, results: Iterable[common_pb2.CircuitCounts]) -> None:
        for chunk in shard.plan.chunks:
            for entry in chunk.entries:
                for s in range(entry.set_start, entry.set_start + entry.set_count):
                    job.set_shots[entry.circuit][s] += chunk.shots
        for result in results:
            merge_counts(job.counts[result.circuit_index][result.set_index], result.counts.items())
            if job.memory:
                job.memory_parts.setdefault((result.circuit_index, result.set_index), []).append(
                    (shard.plan.index, result.memory))
        shard.status = "done"
        job.shards_done += 1

    def recover(self, now: float) -> int:
        """Reload every unfinished job from the store and queue what is left of it."""
        recovered = 0
        for stored in self.store.unfinished_jobs(FINAL_STATES):
            job = JobRecord.from_stored(stored)
            self._activate(job, job.plan(), stored.shard_results)
            if job.shards_done:
                job.state = RUNNING
            recovered += 1
            log.info("job %s recovered: %d of %d shard(s) already counted", job.job_id, job.shards_done,
                     len(job.shards))
            if job.shards_done == len(job.shards):
                self._finish(job, DONE, "", now)
        self.dispatch(now)
        return recovered

    def get_job(self, job_id: str) -> JobRecord:
        """A job by id, from memory or (finished jobs no longer in memory) from the store."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        if len(job_id) > 64:
            raise InvalidArgumentError("job id too long")
        stored = self.store.load_job(job_id, with_payloads=False)
        if stored is None:
            raise NotFoundError(f"no job {job_id!r}")
        job = JobRecord.from_stored(stored)
        self._load_results(job, job.plan(), stored.shard_results)
        if job.final:
            self.jobs[job_id] = job
            self._remember_finished(job_id)
        return job

    def _remember_finished(self, job_id: str) -> None:
        """Keep the newest finished jobs in memory; older ones are read back from the store."""
        self._finished[job_id] = None
        self._finished.move_to_end(job_id)
        while len(self._finished) > self.config.finished_jobs_in_memory:
            old, _ = self._finished.popitem(last=False)
            self.jobs.pop(old, None)

    def cancel(self, job_id: str, now: float) -> JobRecord:
        """Cancel a job; a job already final is left as it is."""
        job = self.get_job(job_id)
        if not job.final:
            self._finish(job, CANCELLED, "cancelled by client", now)
        return job

    # ----------------------------------------------------------------- results

    def chunk_result(self, node_id: str, msg: node_pb2.ChunkResult, now: float) -> None:
        """A chunk of a running shard finished on a node: keep it as partial counts."""
        attempt = self._live_attempt(node_id, msg.attempt_token)
        if attempt is None:
            return
        job = self.jobs[attempt.job_id]
        shard = job.shards[attempt.shard_index]
        problem = _check_chunk(job, shard.plan, msg)
        if problem:
            self._attempt_failed(job, shard, attempt, f"node sent inconsistent results: {problem}", now)
            return
        attempt.partial[msg.chunk_index] = list(msg.counts)
        self.on_job_change(job.job_id)

    def shard_done(self, node_id: str, token: str, now: float) -> None:
        """A node finished a shard: count it, once."""
        attempt = self._live_attempt(node_id, token)
        if attempt is None:
            return
        job = self.jobs[attempt.job_id]
        shard = job.shards[attempt.shard_index]
        if len(attempt.partial) != len(shard.plan.chunks):
            self._attempt_failed(job, shard, attempt, f"node reported the shard done after "
                                 f"{len(attempt.partial)} of {len(shard.plan.chunks)} chunks", now)
            return
        results = common_pb2.ShardResult(results=[r for k in sorted(attempt.partial) for r in attempt.partial[k]])
        if not self.store.record_shard(job.job_id, shard.plan.index, results, node_id, token, now):
            log.error("job %s shard %d already had a stored result; dropping attempt %s", job.job_id,
                      shard.plan.index, token)
            self._end_attempt(attempt, now, "stale", "duplicate result")
            return
        self._end_attempt(attempt, now, "done", "")
        if shard.plan.cost > 0:
            job.seconds_per_cost.append((now - attempt.started_at) / shard.plan.cost)
        for other in list(shard.live):  # a backup copy lost the race: stop it
            self._cancel_attempt(other, now, "another copy of the shard finished first")
        self._merge(job, shard, results.results)
        self.shots_counted += shard.plan.shots
        self.metrics.shots.inc(shard.plan.shots)
        self.metrics.shard_duration.observe(max(0.0, now - attempt.started_at))
        node = self.nodes.get(node_id)
        if node is not None:
            node.shards_done += 1
        log.info("job %s shard %d done on node %s (%d/%d)%s", job.job_id, shard.plan.index, node_id,
                 job.shards_done, len(job.shards), " (backup copy)" if attempt.backup else "")
        if job.shards_done == len(job.shards):
            self._finish(job, DONE, "", now)
        else:
            self.on_job_change(job.job_id)
        self.dispatch(now)

    def shard_failed(self, node_id: str, token: str, error: str, refused: bool, now: float) -> None:
        """A node could not run a shard (refused) or the run failed."""
        attempt = self._live_attempt(node_id, token)
        if attempt is None:
            return
        job = self.jobs[attempt.job_id]
        shard = job.shards[attempt.shard_index]
        error = error[:1000] or "unknown error"
        if refused:
            self._end_attempt(attempt, now, "refused", error)
            shard.refused_by.add(node_id)
            node = self.nodes.get(node_id)
            if node is not None:
                node.sent.pop(job.job_id, None)  # it may have lost what it kept of the job
                node.noise_sent.discard(job.job_id)
            log.info("job %s shard %d handed back by node %s: %s", job.job_id, shard.plan.index, node_id, error)
            self._requeue(job, shard, front=True)
            self.dispatch(now)
        else:
            self._attempt_failed(job, shard, attempt, error, now)

    def _attempt_failed(self, job: JobRecord, shard: ShardState, attempt: Attempt, error: str, now: float) -> None:
        self._end_attempt(attempt, now, "failed", error)
        node = self.nodes.get(attempt.node_id)
        if node is not None:  # a worker restart keeps the daemon's copies, but be safe
            node.sent.pop(job.job_id, None)
            node.noise_sent.discard(job.job_id)
        shard.failures.append((attempt.node_id, error))
        log.warning("job %s shard %d failed on node %s (%d/%d): %s", job.job_id, shard.plan.index,
                    attempt.node_id, len(shard.failures), self.config.max_shard_failures, error)
        if len(shard.failures) >= self.config.max_shard_failures:
            nodes = ", ".join(dict.fromkeys(n for n, _ in shard.failures))
            self._fail_job(job, f"{job.describe_circuits(shard.plan.circuit_indices)} failed "
                           f"{len(shard.failures)} times (nodes: {nodes}): {error}", now)
        else:
            self._requeue(job, shard, front=True)
        self.dispatch(now)

    def _live_attempt(self, node_id: str, token: str) -> Attempt | None:
        attempt = self.attempts.get(token)
        if attempt is not None and attempt.node_id == node_id and node_id in self.nodes:
            return attempt
        self.stale_dropped += 1
        self.metrics.stale.inc()
        job = self.jobs.get(token.split(":", 1)[0])
        if job is not None:
            job.stale_dropped += 1
        log.info("dropped a stale message from node %s for attempt %s", node_id, token[:80])
        return None

    def _end_attempt(self, attempt: Attempt, now: float, outcome: str, error: str) -> None:
        self.metrics.attempts.labels(outcome).inc()
        attempt.ended_at = now
        attempt.outcome = outcome
        attempt.error = error
        attempt.partial = {}  # counted results live in the job; drop the copy
        self.attempts.pop(attempt.token, None)
        node = self.nodes.get(attempt.node_id)
        if node is not None:
            node.running.pop(attempt.token, None)
            self._index(node)
        job = self.jobs.get(attempt.job_id)
        if job is not None:
            shard = job.shards[attempt.shard_index]
            if attempt in shard.live:
                shard.live.remove(attempt)
                if not shard.live and shard.status == "running" and outcome != "done":
                    shard.status = "queued"
                    job.shards_queued += 1

    def _cancel_attempt(self, attempt: Attempt, now: float, reason: str) -> None:
        """Stop a running attempt whose result is no longer wanted, and tell its node."""
        node = self.nodes.get(attempt.node_id)
        if node is not None and node.sink is not None:
            node.sink.put_nowait(node_pb2.CoordinatorMessage(
                cancel=node_pb2.CancelAttempt(attempt_token=attempt.token, reason=reason)))
        self._end_attempt(attempt, now, "cancelled", reason)

    def _requeue(self, job: JobRecord, shard: ShardState, *, front: bool) -> None:
        if job.final or shard.status != "queued":
            return  # counted, or a copy of it still runs
        entry = (job.job_id, shard.plan.index)
        self.metrics.reassigned.inc()
        if front:
            self.queue.appendleft(entry)
        else:
            self.queue.append(entry)
        self.on_job_change(job.job_id)

    def _fail_job(self, job: JobRecord, message: str, now: float) -> None:
        if not job.final:
            log.error("job %s failed: %s", job.job_id, message)
            self._finish(job, FAILED, message, now)

    def _finish(self, job: JobRecord, state: int, error: str, now: float) -> None:
        self.metrics.jobs_finished.labels(common_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()).inc()
        self.metrics.job_latency.observe(max(0.0, now - job.created_at))
        job.state = state
        job.error = error
        job.finished_at = now
        self.store.finish_job(job.job_id, state, error, now)
        for shard in job.shards:
            for attempt in list(shard.live):
                self._cancel_attempt(attempt, now, error or "job finished")
        for node_id in job.nodes_used:
            node = self.nodes.get(node_id)
            if node is not None and (node.sent.pop(job.job_id, None) is not None or job.job_id in node.noise_sent):
                node.noise_sent.discard(job.job_id)
                if node.sink is not None:
                    node.sink.put_nowait(node_pb2.CoordinatorMessage(forget=node_pb2.ForgetJob(job_id=job.job_id)))
        job.qpy = []  # payloads are on disk; free the memory
        self._remember_finished(job.job_id)
        log.info("job %s %s after %.2fs%s", job.job_id, common_pb2.JobState.Name(state).removeprefix("JOB_STATE_")
                 .lower(), now - job.created_at, f": {error}" if error else "")
        self.on_job_change(job.job_id)

    # ---------------------------------------------------------------- dispatch

    def _index(self, node: NodeRecord) -> None:
        """File a node under idle (by its free slots), prefetch (room in hand) or neither. A
        node filed again goes to the back of its group (round robin)."""
        node_id = node.node_id
        if node.pool is not None:
            group = self._prefetch if node.pool == 0 else self._idle[node.pool]
            group.pop(node_id, None)
            if node.pool and not group:
                del self._idle[node.pool]
            node.pool = None
        if node.state != "alive" or node.sink is None or node_id not in self.nodes:
            return
        free = node.caps.slots - len(node.running)
        if free > 0:
            self._idle.setdefault(free, {})[node_id] = node
            node.pool = free
        elif len(node.running) < node.in_hand_limit:
            self._prefetch[node_id] = node
            node.pool = 0

    def _idle_nodes(self) -> Iterator[NodeRecord]:
        """Nodes with a free slot, those with the most free slots first."""
        for free in sorted(self._idle, reverse=True):
            yield from self._idle[free].values()

    def dispatch(self, now: float) -> int:
        """Place queued shards on nodes that can hold them: free slots first, then one more in
        hand per slot so that a node's next shard is there when one ends. Returns how many."""
        placed = 0
        skipped: list[tuple[str, int]] = []
        while self.queue and (self._idle or self._prefetch):
            job_id, index = self.queue.popleft()
            job = self.jobs.get(job_id)
            if job is None or job.final or job.shards[index].status != "queued":
                continue
            shard = job.shards[index]
            node = self._pick(shard)
            if node is None:
                skipped.append((job_id, index))
                continue
            self._start_attempt(job, shard, node, now)
            placed += 1
        self.queue.extendleft(reversed(skipped))
        return placed

    def _pick(self, shard: ShardState, *, idle_only: bool = False) -> NodeRecord | None:
        """The first node that can hold the shard, idle ones first, preferring one it has not
        failed on. Nodes that cannot hold it are skipped; usually the first one fits."""
        failed_on = {n for n, _ in shard.failures}
        running_on = {a.node_id for a in shard.live}
        pools = (self._idle_nodes(),) if idle_only else (self._idle_nodes(), iter(self._prefetch.values()))
        for pool in pools:
            fallback = None
            for node in pool:
                if node.node_id in shard.refused_by or node.node_id in running_on or not node.can_hold(shard.plan):
                    continue
                if node.node_id not in failed_on:
                    return node
                fallback = fallback or node
            if fallback is not None:
                return fallback
        return None

    def speculate(self, now: float) -> int:
        """Give slow shards a backup copy on an idle node, near the end of their job.

        A shard qualifies when nothing of its job is queued, it runs as a single attempt, has
        had no backup yet, and has run ``backup_after_s`` and ``backup_slowdown`` times longer
        than the job's finished shards suggest for its estimated cost. Called periodically (not
        on every event): its work is proportional to the attempts running.
        """
        after = self.config.backup_after_s
        if not after or not self._idle:
            return 0
        started = 0
        medians: dict[str, float] = {}  # per job, computed once per call
        for attempt in sorted(self.attempts.values(), key=lambda a: a.started_at):
            if not self._idle:
                break
            elapsed = now - attempt.started_at
            if elapsed < after:
                break  # sorted: every later one is younger
            job = self.jobs.get(attempt.job_id)
            if job is None or job.final or job.shards_queued or not job.seconds_per_cost:
                continue
            shard = job.shards[attempt.shard_index]
            if len(shard.live) != 1 or shard.backups or shard.status != "running":
                continue
            if job.job_id not in medians:
                rates = sorted(job.seconds_per_cost)
                medians[job.job_id] = rates[len(rates) // 2]
            expected = medians[job.job_id] * shard.plan.cost
            if elapsed < self.config.backup_slowdown * expected:
                continue
            node = self._pick(shard, idle_only=True)
            if node is None:
                continue
            shard.backups += 1
            self.metrics.backups.inc()
            log.info("job %s shard %d: running %.1fs on node %s (expected %.1fs): backup copy on node %s",
                     job.job_id, shard.plan.index, elapsed, attempt.node_id, expected, node.node_id)
            self._start_attempt(job, shard, node, now, backup=True)
            started += 1
        return started

    def _start_attempt(self, job: JobRecord, shard: ShardState, node: NodeRecord, now: float, *,
                       backup: bool = False) -> None:
        token = f"{job.job_id}:{shard.plan.index}:{secrets.token_hex(8)}"
        attempt = Attempt(token, job.job_id, shard.plan.index, node.node_id, now, backup=backup)
        if shard.status == "queued":
            job.shards_queued -= 1
        shard.status = "running"
        shard.live.append(attempt)
        node.running[token] = attempt
        self.attempts[token] = attempt
        job.attempts.append(attempt)
        job.nodes_used.add(node.node_id)
        if job.state == QUEUED:
            job.state = RUNNING
            job.started_at = now
        plan = shard.plan
        sent = node.sent.setdefault(job.job_id, set())
        assignment = node_pb2.ShardAssignment(
            job_id=job.job_id,
            shard_index=plan.index,
            attempt_token=token,
            chunks=[common_pb2.Chunk(entries=[common_pb2.ChunkEntry(circuit_index=e.circuit, set_start=e.set_start,
                                                                      set_count=e.set_count) for e in c.entries],
                                     shots=c.shots, seed=c.seed)
                    for c in plan.chunks],
            circuits=[_payload(job, plan, i, cached=i in sent) for i in plan.circuit_indices],
            method=plan.method,
            memory_bytes=plan.memory_bytes,
            memory=job.memory,
        )
        sent.update(plan.circuit_indices)
        if job.noise_model:
            if job.job_id in node.noise_sent:
                assignment.noise_model_cached = True
            else:
                assignment.noise_model = job.noise_model
                node.noise_sent.add(job.job_id)
        assert node.sink is not None
        node.sink.put_nowait(node_pb2.CoordinatorMessage(assign=assignment))
        self._index(node)
        log.info("job %s shard %d -> node %s (attempt %d%s)", job.job_id, plan.index, node.node_id,
                 len(shard.failures) + shard.losses + len(shard.refused_by) + shard.backups + 1,
                 ", backup" if backup else "")
        self.on_job_change(job.job_id)


def _payload(job: JobRecord, plan: ShardPlan, index: int, *, cached: bool) -> node_pb2.CircuitPayload:
    """The circuit's QPY (unless the node has it already) and the rows of parameter values the
    shard uses."""
    payload = node_pb2.CircuitPayload(circuit_index=index)
    if cached:
        payload.cached = True
    else:
        payload.qpy = job.qpy[index]
    params = job.params[index]
    if params is not None:
        first, count = plan.set_range(index)
        row = 8 * len(params.names)
        payload.first_set = first
        payload.parameters.names.extend(params.names)
        payload.parameters.num_sets = count
        payload.parameters.values = params.values[first * row : (first + count) * row]
    return payload


def _check_chunk(job: JobRecord, plan: ShardPlan, msg: node_pb2.ChunkResult) -> str:
    if not 0 <= msg.chunk_index < len(plan.chunks):
        return f"no chunk {msg.chunk_index}"
    chunk = plan.chunks[msg.chunk_index]
    expected = sorted((e.circuit, s) for e in chunk.entries for s in range(e.set_start, e.set_start + e.set_count))
    got = sorted((c.circuit_index, c.set_index) for c in msg.counts)
    if got != expected:
        return f"chunk {msg.chunk_index} has results for {len(got)} experiments, not the {len(expected)} planned"
    for c in msg.counts:
        total = sum(c.counts.values())
        if total != chunk.shots:
            return f"circuit {c.circuit_index} counts add up to {total}, expected {chunk.shots}"
        num_clbits = job.infos[c.circuit_index].num_clbits
        if not _valid_outcomes(c.counts, num_clbits):
            return f"circuit {c.circuit_index} has an outcome that is not a {num_clbits}-bit hexadecimal value"
        width = memory_width(job.infos[c.circuit_index].num_clbits)
        if job.memory and len(c.memory) != chunk.shots * width:
            return f"circuit {c.circuit_index} sent {len(c.memory)} bytes of memory, expected {chunk.shots * width}"
    return ""


def _valid_outcomes(counts: Mapping[str, int], num_clbits: int) -> bool:
    """Aer's outcome keys: ``0x`` and lowercase hex digits, below ``2**num_clbits``. One regular
    expression over all keys (a result may hold 100,000 of them), then a numeric check only
    where the top digit can overflow the width."""
    if not counts:
        return True
    digits = max(1, -(-num_clbits // 4))
    pattern = _OUTCOME_PATTERNS.get(digits)
    if pattern is None:
        pattern = _OUTCOME_PATTERNS[digits] = re.compile(rf"0x[0-9a-f]{{1,{digits}}}(?:,0x[0-9a-f]{{1,{digits}}})*")
    joined = ",".join(counts)
    if joined.count(",") != len(counts) - 1 or pattern.fullmatch(joined) is None:
        return False  # (a key holding the separator would otherwise pass as two)
    if num_clbits % 4 == 0 and num_clbits:
        return True  # as many digits as the width allows can never overflow it
    limit = 1 << num_clbits
    return all(int(key, 16) < limit for key in counts if len(key) - 2 == digits)


_OUTCOME_PATTERNS: dict[int, re.Pattern[str]] = {}


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"
