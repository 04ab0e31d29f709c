"""The node's simulation worker processes (qscale.node.worker), with real spawned workers.

One worker is shared by the module (warming one up costs about a second); the tests that kill it
check that the slot comes back by itself. Every wait is bounded and the worker is stopped in the
fixture's teardown whatever happens.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from qiskit import QuantumCircuit
from qiskit.circuit.library import QFTGate

from conftest import bell, dense_circuit, uniform
from qscale.circuits import dump_qpy
from qscale.node.worker import ChunkOutcome, ShardOutcome, WorkerSlot, describe_exit
from qscale.outcomes import Outcomes
from qscale.proto.v1 import common_pb2, node_pb2

pytestmark = pytest.mark.timeout(120)

RUN_TIMEOUT_S = 60.0
SLOT_MEMORY = 256 << 20  # Aer's cap: 256 MiB holds 24 qubits of statevector


def _assignment(
    token: str,
    circuits: dict[int, bytes],
    chunks: list[tuple[list[int], int, int]],
    *,
    job_id: str = "job-test",
    method: str = "automatic",
) -> node_pb2.ShardAssignment:
    return node_pb2.ShardAssignment(
        job_id=job_id,
        shard_index=0,
        attempt_token=token,
        chunks=[common_pb2.Chunk(entries=[common_pb2.ChunkEntry(circuit_index=i, set_count=1) for i in idx],
                                 shots=shots, seed=seed) for idx, shots, seed in chunks],
        circuits=[node_pb2.CircuitPayload(circuit_index=i, qpy=q) for i, q in circuits.items()],
        method=method,
        memory_bytes=1 << 20,
    )


def _pairs(chunk: ChunkOutcome) -> list[tuple[int, dict[str, int]]]:
    return [(c.circuit_index, Outcomes.from_proto(c.outcomes).hex_dict()) for c in chunk.counts]


def _run(
    slot: WorkerSlot,
    assignment: node_pb2.ShardAssignment,
    on_chunk: Callable[[ChunkOutcome], object] | None = None,
) -> tuple[ShardOutcome, list[ChunkOutcome]]:
    chunks: list[ChunkOutcome] = []

    def collect(chunk: ChunkOutcome) -> None:
        chunks.append(chunk)
        if on_chunk is not None:
            on_chunk(chunk)

    outcome = slot.run(assignment, collect, timeout=RUN_TIMEOUT_S)
    return outcome, chunks


def _process_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def slot() -> Iterator[WorkerSlot]:
    s = WorkerSlot(0, threads=1, memory_budget_bytes=SLOT_MEMORY, ready_timeout_s=90.0)
    pids: set[int] = set()
    try:
        s.start()
        s.wait_ready(timeout=90.0)
        yield s
    finally:
        if s.pid is not None:
            pids.add(s.pid)
        s.close(timeout=5.0)
        for pid in pids:
            assert _process_gone(pid), f"worker {pid} still running after close()"


@pytest.fixture
def ready_slot(slot: WorkerSlot) -> WorkerSlot:
    """The shared slot, warmed up again if an earlier test killed its worker."""
    slot.wait_ready(timeout=90.0)
    return slot


def test_worker_reports_what_it_runs(ready_slot: WorkerSlot) -> None:
    info = ready_slot.info
    assert info is not None and info.pid == ready_slot.pid != os.getpid()
    assert {"automatic", "statevector", "stabilizer"} <= set(info.methods)
    assert info.qpy_version > 0 and info.qiskit_version and info.aer_version
    assert info.max_statevector_qubits == 24  # 256 MiB of complex128 amplitudes
    assert info.warmup_s > 0


def test_shard_of_two_chunks_returns_packed_outcomes_per_chunk(ready_slot: WorkerSlot) -> None:
    a = _assignment(
        "bell-1",
        {0: dump_qpy(bell()), 1: dump_qpy(uniform())},
        [([0, 1], 1000, 11), ([1], 500, 12)],
    )
    outcome, chunks = _run(ready_slot, a)
    assert outcome.ok, outcome.error
    assert outcome.chunks_done == 2 and outcome.seconds >= 0
    assert [c.chunk_index for c in chunks] == [0, 1]
    (i0, bell_counts), (i1, uni) = _pairs(chunks[0])
    assert (i0, i1) == (0, 1)
    assert set(bell_counts) <= {"0x0", "0x3"} and sum(bell_counts.values()) == 1000
    assert sum(uni.values()) == 1000 and all(k.startswith("0x") for k in uni)
    [(i, uni2)] = _pairs(chunks[1])
    assert i == 1 and sum(uni2.values()) == 500


def test_same_seed_gives_same_counts_and_other_seed_other_counts(ready_slot: WorkerSlot) -> None:
    qpy = {0: dump_qpy(uniform())}
    first, c1 = _run(ready_slot, _assignment("seed-1", qpy, [([0], 2000, 7), ([0], 2000, 8)]))
    second, c2 = _run(ready_slot, _assignment("seed-2", qpy, [([0], 2000, 7), ([0], 2000, 8)]))
    assert first.ok and second.ok
    assert c1[0].counts == c2[0].counts and c1[1].counts == c2[1].counts
    assert c1[0].counts != c1[1].counts


def test_uint64_seed_is_folded_into_aer_range(ready_slot: WorkerSlot) -> None:
    qpy = {0: dump_qpy(uniform())}
    high, c_high = _run(ready_slot, _assignment("seed-hi", qpy, [([0], 500, (1 << 64) - 1)]))
    low, c_low = _run(ready_slot, _assignment("seed-lo", qpy, [([0], 500, (1 << 63) - 1)]))
    assert high.ok and low.ok, (high.error, low.error)
    assert c_high[0].counts == c_low[0].counts


def test_circuit_with_gates_aer_lacks_is_transpiled(ready_slot: WorkerSlot) -> None:
    qc = QuantumCircuit(3)
    qc.x(0)
    qc.append(QFTGate(3), [0, 1, 2])
    qc.append(QFTGate(3).inverse(), [0, 1, 2])
    qc.measure_all()
    outcome, chunks = _run(ready_slot, _assignment("qft-1", {0: dump_qpy(qc)}, [([0], 300, 1)]))
    assert outcome.ok, outcome.error
    assert _pairs(chunks[0]) == [(0, {"0x1": 300})]  # QFT then its inverse: back to |001>


def test_garbage_qpy_fails_with_a_clear_message(ready_slot: WorkerSlot) -> None:
    pid = ready_slot.pid
    outcome, chunks = _run(ready_slot, _assignment("bad-1", {0: b"definitely not QPY"}, [([0], 10, 1)]))
    assert not outcome.ok and not outcome.aborted and chunks == []
    assert outcome.error.startswith("InvalidArgumentError: circuit 0:")
    assert "not a QPY payload" in outcome.error
    assert "Traceback" not in outcome.error
    assert ready_slot.pid == pid  # a bad payload does not cost a worker


def test_missing_payload_and_missing_measurements_fail_clearly(ready_slot: WorkerSlot) -> None:
    outcome, _ = _run(ready_slot, _assignment("nopayload-1", {0: dump_qpy(bell())}, [([0, 3], 10, 1)]))
    assert not outcome.ok and "carries no QPY for it" in outcome.error and "circuit 3" in outcome.error
    silent = QuantumCircuit(2)
    silent.h(0)
    outcome, _ = _run(ready_slot, _assignment("nomeasure-1", {0: dump_qpy(silent)}, [([0], 10, 1)]))
    assert not outcome.ok and "measures no classical bit" in outcome.error


def test_aer_memory_cap_comes_from_the_slot_budget(ready_slot: WorkerSlot) -> None:
    wide = QuantumCircuit(26)  # 1 GiB of statevector > the 256 MiB slot budget
    wide.h(range(26))
    wide.t(0)
    wide.measure_all()
    outcome, _ = _run(ready_slot, _assignment("wide-1", {0: dump_qpy(wide)}, [([0], 10, 1)], method="statevector"))
    assert not outcome.ok
    assert outcome.error.startswith("AerError:") and "memory" in outcome.error.lower()


def test_sigkill_of_the_worker_mid_shard_is_a_failure_and_the_slot_recovers(ready_slot: WorkerSlot) -> None:
    pid = ready_slot.pid
    assert pid is not None
    a = _assignment(
        "kill-1",
        {0: dump_qpy(bell()), 1: dump_qpy(dense_circuit())},
        [([0], 100, 1), ([1], 100, 2)],
    )
    # The first chunk is instant; the worker is deep in the slow second one when we kill it.
    outcome, chunks = _run(ready_slot, a, on_chunk=lambda c: os.kill(pid, signal.SIGKILL))
    assert [c.chunk_index for c in chunks] == [0]
    assert not outcome.ok and not outcome.aborted
    assert outcome.error == "worker process died (signal 9, SIGKILL)"
    assert _process_gone(pid)

    info = ready_slot.wait_ready(timeout=90.0)  # a fresh worker, started by the slot itself
    assert info.pid != pid
    again, chunks = _run(ready_slot, _assignment("kill-2", {0: dump_qpy(bell())}, [([0], 100, 3)]))
    assert again.ok, again.error
    assert sum(_pairs(chunks[0])[0][1].values()) == 100


def test_abort_stops_a_running_shard_and_a_pending_one(ready_slot: WorkerSlot) -> None:
    pid = ready_slot.pid
    a = _assignment("abort-1", {0: dump_qpy(bell()), 1: dump_qpy(dense_circuit())}, [([0], 100, 1), ([1], 100, 2)])
    outcome, chunks = _run(ready_slot, a, on_chunk=lambda c: ready_slot.abort("abort-1", "cancelled: test"))
    assert outcome.aborted and not outcome.ok and outcome.error == "cancelled: test"
    assert len(chunks) == 1
    assert pid is not None and _process_gone(pid)

    # An abort that arrives before the shard reaches the worker: the shard never runs.
    assert ready_slot.abort("abort-2", "cancelled early") is False
    outcome, chunks = _run(ready_slot, _assignment("abort-2", {0: dump_qpy(bell())}, [([0], 10, 1)]))
    assert outcome.aborted and outcome.error == "cancelled early" and chunks == []


def test_describe_exit() -> None:
    assert describe_exit(-9) == "signal 9, SIGKILL"
    assert describe_exit(-11) == "signal 11, SIGSEGV"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(None) == "exit status unknown"


def test_close_stops_the_worker_and_is_idempotent() -> None:
    s = WorkerSlot(7, threads=1, memory_budget_bytes=64 << 20)
    try:
        s.start()
        pid = s.pid
        assert pid is not None
    finally:
        s.close(timeout=5.0)
    assert _process_gone(pid)
    s.close()
    assert s.pid is None
    outcome = s.run(_assignment("closed-1", {0: dump_qpy(bell())}, [([0], 10, 1)]), timeout=5.0)
    assert outcome.aborted and outcome.error == "slot closed"
