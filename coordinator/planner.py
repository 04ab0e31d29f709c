"""The shard planner: how a job is cut into shards.

A plan is a pure function of the job (its circuits, shots, seed, method) and the
:class:`PlanningPolicy`; it never depends on how many nodes are up. Seeds are derived from
the job seed with :class:`numpy.random.SeedSequence` keyed by (shard, chunk), so the merged
counts of a seeded job are the same on 1 node or 50, and after any retry.

The unit of dispatch and accounting is the shard; inside a shard, each chunk is one Aer call
whose counts are streamed back as soon as it ends (partial results).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qscale.circuits import CircuitInfo, estimate_memory_bytes, resolved_method

__all__ = ["PlanningPolicy", "ChunkPlan", "ShardPlan", "plan_job", "chunk_seed", "splits_shots"]

_SEED_MODULUS = 1 << 31  # Aer adds an offset per experiment to the seed; stay far from overflow


@dataclass(frozen=True)
class PlanningPolicy:
    """How jobs are cut. Stored with each job, so a restart plans it the same way."""

    shots_per_shard: int = 1000
    """Largest number of shots in one shard when a circuit's shots are split."""
    max_circuits_per_shard: int = 64
    """Most circuits batched into one shard."""
    circuits_per_chunk: int = 16
    """Most circuits in one Aer call inside a shard (the granularity of partial results)."""
    batch_max_qubits: int = 16
    """Circuits at most this wide are batched with their neighbours; wider ones get a shard each."""

    def __post_init__(self) -> None:
        for name in ("shots_per_shard", "max_circuits_per_shard", "circuits_per_chunk", "batch_max_qubits"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanningPolicy.{name} must be >= 1")


@dataclass(frozen=True)
class ChunkPlan:
    """One Aer call: every circuit listed, ``shots`` shots each, seeded with ``seed``."""

    circuit_indices: tuple[int, ...]
    shots: int
    seed: int


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
        return tuple(dict.fromkeys(i for c in self.chunks for i in c.circuit_indices))

    @property
    def shots(self) -> int:
        """Shots over all circuits of the shard."""
        return sum(c.shots * len(c.circuit_indices) for c in self.chunks)


def chunk_seed(job_seed: int, shard_index: int, chunk_index: int) -> int:
    """The simulator seed of one chunk, derived from the job seed."""
    seq = np.random.SeedSequence(job_seed, spawn_key=(shard_index, chunk_index))
    return int(seq.generate_state(1, dtype=np.uint64)[0] % _SEED_MODULUS)


def splits_shots(info: CircuitInfo, method: str) -> bool:
    """Whether each shot costs a simulation of its own, so that splitting shots spreads work.

    Statevector-like methods sample every shot of a circuit with measurements only at the end
    from one final state: splitting its shots would simulate it again per shard. The stabilizer
    methods, mid-circuit measurement, reset and classical control pay per shot.
    """
    if resolved_method(method, info) in ("stabilizer", "extended_stabilizer"):
        return True
    return not info.final_measurements_only


def _even_split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plan_job(
    infos: Sequence[CircuitInfo],
    shots: int,
    seed: int,
    method: str,
    policy: PlanningPolicy,
) -> tuple[ShardPlan, ...]:
    """Cut a job into shards.

    Circuits whose shots cost a simulation each are split into shards of at most
    ``policy.shots_per_shard`` shots; other circuits keep all their shots in one shard, and
    consecutive narrow ones are batched together.
    """
    if shots < 1:
        raise ValueError("shots must be >= 1")
    # Each entry: (circuit indices, shots per circuit, memory, qubits) of a future shard.
    pending: list[tuple[list[int], int]] = []
    batch: list[int] = []

    def flush() -> None:
        if batch:
            pending.append((list(batch), shots))
            batch.clear()

    for index, info in enumerate(infos):
        if splits_shots(info, method):
            flush()
            parts = max(1, math.ceil(shots / policy.shots_per_shard))
            pending.extend(([index], part) for part in _even_split(shots, parts))
        elif info.num_qubits <= policy.batch_max_qubits:
            batch.append(index)
            if len(batch) >= policy.max_circuits_per_shard:
                flush()
        else:
            flush()
            pending.append(([index], shots))
    flush()

    shards = []
    for shard_index, (indices, shard_shots) in enumerate(pending):
        step = policy.circuits_per_chunk
        chunks = tuple(
            ChunkPlan(tuple(indices[i : i + step]), shard_shots, chunk_seed(seed, shard_index, k))
            for k, i in enumerate(range(0, len(indices), step))
        )
        shards.append(
            ShardPlan(
                index=shard_index,
                chunks=chunks,
                memory_bytes=max(estimate_memory_bytes(infos[i], method) for i in indices),
                num_qubits=max(infos[i].num_qubits for i in indices),
                qpy_version=max(infos[i].qpy_version for i in indices),
            )
        )
    return tuple(shards)
