"""The worker's answer when Aer gives no counts: classical bits that nothing writes read all zeros
(as in Qiskit's samplers and BasicSimulator), in counts and in per-shot memory.

The worker's shard loop runs in this process (no spawned worker) with a pipe stand-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.circuit.classical import expr
from qiskit_aer import AerSimulator

from conftest import bell
from qscale.circuits import dump_qpy, pack_parameter_values
from qscale.node.worker import _worker_run_shard, _worker_warm_up, _WorkerState
from qscale.outcomes import Outcomes
from qscale.proto.v1 import common_pb2, node_pb2


class _Pipe:
    """What the worker sends, kept."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)


@pytest.fixture(scope="module")
def state() -> Iterator[_WorkerState]:
    worker_state, _ = _worker_warm_up(1, 256 << 20)
    worker_state.cache_entries, worker_state.cache_bytes = 16, 1 << 20
    yield worker_state


def _run(state: _WorkerState, circuit: QuantumCircuit, chunks: list[tuple[int, int]], *, sets: int = 1,
         values: np.ndarray | None = None, memory: bool = True) -> list[tuple[Any, ...]]:
    payload = node_pb2.CircuitPayload(circuit_index=0, qpy=dump_qpy(circuit))
    if values is not None:
        names, num_sets, data = pack_parameter_values([p.name for p in circuit.parameters], values)
        payload.parameters.CopyFrom(common_pb2.ParameterValues(names=names, num_sets=num_sets, values=data))
    assignment = node_pb2.ShardAssignment(
        job_id=f"job-{id(circuit)}", attempt_token="t", memory=memory, circuits=[payload],
        chunks=[common_pb2.Chunk(entries=[common_pb2.ChunkEntry(circuit_index=0, set_count=sets)], shots=shots,
                                 seed=seed) for shots, seed in chunks],
    )
    pipe = _Pipe()
    _worker_run_shard(state, pipe, assignment.SerializeToString())  # type: ignore[arg-type]
    return pipe.sent


def _results(sent: list[tuple[Any, ...]]) -> list[common_pb2.ShardResult]:
    assert sent[-1][0] == "done", sent[-1]
    return [common_pb2.ShardResult.FromString(m[2]) for m in sent if m[0] == "chunk"]


def _hex(result: common_pb2.CircuitCounts) -> dict[str, int]:
    return Outcomes.from_proto(result.outcomes).hex_dict()


def test_aer_gives_no_counts_for_unmeasured_bits() -> None:
    """The premise: Aer leaves counts and memory out when nothing is measured."""
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    assert AerSimulator().run(qc, shots=4, memory=True).result().data(0) == {}


def test_unmeasured_bits_give_all_zero_counts_and_memory(state: _WorkerState) -> None:
    idle = QuantumCircuit(2, 10)  # two bytes of memory per shot
    idle.h(0)
    chunks = _results(_run(state, idle, [(6, 1), (4, 2)]))
    assert [[(r.circuit_index, _hex(r)) for r in c.results] for c in chunks] == [[(0, {"0x0": 6})],
                                                                                [(0, {"0x0": 4})]]
    assert [c.results[0].memory for c in chunks] == [bytes(12), bytes(8)]
    without_memory = _results(_run(state, idle, [(5, 1)], memory=False))
    assert _hex(without_memory[0].results[0]) == {"0x0": 5} and without_memory[0].results[0].memory == b""


def test_unmeasured_bits_of_every_parameter_set(state: _WorkerState) -> None:
    theta = Parameter("t")
    swept = QuantumCircuit(1, 1)
    swept.rx(theta, 0)
    (chunk,) = _results(_run(state, swept, [(3, 1)], sets=3, values=np.array([[0.1], [0.2], [0.3]])))
    assert [(r.set_index, _hex(r), r.memory) for r in chunk.results] == [(s, {"0x0": 3}, bytes(3))
                                                                         for s in range(3)]


def test_measured_circuits_still_use_aer_counts(state: _WorkerState) -> None:
    (chunk,) = _results(_run(state, bell(), [(50, 1)]))
    counts = _hex(chunk.results[0])
    assert sum(counts.values()) == 50 and set(counts) <= {"0x0", "0x3"} and len(counts) == 2


def test_no_counts_is_an_error_when_bits_are_written_or_absent(state: _WorkerState) -> None:
    stored = QuantumCircuit(1, 2)  # sets clbit 1 without measuring: Aer reports nothing
    stored.store(stored.clbits[1], expr.lift(True))
    sent = _run(state, stored, [(4, 1)])
    assert sent[-1][0] == "failed" and "writes classical bits" in sent[-1][1]
    silent = QuantumCircuit(2)
    silent.h(0)
    sent = _run(state, silent, [(4, 1)])
    assert sent[-1][0] == "failed" and "measures no classical bit" in sent[-1][1]
