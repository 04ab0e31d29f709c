"""The coordinator's rules, as a state machine: events in, decisions out.

Events are the methods of :class:`Scheduler` (a node registered, a heartbeat, a chunk result,
a shard done or failed, a stream opened or closed, a job accepted or cancelled, a tick); each
returns the :mod:`~qscale.coordinator.decisions` it made (send this to that node's stream,
persist these results, wake these watchers), which :class:`~qscale.coordinator.runtime.Runtime`
carries out. The scheduler does no I/O and reads no clock: every event takes ``now``
(monotonic seconds; an injected ``wall`` clock stamps records for display only). It is called
from one thread.

Accounting rules:
- every dispatch of a shard is an *attempt* with an unguessable token; a node's messages about
  a shard are accepted only for the token of one of the shard's current attempts, sent by the
  node that holds it; anything else (a node declared lost coming back, a cancelled attempt) is
  dropped and counted as stale;
- a shard is counted once: by the first of its attempts to finish; the others are cancelled;
- a node that goes silent (or whose stream breaks) is first *suspected*: its shards get backup
  copies on free capacity at once, and it keeps them; it is declared lost only after the
  heartbeat timeout (see :mod:`~qscale.coordinator.nodes`). A node that comes back, or
  registers again presenting its id and attempts in hand, keeps the attempts still current.

Sharing rules:
- free slots go to queued shards in the order of :class:`~qscale.coordinator.fairshare.FairQueue`:
  priority class, then the user and the job with the least weighted slot-seconds; every attempt
  is charged to its job (an estimate at dispatch, what it ran at its end);
- a user at their slot quota gets no more slots until one of theirs frees; a submission over a
  user's job or queued-shots quota is refused before anything changes (:meth:`Scheduler.admit`);
- a shard that must start before those waiting on the nodes (a higher class, or the first of a
  job with nothing in hand) may be *overbooked* onto a node holding a waiting shard of its class
  or lower: the node runs it on its next free slot; nothing running is stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

from qscale.coordinator import messages
from qscale.coordinator.checks import check_chunk
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.decisions import CloseStream, Decision, FinishJob, Notify, RecordShard, Send
from qscale.coordinator.fairshare import FairQueue, QueuedJob
from qscale.coordinator.jobs import (CANCELLED, DONE, FAILED, FINAL_STATES, QUEUED, RUNNING, Attempt, Job, Shard,
                                     run_order, state_name)
from qscale.coordinator.metrics import CoordinatorMetrics
from qscale.coordinator.nodes import Node, Registry, check_capabilities
from qscale.coordinator.placement import Placement
from qscale.coordinator.planner import ShardPlan
from qscale.coordinator.users import User
from qscale.errors import (FailedPreconditionError, InvalidArgumentError, NoCapableNodeError, NotFoundError,
                           ResourceExhaustedError)
from qscale.proto.v1 import common_pb2, node_pb2

__all__ = ["Scheduler", "FINAL_STATES", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"]

log = logging.getLogger(__name__)

_MAX_TOKENS = 100_000  # attempt tokens one node may report in hand
_MAX_REFUSALS = 20  # refusals of one shard by nodes that are not draining before its job fails
_REFUSAL_BACKOFF_S = 0.1  # after the second refusal by a node; doubles with each one, up to:
_REFUSAL_BACKOFF_MAX_S = 10.0
_LOOKAHEAD = 32  # queued shards of a job looked at for one that fits, when its first does not
_MIN_CHARGE_S = 0.01  # least a dispatch is charged, for shards whose cost the planner puts at 0
_RATE_SMOOTHING = 0.2  # weight of the newest shard in the moving averages of seconds per cost


@dataclass
class Usage:
    """What one user has now, for quotas and display."""

    jobs_unfinished: int = 0
    shots_queued: int = 0
    """Shots asked for by their unfinished jobs and not counted yet."""
    in_hand: int = 0
    """Attempts of their shards that nodes hold."""
    slot_seconds: float = 0.0
    """Slot-seconds of their attempts that ended, since the coordinator started."""


class Scheduler:
    """Node registry, job table and dispatcher. Not thread-safe: call it from one thread."""

    def __init__(self, config: CoordinatorConfig, *, metrics: CoordinatorMetrics | None = None,
                 wall: Callable[[], float] = time.time, users: Callable[[str], User] | None = None) -> None:
        self.config = config
        self.user_policy: Callable[[str], User] = users or (lambda name: User(
            name, max_jobs=config.max_jobs_per_user, max_queued_shots=config.max_queued_shots_per_user,
            max_slots=config.max_slots_per_user))
        """A user's weight and quotas by name."""
        self.metrics = metrics or CoordinatorMetrics()
        self.wall = wall
        self.registry = Registry(config.lost_node_ttl_s)
        self.placement = Placement()
        self.jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # final jobs kept in memory, oldest first
        self.fair = FairQueue(lambda name: self.user_policy(name).weight)
        """Queued shards, served by class, then fair share between users and between jobs."""
        self.usage: dict[str, Usage] = {}
        """Per user with unfinished jobs or attempts in hand (or that had some)."""
        self._admitted: set[str] = set()
        """Jobs counted against their user's quotas by :meth:`admit`, not accepted yet."""
        self.backups_wanted: deque[str] = deque()
        """Tokens of attempts held by suspected nodes, whose shards want a backup copy."""
        self.attempts: dict[str, Attempt] = {}
        self.stale_dropped = 0
        self.shots_counted = 0
        """Shots of every shard counted since start (all jobs)."""
        self._out: list[Decision] = []
        self.metrics.bind(
            nodes_alive=lambda: sum(1 for n in list(self.nodes.values()) if n.state == "alive"),
            nodes_draining=lambda: sum(1 for n in list(self.nodes.values()) if n.state == "draining"),
            slots_busy=lambda: len(self.attempts),
            slots_total=lambda: self.registry.slots_total,
            shards_queued=lambda: sum(j.shards_queued for j in list(self.jobs.values()) if not j.final),
            shards_running=lambda: sum(j.shards_running for j in list(self.jobs.values()) if not j.final),
            jobs_queued=lambda: sum(1 for j in list(self.jobs.values()) if j.state == QUEUED),
            jobs_running=lambda: sum(1 for j in list(self.jobs.values()) if j.state == RUNNING),
        )
        self._last_now = 0.0  # of the last tick: scrapes read running slot-seconds up to it
        self.metrics.bind_users(lambda: [(name, u.jobs_unfinished, u.shots_queued, u.in_hand,
                                          self.slot_seconds(name, self._last_now))
                                         for name, u in list(self.usage.items())])

    @property
    def nodes(self) -> dict[str, Node]:
        return self.registry.nodes

    def _take(self) -> list[Decision]:
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------ nodes

    def register(self, caps: node_pb2.NodeCapabilities, now: float, previous_id: str = "",
                 in_hand: Sequence[str] = ()) -> tuple[Node, list[str], list[Decision]]:
        """A node joins, or comes back presenting its previous id and the attempts it holds.
        Returns its record, the attempts it keeps (the rest it must drop) and the decisions."""
        check_capabilities(caps)
        if len(in_hand) > _MAX_TOKENS or any(len(t) > 200 for t in in_hand):
            raise InvalidArgumentError("register: too many attempt tokens, or one too long")
        if len(previous_id) > 64:
            raise InvalidArgumentError("register: previous node id too long")
        node = self.nodes.get(previous_id) if previous_id else None
        if node is not None:
            adopted = self._resume(node, caps, now, in_hand)
        else:
            node = Node(self.registry.new_id(caps, previous_id), caps, self.wall(), now,
                        in_hand_limit=caps.slots * (1 + self.config.prefetch_per_slot))
            self.registry.add(node)
            adopted = self._adopt_orphans(node, in_hand, now)
            log.info("node %s registered%s: %d slots, %d cores, %.1f GiB budget (%s)%s", node.node_id,
                     " again" if node.node_id == previous_id else "", caps.slots, caps.cores,
                     caps.memory_budget_bytes / 2**30, caps.hostname,
                     f"; kept {len(adopted)} of {len(in_hand)} attempt(s) in hand" if in_hand else "")
        return node, adopted, self._take()

    def _resume(self, node: Node, caps: node_pb2.NodeCapabilities, now: float, in_hand: Sequence[str]) -> list[str]:
        """A known node registered again (its stream broke): it keeps what is still current."""
        self.registry.slots_total += caps.slots - node.caps.slots
        node.caps = caps
        node.in_hand_limit = caps.slots * (1 + self.config.prefetch_per_slot)
        if node.stream is not None:
            self._out.append(CloseStream(node.stream))
            node.stream = None
        node.forget_payloads()  # it may have dropped its cache: send payloads again
        self.registry.heard(node, now)
        held = set(in_hand)
        adopted = []
        for token, attempt in list(node.running.items()):
            if token in held:
                attempt.unreported = 0
                adopted.append(token)
            else:
                self._release(attempt, now, "lost", "the node no longer holds it", count_loss=False)
        adopted += self._adopt_orphans(node, [t for t in in_hand if t not in node.running], now)
        log.info("node %s resumed: kept %d of %d attempt(s) in hand", node.node_id, len(adopted), len(in_hand))
        self.placement.file(node)
        return adopted

    def _adopt_orphans(self, node: Node, tokens: Sequence[str], now: float) -> list[str]:
        """Attempts a node holds that this coordinator does not know as running (it restarted,
        or declared the node lost): adopt each whose shard still waits in the queue."""
        adopted = []
        for token in tokens:
            job_id, _, rest = token.partition(":")
            index_text = rest.partition(":")[0]
            job = self.jobs.get(job_id)
            if job is None or job.final or token in self.attempts or not index_text.isdigit():
                continue
            index = int(index_text)
            if index >= len(job.shards) or len(node.running) >= node.in_hand_limit:
                continue
            shard = job.shards[index]
            if shard.status == "queued" and not shard.live:
                self._start_attempt(job, shard, node, now, token=token)
                adopted.append(token)
        return adopted

    def heartbeat(self, node_id: str, now: float, in_hand: Sequence[str] | None = None, *,
                  stream: object | None = None) -> tuple[bool, list[Decision]]:
        """A node's heartbeat, with the attempts it holds, on its Work ``stream`` (when given).
        False: the node is unknown (lost, or from before a restart), or the stream is not its
        current one (it registered again since): that session should register again."""
        node = self.nodes.get(node_id)
        if node is None or (stream is not None and node.stream is not stream):
            return False, []
        if node.last_heartbeat:
            self.metrics.heartbeat_lag.observe(max(0.0, now - node.last_heartbeat))
        changed = self.registry.heard(node, now)
        if changed:
            log.info("node %s heard again: no longer suspected", node_id)
            self.placement.file(node)
        if in_hand is not None and len(in_hand) <= _MAX_TOKENS:
            changed = self._reconcile(node, in_hand, now) or changed
        if changed:  # (a plain heartbeat costs no dispatch: it must stay cheap with 1,000 nodes)
            self._dispatch(now)
        return True, self._take()

    def _reconcile(self, node: Node, in_hand: Sequence[str], now: float) -> bool:
        """Compare what the node says it holds with what it was given. An attempt it holds that
        is no longer current is cancelled; one it was given but has not listed in two
        heartbeats in a row (sent before the earlier of them) went missing: run it elsewhere.
        Returns True if an attempt was released."""
        released = False
        held = set(in_hand)
        for token in held.difference(node.running):
            if node.stream is not None:
                self._out.append(Send(node.stream, messages.cancel(token, "no longer current")))
        for attempt in list(node.running.values()):
            if attempt.token in held:
                attempt.unreported = 0
            elif attempt.started < node.last_heartbeat:
                attempt.unreported += 1
                if attempt.unreported >= 2:
                    self._release(attempt, now, "lost", "the node does not hold it (heartbeat)", count_loss=False)
                    released = True
        node.last_heartbeat = now
        return released

    def attach_stream(self, node_id: str, stream: object, now: float) -> list[Decision]:
        """Bind a node's Work stream; shards start flowing to it."""
        node = self.nodes.get(node_id)
        if node is None:
            raise NotFoundError(f"unknown node {node_id}; register again")
        if node.stream is not None:
            # Its first stream is still open here: a node that lost it registers again first.
            raise FailedPreconditionError(f"node {node_id} already has a work stream; register again")
        node.stream = stream
        self.registry.clear_suspicion(node)
        self.registry.heard(node, now)
        self.placement.file(node)
        log.info("node %s work stream open", node_id)
        self._dispatch(now)
        return self._take()

    def detach_stream(self, node_id: str, stream: object, now: float, reason: str) -> list[Decision]:
        """A node's Work stream ended. A node that drained and holds nothing has left; any other
        is suspected (it may come back with its attempts) until it resumes or times out."""
        node = self.nodes.get(node_id)
        if node is None or node.stream is not stream:
            return []
        node.stream = None
        if node.state == "draining" and not node.running:
            self._lose_node(node, now, "left after draining", close_stream=False)
        else:
            self._suspect(node, now, reason)
        return self._take()

    def node_draining(self, node_id: str, now: float) -> list[Decision]:
        """The node assigns itself no more work; it hands back what it has not started."""
        node = self.nodes.get(node_id)
        if node is not None and node.state == "alive":
            node.state = "draining"
            self.placement.file(node)
            log.info("node %s draining", node_id)
        return self._take()

    def tick(self, now: float) -> list[Decision]:
        """Periodic: suspect silent nodes, declare lost those silent past the timeout, age out
        lost entries, start backup copies of slow shards, dispatch."""
        self._last_now = now
        config = self.config
        suspect, lose = self.registry.silent(now, config.suspect_after, config.heartbeat_timeout_s)
        for node in suspect:
            self._suspect(node, now, f"no heartbeat for {now - node.last_heard:.1f}s")
        for node in lose:
            # Its stream stays open: whatever a hung node sends later arrives there and is
            # dropped as stale; the node learns it was lost from its next heartbeat.
            silence = now - node.last_heard
            reason = (f"no heartbeat for {silence:.1f}s" if silence > config.heartbeat_timeout_s else
                      f"its work stream broke {now - (node.suspected_since or now):.1f}s ago and it did not come back")
            self._lose_node(node, now, reason, close_stream=False)
        self.registry.age_out(now)
        self._speculate(now)
        self._dispatch(now)
        return self._take()

    def _suspect(self, node: Node, now: float, reason: str) -> None:
        if node.suspected_since is not None:
            return
        self.registry.suspect(node, now)
        self.placement.file(node)
        self.metrics.suspected.inc()
        log.warning("node %s suspected (%s): backup copies for %d shard(s) it holds", node.node_id, reason,
                    len(node.running))
        for attempt in node.running.values():
            self.backups_wanted.append(attempt.token)
        self._dispatch(now)

    def _lose_node(self, node: Node, now: float, reason: str, *, close_stream: bool = True) -> None:
        self.registry.remove(node, now)
        self.placement.file(node)
        kind = "drained" if reason == "left after draining" else "stream" if node.stream is None else "timeout"
        self.metrics.nodes_lost.labels(kind).inc()
        if node.stream is not None and close_stream:
            self._out.append(CloseStream(node.stream))
        level = logging.INFO if reason == "left after draining" else logging.WARNING
        log.log(level, "node %s lost (%s); requeueing %d shard(s)", node.node_id, reason, len(node.running))
        for attempt in list(node.running.values()):
            self._release(attempt, now, "lost", reason, count_loss=True)
        self._dispatch(now)

    # ------------------------------------------------------------------- jobs

    def plan(self, job: Job) -> tuple[ShardPlan, ...]:
        """The job's shards; raises if no node of the cluster can hold one of them.

        A circuit wider than any live node's statevector goes to the matrix-product-state
        method when the job lets the method be chosen (recorded in the job's policy, which is
        stored with it, so that a restart plans it the same way)."""
        widest = max((n.caps.max_statevector_qubits for n in self.nodes.values() if n.state == "alive"), default=0)
        if widest and job.method in ("", "automatic") and any(
                not info.clifford and info.num_qubits > widest for info in job.infos):
            job.policy = dataclasses.replace(job.policy, max_statevector_qubits=widest)
        plan = job.plan()
        self._check_capacity(job, plan)
        return plan

    def accept(self, job: Job, plan: tuple[ShardPlan, ...], now: float,
               done: dict[int, list[common_pb2.CircuitCounts]] | None = None) -> list[Decision]:
        """Queue a planned job once it is in the store (with the results already stored for
        some of its shards, after a restart), and dispatch."""
        job.accepted = now
        job.start(plan, done or {})
        self.jobs[job.job_id] = job
        if job.job_id in self._admitted:
            self._admitted.discard(job.job_id)
            self._user(job.user).shots_queued -= job.shots_done  # (admitted with every shot to go)
        else:
            usage = self._user(job.user)
            usage.jobs_unfinished += 1
            usage.shots_queued += job.shots_total - job.shots_done
        self.fair.add(job.job_id, job.user, job.priority, (s.plan.index for s in job.shards if s.status == "queued"))
        if done:
            if job.shards_done:
                job.state = RUNNING
            log.info("job %s recovered: %d of %d shard(s) already counted", job.job_id, job.shards_done,
                     len(job.shards))
            if job.shards_done == len(job.shards):
                self._finish(job, DONE, "", now)
        else:
            log.info("job %s accepted: %d circuit(s), %d experiment(s), %d shots, %d shard(s), seed %d, method %s%s",
                     job.job_id, len(job.infos), sum(job.num_sets), job.shots_total, len(plan), job.seed,
                     job.method or "automatic", ", noisy" if job.noise_model else "")
        self._dispatch(now)
        return self._take()

    def admit(self, job: Job) -> None:
        """Count a new job against its user's quotas until :meth:`accept` (or :meth:`withdraw`),
        or refuse it with nothing changed.

        Raises:
            ResourceExhaustedError: the user has as many unfinished jobs as allowed, or the job's
                shots would take their queued shots over the limit; the message says which
                limit and the current usage.
        """
        self.check_jobs_quota(job.user)
        policy = self.user_policy(job.user)
        usage = self._user(job.user)
        if policy.max_queued_shots and usage.shots_queued + job.shots_total > policy.max_queued_shots:
            raise ResourceExhaustedError(
                f"this job asks for {job.shots_total:,} shot(s) and user {job.user!r} has {usage.shots_queued:,} "
                f"queued; at most {policy.max_queued_shots:,} may be queued (max-queued-shots): submit fewer "
                "shots, or wait for queued ones to run")
        usage.jobs_unfinished += 1
        usage.shots_queued += job.shots_total
        self._admitted.add(job.job_id)

    def check_jobs_quota(self, user: str) -> None:
        """Raise :class:`ResourceExhaustedError` if ``user`` may not have one more unfinished job."""
        policy = self.user_policy(user)
        usage = self.usage.get(user)
        if policy.max_jobs and usage is not None and usage.jobs_unfinished >= policy.max_jobs:
            raise ResourceExhaustedError(
                f"user {user!r} has {usage.jobs_unfinished} unfinished job(s), the most allowed (max-jobs "
                f"{policy.max_jobs}); wait for one to finish, or cancel one")

    def withdraw(self, job: Job) -> None:
        """Undo :meth:`admit` for a job that was not accepted after all."""
        if job.job_id in self._admitted:
            self._admitted.discard(job.job_id)
            usage = self._user(job.user)
            usage.jobs_unfinished -= 1
            usage.shots_queued -= job.shots_total

    def _user(self, name: str) -> Usage:
        usage = self.usage.get(name)
        if usage is None:
            usage = self.usage[name] = Usage()
        return usage

    def slot_seconds(self, name: str, now: float) -> float:
        """Slot-seconds of a user's attempts since the coordinator started, running ones included."""
        usage = self.usage.get(name)
        running = sum(max(0.0, now - a.running_since) for a in list(self.attempts.values())
                      if a.running_since and a.user == name)
        return (usage.slot_seconds if usage else 0.0) + running

    def _check_capacity(self, job: Job, plan: tuple[ShardPlan, ...]) -> None:
        live = [n for n in self.nodes.values() if n.state == "alive"]
        if not live:
            return  # nothing to judge by; the job waits for nodes
        infos = job.infos
        for shard in plan:
            if not any(n.can_hold(shard) for n in live):
                widest = max(shard.circuit_indices, key=lambda i: infos[i].num_qubits)
                best = max(n.slot_memory for n in live)
                newest_qpy = max(n.caps.qpy_version for n in live)
                if newest_qpy and shard.qpy_version > newest_qpy:
                    raise NoCapableNodeError(
                        f"circuit {widest}: QPY version {shard.qpy_version} is newer than any node reads "
                        f"({newest_qpy}); upgrade qiskit on the nodes or dump with an older QPY version")
                widest_state = max(n.caps.max_statevector_qubits for n in live)
                methods = sorted({m for n in live for m in n.caps.methods})
                hint = ""
                if job.estimator and job.noise_model and shard.method == "density_matrix":
                    hint = ("; exact expectation values with a noise model need its density matrix: ask for a "
                            "sampled estimate (precision > 0) instead")
                raise NoCapableNodeError(
                    f"circuit {widest} ({infos[widest].name!r}, {infos[widest].num_qubits} qubits) needs "
                    f"{_gib(shard.memory_bytes)} with method {shard.method}; the largest node slot "
                    f"holds {_gib(best)} (statevectors of up to {widest_state} qubits) and the nodes offer "
                    f"{', '.join(methods) or 'no method'}{hint}"
                )

    def remember(self, job: Job) -> None:
        """Keep a finished job read back from the store among those in memory."""
        if job.final:
            self.jobs[job.job_id] = job
            self._remember_finished(job.job_id)

    def _remember_finished(self, job_id: str) -> None:
        """Keep the newest finished jobs in memory; older ones are read back from the store."""
        self._finished[job_id] = None
        self._finished.move_to_end(job_id)
        while len(self._finished) > self.config.finished_jobs_in_memory:
            old, _ = self._finished.popitem(last=False)
            self.jobs.pop(old, None)

    def forget(self, job_ids: Iterable[str]) -> None:
        """Drop finished jobs from memory: retention pruned their results. Unfinished ones stay."""
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is not None and job.final:
                del self.jobs[job_id]
                self._finished.pop(job_id, None)

    def cancel(self, job: Job, now: float) -> list[Decision]:
        """Cancel a job; a job already final is left as it is."""
        if not job.final and job.job_id in self.jobs:
            self._finish(job, CANCELLED, "cancelled by client", now)
        return self._take()

    # ----------------------------------------------------------------- results

    def chunk_result(self, node_id: str, msg: node_pb2.ChunkResult, now: float) -> list[Decision]:
        """A chunk of a running shard finished on a node: keep it as partial counts."""
        attempt = self._live_attempt(node_id, msg.attempt_token, now)
        if attempt is None or msg.chunk_index in attempt.partial:  # (resent after a resume)
            return self._take()
        if not attempt.running_at:
            node = self.nodes[node_id]
            node.confirm_running(attempt, self.wall(), now)
            self.placement.file(node)
        job = self.jobs[attempt.job_id]
        shard = job.shards[attempt.shard_index]
        problem = check_chunk(job, shard.plan, msg)
        if problem:
            self._attempt_failed(job, shard, attempt, f"node sent inconsistent results: {problem}", now)
        else:
            job.add_chunk(shard, attempt, msg.chunk_index, list(msg.counts))
            self._out.append(Notify(job.job_id))
        return self._take()

    def shard_done(self, node_id: str, token: str, now: float) -> list[Decision]:
        """A node finished a shard: count it, once."""
        attempt = self._live_attempt(node_id, token, now)
        if attempt is None:
            return self._take()
        job = self.jobs[attempt.job_id]
        shard = job.shards[attempt.shard_index]
        if len(attempt.partial) != len(shard.plan.chunks):
            self._attempt_failed(job, shard, attempt, f"node reported the shard done after "
                                 f"{len(attempt.partial)} of {len(shard.plan.chunks)} chunks", now)
            return self._take()
        results = common_pb2.ShardResult(results=[r for k in sorted(attempt.partial) for r in attempt.partial[k]])
        job.show_partial(shard, None)
        self._end_attempt(attempt, now, "done", "")
        self._out.append(RecordShard(job.job_id, shard.plan.index, results, node_id, token, attempt.ended_at))
        if shard.plan.cost > 0:
            job.seconds_per_cost.append((now - attempt.started) / shard.plan.cost)
            # What it ran, without the wait in the node's hand: the estimate charged at dispatch.
            rate = (now - (attempt.running_since or attempt.started)) / shard.plan.cost
            job.seconds_per_cost_ewma = _smooth(job.seconds_per_cost_ewma, rate)
        job.count(shard, results.results)
        self._user(job.user).shots_queued -= shard.plan.shots
        for other in list(shard.live):  # a backup copy lost the race: stop it
            self._cancel_attempt(other, now, "another copy of the shard finished first")
        self.shots_counted += shard.plan.shots
        self.metrics.shots.inc(shard.plan.shots)
        self.metrics.shard_duration.observe(max(0.0, now - attempt.started))
        node = self.nodes.get(node_id)
        if node is not None:
            node.shards_done += 1
        log.info("job %s shard %d done on node %s (%d/%d)%s", job.job_id, shard.plan.index, node_id,
                 job.shards_done, len(job.shards), " (backup copy)" if attempt.backup else "")
        if job.shards_done == len(job.shards):
            self._finish(job, DONE, "", now)
        else:
            self._out.append(Notify(job.job_id))
        self._dispatch(now)
        return self._take()

    def shard_failed(self, node_id: str, token: str, error: str, refused: bool, now: float) -> list[Decision]:
        """A node could not run a shard (refused: transient, nothing ran) or the run failed."""
        attempt = self._live_attempt(node_id, token, now)
        if attempt is None:
            return self._take()
        job = self.jobs[attempt.job_id]
        shard = job.shards[attempt.shard_index]
        error = error[:1000] or "unknown error"
        if not refused:
            self._attempt_failed(job, shard, attempt, error, now)
            return self._take()
        self._end_attempt(attempt, now, "refused", error)
        node = self.nodes.get(node_id)
        draining = node is None or node.state != "alive"
        if node is not None:
            node.forget_payloads(job.job_id)  # it may have lost what it kept of the job
        if not draining:
            count = shard.refusals[node_id] = shard.refusals.get(node_id, 0) + 1
            # Back off before sending it to that node again: a refusal is transient, but one
            # that persists must not spin (the tick dispatches it again when the time is up).
            if count > 1:  # (the first may be a dropped cache: the shard goes back with its payloads)
                shard.refused_until[node_id] = now + min(_REFUSAL_BACKOFF_MAX_S, _REFUSAL_BACKOFF_S * 2 ** (count - 2))
        log.info("job %s shard %d handed back by node %s: %s", job.job_id, shard.plan.index, node_id, error)
        if sum(shard.refusals.values()) >= _MAX_REFUSALS:
            self._fail_job(job, f"{job.describe_circuits(shard.plan.circuit_indices)} was refused "
                           f"{_MAX_REFUSALS} times (last by node {node_id}: {error})", now)
        else:
            self._requeue(job, shard)
        self._dispatch(now)
        return self._take()

    def _attempt_failed(self, job: Job, shard: Shard, attempt: Attempt, error: str, now: float) -> None:
        self._end_attempt(attempt, now, "failed", error)
        node = self.nodes.get(attempt.node_id)
        if node is not None:  # a worker restart keeps the daemon's copies, but be safe
            node.forget_payloads(job.job_id)
        shard.failures.append((attempt.node_id, error))
        log.warning("job %s shard %d failed on node %s (%d/%d): %s", job.job_id, shard.plan.index,
                    attempt.node_id, len(shard.failures), self.config.max_shard_failures, error)
        if len(shard.failures) >= self.config.max_shard_failures:
            nodes = ", ".join(dict.fromkeys(n for n, _ in shard.failures))
            self._fail_job(job, f"{job.describe_circuits(shard.plan.circuit_indices)} failed "
                           f"{len(shard.failures)} times (nodes: {nodes}): {error}", now)
        elif not shard.live:
            self._requeue(job, shard)
        self._dispatch(now)

    def _live_attempt(self, node_id: str, token: str, now: float) -> Attempt | None:
        attempt = self.attempts.get(token)
        node = self.nodes.get(node_id)
        if attempt is not None and attempt.node_id == node_id and node is not None:
            if self.registry.heard(node, now):
                self.placement.file(node)
            return attempt
        self.stale_dropped += 1
        self.metrics.stale.inc()
        job = self.jobs.get(token.split(":", 1)[0])
        if job is not None:
            job.stale_dropped += 1
        log.info("dropped a stale message from node %s for attempt %s", node_id, token[:80])
        return None

    def _end_attempt(self, attempt: Attempt, now: float, outcome: str, error: str) -> None:
        """End a running attempt (once: an attempt already ended is left as it is)."""
        if not attempt.running:
            return
        self.metrics.attempts.labels(outcome).inc()
        attempt.ended_at = self.wall()
        attempt.outcome = outcome
        attempt.error = error
        self.attempts.pop(attempt.token, None)
        node = self.nodes.get(attempt.node_id)
        if node is not None:
            node.drop(attempt)
            if attempt.running_at:  # its slot takes the next attempt the node holds
                waiting = node.next_waiting()
                if waiting is not None:
                    node.mark_running(waiting, attempt.ended_at, now)
            self.placement.file(node)
        ran = now - attempt.running_since if attempt.running_since else 0.0
        usage = self._user(attempt.user)
        usage.in_hand -= 1
        usage.slot_seconds += ran
        self.fair.charge(attempt.job_id, ran - attempt.charged)  # the estimate becomes what it ran
        job = self.jobs.get(attempt.job_id)
        if job is not None:
            job.in_hand -= 1
            shard = job.shards[attempt.shard_index]
            if attempt in shard.live:
                shard.live.remove(attempt)
                if shard.shown is attempt:
                    job.show_partial(shard, shard.live[0] if shard.live else None)
                if not shard.live and shard.status == "running" and outcome != "done":
                    shard.status = "queued"
                    job.shards_queued += 1
        attempt.partial = {}  # counted results live in the job; drop the copy

    def _release(self, attempt: Attempt, now: float, outcome: str, reason: str, *, count_loss: bool) -> None:
        """End an attempt that will not finish, and run its shard again unless another copy
        runs on (``count_loss``: its node was lost; too many losses fail the job)."""
        if not attempt.running:
            return
        self._end_attempt(attempt, now, outcome, reason)
        job = self.jobs.get(attempt.job_id)
        if job is None or job.final:
            return
        shard = job.shards[attempt.shard_index]
        if shard.live or shard.status == "done":
            return  # a backup copy of it runs on, or it was counted meanwhile
        if count_loss:
            shard.losses += 1
            if shard.losses >= self.config.max_shard_losses:
                self._fail_job(job, f"{job.describe_circuits(shard.plan.circuit_indices)}: the nodes running it "
                               f"were lost {shard.losses} times (last: {reason}); it may exhaust their memory", now)
                return
        self._requeue(job, shard)

    def _cancel_attempt(self, attempt: Attempt, now: float, reason: str) -> None:
        """Stop a running attempt whose result is no longer wanted, and tell its node."""
        node = self.nodes.get(attempt.node_id)
        if node is not None and node.stream is not None:
            self._out.append(Send(node.stream, messages.cancel(attempt.token, reason)))
        self._end_attempt(attempt, now, "cancelled", reason)

    def _requeue(self, job: Job, shard: Shard) -> None:
        if job.final or shard.status != "queued":
            return  # counted, or a copy of it still runs
        self.metrics.reassigned.inc()
        self.fair.requeue(job.job_id, shard.plan.index)
        self._out.append(Notify(job.job_id))

    def _fail_job(self, job: Job, message: str, now: float) -> None:
        if not job.final:
            log.error("job %s failed: %s", job.job_id, message)
            self._finish(job, FAILED, message, now)

    def _finish(self, job: Job, state: int, error: str, now: float) -> None:
        self.metrics.jobs_finished.labels(state_name(state)).inc()
        self.metrics.job_latency.observe(max(0.0, now - job.accepted))
        job.state = state
        job.error = error
        job.finished_at = self.wall()
        self.fair.remove(job.job_id)
        usage = self._user(job.user)
        usage.jobs_unfinished -= 1
        usage.shots_queued -= job.shots_total - job.shots_done
        self._out.append(FinishJob(job.job_id, state, error, job.finished_at))
        for shard in job.shards:
            for attempt in list(shard.live):
                self._cancel_attempt(attempt, now, error or "job finished")
        for node_id in job.nodes_used:
            node = self.nodes.get(node_id)
            if node is not None and (node.sent.pop(job.job_id, None) is not None or job.job_id in node.noise_sent):
                node.noise_sent.discard(job.job_id)
                if node.stream is not None:
                    self._out.append(Send(node.stream, messages.forget(job.job_id)))
        job.qpy = []  # payloads are on disk; free the memory
        self._remember_finished(job.job_id)
        log.info("job %s %s after %.2fs%s", job.job_id, state_name(state), job.finished_at - job.created_at,
                 f": {error}" if error else "")
        self._out.append(Notify(job.job_id))

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self, now: float) -> int:
        """Place backup copies for the shards of suspected nodes, then queued shards in fair
        order, on nodes that can hold them: free slots first, then one more in hand per slot so
        that a node's next shard is there when one ends, then (for a shard that must start
        before those waiting) overbooked. Returns how many."""
        placed = self._place_backups(now)
        fair = self.fair
        try:
            while (entry := fair.best()) is not None:
                job = self.jobs.get(entry.job_id)
                if job is None or job.final:
                    fair.remove(entry.job_id)
                    continue
                # Overbook for a job with nothing in hand (onto a node waiting with its class or
                # lower), or onto a node waiting with a lower class than the job's.
                ahead = job.priority if job.in_hand == 0 else job.priority - 1
                if not self.placement and not self.placement.can_overbook(ahead):
                    break  # no room, and the next in order may not jump the queue
                policy = self.user_policy(job.user)
                if policy.max_slots and self._user(job.user).in_hand >= policy.max_slots:
                    fair.block_user(entry)
                    continue
                if self._place_one(job, entry, ahead, now):
                    placed += 1
                else:
                    fair.block_job(entry)
        finally:
            fair.end_round()
        return placed

    def _place_one(self, job: Job, entry: QueuedJob, ahead: int, now: float) -> bool:
        """Start the first queued shard of ``job`` (among its next few) that a node takes."""
        shards = entry.shards
        for position, index in enumerate(islice(shards, _LOOKAHEAD)):
            shard = job.shards[index]
            if shard.status != "queued":
                continue  # counted or running meanwhile (its entry is dropped below)
            found = self.placement.pick(shard, now, overbook=ahead)
            if found is None:
                continue
            del shards[position]
            self._drop_stale(job, shards)
            self.fair.taken(entry)
            node, overbooked = found
            self._start_attempt(job, shard, node, now, ahead=overbooked)
            return True
        self._drop_stale(job, shards)
        if not shards:
            self.fair.taken(entry)
        return False

    @staticmethod
    def _drop_stale(job: Job, shards: deque[int]) -> None:
        while shards and job.shards[shards[0]].status != "queued":
            shards.popleft()

    def _place_backups(self, now: float) -> int:
        placed = 0
        skipped: list[str] = []
        while self.backups_wanted and self.placement:
            token = self.backups_wanted.popleft()
            attempt = self.attempts.get(token)
            if attempt is None:
                continue
            holder = self.nodes.get(attempt.node_id)
            job = self.jobs[attempt.job_id]
            shard = job.shards[attempt.shard_index]
            if holder is None or holder.suspected_since is None or len(shard.live) != 1:
                continue  # its node was heard again (or lost), or a copy already runs
            found = self.placement.pick(shard, now)
            if found is None:
                skipped.append(token)
                continue
            node = found[0]
            shard.backups += 1
            self.metrics.backups.inc()
            log.info("job %s shard %d: node %s is suspected: backup copy on node %s", job.job_id, shard.plan.index,
                     holder.node_id, node.node_id)
            self._start_attempt(job, shard, node, now, backup=True)
            placed += 1
        self.backups_wanted.extendleft(reversed(skipped))
        return placed

    def _speculate(self, now: float) -> int:
        """Give slow shards a backup copy on an idle node, near the end of their job.

        A shard qualifies when nothing of its job is queued, it runs as a single attempt, has
        had no backup yet, and has run ``backup_after_s`` and ``backup_slowdown`` times longer
        than the job's finished shards suggest for its estimated cost. Its work is
        proportional to the attempts running.
        """
        after = self.config.backup_after_s
        if not after or not self.placement.has_idle:
            return 0
        started = 0
        medians: dict[str, float] = {}  # per job, computed once per call
        for attempt in sorted(self.attempts.values(), key=lambda a: a.started):
            if not self.placement.has_idle:
                break
            elapsed = now - attempt.started
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
            found = self.placement.pick(shard, now, idle_only=True)
            if found is None:
                continue
            node = found[0]
            shard.backups += 1
            self.metrics.backups.inc()
            log.info("job %s shard %d: running %.1fs on node %s (expected %.1fs): backup copy on node %s",
                     job.job_id, shard.plan.index, elapsed, attempt.node_id, expected, node.node_id)
            self._start_attempt(job, shard, node, now, backup=True)
            started += 1
        return started

    def _start_attempt(self, job: Job, shard: Shard, node: Node, now: float, *, backup: bool = False,
                       token: str = "", ahead: bool = False) -> None:
        """Bind a new attempt of ``shard`` to ``node`` and send it there (``ahead``: to run before
        the shards waiting there); with ``token``, adopt an attempt the node already holds
        (nothing is sent). The job is charged the attempt's estimated duration."""
        adopted = bool(token)
        token = token or f"{job.job_id}:{shard.plan.index}:{secrets.token_hex(8)}"
        attempt = Attempt(token, job.job_id, shard.plan.index, node.node_id, now, self.wall(), backup=backup,
                          user=job.user, priority=job.priority, order=run_order(job.priority, ahead))
        if adopted or sum(1 for a in node.running.values() if a.running_at) < node.caps.slots:
            attempt.running_at, attempt.running_since = attempt.started_at, now
        if shard.status == "queued":
            job.shards_queued -= 1
        shard.status = "running"
        shard.live.append(attempt)
        node.hold(attempt)
        self.attempts[token] = attempt
        job.in_hand += 1
        self._user(job.user).in_hand += 1
        attempt.charged = self._estimate(job, shard)
        self.fair.charge(job.job_id, attempt.charged)
        job.attempts.append(attempt)
        job.nodes_used.add(node.node_id)
        if job.state == QUEUED:
            job.state = RUNNING
            job.started_at = attempt.started_at
        if not adopted:
            plan = shard.plan
            sent = node.sent.setdefault(job.job_id, set())
            message = messages.assignment(job, plan, token, cached=sent, noise_cached=job.job_id in node.noise_sent,
                                          order=attempt.order)
            sent.update(plan.circuit_indices)
            if job.noise_model:
                node.noise_sent.add(job.job_id)
            self._out.append(Send(node.stream, message))
        self.placement.file(node)
        log.info("job %s shard %d -> node %s (attempt %d%s)", job.job_id, shard.plan.index, node.node_id,
                 shard.tries + 1, ", backup" if backup else ", adopted" if adopted else ", ahead" if ahead else "")
        self._out.append(Notify(job.job_id))

    def _estimate(self, job: Job, shard: Shard) -> float:
        """Seconds the shard will likely take: its estimated cost at the rate of its job's
        finished shards, else as estimated. Never another job's rate: a tiny job's overhead per
        unit of cost would make a big job's first shards look many times longer than they run."""
        rate = job.seconds_per_cost_ewma or 1.0
        return max(_MIN_CHARGE_S, shard.plan.cost * rate)


def _smooth(average: float, value: float) -> float:
    """A moving average updated with ``value`` (the first value is taken as it is)."""
    return value if not average else average + _RATE_SMOOTHING * (value - average)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"
