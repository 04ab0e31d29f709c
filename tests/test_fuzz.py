"""Property-based fuzzing of the decoding paths: every input either decodes or is refused with
InvalidArgumentError, never anything else (no other exception, no crash, no hang).

Mutated QPY bodies only go through the sandbox: in a plain process a few hundred mutated bytes can
make Qiskit's reader ask for gigabytes, run for seconds, or abort the process when memory is capped
(this file's sandbox property found all three). Example counts are bounded and derandomised, so
the file is quick and reproducible. ``pytest -s`` prints how many inputs ran.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qiskit import QuantumCircuit, qpy
from qiskit.circuit import Parameter

from qscale.circuits import METHODS, check_operations, dump_qpy, load_qpy, parse_qasm
from qscale.coordinator import sandbox
from qscale.coordinator.config import Limits
from qscale.coordinator.intake import prepare_job
from qscale.errors import InvalidArgumentError
from qscale.proto.v1 import common_pb2, jobs_pb2

LIMITS = Limits(max_qubits=32, max_clbits=64, max_operations=5000, max_nesting_depth=8, max_circuits=8,
                max_experiments=64, max_shots=1 << 20, decode_workers=1, decode_timeout_s=1.0,
                decode_memory_bytes=512 << 20)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
MARKER = "zq_fuzz_marker"
examples = 0


@pytest.fixture(scope="module")
def pool() -> Iterator[sandbox.SandboxPool]:
    p = sandbox.SandboxPool.for_limits(LIMITS).start()
    yield p
    p.close()
    print(f"\ntest_fuzz: {examples} fuzzed inputs")


def _seeds() -> list[bytes]:
    theta = Parameter("theta")
    a = QuantumCircuit(2, 2, name="bell")
    a.h(0)
    a.cx(0, 1)
    a.measure([0, 1], [0, 1])
    b = QuantumCircuit(2, 2)
    b.ry(theta, 0)
    b.measure(0, 0)
    with b.if_test((b.clbits[0], 1)):
        b.x(1)
    b.measure(1, 1)
    inner = QuantumCircuit(1, name="mine")
    inner.sx(0)
    inner.rz(0.3, 0)
    c = QuantumCircuit(1, 1)
    c.append(inner.to_gate(), [0])
    c.measure(0, 0)
    out = [dump_qpy(x) for x in (a, b, c)]
    buf = io.BytesIO()
    qpy.dump(a, buf, version=13)
    return [*out, buf.getvalue()]


SEEDS = _seeds()


@st.composite
def mutated_qpy(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "flip", "set", "set", "insert", "delete", "truncate")))
        start = draw(st.sampled_from((0, 19, 19, 19)))  # mostly past the file header
        pos = draw(st.integers(min(start, len(data) - 1), max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from((0, 1, 0x7F, 0x80, 0xFF)))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


qpy_payloads = st.one_of(
    mutated_qpy(),
    mutated_qpy(),
    mutated_qpy(),
    st.binary(max_size=300),
    st.builds(lambda v, rest: b"QISKIT" + bytes([v]) + rest, st.integers(0, 255), st.binary(max_size=200)),
)

_TOKENS = ("OPENQASM 2.0;", "OPENQASM 3.0;", 'include "qelib1.inc";', 'include "stdgates.inc";',
           'include "/etc/passwd";', "qreg q[2];", "creg c[2];", "qubit[2] q;", "bit[2] c;", "qreg q[99999999];",
           "h q[0];", "cx q[0], q[1];", "x q;", "measure q -> c;", "c = measure q;", "c[0] = measure q[0];",
           "rx(pi/2) q[1];", "gate g a { h a; x a; }", "gate g2 a { g a; g a; }", "g2 q[0];", "g q[1];",
           "opaque o a;", "o q[0];", "barrier q;", "reset q[0];", "if (c==1) x q[0];", "if (c[0]) { x q[0]; }",
           "for uint i in [0:3] { h q[0]; }", "while (c[0]) { x q[0]; c[0] = measure q[0]; }", "{", "}",
           "(", ")", ";", "[", "]", "->", "U(0,0,0) q[0];", "CX q[0], q[1];", "$0", "pow(2) @ h q[0];",
           "ctrl @ x q[0], q[1];", "inv @ s q[0];", "const uint n = 2;", "qubit[n] r;", "// comment\n",
           "/* block */", f"{MARKER} q[0];", f'"{MARKER}"', "\x00", "\u00e9", "1e400", "-", "@")

qasm_programs = st.one_of(
    st.lists(st.sampled_from(_TOKENS), max_size=14).map("\n".join),
    st.text(max_size=200),
    st.builds(lambda head, body: head + body, st.sampled_from(("OPENQASM 2.0;\n", "OPENQASM 3.0;\n")),
              st.text(alphabet=st.characters(codec="utf-8"), max_size=120)),
)


def _count() -> None:
    global examples
    examples += 1


@st.composite
def header_mutations(draw: st.DrawFn) -> bytes:
    """A valid payload whose file header (magic, version, Qiskit version, program count) is
    mutated: what load_qpy checks itself before Qiskit's reader sees anything."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        data[draw(st.integers(0, 18))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(FUZZ, max_examples=300)
@given(data=st.one_of(header_mutations(), st.binary(max_size=64)))
def test_load_qpy_checks_headers_itself(data: bytes) -> None:
    """In this process only header mutations: a mutated body can make Qiskit's reader allocate
    gigabytes or abort (found by this file's sandbox property); that is the sandbox's job."""
    _count()
    try:
        circuit = load_qpy(data)
    except InvalidArgumentError:
        return
    check_operations_or_refuse(circuit)


@settings(FUZZ, max_examples=400)
@given(data=qpy_payloads)
def test_load_qpy_in_the_sandbox_decodes_or_refuses(data: bytes, pool: sandbox.SandboxPool) -> None:
    _count()
    try:
        [decoded] = pool.decode([sandbox.Source("qpy", data)], LIMITS)
    except InvalidArgumentError as exc:
        assert str(exc).startswith("circuit 0"), str(exc)
        return
    assert decoded.qpy is None and decoded.info.num_qubits <= LIMITS.max_qubits


def check_operations_or_refuse(circuit: QuantumCircuit, unique_names: bool = False) -> None:
    try:
        check_operations(circuit, max_operations=LIMITS.max_operations, max_nesting_depth=LIMITS.max_nesting_depth,
                         unique_names=unique_names)
    except InvalidArgumentError:
        pass


@settings(FUZZ, max_examples=600)
@given(text=qasm_programs)
def test_parse_qasm_parses_or_refuses(text: str) -> None:
    _count()
    try:
        circuit = parse_qasm(text, max_qubits=LIMITS.max_qubits, max_clbits=LIMITS.max_clbits,
                             max_operations=LIMITS.max_operations, max_nesting_depth=LIMITS.max_nesting_depth)
    except InvalidArgumentError as exc:
        assert MARKER not in str(exc) and "passwd" not in str(exc), str(exc)
        return
    check_operations_or_refuse(circuit, unique_names=True)


sources = st.one_of(
    st.builds(lambda d: jobs_pb2.CircuitSource(qpy=d), qpy_payloads),
    st.builds(lambda t: jobs_pb2.CircuitSource(qasm=t), qasm_programs),
    st.builds(lambda d: jobs_pb2.CircuitSource(qpy=d), st.sampled_from(SEEDS)),
    st.builds(lambda d: jobs_pb2.CircuitSource(qpy=d), st.sampled_from(SEEDS)),
    st.just(jobs_pb2.CircuitSource()),
)


@st.composite
def submit_requests(draw: st.DrawFn) -> jobs_pb2.SubmitRequest:
    circuits = draw(st.lists(sources, min_size=draw(st.sampled_from((0, 1, 1, 1))), max_size=5))
    for source in circuits:
        source.name = draw(st.text(max_size=30))
        source.shots = draw(st.sampled_from((0, 0, 0, 0, 1, 100, -1, 1 << 40, -(1 << 63))))
        if draw(st.booleans()):
            names = draw(st.lists(st.sampled_from(("theta", "phi", "", "zq_param")), max_size=3))
            sets = draw(st.integers(-2, 5))
            source.parameters.CopyFrom(common_pb2.ParameterValues(
                names=names, num_sets=sets,
                values=draw(st.one_of(st.binary(max_size=64),
                                      st.just(np.zeros(max(0, sets) * len(names), "<f8").tobytes())))))
    request = jobs_pb2.SubmitRequest(
        circuits=circuits,
        shots=draw(st.sampled_from((1, 100, 100, 100, 0, -5, 1 << 62))),
        method=draw(st.one_of(st.sampled_from(("", "", "", *METHODS)), st.text(max_size=20))),
        memory=draw(st.booleans()),
        noise_model=draw(st.one_of(st.sampled_from(("", "", "", "", "{}", '{"errors": []}', '{"errors": [1]}')),
                                   st.text(max_size=40))),
        request_key=draw(st.text(max_size=10)),
    )
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, (1 << 64) - 1))
    return request


@settings(FUZZ, max_examples=400)
@given(request=submit_requests())
def test_prepare_job_accepts_or_refuses(request: jobs_pb2.SubmitRequest, pool: sandbox.SandboxPool) -> None:
    _count()
    try:
        job = prepare_job(request, LIMITS, pool)
    except InvalidArgumentError as exc:
        assert "Traceback" not in str(exc) and MARKER not in str(exc), str(exc)
        return
    assert len(job.infos) == len(job.qpy) == len(request.circuits) > 0
    assert all(load_qpy(data).num_qubits == info.num_qubits for data, info in zip(job.qpy, job.infos))


@settings(FUZZ, max_examples=200)
@given(batch=st.lists(st.one_of(st.builds(lambda d: sandbox.Source("qpy", d), qpy_payloads),
                                st.builds(lambda t: sandbox.Source("qasm", t), qasm_programs)), min_size=1,
                      max_size=12),
       noise=st.sampled_from(("", '{"errors": []}', "[]", "{")))
def test_sandbox_decodes_or_refuses(batch: list[sandbox.Source], noise: str, pool: sandbox.SandboxPool) -> None:
    _count()
    try:
        decoded = pool.decode(batch, LIMITS, noise_model=noise)
    except InvalidArgumentError as exc:
        text = str(exc)
        assert text.startswith(("circuit ", "invalid noise model", "the noise model")), text
        assert MARKER not in text and "passwd" not in text, text
        return
    assert len(decoded) == len(batch)
    for source, result in zip(batch, decoded):
        assert (result.qpy is None) == (source.kind == "qpy")
        if result.qpy is not None:
            assert load_qpy(result.qpy).num_qubits == result.info.num_qubits


def test_replies_from_the_sandbox_are_checked() -> None:
    """The coordinator parses what a sandbox process sends (JSON and bytes, never a pickle) and
    refuses anything malformed."""
    from qscale.circuits import describe

    info = describe(QuantumCircuit(1, 1))
    good = sandbox._encode_reply([[1, sandbox._info_to_json(info), 3]], [b"abc"], False)
    [(ok, parsed, blob)], restart = sandbox._decode_reply(good, 1)
    assert ok and parsed == info and blob == b"abc" and not restart
    fields = sandbox._info_to_json(info)
    for bad in (
        good + b"x",
        good[:-1],
        sandbox._encode_reply([[1, fields, 3]] * 2, [b"abc"] * 2, False),  # more results than items
        sandbox._encode_reply([[1, fields[:-1], 3]], [b"abc"], False),
        sandbox._encode_reply([[1, [*fields[:1], -1, *fields[2:]], 3]], [b"abc"], False),
        sandbox._encode_reply([[1, [*fields[:1], "2", *fields[2:]], 3]], [b"abc"], False),
        sandbox._encode_reply([[1, fields, -3]], [b"abc"], False),
        sandbox._encode_reply([[0, "pickle", "x"]], [], False),
        b"\x00\x00\x00\x05{}{}{",
        b"\x80\x04\x95",
    ):
        with pytest.raises((ValueError, KeyError, TypeError, AttributeError)):
            sandbox._decode_reply(bad, 1)
    [(ok, (kind, message), _)], _ = sandbox._decode_reply(
        sandbox._encode_reply([[0, "error", "\x1b[31m" + "x" * 1000]], [], False), 1)
    assert not ok and kind == "error" and len(message) <= 300 and "\x1b" not in message
    json.dumps(fields)
