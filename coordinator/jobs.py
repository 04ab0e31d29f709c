"""The job record: one :class:`Job` from intake to the store and back, its shards and their
attempts, and the merged outcomes kept up to date as results arrive.

A job is built once by intake (:func:`qscale.coordinator.intake.prepare_job`), written by the
store as it is, read back by the store after a restart, and run by the scheduler. Outcomes stay
packed (:mod:`qscale.outcomes`) and are merged as arrays; the coordinator formats bitstrings
only for the few outcomes a progress update shows (:mod:`qscale.coordinator.views`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from qscale.circuits import CircuitInfo
from qscale.coordinator.planner import PlanExplanation, PlanningPolicy, ShardPlan, plan_and_explain
from qscale.outcomes import Outcomes, OutcomeTotals, outcome_width
from qscale.proto.v1 import common_pb2

__all__ = ["Job", "Shard", "Attempt", "Totals", "run_order", "QUEUED", "RUNNING", "DONE", "FAILED",
           "CANCELLED", "FINAL_STATES", "state_name"]

QUEUED = common_pb2.JOB_STATE_QUEUED
RUNNING = common_pb2.JOB_STATE_RUNNING
DONE = common_pb2.JOB_STATE_DONE
FAILED = common_pb2.JOB_STATE_FAILED
CANCELLED = common_pb2.JOB_STATE_CANCELLED
FINAL_STATES = (DONE, FAILED, CANCELLED)


def run_order(priority: int, ahead: bool = False) -> int:
    """The order a node runs what it holds in: higher classes first and, within a class, a shard
    sent ``ahead`` of those waiting (overbooked) before them; arrival order among equals."""
    return 2 * max(priority, 0) + int(ahead)


def state_name(state: int) -> str:
    """``queued``, ``running``, ``done`` ... for logs and messages."""
    return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


@dataclass(eq=False)
class Attempt:
    """One dispatch of a shard to a node."""

    token: str
    job_id: str
    shard_index: int
    node_id: str
    started: float
    """Monotonic time of the dispatch (speculation, reconciliation)."""
    started_at: float
    """Wall time of the dispatch (display only)."""
    ended_at: float = 0.0
    running_at: float = 0.0
    """Wall time it likely began to run on its node (display only; 0: still waiting in the node's
    queue, or never ran): at dispatch to a free slot, else when an attempt ahead of it on that
    node ended (a node runs what it holds in the order it got it), or at its first chunk."""
    user: str = ""
    """Its job's user (charged for its slot)."""
    running_since: float = 0.0
    """Monotonic twin of ``running_at`` (0: not running yet): what the attempt is charged from."""
    priority: int = common_pb2.PRIORITY_NORMAL
    """Its job's priority class."""
    order: int = 0
    """Run order sent to the node, which runs the highest it holds first (see :func:`run_order`)."""
    charged: float = 0.0
    """Slot-seconds charged to its job's fair share at dispatch (an estimate, corrected at its end)."""
    outcome: str = "running"  # running, done, failed, refused, lost, cancelled, stale
    error: str = ""
    backup: bool = False
    """A backup copy (of a slow shard, or of one held by a suspected node)."""
    partial: dict[int, list[common_pb2.CircuitCounts]] = field(default_factory=dict)
    """chunk index -> one result per experiment of the chunk, as chunks finish."""
    unreported: int = 0
    """Heartbeats in a row that did not list this attempt (see Scheduler.heartbeat)."""

    @property
    def running(self) -> bool:
        return self.outcome == "running"


@dataclass(eq=False)
class Shard:
    plan: ShardPlan
    status: str = "queued"  # queued, running, done
    live: list[Attempt] = field(default_factory=list)
    """Attempts running now: one, or more while backup copies race the first."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)
    """node id -> refusals (a refusal is transient: a node's cache dropped the job, a drain)."""
    refused_until: dict[str, float] = field(default_factory=dict)
    """node id -> monotonic time before which the shard does not go back to that node."""
    losses: int = 0
    backups: int = 0
    shown: Attempt | None = None
    """The attempt whose finished chunks the job's partial totals include (see Totals)."""

    @property
    def tries(self) -> int:
        return len(self.failures) + self.losses + sum(self.refusals.values()) + self.backups


@dataclass(eq=False, slots=True)
class Totals:
    """Merged outcomes of one circuit, kept incrementally as arrays.

    ``counted`` holds every counted shard's outcomes (the circuit's result, over its parameter
    sets); ``partial`` the finished chunks of running shards (progress only), which can shrink
    again when an attempt is lost (its chunks are added back negated). :meth:`top` answers "the
    k most frequent outcomes so far" from both, merged once per change and selected before
    anything is formatted.
    """

    width: int
    counted: OutcomeTotals = field(init=False)
    partial: OutcomeTotals = field(init=False)
    _version: int = 0
    _top: tuple[int, int, Outcomes] | None = None
    _leaders: tuple[int, Outcomes] | None = None

    TRACKED: ClassVar[int] = 256
    """Most outcomes a progress update can ask for without merging every outcome."""

    def __post_init__(self) -> None:
        self.counted = OutcomeTotals(self.width)
        self.partial = OutcomeTotals(self.width)

    def add_counted(self, outcomes: Outcomes, shots: int | None = None) -> None:
        self.counted.add(outcomes, shots=shots)
        self._version += 1

    def add_partial(self, outcomes: Outcomes, sign: int = 1) -> None:
        self.partial.add(outcomes, sign)
        self._version += 1

    def top(self, k: int) -> Outcomes:
        """The ``k`` most frequent outcomes, partial chunks included (``k <= 0``: all of them).

        For ``k <= TRACKED`` the candidates are the counted outcomes' ``TRACKED`` leaders (chosen
        again only when a shard is counted) and the partial ones: exact, since an outcome outside
        both has no more than the least of the leaders. Cached until the next change."""
        if self._top is not None and self._top[:2] == (self._version, k):
            return self._top[2]
        counted, running = self.counted.merged(), self.partial.merged()
        if k <= 0 or k > self.TRACKED:
            top = counted.plus(running).top(k)
        else:
            if self._leaders is None or self._leaders[0] is not counted:
                self._leaders = (counted, counted.top(self.TRACKED))
            keys = np.union1d(self._leaders[1].keys, running.keys)
            totals = counted.counts_of(keys) + running.counts_of(keys)
            seen = totals != 0  # (a lost attempt's chunk taken out again)
            top = Outcomes(self.width, keys[seen], totals[seen]).top(k)
        self._top = (self._version, k, top)
        return top

    @property
    def shots(self) -> int:
        return self.counted.shots

    @property
    def progress_shots(self) -> int:
        return self.counted.shots + self.partial.shots


@dataclass(eq=False)
class Job:
    """A job: what was submitted (validated), its plan, and what has been counted so far."""

    job_id: str
    created_at: float
    """Wall time of the submission."""
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
    observables: list[tuple[str, ...]] = field(default_factory=list)
    """Estimator jobs: the Pauli labels of each circuit (empty for sampler jobs)."""
    user: str = "default"
    """Who submitted it: the user name of their API token (see :mod:`qscale.coordinator.users`)."""
    priority: int = common_pb2.PRIORITY_NORMAL
    """Its priority class (``common_pb2.Priority``): higher classes are served first."""
    pruned: bool = False
    """Its results were removed by retention; only its status is left."""
    in_hand: int = 0
    """Attempts of its shards that nodes hold now."""
    seconds_per_cost_ewma: float = 0.0
    """Moving average of ``seconds_per_cost`` (0: no shard done yet): the estimate of what a
    shard will take, charged to its fair share at dispatch."""
    state: int = QUEUED
    error: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    accepted: float = 0.0
    """Monotonic time the coordinator accepted (or recovered) it."""
    shards: list[Shard] = field(default_factory=list)
    set_outcomes: list[list[OutcomeTotals]] = field(default_factory=list)
    """Counted outcomes per circuit, per parameter set."""
    totals: list[Totals] = field(default_factory=list)
    """Per circuit: merged over its parameter sets, incrementally (progress and results)."""
    set_shots: list[list[int]] = field(default_factory=list)
    memory_parts: dict[tuple[int, int], list[tuple[int, bytes]]] = field(default_factory=dict)
    """(circuit, set) -> (shard index, per-shot memory) of every counted shard."""
    attempts: list[Attempt] = field(default_factory=list)
    nodes_used: set[str] = field(default_factory=set)
    stale_dropped: int = 0
    shards_done: int = 0
    shards_queued: int = 0
    shots_done: int = 0
    seconds_per_cost: list[float] = field(default_factory=list)
    """Wall seconds per estimated reference second of the shards done (backup decisions)."""
    values: list[np.ndarray] = field(default_factory=list)
    """Estimator jobs: per circuit, the counted expectation values (parameter sets x
    observables); rows of shards not counted yet are NaN."""
    explanation: PlanExplanation | None = None
    """Why the plan has as many shards as it has (set by :meth:`plan`)."""
    methods_run: list[set[str]] = field(default_factory=list)
    """Per circuit, the Aer methods its counted shards ran with (as the nodes reported them)."""

    @property
    def estimator(self) -> bool:
        """Whether the job computes exact expectation values instead of sampling."""
        return bool(self.observables)

    def plan(self) -> tuple[ShardPlan, ...]:
        """The job's shards under its policy; keeps why they are that many in :attr:`explanation`."""
        plan, self.explanation = plan_and_explain(
            self.infos, self.shots, self.num_sets, self.seed, self.method, self.policy, noisy=bool(self.noise_model),
            memory=self.memory, observables=[len(o) for o in self.observables] or None)
        return plan

    def start(self, plan: tuple[ShardPlan, ...], done: dict[int, list[common_pb2.CircuitCounts]]) -> None:
        """Lay out the shards of ``plan`` and count the results already stored for some of them."""
        self.shards = [Shard(p) for p in plan]
        self.totals = [Totals(outcome_width(info.num_clbits)) for info in self.infos]
        # A circuit with one parameter set: its set's outcomes are its merged outcomes (one
        # object); an estimator job has no outcomes (its values are in `values`).
        self.set_outcomes = [[self.totals[c].counted] if k == 1 or self.estimator else
                             [OutcomeTotals(self.totals[c].width) for _ in range(k)]
                             for c, k in enumerate(self.num_sets)]
        self.set_shots = [[0] * k for k in self.num_sets]
        self.methods_run = [set() for _ in self.infos]
        self.values = [np.full((k, len(o)), np.nan) for k, o in zip(self.num_sets, self.observables)]
        self.shots_done = self.shards_done = 0
        for shard in self.shards:
            if shard.plan.index in done:
                self.count(shard, done[shard.plan.index])
        self.shards_queued = sum(1 for s in self.shards if s.status == "queued")

    def count(self, shard: Shard, results: Sequence[common_pb2.CircuitCounts]) -> None:
        """Count a shard's results (once: the caller checked it is not done yet). ``results``
        are those of its chunks in order, as checked (:func:`~qscale.coordinator.checks.check_chunk`)."""
        for result in results:  # (a node that does not say: the method the plan named)
            self.methods_run[result.circuit_index].add(result.method or shard.plan.method)
        position = 0
        for chunk in shard.plan.chunks:
            for entry in chunk.entries:
                for s in range(entry.set_start, entry.set_start + entry.set_count):
                    self.set_shots[entry.circuit][s] += chunk.shots
            if self.estimator:
                continue
            experiments = sum(entry.set_count for entry in chunk.entries)
            for result in results[position:position + experiments]:
                c = result.circuit_index
                outcomes = Outcomes.from_proto(result.outcomes)  # (checked; decoded when read)
                self.totals[c].add_counted(outcomes, chunk.shots)
                if len(self.set_outcomes[c]) > 1:
                    self.set_outcomes[c][result.set_index].add(outcomes, shots=chunk.shots)
                if self.memory:
                    self.memory_parts.setdefault((c, result.set_index), []).append((shard.plan.index, result.memory))
            position += experiments
        if self.estimator:
            for result in results:
                block = np.frombuffer(result.expectation_values, dtype="<f8")
                rows = self.values[result.circuit_index][result.set_index : result.set_index + result.set_count]
                rows[:] = block.reshape(rows.shape)
        shard.status = "done"
        self.shards_done += 1
        self.shots_done += shard.plan.shots

    def add_chunk(self, shard: Shard, attempt: Attempt, index: int, results: list[common_pb2.CircuitCounts]
                  ) -> None:
        """Keep a finished chunk of a running attempt; progress shows the chunks of one attempt
        per shard (the first to send one)."""
        attempt.partial[index] = results
        if shard.shown is None:
            self.show_partial(shard, attempt)
        elif shard.shown is attempt:
            self._partial((results,), 1)

    def show_partial(self, shard: Shard, attempt: Attempt | None) -> None:
        """Make ``attempt``'s finished chunks the ones progress shows for ``shard`` (None: none)."""
        if shard.shown is attempt:
            return
        if shard.shown is not None:
            self._partial(shard.shown.partial.values(), -1)
        shard.shown = attempt
        if attempt is not None:
            self._partial(attempt.partial.values(), 1)

    def _partial(self, chunks: Iterable[list[common_pb2.CircuitCounts]], sign: int) -> None:
        if self.estimator:
            return  # progress of an estimator job is its shards and experiments done
        for chunk in chunks:
            for result in chunk:
                self.totals[result.circuit_index].add_partial(Outcomes.from_proto(result.outcomes), sign)

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
    def shards_running(self) -> int:
        return sum(1 for s in self.shards if s.status == "running")

    def circuit_outcomes(self, index: int) -> common_pb2.Outcomes:
        """Counted outcomes of a circuit, merged over its parameter sets, as a message."""
        return self.totals[index].counted.merged().to_proto()

    def set_memory(self, index: int, set_index: int) -> bytes:
        """Per-shot memory of one parameter set, in shot order (shards in plan order)."""
        return b"".join(part for _, part in sorted(self.memory_parts.get((index, set_index), ())))

    def describe_circuits(self, indices: Iterable[int]) -> str:
        idx = list(indices)
        if len(idx) == 1:
            return f"circuit {idx[0]} ({self.infos[idx[0]].name!r})"
        return f"circuits {idx[0]}-{idx[-1]}"
