"""Checks on what nodes send back: a chunk's results must be the experiments its plan names,
with counts that add up to its shots, outcomes that fit the circuit's classical bits, and
per-shot memory of the right size; or, for estimator work, expectation values of the right
shape and range. A node is trusted to simulate, not to be well formed."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from qscale.circuits import memory_width
from qscale.coordinator.jobs import Job
from qscale.coordinator.planner import Entry, ShardPlan
from qscale.proto.v1 import node_pb2

__all__ = ["check_chunk", "valid_outcomes"]


def check_chunk(job: Job, plan: ShardPlan, msg: node_pb2.ChunkResult) -> str:
    """What is wrong with a chunk result, or ``""``."""
    if not 0 <= msg.chunk_index < len(plan.chunks):
        return f"no chunk {msg.chunk_index}"
    chunk = plan.chunks[msg.chunk_index]
    if job.estimator:
        return _check_expectation_values(job, chunk.entries, msg)
    expected = sorted((e.circuit, s) for e in chunk.entries for s in range(e.set_start, e.set_start + e.set_count))
    got = sorted((c.circuit_index, c.set_index) for c in msg.counts)
    if got != expected:
        return f"chunk {msg.chunk_index} has results for {len(got)} experiments, not the {len(expected)} planned"
    for c in msg.counts:
        total = sum(c.counts.values())
        if total != chunk.shots:
            return f"circuit {c.circuit_index} counts add up to {total}, expected {chunk.shots}"
        num_clbits = job.infos[c.circuit_index].num_clbits
        if not valid_outcomes(c.counts, num_clbits):
            return f"circuit {c.circuit_index} has an outcome that is not a {num_clbits}-bit hexadecimal value"
        width = memory_width(num_clbits)
        if job.memory and len(c.memory) != chunk.shots * width:
            return f"circuit {c.circuit_index} sent {len(c.memory)} bytes of memory, expected {chunk.shots * width}"
    return ""


def _check_expectation_values(job: Job, entries: tuple[Entry, ...], msg: node_pb2.ChunkResult) -> str:
    """An estimator chunk: one block per planned entry, each with a finite real value in
    [-1, 1] per parameter set and observable (a Pauli's expectation value)."""
    got = sorted((c.circuit_index, c.set_index, c.set_count) for c in msg.counts)
    if got != sorted((e.circuit, e.set_start, e.set_count) for e in entries):
        return f"chunk {msg.chunk_index} has {len(got)} blocks of expectation values, not the {len(entries)} planned"
    for c in msg.counts:
        size = c.set_count * len(job.observables[c.circuit_index]) * 8
        if len(c.expectation_values) != size:
            return f"circuit {c.circuit_index} sent {len(c.expectation_values)} bytes of expectation values, " \
                   f"expected {size}"
        values = np.frombuffer(c.expectation_values, dtype="<f8")
        if not np.all(np.abs(values) <= 1.0 + 1e-9):  # NaN fails too
            return f"circuit {c.circuit_index} sent an expectation value that is not a number in [-1, 1]"
    return ""


def valid_outcomes(counts: Mapping[str, int], num_clbits: int) -> bool:
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
