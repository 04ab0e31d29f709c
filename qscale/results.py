"""What the client returns: job states, progress updates and results as plain dataclasses
(decoded from the wire once, safe to keep after the connection closes)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from qscale.circuits import unpack_memory_bits
from qscale.outcomes import Outcomes
from qscale.proto.v1 import common_pb2, jobs_pb2

__all__ = ["JobState", "JobStatus", "PlanInfo", "Progress", "SetResult", "CircuitResult", "AttemptRecord",
           "JobResult", "NodeStatus", "UserStatus", "PRIORITIES", "priority_name"]



PRIORITIES: dict[str, int] = {"low": common_pb2.PRIORITY_LOW, "normal": common_pb2.PRIORITY_NORMAL,
                              "high": common_pb2.PRIORITY_HIGH}
"""The priority classes of jobs, by name, with their wire values (``common_pb2.Priority``)."""


def priority_name(value: int) -> str:
    """The name of a wire priority: ``low``, ``normal`` (also for ``PRIORITY_UNSPECIFIED``) or
    ``high``; ``priority N`` for a value this client does not know."""
    if value == common_pb2.PRIORITY_UNSPECIFIED:
        return "normal"
    for name, number in PRIORITIES.items():
        if number == value:
            return name
    return f"priority {value}"


class JobState(str, enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True for done, failed and cancelled."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def from_proto(cls, value: int) -> JobState:
        name = common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")
        return cls(name.lower()) if name != "UNSPECIFIED" else cls.QUEUED


@dataclass(frozen=True)
class PlanInfo:
    """How the coordinator's planner cut a job, and why into that many shards.

    The plan depends on the job (and the coordinator's planning settings), never on how many
    nodes are up: a small job gets few shards however many nodes there are."""

    shards: int
    estimated_cost_s: float
    """The job's estimated work, in reference seconds (one simulation thread)."""
    shard_target_s: float
    """The estimated work the planner aimed at per shard."""
    limit: str
    """What set the number of shards: ``min_shard_cost`` (a small job: shards are not planned
    below a minimum cost, 50 ms by default), ``target_shards``, ``max_shard_cost``,
    ``shots_per_shard``, ``memory``, ``unsplittable`` or ``circuits_per_shard``."""
    shots_per_shard: int
    """The cap on shots per shard in force (0: none)."""
    splittable: bool
    """Some experiment pays for each shot, so ``shots_per_shard`` would spread it further."""
    explanation: str
    """One sentence, e.g. ``3 shards: the job is about 116 ms of estimated work, and the planner's
    smallest shard target is 50 ms``."""

    @classmethod
    def from_proto(cls, msg: jobs_pb2.PlanInfo) -> PlanInfo:
        return cls(msg.shards, msg.estimated_cost_s, msg.shard_target_s, msg.limit, msg.shots_per_shard,
                   msg.splittable, msg.explanation)


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a job's progress."""

    job_id: str
    state: JobState
    error: str
    shots_total: int
    shots_done: int
    shards_total: int
    shards_done: int
    shards_running: int
    num_circuits: int
    created_at: float
    finished_at: float
    plan: PlanInfo | None = None
    """Why the job has ``shards_total`` shards (None where the coordinator did not say)."""
    user: str = ""
    """Who submitted it (the user of their API token; empty where the coordinator did not say)."""
    priority: str = "normal"
    """Its priority class: ``low``, ``normal`` or ``high``."""
    pruned: bool = False
    """Its results were removed by the coordinator's retention: the status stays, the result does not."""

    @classmethod
    def from_proto(cls, msg: jobs_pb2.JobStatus) -> JobStatus:
        return cls(msg.job_id, JobState.from_proto(msg.state), msg.error, msg.shots_total, msg.shots_done,
                   msg.shards_total, msg.shards_done, msg.shards_running, msg.num_circuits, msg.created_at,
                   msg.finished_at, PlanInfo.from_proto(msg.plan) if msg.HasField("plan") else None,
                   msg.user, priority_name(msg.priority), msg.pruned)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data


@dataclass(frozen=True)
class Progress:
    """One update from :meth:`qscale.Job.watch`: the status and, per circuit, the counts merged so
    far (counted shards plus the chunks of running shards; a chunk of a shard whose node is
    lost disappears again). ``counts`` is empty in an update watched without counts."""

    status: JobStatus
    counts: list[dict[str, int]]

    @classmethod
    def from_proto(cls, msg: jobs_pb2.JobProgress) -> Progress:
        if not msg.counts:  # (a job of 10,000 circuits: no 10,000 empty dicts per update)
            return cls(JobStatus.from_proto(msg.status), [])
        counts: list[dict[str, int]] = [{} for _ in range(msg.status.num_circuits)]
        for c in msg.counts:
            if 0 <= c.circuit_index < len(counts):
                counts[c.circuit_index] = dict(c.counts)
        return cls(JobStatus.from_proto(msg.status), counts)


@dataclass(frozen=True)
class SetResult:
    """Outcomes of one parameter set of a circuit, and its per-shot memory if the job asked."""

    index: int
    outcomes: Outcomes = field(repr=False)
    """The distinct outcomes and their counts, packed (see :class:`~qscale.outcomes.Outcomes`)."""
    shots: int
    memory: bytes = field(default=b"", repr=False)
    """Every shot's outcome in shot order, ``memory_width`` bytes each, little-endian."""
    num_clbits: int = field(default=0, repr=False)
    registers: tuple[tuple[str, int], ...] = field(default=(), repr=False)

    @cached_property
    def counts(self) -> dict[str, int]:
        """``{bitstring: count}`` (clbit 0 rightmost, registers separated by spaces), formatted
        on first use."""
        return self.outcomes.to_dict(self.num_clbits, self.registers)


@dataclass(frozen=True)
class CircuitResult:
    """Merged outcomes of one circuit (over all its parameter sets). :attr:`counts` gives them
    as Qiskit bitstrings (clbit 0 rightmost, registers separated by spaces) adding up to
    ``shots``; :attr:`outcomes` as the packed arrays they travel in."""

    index: int
    name: str
    outcomes: Outcomes = field(repr=False)
    shots: int
    num_qubits: int
    num_clbits: int
    sets: list[SetResult] = field(default_factory=list, repr=False)
    """One entry per parameter set (one for a circuit without parameters)."""
    registers: list[tuple[str, int]] = field(default_factory=list)
    register_clbits: list[int] = field(default_factory=list, repr=False)
    """Circuit clbit index of each register bit, registers concatenated in order."""
    memory_width: int = 1
    observables: list[str] = field(default_factory=list)
    """Estimator jobs: the Pauli labels submitted for this circuit."""
    expectation_values: np.ndarray | None = field(default=None, repr=False)
    """Estimator jobs: exact expectation values, shape (parameter sets, observables); None for
    sampler jobs."""
    method: str = ""
    """The Aer method that ran this circuit (``stabilizer``, ``statevector``, ...), as the nodes'
    Aer reported it; never ``automatic``. Several, comma-separated, if its shards differed."""

    @cached_property
    def counts(self) -> dict[str, int]:
        """``{bitstring: count}`` over every parameter set, formatted on first use."""
        return self.outcomes.to_dict(self.num_clbits, self.registers)

    def most_frequent(self, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` most frequent outcomes, most frequent first (only those are formatted)."""
        top = self.outcomes.top(n)
        return list(zip(top.bitstrings(self.num_clbits, self.registers), top.counts.tolist()))

    def memory_bits(self, set_index: int = 0) -> np.ndarray:
        """Per-shot outcomes of one parameter set as bools, shape (shots, num_clbits), column j
        is clbit j. Needs a job submitted with ``memory=True``."""
        return unpack_memory_bits(self._memory(set_index), self.memory_width, self.num_clbits)

    def memory(self, set_index: int = 0) -> list[str]:
        """Per-shot outcomes of one parameter set as Qiskit bitstrings, in shot order."""
        shots = Outcomes.from_memory(self._memory(set_index), self.memory_width)
        return shots.bitstrings(self.num_clbits, self.registers)

    def _memory(self, set_index: int) -> bytes:
        memory = self.sets[set_index].memory
        if not memory:
            raise ValueError("no per-shot memory: submit the job with memory=True")
        return memory


@dataclass(frozen=True)
class AttemptRecord:
    """One dispatch of a shard to a node."""

    shard_index: int
    node_id: str
    started_at: float
    ended_at: float
    outcome: str
    error: str


@dataclass(frozen=True)
class JobResult:
    """The result of a finished job."""

    job_id: str
    status: JobStatus
    results: list[CircuitResult]
    seed: int
    method: str
    """The method asked for (``automatic``: chosen per circuit); :attr:`methods` says what ran."""
    nodes_used: list[str]
    attempts: list[AttemptRecord] = field(repr=False)
    stale_results_dropped: int
    wall_time_s: float

    @property
    def counts(self) -> list[dict[str, int]]:
        """Merged counts per circuit."""
        return [r.counts for r in self.results]

    @property
    def shots(self) -> int:
        """Shots counted over all circuits."""
        return sum(r.shots for r in self.results)

    @property
    def methods(self) -> list[str]:
        """The Aer methods that ran the job's circuits, each once, sorted."""
        return sorted({m.strip() for r in self.results for m in r.method.split(",") if m.strip()})

    @classmethod
    def from_proto(cls, msg: jobs_pb2.JobResult) -> JobResult:
        return cls(
            job_id=msg.status.job_id,
            status=JobStatus.from_proto(msg.status),
            results=[_circuit_result(r) for r in msg.results],
            seed=msg.seed,
            method=msg.method,
            nodes_used=list(msg.nodes_used),
            attempts=[AttemptRecord(a.shard_index, a.node_id, a.started_at, a.ended_at, a.outcome, a.error)
                      for a in msg.attempts],
            stale_results_dropped=msg.stale_results_dropped,
            wall_time_s=msg.wall_time_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``job_id``, ``status``, ``results`` (per circuit: ``name``, the
        ``method`` that ran, ``counts``, ``shots``), and ``metadata`` (``seed``, ``method``: the
        methods that ran, ``method_requested``, ``shards``, ``plan``: why that many, as
        :class:`PlanInfo`; attempts, nodes used, wall time)."""
        return {
            "job_id": self.job_id,
            "status": self.status.state.value,
            "error": self.status.error,
            "results": [{"index": r.index, "name": r.name, "method": r.method, "shots": r.shots,
                         "num_qubits": r.num_qubits,
                         **({"observables": r.observables, "expectation_values": r.expectation_values.tolist()}
                            if r.expectation_values is not None else {"counts": r.counts}),
                         **({"sets": [{"index": x.index, "shots": x.shots, "counts": x.counts} for x in r.sets]}
                            if len(r.sets) > 1 and r.expectation_values is None else {})}
                        for r in self.results],
            "metadata": {
                "seed": self.seed,
                "method": ", ".join(self.methods),
                "method_requested": self.method,
                "shards": self.status.shards_total,
                "plan": asdict(self.status.plan) if self.status.plan is not None else None,
                "attempts": len(self.attempts),
                "nodes_used": self.nodes_used,
                "stale_results_dropped": self.stale_results_dropped,
                "wall_time_s": self.wall_time_s,
            },
        }


def _circuit_result(msg: jobs_pb2.CircuitResult) -> CircuitResult:
    width = msg.memory_width or 1
    outcomes = Outcomes.from_proto(msg.outcomes) if msg.HasField("outcomes") else Outcomes.empty(width)
    registers = tuple((g.name, g.size) for g in msg.registers)
    sets = [SetResult(x.set_index, Outcomes.from_proto(x.outcomes) if x.HasField("outcomes") else outcomes,
                      x.shots, x.memory, msg.num_clbits, registers) for x in msg.sets]
    return CircuitResult(msg.circuit_index, msg.name, outcomes, msg.shots, msg.num_qubits, msg.num_clbits, sets,
                         list(registers), list(msg.register_clbits), width, list(msg.observables),
                         _expectation_values(msg), msg.method)


def _expectation_values(msg: jobs_pb2.CircuitResult) -> np.ndarray | None:
    """An estimator result's values as a (sets, observables) array; None for a sampler job."""
    if not msg.observables:
        return None
    values = np.frombuffer(msg.expectation_values, dtype="<f8")
    return values.reshape(-1, len(msg.observables)).copy()


@dataclass(frozen=True)
class NodeStatus:
    """A node as the coordinator sees it."""

    node_id: str
    name: str
    hostname: str
    state: str
    slots: int
    running: int
    cores: int
    memory_budget_bytes: int
    max_statevector_qubits: int
    last_heartbeat_age_s: float
    shards_done: int

    @classmethod
    def from_proto(cls, msg: jobs_pb2.NodeInfo) -> NodeStatus:
        c = msg.capabilities
        return cls(msg.node_id, c.name, c.hostname, msg.state, c.slots, msg.running, c.cores,
                   c.memory_budget_bytes, c.max_statevector_qubits, msg.last_heartbeat_age_s, msg.shards_done)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UserStatus:
    """A user of a shared coordinator: their share, what they use now and their quotas."""

    name: str
    weight: float
    """Share of the cluster relative to other users (1 by default)."""
    admin: bool
    """Sees and cancels every user's jobs."""
    jobs_unfinished: int
    """Jobs queued or running."""
    shots_queued: int
    """Shots of unfinished jobs not yet counted."""
    slots_busy: int
    """Node slots the user's shards hold now."""
    slot_seconds: float
    """Slot-seconds used since the coordinator started."""
    max_jobs: int
    """Quota: most unfinished jobs (0: none)."""
    max_queued_shots: int
    """Quota: most shots queued (0: none)."""
    max_slots: int
    """Quota: most slots at once (0: none)."""

    @classmethod
    def from_proto(cls, msg: jobs_pb2.UserInfo) -> UserStatus:
        return cls(msg.name, msg.weight or 1.0, msg.admin, msg.jobs_unfinished, msg.shots_queued, msg.slots_busy,
                   msg.slot_seconds, msg.max_jobs, msg.max_queued_shots, msg.max_slots)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
