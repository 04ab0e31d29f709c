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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qscale.circuits import CircuitInfo, estimate_memory_bytes, resolved_method

__all__ = ["PlanningPolicy", "Entry", "ChunkPlan", "ShardPlan", "plan_job", "chunk_seed", "splits_shots"]

_SEED_MODULUS = 1 << 31  # Aer adds an offset per experiment to the seed; stay far from overflow


@dataclass(frozen=True)
class PlanningPolicy:
    """How jobs are cut. Stored with each job, so a restart plans it the same way."""

    shots_per_shard: int = 1000
    """Largest number of shots in one shard where shots cost a simulation each."""
    max_circuits_per_shard: int = 64
    """Most experiments (circuit x parameter set) batched into one shard."""
    circuits_per_chunk: int = 16
    """Most experiments in one Aer call inside a shard (the granularity of partial results)."""
    batch_max_qubits: int = 16
    """Circuits at most this wide are batched; wider ones get a shard per experiment."""

    def __post_init__(self) -> None:
        for name in ("shots_per_shard", "max_circuits_per_shard", "circuits_per_chunk", "batch_max_qubits"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanningPolicy.{name} must be >= 1")


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


def chunk_seed(job_seed: int, shard_index: int, chunk_index: int) -> int:
    """The simulator seed of one chunk, derived from the job seed."""
    seq = np.random.SeedSequence(job_seed, spawn_key=(shard_index, chunk_index))
    return int(seq.generate_state(1, dtype=np.uint64)[0] % _SEED_MODULUS)


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


def _even_split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _chunks(items: list[tuple[Entry, int]], per_chunk: int) -> list[tuple[list[Entry], int]]:
    """Consecutive entries with the same shots, cut into calls of at most ``per_chunk`` experiments."""
    out: list[tuple[list[Entry], int]] = []
    current: list[Entry] = []
    size = 0
    shots = items[0][1]
    for entry, entry_shots in items:
        if entry_shots != shots and current:
            out.append((current, shots))
            current, size = [], 0
        shots = entry_shots
        start, left = entry.set_start, entry.set_count
        while left:
            take = min(left, per_chunk - size)
            current.append(Entry(entry.circuit, start, take))
            start, left, size = start + take, left - take, size + take
            if size == per_chunk:
                out.append((current, shots))
                current, size = [], 0
    if current:
        out.append((current, shots))
    return out


def plan_job(
    infos: Sequence[CircuitInfo],
    shots: Sequence[int],
    num_sets: Sequence[int],
    seed: int,
    method: str,
    policy: PlanningPolicy,
    *,
    noisy: bool = False,
) -> tuple[ShardPlan, ...]:
    """Cut a job into shards.

    Args:
        infos: the circuits.
        shots: shots per parameter set, per circuit.
        num_sets: parameter sets per circuit (1 for a circuit without parameters).

    Experiments whose shots cost a simulation each are split into shards of at most
    ``policy.shots_per_shard`` shots (several small experiments per shard when they fit);
    other experiments keep all their shots in one shard, and narrow ones are batched.
    """
    per_shard = policy.max_circuits_per_shard
    pending: list[list[tuple[Entry, int]]] = []
    batch: list[tuple[Entry, int]] = []
    batch_size = 0

    def flush() -> None:
        nonlocal batch, batch_size
        if batch:
            pending.append(batch)
            batch, batch_size = [], 0

    for index, info in enumerate(infos):
        n, sets = shots[index], num_sets[index]
        if n < 1 or sets < 1:
            raise ValueError(f"circuit {index}: shots and parameter sets must be >= 1")
        if splits_shots(info, method, noisy):
            flush()
            if n > policy.shots_per_shard:
                parts = _even_split(n, math.ceil(n / policy.shots_per_shard))
                pending.extend([(Entry(index, s, 1), part)] for s in range(sets) for part in parts)
            else:
                k = max(1, min(policy.shots_per_shard // n, per_shard))
                pending.extend([(Entry(index, s, min(k, sets - s)), n)] for s in range(0, sets, k))
        elif info.num_qubits <= policy.batch_max_qubits:
            start = 0
            while start < sets:
                take = min(per_shard - batch_size, sets - start)
                batch.append((Entry(index, start, take), n))
                batch_size += take
                start += take
                if batch_size >= per_shard:
                    flush()
        else:
            flush()
            pending.extend([(Entry(index, s, 1), n)] for s in range(sets))
    flush()

    shards = []
    for shard_index, items in enumerate(pending):
        chunks = tuple(
            ChunkPlan(tuple(entries), chunk_shots, chunk_seed(seed, shard_index, k))
            for k, (entries, chunk_shots) in enumerate(_chunks(items, policy.circuits_per_chunk))
        )
        circuits = list(dict.fromkeys(e.circuit for e, _ in items))
        shards.append(
            ShardPlan(
                index=shard_index,
                chunks=chunks,
                memory_bytes=max(estimate_memory_bytes(infos[i], method) for i in circuits),
                num_qubits=max(infos[i].num_qubits for i in circuits),
                qpy_version=max(infos[i].qpy_version for i in circuits),
            )
        )
    return tuple(shards)
