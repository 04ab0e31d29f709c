"""Checks on what nodes send back: a chunk's results must be the experiments its plan names,
with packed outcomes that add up to its shots and fit the circuit's classical bits, and
per-shot memory of the right size; or, for estimator work, expectation values of the right
shape and range. A node is trusted to simulate, not to be well formed."""

from __future__ import annotations

import numpy as np

from qscale.circuits import memory_width
from qscale.coordinator.jobs import Job
from qscale.coordinator.planner import Entry, ShardPlan
from qscale.outcomes import check_many
from qscale.proto.v1 import node_pb2

__all__ = ["check_chunk"]


def check_chunk(job: Job, plan: ShardPlan, msg: node_pb2.ChunkResult) -> str:
    """What is wrong with a chunk result, or ``""``."""
    if not 0 <= msg.chunk_index < len(plan.chunks):
        return f"no chunk {msg.chunk_index}"
    chunk = plan.chunks[msg.chunk_index]
    for c in msg.counts:  # a name, shown to users and stored: short, plain
        if c.method and (len(c.method) > 64 or not c.method.isascii() or not c.method.replace("_", "").isalpha()):
            return f"circuit {c.circuit_index}: a malformed simulation method name"
    if job.estimator:
        return _check_expectation_values(job, chunk.entries, msg)
    expected = sorted((e.circuit, s) for e in chunk.entries for s in range(e.set_start, e.set_start + e.set_count))
    got = sorted((c.circuit_index, c.set_index) for c in msg.counts)
    if got != expected:
        return f"chunk {msg.chunk_index} has results for {len(got)} experiments, not the {len(expected)} planned"
    bad, problem = check_many([(c.outcomes, job.infos[c.circuit_index].num_clbits) for c in msg.counts],
                              chunk.shots)
    if problem:
        return f"circuit {msg.counts[bad].circuit_index}: {problem}"
    if job.memory:
        for c in msg.counts:
            size = chunk.shots * memory_width(job.infos[c.circuit_index].num_clbits)
            if len(c.memory) != size:
                return f"circuit {c.circuit_index} sent {len(c.memory)} bytes of memory, expected {size}"
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

