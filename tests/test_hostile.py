"""Hostile input. Every limit is tried at the limit and one over it; broken, old and oversize QPY;
OpenQASM that includes files, declares huge registers or defines gate bombs; payloads that make a
decoder exhaust memory or hang; garbage in every field of the job and node messages. After each
case (or group of cases) the coordinator and the node still answer and a normal job succeeds.

``pytest -s tests/test_hostile.py`` prints how many hostile inputs were tried.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from qiskit import QuantumCircuit, qpy
from qiskit.circuit import Gate, IfElseOp, Parameter

from conftest import bell, wait_until
from qscale.circuits import check_operations, dump_qpy, max_statevector_qubits, parse_qasm
from qscale.coordinator import sandbox
from qscale.coordinator.config import CoordinatorConfig, Limits
from qscale.errors import InvalidArgumentError
from qscale.local import LocalCluster
from qscale.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, node_pb2, node_pb2_grpc

LIMITS = Limits(
    max_message_bytes=2 << 20, max_circuit_bytes=1 << 20, max_circuits=40, max_shots=10_000, max_qubits=16,
    max_clbits=24, max_experiments=60, max_operations=1000, max_nesting_depth=8, max_noise_model_bytes=64 << 10,
    decode_workers=2, decode_memory_bytes=512 << 20, decode_timeout_s=2.0,
)
MARKER = "zq_marker_7f3a"  # never valid anywhere: if it shows up in an error, the error quotes the source
OK, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
tried = 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(1, cores_per_node=1, memory_budget_per_node=1 << 30,
                      config=CoordinatorConfig(limits=LIMITS)) as c:
        yield c
    print(f"\ntest_hostile: {tried} hostile inputs tried")


@pytest.fixture(scope="module")
def stubs(cluster: LocalCluster) -> Iterator[tuple[jobs_pb2_grpc.JobServiceStub, node_pb2_grpc.NodeServiceStub]]:
    channel = grpc.insecure_channel(cluster.address)
    yield jobs_pb2_grpc.JobServiceStub(channel), node_pb2_grpc.NodeServiceStub(channel)
    channel.close()


@pytest.fixture
def jobs(stubs) -> jobs_pb2_grpc.JobServiceStub:
    return stubs[0]


def still_serving(cluster: LocalCluster) -> None:
    """The coordinator and the node answer, and a normal job runs to the end."""
    result = cluster.client.submit(bell(), shots=100, seed=1).result(timeout=60)
    assert result.shots == 100 and set(result.counts[0]) <= {"00", "11"}
    assert [n.state for n in cluster.client.nodes()].count("alive") >= 1


def submit(jobs, request: jobs_pb2.SubmitRequest, *, hostile: bool = True) -> tuple[grpc.StatusCode, str]:
    """Submit; (status code, details). An accepted job is cancelled (it was only a probe)."""
    global tried
    tried += hostile
    try:
        reply = jobs.Submit(request, timeout=60)
    except grpc.RpcError as err:
        details = err.details() or ""
        assert "Traceback" not in details and 'File "' not in details, details
        return err.code(), details
    jobs.Cancel(jobs_pb2.JobRef(job_id=reply.job_id), timeout=10)
    return OK, reply.job_id


def refused(jobs, request: jobs_pb2.SubmitRequest, *texts: str, absent: tuple[str, ...] = (MARKER,)) -> str:
    code, details = submit(jobs, request)
    assert code == REFUSED, (code, details)
    for text in texts:
        assert text in details, details
    for text in absent:
        assert text not in details, details
    return details


def qpy_job(*circuits: QuantumCircuit | bytes, shots: int = 10, **fields) -> jobs_pb2.SubmitRequest:
    sources = [jobs_pb2.CircuitSource(qpy=c if isinstance(c, bytes) else dump_qpy(c)) for c in circuits]
    return jobs_pb2.SubmitRequest(circuits=sources, shots=shots, **fields)


def qasm_job(*texts: str, shots: int = 10) -> jobs_pb2.SubmitRequest:
    return jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qasm=t) for t in texts], shots=shots)


# ------------------------------------------------------------------------------ circuits

def wide(n: int, clbits: int | None = None) -> QuantumCircuit:
    qc = QuantumCircuit(n, n if clbits is None else clbits)
    qc.x(range(n))
    for i in range(qc.num_clbits):
        qc.measure(i % n, i)
    return qc


def with_ops(n: int) -> QuantumCircuit:
    """``n`` operations: n - 1 X gates and a measurement."""
    qc = QuantumCircuit(1, 1)
    for _ in range(n - 1):
        qc.x(0)
    qc.measure(0, 0)
    return qc


def expanded_ops(n: int) -> QuantumCircuit:
    """``n`` operations once a 100-gate custom gate is expanded (9 uses, the rest plain X)."""
    block = QuantumCircuit(1, name="block")
    for _ in range(100):
        block.x(0)
    gate = block.to_gate()
    qc = QuantumCircuit(1, 1)
    for _ in range(9):
        qc.append(gate, [0])
    for _ in range(n - 901):
        qc.x(0)
    qc.measure(0, 0)
    return qc


def gate_chain(depth: int) -> QuantumCircuit:
    """A custom gate whose definition uses another, ``depth`` definitions deep."""
    inner = QuantumCircuit(1, name="g1")
    inner.x(0)
    gate = inner.to_gate()
    for level in range(2, depth + 1):
        outer = QuantumCircuit(1, name=f"g{level}")
        outer.append(gate, [0])
        gate = outer.to_gate()
    qc = QuantumCircuit(1, 1)
    qc.append(gate, [0])
    qc.measure(0, 0)
    return qc


def nested_ifs(depth: int) -> QuantumCircuit:
    """Control flow nested ``depth`` blocks deep."""
    inner = QuantumCircuit(1, 1)
    inner.x(0)
    for _ in range(depth - 1):
        outer = QuantumCircuit(1, 1)
        outer.append(IfElseOp((outer.clbits[0], 1), inner), [0], [0])
        inner = outer
    qc = QuantumCircuit(1, 1)
    qc.measure(0, 0)
    qc.append(IfElseOp((qc.clbits[0], 1), inner), [0], [0])
    qc.measure(0, 0)
    return qc


def with_metadata_size(size: int) -> bytes:
    """A Bell circuit's QPY padded (through its metadata) to exactly ``size`` bytes."""
    qc = bell()
    qc.metadata = {"pad": ""}
    base = len(dump_qpy(qc))
    qc.metadata = {"pad": "x" * (size - base)}
    data = dump_qpy(qc)
    assert len(data) == size
    return data


def qasm_of_size(size: int) -> str:
    text = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0], q[1];\n' \
           "measure q -> c;\n// "
    return text + "x" * (size - len(text))


def qasm3_nested_ifs(depth: int) -> str:
    return ('OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[1] q;\nbit[1] c;\nc[0] = measure q[0];\n'
            + "if (c[0]) {\n" * depth + "x q[0];\n" + "}\n" * depth + "c[0] = measure q[0];\n")


def qasm_gate_chain(depth: int, fan: int = 1, version: int = 2) -> str:
    """Gates g1..g{depth}, each calling the previous one ``fan`` times; the last one applied."""
    if version == 2:
        head, regs, meas = 'OPENQASM 2.0;\ninclude "qelib1.inc";\n', "qreg q[1];\ncreg c[1];\n", "measure q[0] -> c[0];\n"
    else:
        head, regs, meas = 'OPENQASM 3.0;\ninclude "stdgates.inc";\n', "qubit[1] q;\nbit[1] c;\n", "c[0] = measure q[0];\n"
    lines = [head, "gate g1 a { x a; }\n"]
    for level in range(2, depth + 1):
        lines.append(f"gate g{level} a {{ " + f"g{level - 1} a; " * fan + "}\n")
    return "".join(lines) + regs + f"g{depth} q[0];\n" + meas


def parameterised(sets: int) -> jobs_pb2.SubmitRequest:
    theta = Parameter("theta")
    qc = QuantumCircuit(1, 1)
    qc.ry(theta, 0)
    qc.measure(0, 0)
    values = np.linspace(0, 1, sets).reshape(sets, 1)
    params = common_pb2.ParameterValues(names=["theta"], num_sets=sets, values=values.astype("<f8").tobytes())
    return jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=dump_qpy(qc), parameters=params)], shots=10)


def noise_of_size(size: int) -> str:
    from qiskit_aer.noise import NoiseModel

    text = json.dumps(NoiseModel().to_dict(serializable=True))
    return text + " " * (size - len(text))


def message_of_size(size: int) -> jobs_pb2.SubmitRequest:
    """A valid request of exactly ``size`` bytes on the wire (two padded OpenQASM circuits)."""
    half = min(LIMITS.max_circuit_bytes, size // 2)
    request = qasm_job(qasm_of_size(half), qasm_of_size(half))
    for _ in range(3):  # the length prefix of the second source grows with its text
        request.circuits[1].qasm = qasm_of_size(len(request.circuits[1].qasm) + size - request.ByteSize())
    assert request.ByteSize() == size
    return request


# (at the limit, one over it, words the refusal must contain)
LIMIT_CASES: dict[str, tuple[Callable[[], jobs_pb2.SubmitRequest], Callable[[], jobs_pb2.SubmitRequest], str]] = {
    "qubits qpy": (lambda: qpy_job(wide(16)), lambda: qpy_job(wide(17)), "17 qubits; the limit is 16"),
    "qubits qasm": (lambda: qasm_job("OPENQASM 2.0;\nqreg q[16];\ncreg c[1];\nmeasure q[0] -> c[0];\n"),
                    lambda: qasm_job("OPENQASM 2.0;\nqreg q[16];\nqreg r[1];\ncreg c[1];\nmeasure q[0] -> c[0];\n"),
                    "more than 16 qubits"),
    "clbits qpy": (lambda: qpy_job(wide(2, 24)), lambda: qpy_job(wide(2, 25)), "25 classical bits; the limit is 24"),
    "clbits qasm": (lambda: qasm_job("OPENQASM 3.0;\nqubit q;\nbit[24] c;\nc[0] = measure q;\n"),
                    lambda: qasm_job("OPENQASM 3.0;\nqubit q;\nbit[24] c;\nbit d;\nc[0] = measure q;\n"),
                    "more than 24 classical bits"),
    "shots": (lambda: qpy_job(bell(), shots=10_000), lambda: qpy_job(bell(), shots=10_001),
              "shots must be between 1 and 10000"),
    "circuits": (lambda: qpy_job(*[bell()] * 40), lambda: qpy_job(*[bell()] * 41), "at most 40 circuits"),
    "parameter sets": (lambda: parameterised(60), lambda: parameterised(61), "at most 60 experiments"),
    "operations": (lambda: qpy_job(with_ops(1000)), lambda: qpy_job(with_ops(1001)), "more than 1000 operations"),
    "operations expanded": (lambda: qpy_job(expanded_ops(1000)), lambda: qpy_job(expanded_ops(1001)),
                            "more than 1000 operations"),
    "operations qasm": (lambda: qasm_job(qasm_gate_chain(4, 10).replace("g4 q[0];", "g3 q[0]; " * 9 + "x q[0]; " * 99)),
                        lambda: qasm_job(qasm_gate_chain(4, 10).replace("g4 q[0];", "g3 q[0]; " * 9 + "x q[0]; " * 100)),
                        "more than 1000 operations"),
    "nested gates qpy": (lambda: qpy_job(gate_chain(8)), lambda: qpy_job(gate_chain(9)), "nested deeper than 8"),
    "nested gates qasm": (lambda: qasm_job(qasm_gate_chain(8)), lambda: qasm_job(qasm_gate_chain(9)),
                          "nested deeper than 8"),
    "nested control flow qpy": (lambda: qpy_job(nested_ifs(8)), lambda: qpy_job(nested_ifs(9)),
                                "nested deeper than 8"),
    "nested control flow qasm": (lambda: qasm_job(qasm3_nested_ifs(8)), lambda: qasm_job(qasm3_nested_ifs(9)),
                                 "nested deeper than 8"),
    "circuit bytes qpy": (lambda: qpy_job(with_metadata_size(1 << 20)), lambda: qpy_job(with_metadata_size((1 << 20) + 1)),
                          "the limit is 1048576"),
    "circuit bytes qasm": (lambda: qasm_job(qasm_of_size(1 << 20)), lambda: qasm_job(qasm_of_size((1 << 20) + 1)),
                           "the limit is 1048576"),
    "noise model bytes": (lambda: qpy_job(bell(), noise_model=noise_of_size(64 << 10)),
                          lambda: qpy_job(bell(), noise_model=noise_of_size((64 << 10) + 1)), "the limit is 65536"),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_each_limit_at_and_one_over(case: str, cluster: LocalCluster, jobs) -> None:
    at, over, text = LIMIT_CASES[case]
    code, details = submit(jobs, at(), hostile=False)
    assert code == OK, details
    refused(jobs, over(), text)
    still_serving(cluster)


def test_message_size_limit(cluster: LocalCluster, jobs) -> None:
    code, details = submit(jobs, message_of_size(LIMITS.max_message_bytes), hostile=False)
    assert code == OK, details
    code, details = submit(jobs, message_of_size(LIMITS.max_message_bytes + 1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    code, _ = submit(jobs, jobs_pb2.SubmitRequest(circuits=[jobs_pb2.CircuitSource(qpy=bytes(8 << 20))]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(cluster)


def test_limits_come_from_defaults_environment_and_flags(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from qscale.coordinator.cli import main

    assert Limits().max_operations == 1_000_000 and Limits().max_nesting_depth == 32
    env = {"QSCALE_MAX_QUBITS": "40", "QSCALE_MAX_OPERATIONS": "5_000", "QSCALE_MAX_MESSAGE_BYTES": "64M",
           "QSCALE_DECODE_TIMEOUT": "2.5", "QSCALE_DECODE_MEMORY_BYTES": "1G", "QSCALE_MAX_NESTING_DEPTH": "12"}
    limits = CoordinatorConfig.from_env(env).limits
    assert (limits.max_qubits, limits.max_operations, limits.max_message_bytes, limits.decode_timeout_s,
            limits.decode_memory_bytes, limits.max_nesting_depth) == (40, 5000, 64 << 20, 2.5, 1 << 30, 12)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--max-qubits", "30", "--max-shots", "1000", "--max-circuits", "7",
                 "--max-experiments", "70", "--max-nesting-depth", "9", "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)["limits"]
    assert (shown["max_qubits"], shown["max_shots"], shown["max_circuits"], shown["max_experiments"],
            shown["max_nesting_depth"], shown["max_operations"]) == (30, 1000, 7, 70, 9, 5000)
    for bad in ({"QSCALE_MAX_QUBITS": "many"}, {"QSCALE_MAX_OPERATIONS": "0"}, {"QSCALE_MAX_NESTING_DEPTH": "1000"}):
        with pytest.raises(InvalidArgumentError):
            CoordinatorConfig.from_env(bad)


# ------------------------------------------------------------------------------------- QPY

GOOD = dump_qpy(bell())


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def qubit_count_offset() -> int:
    """Where a circuit's qubit count sits in this Qiskit's QPY (found, not assumed)."""
    a, b = dump_qpy(QuantumCircuit(2, name="a")), dump_qpy(QuantumCircuit(0x0305, name="a"))
    return next(i for i in range(len(a)) if a[i] != b[i]) - 2


def test_broken_qpy_is_refused(cluster: LocalCluster, jobs) -> None:
    rng = random.Random(1)
    for cut in sorted({0, 5, 6, 7, 18, 19, 20, 30, len(GOOD) - 1, *rng.sample(range(len(GOOD)), 12)}):
        refused(jobs, qpy_job(GOOD[:cut]), "circuit 0")
    accepted = 0
    for _ in range(60):  # flipped bytes: refused, or still a valid circuit (then accepted)
        data = bytearray(GOOD)
        for pos in rng.sample(range(20, len(data)), rng.randint(1, 8)):
            data[pos] ^= 1 << rng.randrange(8)
        code, details = submit(jobs, qpy_job(bytes(data)))
        assert code in (OK, REFUSED), (code, details)
        accepted += code == OK
    refused(jobs, qpy_job(GOOD[:40] + bytes(b ^ 0xFF for b in GOOD[40:80]) + GOOD[80:]), "circuit 0")
    refused(jobs, qpy_job(bytes(rng.randrange(256) for _ in range(400))), "not a QPY payload")
    refused(jobs, qpy_job(b"QISKIT" + bytes(rng.randrange(256) for _ in range(400))), "circuit 0")
    still_serving(cluster)


def test_qpy_versions_outside_the_range_and_several_programs(cluster: LocalCluster, jobs) -> None:
    for version in (*range(0, 13), qpy.QPY_VERSION + 1, 200, 255):
        refused(jobs, qpy_job(patched(GOOD, 6, bytes([version]))), f"QPY version {version} is not accepted",
                f"versions 13 to {qpy.QPY_VERSION}")
    for version in range(13, qpy.QPY_VERSION + 1):  # real payloads of every accepted version
        buf = io.BytesIO()
        qpy.dump(bell(), buf, version=version)
        code, details = submit(jobs, qpy_job(buf.getvalue()), hostile=False)
        assert code == OK, (version, details)
    buf = io.BytesIO()
    qpy.dump([bell(), bell()], buf)
    refused(jobs, qpy_job(buf.getvalue()), "exactly one circuit, this one holds 2")
    for programs in (0, 2, 1 << 40):
        refused(jobs, qpy_job(patched(GOOD, 10, struct.pack("!Q", programs))), "exactly one circuit")
    still_serving(cluster)


def test_operations_off_the_allow_list_are_refused(cluster: LocalCluster, jobs) -> None:
    from qiskit.circuit import AnnotatedOperation, InverseModifier
    from qiskit.circuit.library import HGate, QFTGate, UnitaryGate
    from qiskit.quantum_info import Kraus
    from qiskit_aer.library import SaveStatevector, SetStatevector
    from qiskit_aer.noise import amplitude_damping_error

    def circuit(add: Callable[[QuantumCircuit], object]) -> QuantumCircuit:
        qc = QuantumCircuit(2, 2)
        add(qc)
        qc.measure([0, 1], [0, 1])
        return qc

    impostor = Gate("h", 1, [])
    impostor.definition = with_ops(2).remove_final_measurements(inplace=False)
    cases = {
        "save_statevector": lambda qc: qc.append(SaveStatevector(2), [0, 1]),
        "set_statevector": lambda qc: qc.append(SetStatevector([1, 0, 0, 0]), [0, 1]),
        "kraus": lambda qc: qc.append(Kraus([np.diag([1, 0.6]), np.array([[0, 0.8], [0, 0]])]), [0]),
        "quantum_channel": lambda qc: qc.append(amplitude_damping_error(0.1), [0]),
        "AnnotatedOperation": lambda qc: qc.append(AnnotatedOperation(HGate(), InverseModifier()), [0]),
        "no definition": lambda qc: qc.append(Gate(MARKER, 1, []), [0]),
        "is not Qiskit's 'h'": lambda qc: qc.append(impostor, [0]),
    }
    for text, add in cases.items():
        refused(jobs, qpy_job(circuit(add)), text)
    allowed = [
        lambda qc: qc.append(UnitaryGate(np.eye(4)), [0, 1]),
        lambda qc: qc.initialize([0, 1], [0]),
        lambda qc: qc.append(QFTGate(2), [0, 1]),
        lambda qc: qc.append(gate_chain(5).to_instruction(), [0], [0]),
        lambda qc: qc.cx(0, 1, ctrl_state=0),
    ]
    for add in allowed:
        code, details = submit(jobs, qpy_job(circuit(add)), hostile=False)
        assert code == OK, details
    still_serving(cluster)


def test_decoder_out_of_memory_is_an_error_not_a_dead_coordinator(cluster: LocalCluster, jobs) -> None:
    # 386 bytes that claim four billion qubits: Qiskit's reader allocates until the machine's
    # memory is gone (the OOM killer took a 24 GiB process in a trial). The sandbox stops it.
    offset = qubit_count_offset()
    bomb = patched(GOOD, offset, struct.pack("!I", 4_000_000_000))
    refused(jobs, qpy_job(bomb), "circuit 0 could not be decoded safely", "memory")
    # OpenQASM 3: raising a 14-qubit gate to a power builds its 4 GiB matrix.
    args = ", ".join(f"a{i}" for i in range(14))
    body = " ".join(f"h a{i};" for i in range(14))
    text = (f'OPENQASM 3.0;\ninclude "stdgates.inc";\ngate {MARKER} {args} {{ {body} }}\nqubit[14] q;\nbit[14] c;\n'
            f"pow(0.5) @ {MARKER} " + ", ".join(f"q[{i}]" for i in range(14)) + ";\nc = measure q;\n")
    refused(jobs, qasm_job(text), "circuit 0 could not be decoded safely")
    still_serving(cluster)


def slow_qasm(n: int = 11) -> str:
    """pow(0.5) of an n-qubit gate: Qiskit's OpenQASM 3 importer computes the square root of its
    2**n x 2**n matrix (n = 11: about 8 s of CPU and 300 MiB; n = 12: a minute)."""
    args = ", ".join(f"a{i}" for i in range(n))
    body = " ".join(f"h a{i};" for i in range(n)) + " " + " ".join(f"cx a{i}, a{i + 1};" for i in range(n - 1))
    return (f'OPENQASM 3.0;\ninclude "stdgates.inc";\ngate big {args} {{ {body} }}\nqubit[{n}] q;\nbit[{n}] c;\n'
            "pow(0.5) @ big " + ", ".join(f"q[{i}]" for i in range(n)) + ";\nc = measure q;\n")


def test_decoder_hang_is_cut_off(cluster: LocalCluster, jobs) -> None:
    request = qasm_job(*[qasm_of_size(200)] * 3, slow_qasm())
    refused(jobs, request, "circuit 3 could not be decoded safely: it took longer than the 2 s limit")
    still_serving(cluster)


# Mutated Bell-like QPY (Qiskit 2.6, QPY 18) found by this suite's sandbox fuzzing
# (tests/test_fuzz.py): a few hundred bytes each. Outside a sandbox the first asks for more memory
# than the machine has, the second for 2.4 GB (under a memory cap Qiskit's Rust reader aborts the
# whole process), the third runs 8 s and holds 2 GB.
FUZZ_OOM = bytes.fromhex(
    "5149534b49541202060200000000000000017071000000000000001c000a6600080000000200000002000100000000000200"
    "000002000000000000000400000000636972637569742d343200000000000000007b7d710100000002000101017100000000"
    "6301000000020001010163000000000000000000000000000000000000000600000001000000010000000000000000000000"
    "00000000000000000000000052594761746571000000007000000000000000170005866d2df154834accb4485d3a1996e4e4"
    "74686574610007000000000000000100000001000000000000000000000000000000000000004d6561737572657100000000"
    "6300000000000800000001"
)
FUZZ_ABORT = bytes.fromhex(
    "5149534b49541202060200000000000000017071000000000000001c000a6600080000000100000001000000000000000200"
    "000002000000000000000200000000636972637569742d343500000000000000007b7d710100000001000101017100000000"
    "6301000000010001010163000000000000004ff93eb200000000000000000000010006670000000100000000010000000000"
    "0000ce000000000000000000000000000000006d696e655f3000046600080000000100000000000000000000000200000001"
    "0000000000000002000000006d696e6500000000000000007b7d710100000001000101017100000000000000000000000000"
    "0000000000000600000000000000010000000000000000000000000000000000000000000000535847617465710000000000"
    "0600000001000000010000000000000000000000000000000000000000000000525a47617465710000000066000000000000"
    "00083fd333333333333300ffffffffffffffffffffffff000000000000000000060000000000000001000000000000000000"
    "00000000000000000000010000006d696e655f30710000000000070000000000000001000000010000000000000000000000"
    "00000000000000004d6561737572657100000000630000000000ffffffffffffffffffffffff0000000000000000"
)
FUZZ_SLOW = bytes.fromhex(
    "5149534b49541202060200000000000000017071000000000000001c000a6600080080000200000002000000000000000200"
    "000002000000000000000400000000636972637569742d343200000000000000007b7d710100000002000101017100000000"
    "6301000000020001010163000000000000000000000000000000000000000600000001000000010000000000000000000000"
    "00000000000000000000000052594761746571000000007000000000000000170005866d2df154834accb4485d3a1996e4e4"
    "74686574610007000000000000000100000001000000000000000000000000000000000000004d656173757a657100000000"
    "63000000000008000000010000000100000001010005000000000000000100000000000000004966456c73654f7000000000"
    "00710000000163000000007100000000000000a3000066000800000001000000010000000000000002000000020000000000"
    "0000010000000000000000000000007b7d7101000000020001000071ffffffff000000006301000000020001000063000000"
    "00ffffffff000000000000000000000000000000050000000000000001000000000000000000000000000000000000000000"
    "00005847617465710000000000ffffffffffffffffffffffff00000000000000000007000000000000000100000001000000"
    "000000000000000000000000000000004d6561737572657100000001630000000100ffffffffffffffffffffffff00000000"
    "00000000"
)


def test_payloads_found_by_fuzzing(cluster: LocalCluster, jobs) -> None:
    import qiskit

    expected = [(FUZZ_OOM, "it needs more memory than the 512 MiB limit"),
                (FUZZ_ABORT, "the decoder crashed (signal 6, SIGABRT)"),
                (FUZZ_SLOW, "it took longer than the 2 s limit")]
    for payload, text in expected:
        details = refused(jobs, qpy_job(payload), "circuit 0")
        if qiskit.__version__.startswith("2.6."):  # what they do depends on Qiskit's reader
            assert f"circuit 0 could not be decoded safely: {text}" == details, details
    still_serving(cluster)


def test_a_crashed_decoder_is_replaced() -> None:
    """A sandbox process that dies mid-payload (here: SIGKILL from outside) costs that request an
    error naming the circuit; the next request gets a fresh process."""
    limits = Limits(decode_workers=1, decode_timeout_s=60)
    pool = sandbox.SandboxPool.for_limits(limits).start()
    try:
        text = slow_qasm()
        good = sandbox.Source("qpy", GOOD)
        pool.decode([good], limits)  # warmed up
        [pid] = pool.pids()
        warm = _cpu_seconds(pid)
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                pool.decode([good, sandbox.Source("qasm", text)], limits)
            except BaseException as exc:  # noqa: BLE001
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        wait_until(lambda: _cpu_seconds(pid) > warm + 0.3, 30, "the decoder to work on the payload")
        os.kill(pid, signal.SIGKILL)
        thread.join(30)
        assert outcome and isinstance(outcome[0], InvalidArgumentError)
        assert "circuit 1 could not be decoded safely: the decoder crashed (signal 9, SIGKILL)" in str(outcome[0])
        assert [d.info.num_qubits for d in pool.decode([good], limits)] == [2]
        assert pool.pids() != [pid]
    finally:
        pool.close()


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------- OpenQASM

def test_includes_are_refused_without_reading_files(cluster: LocalCluster, jobs) -> None:
    for version, std in ((2, "qelib1.inc"), (3, "stdgates.inc")):
        for path in ("/etc/passwd", "../../../../etc/passwd", f"{MARKER}.inc", f"{std}/../../etc/passwd",
                     f"./{std}", "/proc/self/environ", "qelib1.inc" if version == 3 else "stdgates.inc"):
            text = f'OPENQASM {version}.0;\ninclude "{path}";\nqreg q[1];\n'
            refused(jobs, qasm_job(text), f"OpenQASM {version} error at line 2", "standard library",
                    absent=(MARKER, "passwd", "root:", "environ"))
        # an include inside a comment is no include
        text = f'OPENQASM {version}.0;\n// include "/etc/passwd";\ninclude "{std}";\n' + (
            "qreg q[1];\ncreg c[1];\nh q[0];\nmeasure q[0] -> c[0];\n" if version == 2 else
            "qubit q;\nbit c;\nh q;\nc = measure q;\n")
        code, details = submit(jobs, qasm_job(text), hostile=False)
        assert code == OK, details
    still_serving(cluster)


def test_huge_registers_are_refused_before_parsing(cluster: LocalCluster, jobs) -> None:
    cases = [
        ("OPENQASM 2.0;\nqreg q[100000000];\n", "more than 16 qubits"),
        ("OPENQASM 2.0;\nqreg q[1];\ncreg c[100000000];\n", "more than 24 classical bits"),
        ("OPENQASM 2.0;\n" + "qreg q%d[1];\n" * 17 % tuple(range(17)), "more than 16 qubits"),
        ("OPENQASM 3.0;\nqubit[100000000] q;\n", "more than 16 qubits"),
        ("OPENQASM 3.0;\nqubit[" + "9" * 5000 + "] q;\n", "more than 16 qubits"),
        ("OPENQASM 3.0;\nbit[100000000] c;\n", "more than 24 classical bits"),
        ("OPENQASM 3.0;\nqreg q[100000000];\n", "more than 16 qubits"),
        ("OPENQASM 3.0;\nconst uint n = 100000000;\nqubit[n] q;\n", "integer literals"),
        ("OPENQASM 3.0;\nqubit[2**30] q;\n", "integer literals"),
        ('OPENQASM 3.0;\ninclude "stdgates.inc";\nh $100000000;\n', "physical qubit numbers must be below 16"),
    ]
    for text, words in cases:
        refused(jobs, qasm_job(text), words)
    still_serving(cluster)


def test_scans_reject_without_calling_the_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    from qiskit import qasm2, qasm3

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parser was called")

    monkeypatch.setattr(qasm2, "loads", boom)
    monkeypatch.setattr(qasm3, "loads", boom)
    for text in ("OPENQASM 2.0;\nqreg q[100000000];\n", "OPENQASM 3.0;\nqubit[100000000] q;\n",
                 qasm_gate_chain(20, 10), qasm_gate_chain(20, 10, 3), qasm3_nested_ifs(100_000),
                 'OPENQASM 2.0;\ninclude "/etc/passwd";\n'):
        with pytest.raises(InvalidArgumentError):
            parse_qasm(text)


def test_gate_bombs_and_deep_nesting(cluster: LocalCluster, jobs) -> None:
    # Twenty levels of gates, each calling the previous one ten times: 10**19 operations.
    refused(jobs, qasm_job(qasm_gate_chain(20, 10)), "expands to more than 1000 operations")
    refused(jobs, qasm_job(qasm_gate_chain(20, 10, 3)), "expands to more than 1000 operations")
    refused(jobs, qasm_job(qasm_gate_chain(20, 1, 3)), "nested deeper than 8")
    refused(jobs, qasm_job(qasm3_nested_ifs(40)), "nested deeper than 8")
    refused(jobs, qasm_job(qasm3_nested_ifs(50_000)), "nested deeper than 8")
    refused(jobs, qasm_job(qasm3_nested_ifs(3).replace("x q[0];", "for uint i in [0:100000000] { x q[0]; }")),
            "more than 1000 operations")
    deep = "(" * 5000 + "0.5" + ")" * 5000
    # The parser either rejects it or runs into the sandbox's time limit (on a loaded machine).
    details = refused(jobs, qasm_job(f'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit q;\nrx({deep}) q;\n'))
    assert "OpenQASM 3 error" in details or "could not be decoded safely" in details, details
    refused(jobs, qpy_job(gate_chain(30)), "nested deeper than 8")
    refused(jobs, qpy_job(nested_ifs(30)), "nested deeper than 8")
    still_serving(cluster)


def test_the_walk_is_memoised_against_definition_bombs() -> None:
    """The operation count of a 10**20-operation expansion, without building it."""
    gate = Gate("g0", 1, [])
    gate.definition = QuantumCircuit(1)
    gate.definition.x(0)
    for level in range(1, 21):
        outer = QuantumCircuit(1)
        for _ in range(10):
            outer.append(gate, [0])  # one gate object, one definition: shared, as QPY shares them
        gate = Gate(f"g{level}", 1, [])
        gate.definition = outer
    qc = QuantumCircuit(1)
    qc.append(gate, [0])
    with pytest.raises(InvalidArgumentError, match="more than 1000000 operations"):
        check_operations(qc)
    assert check_operations(qc, max_operations=10**21, max_nesting_depth=32) == 10**20
    # OpenQASM 2 gates are expanded lazily, one definition per instance: memoised by name.
    from qiskit import qasm2

    lazy = qasm2.loads(qasm_gate_chain(20, 10), custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
    with pytest.raises(InvalidArgumentError, match="more than 1000000 operations"):
        check_operations(lazy, unique_names=True)


def test_parser_errors_quote_nothing_from_the_source(cluster: LocalCluster, jobs) -> None:
    m = MARKER
    cases = [
        f'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\nh q[0]\ncx {m}[0], q[1];\n',
        f'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\n{m} q[0];\n',
        f'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg {m}[2];\nh {m}[5];\n',
        f'OPENQASM 2.0;\nqreg {m}[2];\nqreg {m}[3];\n',
        f'OPENQASM 2.0;\nqreg q[2];\n"{m}"\n',
        f'OPENQASM 2.0;\nqreg q[2];\nU({m}) q[0];\n',
        f'OPENQASM 2.0;\nqreg q[2];\n{m.upper()} q[0];\n',
        f'OPENQASM 2.0;\ninclude "qelib1.inc";\nopaque {m} a;\nqreg q[1];\ncreg c[1];\n{m} q[0];\nmeasure q -> c;\n',
        f"OPENQASM 2.0;\nqreg q[2];\n\x00\x01\xff{m}",
        f'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\nh q[0]\ncx {m}[0], q[1];\n',
        f'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\n{m} q[0];\n',
        f'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] {m};\nh {m}[5];\n',
        f'OPENQASM 3.0;\nqubit[2] q;\n"{m}"\n',
        f'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit q;\nbit c;\nint[32] {m} = 5;\nc = measure q;\n',
        f'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit q;\ndefcal {m} $0 {{ }}\n',
        f"OPENQASM 3.0;\n{m} {m} {{ {m} }}\n" * 3,
        f"OPENQASM 7.0;\nqubit {m};\n",
        f"{m}\n" * 100,
        "\n".join(m + "".join(random.Random(i).choice("(){}[];,@$\"'/*-+") for _ in range(40)) for i in range(20)),
    ]
    for text in cases:
        details = refused(jobs, qasm_job(text))
        assert details.startswith("circuit 0: "), details
    still_serving(cluster)


# ------------------------------------------------------------------------- garbage on the wire

def random_text(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0, 0x2FFF)))) for _ in range(n))


def random_source(rng: random.Random) -> jobs_pb2.CircuitSource:
    source = jobs_pb2.CircuitSource(name=random_text(rng, rng.randrange(0, 300)),
                                    shots=rng.choice((0, -1, 1, 7, 1 << 62, -(1 << 63))))
    kind = rng.randrange(4)
    if kind == 0:
        source.qpy = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
    elif kind == 1:
        source.qpy = patched(GOOD, rng.randrange(len(GOOD)), bytes([rng.randrange(256)]))
    elif kind == 2:
        source.qasm = random_text(rng, rng.randrange(0, 600))
    if rng.random() < 0.5:
        source.parameters.names.extend(random_text(rng, rng.randrange(0, 5)) for _ in range(rng.randrange(0, 4)))
        source.parameters.num_sets = rng.choice((0, -1, 1, 3, 1 << 62, -(1 << 63)))
        source.parameters.values = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    return source


def random_request(rng: random.Random) -> jobs_pb2.SubmitRequest:
    request = jobs_pb2.SubmitRequest(
        circuits=[random_source(rng) for _ in range(rng.randrange(0, 4))],
        shots=rng.choice((0, -5, 1, 100, 1 << 62, -(1 << 63))),
        method=rng.choice(("", "statevector", random_text(rng, rng.randrange(0, 80)))),
        memory=rng.random() < 0.5,
        noise_model=rng.choice(("", "{}", "[]", "null", '{"errors": [1]}', random_text(rng, rng.randrange(0, 200)))),
        request_key=random_text(rng, rng.randrange(0, 100)),
    )
    if rng.random() < 0.5:
        request.seed = rng.choice((0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1))
    return request


def raw_call(channel: grpc.Channel, method: str, data: bytes, *, stream: bool = False) -> grpc.StatusCode:
    """Send undecodable bytes as a request; the status code (never a dead server)."""
    global tried
    tried += 1
    try:
        if stream:
            call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
            list(call(iter([data]), timeout=10))
        else:
            channel.unary_unary(method, request_serializer=None, response_deserializer=None)(data, timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return OK


def test_garbage_in_every_submit_field(cluster: LocalCluster, jobs) -> None:
    rng = random.Random(7)
    for round_ in range(3):
        for _ in range(40):
            code, details = submit(jobs, random_request(rng))
            assert code in (REFUSED, OK), (code, details)
        channel = grpc.insecure_channel(cluster.address)
        for method in ("Submit", "GetJob", "GetResult", "Cancel", "ListJobs", "ListNodes"):
            for _ in range(3):
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
                code = raw_call(channel, f"/qscale.v1.JobService/{method}", data)
                assert code != grpc.StatusCode.UNAVAILABLE
        channel.close()
        still_serving(cluster)


def random_capabilities(rng: random.Random) -> node_pb2.NodeCapabilities:
    return node_pb2.NodeCapabilities(
        name=random_text(rng, rng.randrange(0, 300)), hostname=random_text(rng, rng.randrange(0, 300)),
        cores=rng.choice((0, -1, 1, 1 << 30, -(1 << 31))), slots=rng.choice((0, -1, 1, 64, (1 << 31) - 1)),
        memory_budget_bytes=rng.choice((0, -1, 1, 1 << 62)),
        methods=[rng.choice(("statevector", "", random_text(rng, 20))) for _ in range(rng.randrange(0, 5))],
        max_statevector_qubits=rng.choice((0, -1, 30, (1 << 31) - 1)), qpy_version=rng.choice((0, -1, 13, 255)),
        qscale_version=random_text(rng, 20), qiskit_version=random_text(rng, 20), aer_version=random_text(rng, 20),
    )


def _packed(values: list[int], counts: list[int], width: int = 2) -> common_pb2.Outcomes:
    """Outcomes as a node would send them, whatever they hold."""
    return common_pb2.Outcomes(width=width, values=b"".join(v.to_bytes(width, "little") for v in values),
                               counts=b"".join(c.to_bytes(8, "little") for c in counts))


def random_node_message(rng: random.Random, tokens: list[str]) -> node_pb2.NodeMessage:
    token = rng.choice([*tokens, random_text(rng, rng.randrange(0, 80))])
    kind = rng.randrange(6)
    if kind == 0:
        counts = [common_pb2.CircuitCounts(circuit_index=rng.choice((0, -1, 1 << 30)), set_index=rng.choice((0, -1, 5)),
                                           outcomes=common_pb2.Outcomes(
                                               width=rng.choice((0, 1, 2, -1, 1 << 30)),
                                               values=rng.randbytes(rng.randrange(0, 20)),
                                               counts=rng.randbytes(rng.randrange(0, 20))))
                  for _ in range(rng.randrange(0, 3))]
        return node_pb2.NodeMessage(chunk=node_pb2.ChunkResult(
            attempt_token=token, chunk_index=rng.choice((0, -1, 1 << 30)), counts=counts,
            seconds=rng.choice((0.0, -1.0, float("nan"), float("inf")))))
    if kind == 1:
        return node_pb2.NodeMessage(done=node_pb2.ShardDone(attempt_token=token, seconds=rng.random()))
    if kind == 2:
        return node_pb2.NodeMessage(failed=node_pb2.ShardFailed(attempt_token=token, error=random_text(rng, 500),
                                                                refused=rng.random() < 0.5))
    if kind == 3:
        return node_pb2.NodeMessage(draining=node_pb2.Draining())
    if kind == 4:
        return node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(
            sequence=rng.choice((0, 1, (1 << 64) - 1)), free_slots=rng.choice((0, -1, 1 << 30)),
            attempts_in_hand=[rng.choice((token, random_text(rng, 30))) for _ in range(rng.randrange(0, 50))]))
    return node_pb2.NodeMessage(hello=node_pb2.StreamHello(node_id=random_text(rng, 40)))


def test_garbage_from_a_hostile_node(cluster: LocalCluster, stubs) -> None:
    """Random registrations, work streams of random messages (heartbeats among them), raw bytes:
    the real node goes on working. Random attempt tokens never match (they are unguessable)."""
    global tried
    _, nodes = stubs
    rng = random.Random(11)
    for _ in range(3):
        for _ in range(10):
            tried += 1
            node_id = ""
            try:
                node_id = nodes.Register(node_pb2.RegisterRequest(capabilities=random_capabilities(rng)),
                                         timeout=10).node_id
            except grpc.RpcError as err:
                assert err.code() == REFUSED, err.details()
            first = node_pb2.NodeMessage(hello=node_pb2.StreamHello(node_id=node_id)) if node_id else \
                random_node_message(rng, [])
            messages = [first, *(random_node_message(rng, []) for _ in range(rng.randrange(0, 12)))]
            tried += len(messages)
            try:
                stream = nodes.Work(iter(messages), timeout=3)
                for _ in stream:
                    pass
            except grpc.RpcError as err:
                assert err.code() in (REFUSED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION), err
        channel = grpc.insecure_channel(cluster.address)
        raw_call(channel, "/qscale.v1.NodeService/Register", bytes(rng.randrange(256) for _ in range(64)))
        raw_call(channel, "/qscale.v1.NodeService/Work", bytes(rng.randrange(256) for _ in range(64)), stream=True)
        channel.close()
        still_serving(cluster)


class HostileNode:
    """A registered node with more free slots than the real one (so the scheduler picks it
    first) that answers its assignments as the test says."""

    def __init__(self, nodes: node_pb2_grpc.NodeServiceStub, memory: int = 1 << 30) -> None:
        import queue

        import qiskit

        from qscale.circuits import METHODS

        caps = node_pb2.NodeCapabilities(
            name="hostile", hostname="hostile", cores=1, slots=4, memory_budget_bytes=memory,
            methods=list(METHODS), max_statevector_qubits=max_statevector_qubits(memory // 4), qpy_version=qpy.QPY_VERSION, qscale_version="0",
            qiskit_version=qiskit.__version__, aer_version="0")
        self.node_id = nodes.Register(node_pb2.RegisterRequest(capabilities=caps), timeout=10).node_id
        self.outgoing: queue.Queue[node_pb2.NodeMessage | None] = queue.Queue()
        self.stream = nodes.Work(self._requests(), timeout=60)

    def _requests(self) -> Iterator[node_pb2.NodeMessage]:
        yield node_pb2.NodeMessage(hello=node_pb2.StreamHello(node_id=self.node_id))
        while (message := self.outgoing.get()) is not None:
            yield message

    def assignments(self) -> Iterator[node_pb2.ShardAssignment]:
        for message in self.stream:
            if message.WhichOneof("kind") == "assign":
                yield message.assign

    def answer(self, shard: node_pb2.ShardAssignment, outcomes: common_pb2.Outcomes, chunk_index: int = 0,
               seconds: float = 0.1) -> None:
        global tried
        tried += 1
        entry = shard.chunks[0].entries[0]
        self.outgoing.put(node_pb2.NodeMessage(chunk=node_pb2.ChunkResult(
            attempt_token=shard.attempt_token, chunk_index=chunk_index, seconds=seconds,
            counts=[common_pb2.CircuitCounts(circuit_index=entry.circuit_index, set_index=entry.set_start,
                                             outcomes=outcomes)])))
        self.outgoing.put(node_pb2.NodeMessage(done=node_pb2.ShardDone(attempt_token=shard.attempt_token,
                                                                       seconds=seconds)))

    def close(self) -> None:
        self.outgoing.put(None)


def test_a_hostile_node_answering_real_work_with_garbage(cluster: LocalCluster, stubs) -> None:
    """A registered node that is sent real shards and answers with inconsistent results: the
    attempts fail (the job fails after three), the coordinator keeps serving, and a normal job
    succeeds once the node is gone."""
    from conftest import slow_circuit

    # A 16-qubit density matrix (64 GiB): only the hostile node (4 slots of 64 GiB) can hold it,
    # so every retry goes to it.
    node = HostileNode(stubs[1], memory=1 << 38)
    job = cluster.client.submit(slow_circuit(16, 1), shots=4000, seed=3, method="density_matrix")
    answered = 0
    try:
        for shard in node.assignments():
            shots = shard.chunks[0].shots
            garbage = [(_packed([0], [shots]), 1 << 30), (_packed([0], [shots]), -1),
                       (_packed([0, 1], [1 << 63, (1 << 63) + shots]), 0),  # wraps around to `shots`
                       (_packed([0], [shots + 1]), 0), (common_pb2.Outcomes(), 0),
                       (_packed([1, 0], [1, shots - 1]), 0),  # not in ascending order
                       (_packed([0], [shots], width=1), 0),  # 16 clbits take 2 bytes
                       (_packed([0, 0], [1, shots - 1]), 0)][answered % 8]
            node.answer(shard, garbage[0], garbage[1], seconds=float("nan"))
            answered += 1
            if cluster.client.job(job.job_id).status().state.final or answered >= 16:
                break
    finally:
        node.close()
    status = cluster.client.job(job.job_id).status()  # the coordinator answers about the job
    assert answered >= 3 and status.state.value == "failed", status
    assert "inconsistent results" in status.error
    still_serving(cluster)


def test_malformed_count_keys_from_a_node_do_not_poison_a_result(cluster: LocalCluster, stubs) -> None:
    node = HostileNode(stubs[1])
    job_ids = []
    try:
        for outcomes in (_packed([0xFF], [100]), _packed([1 << 20000], [100], width=3000),
                         common_pb2.Outcomes(width=1, values=b"\x00", counts=b"\x64")):
            job = cluster.client.submit(bell(), shots=100, seed=1)
            job_ids.append(job.job_id)
            node.answer(next(node.assignments()), outcomes)
    finally:
        node.close()
    for job_id in job_ids:
        wait_until(lambda: cluster.client.job(job_id).status().state.final, 30, "the job to end")
        try:
            result = cluster.client.job(job_id).result(timeout=30)
        except Exception as exc:  # the job failed, or its result cannot be read
            assert "internal error" not in str(exc), exc
        else:
            assert all(len(key) == 2 for key in result.counts[0]), result.counts[0]
    still_serving(cluster)
