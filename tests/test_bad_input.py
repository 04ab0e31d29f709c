"""Bad input gets a clear error with the right gRPC status, and the servers keep serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.primitives import StatevectorSampler
from qiskit.providers.basic_provider import BasicSimulator

import qscale.client
from conftest import bell
from qscale import Client, QScaleBackend, SamplerOptions, SamplerV2
from qscale.circuits import dump_qpy
from qscale.errors import InvalidArgumentError, NoCapableNodeError, NotFoundError
from qscale.local import LocalCluster
from qscale.proto.v1 import jobs_pb2, jobs_pb2_grpc, node_pb2, node_pb2_grpc


def wide(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.rx(0.1, range(n))
    qc.measure_all()
    return qc


GOOD_QPY = dump_qpy(bell())
BAD_QASM = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0]\ncx q[0], q[1];\n'

CASES = {
    "garbage bytes": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=b"not qpy at all")], shots=10),
                      grpc.StatusCode.INVALID_ARGUMENT, "not a QPY payload"),
    "truncated qpy": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=GOOD_QPY[: len(GOOD_QPY) // 2])],
                                             shots=10),
                      grpc.StatusCode.INVALID_ARGUMENT, "malformed QPY"),
    "bit-flipped qpy": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(
        qpy=GOOD_QPY[:40] + bytes(b ^ 0xFF for b in GOOD_QPY[40:80]) + GOOD_QPY[80:])], shots=10),
        grpc.StatusCode.INVALID_ARGUMENT, "circuit 0"),
    "qasm syntax error": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qasm=BAD_QASM)], shots=10),
                          grpc.StatusCode.INVALID_ARGUMENT, "OpenQASM 2 error"),
    "qasm file include": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(
        qasm='OPENQASM 2.0;\ninclude "/etc/passwd";\nqreg q[1];\n')], shots=10),
        grpc.StatusCode.INVALID_ARGUMENT, "OpenQASM 2 error"),
    "zero shots": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=GOOD_QPY)], shots=0),
                   grpc.StatusCode.INVALID_ARGUMENT, "shots must be between"),
    "negative shots": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=GOOD_QPY)], shots=-5),
                       grpc.StatusCode.INVALID_ARGUMENT, "shots must be between"),
    "no circuits": (jobs_pb2.SubmitRequest(shots=10), grpc.StatusCode.INVALID_ARGUMENT, "at least one circuit"),
    "empty source": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource()], shots=10),
                     grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "unknown method": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=GOOD_QPY)], shots=10,
                                              method="quantum-magic"),
                       grpc.StatusCode.INVALID_ARGUMENT, "unknown simulation method"),
    "no classical bits": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=dump_qpy(QuantumCircuit(2)))],
                                                 shots=10),
                          grpc.StatusCode.INVALID_ARGUMENT, "no classical bits: it measures nothing"),
    "wider than any node": (jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=dump_qpy(wide(40)))],
                                                   shots=10, method="statevector"),
                            grpc.StatusCode.FAILED_PRECONDITION, "40 qubits"),
}


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    with LocalCluster(1, cores_per_node=1, memory_budget_per_node=1 << 30) as c:
        yield c


@pytest.fixture(scope="module")
def stubs(cluster: LocalCluster):
    channel = grpc.insecure_channel(cluster.address)
    yield jobs_pb2_grpc.JobServiceStub(channel), node_pb2_grpc.NodeServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_submission_is_refused_and_servers_keep_serving(case: str, cluster: LocalCluster, stubs) -> None:
    request, code, text = CASES[case]
    jobs, _ = stubs
    with pytest.raises(grpc.RpcError) as info:
        jobs.Submit(request, timeout=30)
    assert info.value.code() == code
    assert text in info.value.details()
    assert "Traceback" not in info.value.details()
    result = cluster.client.submit(bell(), shots=100, seed=1).result(timeout=60)
    assert result.shots == 100


def test_client_raises_typed_errors(cluster: LocalCluster) -> None:
    client = cluster.client
    with pytest.raises(InvalidArgumentError, match="shots"):
        client.submit(bell(), shots=0)
    with pytest.raises(NoCapableNodeError, match="largest node slot"):
        client.submit(wide(40), shots=10, method="statevector")
    with pytest.raises(NotFoundError):
        client.job("no-such-job")


def test_unknown_ids_and_bad_streams(stubs) -> None:
    jobs, nodes = stubs
    for call in (jobs.GetJob, jobs.GetResult, jobs.Cancel):
        with pytest.raises(grpc.RpcError) as info:
            call(jobs_pb2.JobRef(job_id="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        nodes.Register(node_pb2.RegisterRequest(capabilities=node_pb2.NodeCapabilities(slots=0)), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A work stream that does not start with hello (a heartbeat first included), or names an
    # unknown node, is closed with a status.
    for first in (node_pb2.NodeMessage(done=node_pb2.ShardDone(attempt_token="x")),
                  node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(sequence=1))):
        with pytest.raises(grpc.RpcError) as info:
            list(nodes.Work(iter([first]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ghost = iter([node_pb2.NodeMessage(hello=node_pb2.StreamHello(node_id="ghost"))])
    with pytest.raises(grpc.RpcError) as info:
        list(nodes.Work(ghost, timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_undecodable_request_bytes_get_invalid_argument_without_internals(cluster: LocalCluster) -> None:
    channel = grpc.insecure_channel(cluster.address)
    try:
        for method in ("/qscale.v1.JobService/Submit", "/qscale.v1.JobService/GetJob",
                       "/qscale.v1.NodeService/Register"):
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff\xff garbage", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert "malformed request" in info.value.details() and "class" not in info.value.details()
        work = channel.stream_stream("/qscale.v1.NodeService/Work", request_serializer=None,
                                     response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(work(iter([b"\xff\xff\xff\xff garbage"]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    assert cluster.client.submit(bell(), shots=10, seed=1).result(timeout=60).shots == 10


BAD_SHOTS = [True, False, np.True_, 5.0, np.float64(5), 2.5, "5", b"5", 1 + 0j, [5.0], 0, -3, np.int64(0), 2**63,
             object()]


def test_bad_shots_are_refused_before_anything_is_built_or_sent(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """Every way users give shots refuses the same bad values with InvalidArgumentError, before a
    circuit is serialised or a call is made (the client points at no coordinator at all)."""

    def no_qpy(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("a circuit was serialised before the shots were checked")

    monkeypatch.setattr(qscale.client, "dump_qpy", no_qpy)
    qasm = tmp_path / "bell.qasm"
    qasm.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nmeasure q -> c;\n')
    with Client("127.0.0.1:1", timeout=1.0) as client:
        backend = QScaleBackend(client)
        sampler = SamplerV2(client)
        for value in BAD_SHOTS:
            attempts = {
                "submit": lambda: client.submit(bell(), shots=value),
                "submit per circuit": lambda: client.submit([bell(), bell()], shots=[7, value]),
                "submit_files": lambda: client.submit_files([qasm], shots=value),
                "backend run": lambda: backend.run(bell(), shots=value),
                "backend option": lambda: backend.set_options(shots=value),
                "backend init": lambda: QScaleBackend(client, shots=value),
                "sampler run": lambda: sampler.run([bell()], shots=value),
                "sampler pub": lambda: sampler.run([(bell(), None, value)]),
                "sampler default": lambda: SamplerV2(client, default_shots=value),
                "sampler options": lambda: SamplerV2(client, options={"default_shots": value}),
                "sampler options object": lambda: SamplerOptions(default_shots=value),
            }
            for where, attempt in attempts.items():
                with pytest.raises(InvalidArgumentError, match="shots") as info:
                    attempt()
                assert "positive integer" in str(info.value), (where, value, info.value)
        # None means "the default" to a sampler's run and pubs only.
        for attempt in (lambda: client.submit(bell(), shots=None), lambda: backend.run(bell(), shots=None),
                        lambda: SamplerV2(client, default_shots=None)):
            with pytest.raises(InvalidArgumentError, match="shots must be a positive integer, got NoneType"):
                attempt()
        with pytest.raises(InvalidArgumentError, match=r"shots\[1\] must be a positive integer, got bool"):
            client.submit([bell(), bell()], shots=[np.int64(3), True])
        with pytest.raises(InvalidArgumentError, match="pub 1 shots must be a positive integer, got float"):
            sampler.run([bell(), (bell(), None, 3.0)])
        assert backend.options.shots == 1024  # refused options change nothing


def test_integral_numpy_shots_are_accepted_everywhere(cluster: LocalCluster) -> None:
    client = cluster.client
    assert client.submit(bell(), shots=np.int64(5), seed=1).result(timeout=60).shots == 5
    per_circuit = client.submit([bell(), bell()], shots=np.array([3, 4], dtype=np.uint32), seed=1).result(timeout=60)
    assert [r.shots for r in per_circuit.results] == [3, 4]
    counts = QScaleBackend(client, shots=np.int16(6)).run(bell(), seed_simulator=1).result().get_counts()
    assert sum(counts.values()) == 6
    counts = QScaleBackend(client).run(bell(), shots=np.int64(7), seed_simulator=1).result().get_counts()
    assert sum(counts.values()) == 7
    sampler = SamplerV2(client, default_shots=np.int32(8), seed=1)
    assert sampler.default_shots == 8 and type(sampler.default_shots) is int
    result = sampler.run([bell(), (bell(), None, np.uint8(9))]).result()
    assert [r.data.meas.num_shots for r in result] == [8, 9]
    assert [type(r.metadata["shots"]) for r in result] == [int, int]
    assert sampler.run([bell()], shots=np.int64(10)).result()[0].data.meas.num_shots == 10


def test_unmeasured_classical_bits_read_zero_through_submit(cluster: LocalCluster) -> None:
    """Intake accepts classical bits that nothing measures; they read 0, as in BasicSimulator."""
    qc = QuantumCircuit(2, 2, name="unmeasured")
    qc.h(0)
    result = cluster.client.submit(qc, shots=50, memory=True, seed=1).result(timeout=60)
    reference = BasicSimulator().run(qc, shots=50).result().get_counts()
    assert result.counts == [reference] == [{"00": 50}]
    assert result.results[0].memory() == ["00"] * 50
    counts = QScaleBackend(cluster.client).run(qc, shots=20, memory=True).result()
    assert counts.get_counts() == {"00": 20} and counts.get_memory() == ["00"] * 20
    with pytest.raises(InvalidArgumentError, match="no classical bits"):
        cluster.client.submit(QuantumCircuit(2), shots=10)
    ref = StatevectorSampler().run([qc], shots=5).result()[0].data.c.get_counts()
    assert ref == {"00": 5}
