"""The shard planner: how a job is cut into shards.

A plan is a pure function of the job (its circuits, parameter sets, shots, seed, method,
noise) and the :class:`PlanningPolicy`; it never depends on how many nodes are up. Seeds are
derived from the job seed with :class:`numpy.random.SeedSequence` keyed by (shard, chunk), so
the merged results of a seeded job are the same on 1 node or 50, and after any retry.

The unit of simulation is the *experiment*: one parameter set of one circuit (a circuit
without parameters has one set). The unit of dispatch and accounting is the shard; inside a
shard, each chunk is one Aer call whose results are streamed back as soon as it ends.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qscale.circuits import CircuitInfo, estimate_memory_bytes, memory_width, resolved_method

__all__ = ["PlanningPolicy", "Entry", "ChunkPlan", "ShardPlan", "PlanExplanation", "plan_and_explain",
           "chunk_seed", "splits_shots", "choose_method", "experiment_cost", "shards_for_cap", "LIMITS"]

_SEED_MODULUS = 1 << 31  # Aer adds an offset per experiment to the seed; stay far from overflow


@dataclass(frozen=True)
class PlanningPolicy:
    """How jobs are cut. Stored with each job, so a restart plans it the same way.

    Shard sizes come from a cost model (:func:`experiment_cost`) in *reference seconds*: one
    simulation thread of the machine the constants were measured on (a 2-core x86-64 VM,
    qiskit-aer 0.18). The figures only need to be right relative to each other; the plan
    depends on them and on the job, never on the cluster (see the planner section of
    ``docs/architecture.md``).
    """

    target_shards: int = 32
    """A job with enough work is cut into about this many shards, so that up to this many
    nodes share it evenly; a small job gets fewer, never shards cheaper than
    ``min_shard_seconds``."""
    min_shard_seconds: float = 0.05
    """Smallest estimated cost of a shard: keeps the per-shard overhead (~1 ms) below ~2%."""
    max_shard_seconds: float = 30.0
    """Largest estimated cost of a shard whose work can be divided (sets, batches, shots)."""
    min_chunk_seconds: float = 0.5
    """A shard is cut into Aer calls (chunks, the unit of partial results) of at least this cost."""
    chunks_per_shard: int = 4
    """Most chunks of a long shard."""
    max_circuits_per_shard: int = 2048
    """Most experiments (circuit x parameter set) in one shard (bounds message sizes)."""
    circuits_per_chunk: int = 512
    """Most experiments in one Aer call."""
    shots_per_shard: int = 0
    """If > 0, the most shots of one experiment in a shard where shots cost a simulation each."""
    max_memory_chunk_bytes: int = 8 << 20
    """Most bytes of per-shot memory one chunk returns: wider ones split their shots."""
    # Cost model constants (reference seconds, one thread).
    amplitude_op_s: float = 4e-9
    """Applying one instruction to one statevector amplitude."""
    stabilizer_op_s: float = 8e-9
    """One instruction on one qubit of a stabilizer tableau, per shot."""
    sample_s: float = 1e-7
    """Sampling one shot, per measured qubit, from a final state."""
    experiment_overhead_s: float = 3e-4
    """Fixed cost of one experiment in an Aer call (setup, conversion, result)."""
    expectation_value_factor: float = 2.0
    """One exact Pauli expectation value: cost per amplitude relative to ``amplitude_op_s``."""
    max_statevector_qubits: int = 0
    """Widest statevector any node of the cluster holds when the job was accepted (0: not
    limited). A non-Clifford circuit wider than this runs on the matrix-product-state method
    instead of being refused; set by the scheduler and stored with the job, so a restart plans
    it the same way."""
    density_matrix_factor: float = 0.15
    """Density matrix: cost per instruction and element relative to ``amplitude_op_s`` (Aer fuses
    gates and noise into superoperators; measured 0.093 s for a noisy 10-qubit circuit whose
    trajectories cost 0.7 ms a shot)."""

    def __post_init__(self) -> None:
        for name in ("target_shards", "chunks_per_shard", "max_circuits_per_shard", "circuits_per_chunk",
                     "max_memory_chunk_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanningPolicy.{name} must be >= 1")
        for name in ("shots_per_shard", "max_statevector_qubits"):
            if getattr(self, name) < 0:
                raise ValueError(f"PlanningPolicy.{name} must be >= 0")
        for name in ("min_shard_seconds", "max_shard_seconds", "min_chunk_seconds", "amplitude_op_s",
                     "stabilizer_op_s", "sample_s", "experiment_overhead_s", "density_matrix_factor",
                     "expectation_value_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PlanningPolicy.{name} must be > 0")

    def with_shots_per_shard(self, requested: int) -> PlanningPolicy:
        """This policy with a job's own cap on shots per shard: where both are set the smaller
        wins; ``requested`` 0 leaves the policy as it is."""
        if requested < 0:
            raise ValueError("shots per shard must be >= 0")
        if not requested:
            return self
        cap = min(self.shots_per_shard, requested) if self.shots_per_shard else requested
        return dataclasses.replace(self, shots_per_shard=cap)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PlanningPolicy:
        """A policy from its stored form; fields this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Entry:
    """Parameter sets ``[set_start, set_start + set_count)`` of one circuit."""

    circuit: int
    set_start: int
    set_count: int


@dataclass(frozen=True)
class ChunkPlan:
    """One Aer call: every experiment of ``entries``, ``shots`` shots each, seeded with ``seed``."""

    entries: tuple[Entry, ...]
    shots: int
    seed: int

    @property
    def experiments(self) -> int:
        return sum(e.set_count for e in self.entries)


@dataclass(frozen=True)
class ShardPlan:
    """A unit of work for one node."""

    index: int
    chunks: tuple[ChunkPlan, ...]
    memory_bytes: int
    num_qubits: int
    qpy_version: int = 0
    """Newest QPY version among its circuits' payloads: a node must read it."""
    method: str = "automatic"
    """The Aer method every experiment of the shard runs with."""
    cost: float = 0.0
    """Estimated reference seconds (see :func:`experiment_cost`)."""

    @property
    def circuit_indices(self) -> tuple[int, ...]:
        """Every circuit the shard touches, in order, without repeats."""
        return tuple(dict.fromkeys(e.circuit for c in self.chunks for e in c.entries))

    @property
    def shots(self) -> int:
        """Shots over all experiments of the shard."""
        return sum(c.shots * c.experiments for c in self.chunks)

    def set_range(self, circuit: int) -> tuple[int, int]:
        """(first set, number of sets) of ``circuit`` in this shard (always contiguous)."""
        entries = [e for c in self.chunks for e in c.entries if e.circuit == circuit]
        start = min(e.set_start for e in entries)
        stop = max(e.set_start + e.set_count for e in entries)
        return start, stop - start


LIMITS = ("min_shard_cost", "target_shards", "max_shard_cost", "shots_per_shard", "memory", "unsplittable",
          "circuits_per_shard")
"""What can set the number of shards of a plan (:attr:`PlanExplanation.limit`)."""


@dataclass(frozen=True)
class PlanExplanation:
    """Why a plan has as many shards as it has: the figures, and one sentence for people."""

    shards: int
    estimated_cost_s: float
    """The job's estimated work in reference seconds (see :func:`experiment_cost`)."""
    shard_target_s: float
    """The estimated work the planner aimed at per shard: the job's over
    ``target_shards``, kept between ``min_shard_seconds`` and ``max_shard_seconds``."""
    limit: str
    """What set the number of shards (one of :data:`LIMITS`): ``min_shard_cost`` (a small job:
    shards are not planned below ``min_shard_seconds``), ``target_shards`` (about that many
    shards of equal cost), ``max_shard_cost`` (a big job: shards of at most
    ``max_shard_seconds``), ``shots_per_shard`` (the cap on shots per shard), ``memory``
    (per-shot memory kept under ``max_memory_chunk_bytes`` per chunk), ``unsplittable`` (an
    experiment costlier than a shard's target is one simulation that shots cannot divide) or
    ``circuits_per_shard`` (``max_circuits_per_shard`` experiments per shard)."""
    shots_per_shard: int
    """The cap on shots per shard in force (0: none)."""
    splittable: bool
    """Some experiment pays for each of its shots, so a (smaller) cap on shots per shard
    spreads it over more shards."""
    text: str
    """One sentence: ``"3 shards: the job is about 116 ms of estimated work, ..."``."""


def _seconds(value: float) -> str:
    """A duration for people: ``0.3 ms``, ``116 ms``, ``3.2 s``, ``12.5 min``, ``2.1 h``."""
    if value < 1:
        return f"{value * 1000:.3g} ms"
    if value < 600:
        return f"{value:.3g} s"
    if value < 36_000:
        return f"{value / 60:.3g} min"
    return f"{value / 3600:.3g} h"


def _explain(shards: int, total: float, target: float, policy: PlanningPolicy, *, capped: bool, by_memory: bool,
             unsplit: int, full_batches: int, splittable: bool, estimator: bool) -> PlanExplanation:
    """The one reason that set the number of shards, the most specific first."""
    n = f"{shards} shard{'s' if shards != 1 else ''}"
    work = f"the job is about {_seconds(total)} of estimated work"
    if capped:
        limit, text = "shots_per_shard", f"{n}: at most {policy.shots_per_shard:,} shots per shard ({work})"
    elif by_memory:
        limit, text = "memory", (f"{n}: per-shot memory is cut into pieces of at most "
                                 f"{policy.max_memory_chunk_bytes / (1 << 20):.3g} MiB ({work})")
    elif unsplit:
        each = "an exact simulation" if estimator else "a simulation whose shots are all sampled from its final state"
        what = "an experiment costs" if unsplit == 1 else f"{unsplit:,} experiments cost"
        limit, text = "unsplittable", (f"{n}: {work}; {what} more than the {_seconds(target)} a shard aims at but "
                                       f"cannot be split (each is {each})")
    elif full_batches:
        limit, text = "circuits_per_shard", f"{n}: at most {policy.max_circuits_per_shard:,} experiments per " \
                                            f"shard ({work})"
    elif total / policy.target_shards < policy.min_shard_seconds:
        limit, text = "min_shard_cost", (f"{n}: {work}, and the planner's smallest shard target is "
                                         f"{_seconds(policy.min_shard_seconds)}")
    elif total / policy.target_shards > policy.max_shard_seconds:
        limit, text = "max_shard_cost", (f"{n}: {work}, and a shard holds at most about "
                                         f"{_seconds(policy.max_shard_seconds)} of it")
    else:
        limit, text = "target_shards", f"{n}: {work}, cut into about {policy.target_shards} shards of equal cost"
    return PlanExplanation(shards, total, target, limit, policy.shots_per_shard, splittable, text)


def chunk_seed(job_seed: int, shard_index: int, chunk_index: int) -> int:
    """The simulator seed of one chunk, derived from the job seed."""
    seq = np.random.SeedSequence(job_seed, spawn_key=(shard_index, chunk_index))
    return int(seq.generate_state(1, dtype=np.uint64)[0] % _SEED_MODULUS)


def choose_method(info: CircuitInfo, method: str, shots: int, noisy: bool = False,
                  policy: PlanningPolicy | None = None, *, exact: bool = False) -> str:
    """The Aer method a circuit runs with: the job's, or for ``automatic`` the cheapest one.

    Clifford circuits without noise run on the stabilizer method (as Aer would choose). A noisy
    circuit runs on the density-matrix method when the cost model says one density-matrix
    simulation is cheaper than one trajectory per shot and that method simulates every
    instruction (always for ``exact`` expectation values: trajectories would be a sample);
    otherwise on the statevector method (trajectories, split over shards). A circuit wider than
    ``policy.max_statevector_qubits`` runs on the matrix-product-state method instead. The
    plan names the method, so every shard of an experiment runs the same way.
    """
    if method not in ("", "automatic"):
        return method
    if info.clifford and not noisy:
        return "stabilizer"
    policy = policy or PlanningPolicy()
    if noisy and info.density_matrix_ok and (exact or info.num_qubits < 30):
        dm = experiment_cost(info, "density_matrix", shots, policy, noisy)
        if exact or dm < experiment_cost(info, "statevector", shots, policy, noisy):
            return "density_matrix"
    if 0 < policy.max_statevector_qubits < info.num_qubits:
        return "matrix_product_state"
    return "statevector"


def splits_shots(info: CircuitInfo, method: str, noisy: bool = False) -> bool:
    """Whether each shot costs a simulation of its own, so that splitting shots spreads work.

    Statevector-like methods sample every shot of a noiseless circuit with measurements only at
    the end from one final state: splitting its shots would simulate it again per shard. The
    stabilizer methods, noise (trajectories), mid-circuit measurement, reset and classical
    control pay per shot. The density-matrix method simulates noise once for all shots.
    """
    resolved = resolved_method(method, info)
    if resolved in ("stabilizer", "extended_stabilizer"):
        return True
    if resolved == "density_matrix":
        return False
    return noisy or not info.final_measurements_only


def experiment_cost(info: CircuitInfo, method: str, shots: int, policy: PlanningPolicy, noisy: bool = False,
                    observables: int = 0) -> float:
    """Estimated reference seconds of one experiment (one parameter set) with ``shots`` shots.

    Statevector: instructions x 2**n amplitudes once, or once per shot where shots cost a
    simulation; density matrix: instructions x 4**n (twice the work per element); stabilizer:
    instructions x n per shot; matrix product state: as a statevector of at most 20 qubits.
    Plus sampling (shots x measured bits) and a fixed per-experiment overhead. An estimator
    experiment (``observables`` > 0) simulates once and takes each observable's exact
    expectation value of the final state instead of sampling.
    """
    method = resolved_method(method, info)
    n, ops = info.num_qubits, max(1, info.num_operations)
    if observables:
        if method in ("stabilizer", "extended_stabilizer"):
            return policy.experiment_overhead_s + (ops + observables * n) * max(1, n) * policy.stabilizer_op_s
        width = 2 * n if method == "density_matrix" else min(n, 20) if method == "matrix_product_state" else n
        amplitudes = float(1 << min(width, 62))
        factor = policy.density_matrix_factor if method == "density_matrix" else 1.0
        return policy.experiment_overhead_s + amplitudes * policy.amplitude_op_s * (
            factor * ops + observables * policy.expectation_value_factor)
    sampling = shots * max(1, info.num_clbits) * policy.sample_s
    if method in ("stabilizer", "extended_stabilizer"):
        per_shot = ops * max(1, n) * policy.stabilizer_op_s * (10 if method == "extended_stabilizer" else 1)
        return policy.experiment_overhead_s + shots * per_shot + sampling
    if method == "density_matrix":
        elements = float(1 << min(2 * n, 62))
        return policy.experiment_overhead_s + policy.density_matrix_factor * ops * elements * policy.amplitude_op_s \
            + sampling
    amplitudes = float(1 << min(n, 20 if method == "matrix_product_state" else 62))
    state = ops * amplitudes * policy.amplitude_op_s
    runs = shots if splits_shots(info, method, noisy) else 1
    return policy.experiment_overhead_s + runs * state + sampling


def shards_for_cap(infos: Sequence[CircuitInfo], shots: Sequence[int], num_sets: Sequence[int], method: str,
                   cap: int, *, noisy: bool = False, estimator: bool = False) -> int:
    """How many shards a cap of ``cap`` shots per shard alone cuts the job's experiments into,
    counting only those whose shots it splits (each shot a simulation of its own): a bound to
    check a job's own cap against before planning it."""
    if cap < 1 or estimator:
        return 0
    total = 0
    for info, n, sets in zip(infos, shots, num_sets):
        if splits_shots(info, choose_method(info, method, n, noisy), noisy):
            total += sets * math.ceil(n / cap)
    return total


def _even_split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass
class _Pending:
    """A shard being built: its experiments (entry, shots), cost and method."""

    method: str
    items: list[tuple[Entry, int, float]] = dataclasses.field(default_factory=list)
    cost: float = 0.0
    experiments: int = 0


def _chunks(items: list[tuple[Entry, int, float]], per_chunk: int, chunk_cost: float
            ) -> list[tuple[list[Entry], int]]:
    """Consecutive entries with the same shots, cut into Aer calls of at most ``per_chunk``
    experiments and about ``chunk_cost`` each. ``items`` hold (entry, shots, cost per set)."""
    out: list[tuple[list[Entry], int]] = []
    current: list[Entry] = []
    size, cost = 0, 0.0
    shots = items[0][1]
    for entry, entry_shots, each in items:
        if entry_shots != shots and current:
            out.append((current, shots))
            current, size, cost = [], 0, 0.0
        shots = entry_shots
        start, left = entry.set_start, entry.set_count
        while left:
            room = per_chunk - size
            if each > 0:
                room = min(room, max(1, math.ceil((chunk_cost - cost) / each)))
            take = min(left, room)
            current.append(Entry(entry.circuit, start, take))
            start, left, size, cost = start + take, left - take, size + take, cost + take * each
            if size >= per_chunk or cost >= chunk_cost:
                out.append((current, shots))
                current, size, cost = [], 0, 0.0
    if current:
        out.append((current, shots))
    return out


def plan_and_explain(
    infos: Sequence[CircuitInfo],
    shots: Sequence[int],
    num_sets: Sequence[int],
    seed: int,
    method: str,
    policy: PlanningPolicy,
    *,
    noisy: bool = False,
    memory: bool = False,
    observables: Sequence[int] | None = None,
) -> tuple[tuple[ShardPlan, ...], PlanExplanation]:
    """Cut a job into shards of about equal estimated cost; also say why into that many.

    Args:
        infos: the circuits.
        shots: shots per parameter set, per circuit.
        num_sets: parameter sets per circuit (1 for a circuit without parameters).
        memory: the job returns per-shot memory (chunks are kept under
            ``policy.max_memory_chunk_bytes``).
        observables: for an estimator job, the number of observables of each circuit: its
            experiments are exact (one simulation each, never split by shots), cut by
            parameter sets only.

    The target cost of a shard is the job's estimated cost over ``policy.target_shards``,
    kept between ``min_shard_seconds`` and ``max_shard_seconds``. Experiments are packed in
    order into shards of about that cost (many small circuits or parameter sets share a
    shard); an experiment whose shots cost a simulation each and that costs more than the
    target is split by shots; one that samples every shot from one final state is never split
    (unless its per-shot memory would not fit a chunk). ``policy.shots_per_shard`` caps the
    shots of a split experiment per shard.

    Returns:
        The shards, and a :class:`PlanExplanation` of their number.
    """
    if not (len(infos) == len(shots) == len(num_sets)):
        raise ValueError("infos, shots and num_sets must have the same length")
    methods: list[str] = []
    costs: list[float] = []
    for index, info in enumerate(infos):
        n, sets = shots[index], num_sets[index]
        if n < 1 or sets < 1:
            raise ValueError(f"circuit {index}: shots and parameter sets must be >= 1")
        obs = observables[index] if observables else 0
        methods.append(choose_method(info, method, n, noisy, policy, exact=bool(obs)))
        costs.append(experiment_cost(info, methods[-1], n, policy, noisy, obs))
    total = sum(c * k for c, k in zip(costs, num_sets))
    target = min(max(total / policy.target_shards, policy.min_shard_seconds), policy.max_shard_seconds)

    pending: list[_Pending] = []
    batch: _Pending | None = None
    capped = by_memory = splittable = False
    unsplit = full_batches = 0

    def flush() -> None:
        nonlocal batch
        if batch is not None and batch.items:
            pending.append(batch)
        batch = None

    for index, info in enumerate(infos):
        n, sets, m, cost = shots[index], num_sets[index], methods[index], costs[index]
        per_shot = not observables and splits_shots(info, m, noisy)
        splittable = splittable or (per_shot and n > 1)
        by_cost = math.ceil(cost / target) if per_shot and cost > target else 1
        by_cap = math.ceil(n / policy.shots_per_shard) if per_shot and policy.shots_per_shard else 1
        by_bytes = math.ceil(n * memory_width(info.num_clbits) / policy.max_memory_chunk_bytes) if memory else 1
        parts = min(max(by_cost, by_cap, by_bytes), n)
        if not per_shot and cost > target:
            unsplit += sets
        if parts > 1:
            capped = capped or by_cap > max(by_cost, by_bytes) or by_cap == by_bytes > by_cost
            by_memory = by_memory or by_bytes > max(by_cost, by_cap)
            flush()
            split = _even_split(n, parts)
            for s in range(sets):
                for part in split:
                    pending.append(_Pending(m, [(Entry(index, s, 1), part, cost * part / n)], cost * part / n, 1))
            continue
        start = 0
        while start < sets:
            if batch is None or batch.method != m:
                flush()
                batch = _Pending(m)
            room = policy.max_circuits_per_shard - batch.experiments
            by_cost = max(1, math.ceil((target - batch.cost) / cost)) if cost > 0 else room
            take = min(sets - start, room, by_cost)
            batch.items.append((Entry(index, start, take), n, cost))
            batch.cost += take * cost
            batch.experiments += take
            start += take
            if batch.experiments >= policy.max_circuits_per_shard or batch.cost >= target:
                full_batches += batch.cost < target
                flush()
    flush()

    shards = []
    for shard_index, item in enumerate(pending):
        chunk_cost = max(policy.min_chunk_seconds, item.cost / policy.chunks_per_shard)
        circuits = list(dict.fromkeys(e.circuit for e, _, _ in item.items))
        per_chunk = policy.circuits_per_chunk
        if memory:  # keep a chunk's per-shot memory under the cap
            widest = max(memory_width(infos[i].num_clbits) * shots[i] for i in circuits)
            per_chunk = max(1, min(per_chunk, policy.max_memory_chunk_bytes // max(1, widest)))
        chunks = tuple(
            ChunkPlan(tuple(entries), chunk_shots, chunk_seed(seed, shard_index, k))
            for k, (entries, chunk_shots) in enumerate(_chunks(item.items, per_chunk, chunk_cost))
        )
        shards.append(
            ShardPlan(
                index=shard_index,
                chunks=chunks,
                memory_bytes=max(estimate_memory_bytes(infos[i], item.method) for i in circuits),
                num_qubits=max(infos[i].num_qubits for i in circuits),
                qpy_version=max(infos[i].qpy_version for i in circuits),
                method=item.method,
                cost=item.cost,
            )
        )
    explanation = _explain(len(shards), total, target, policy, capped=capped, by_memory=by_memory, unsplit=unsplit,
                           full_batches=full_batches, splittable=splittable, estimator=bool(observables))
    return tuple(shards), explanation
