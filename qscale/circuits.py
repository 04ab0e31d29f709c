"""Circuits on the wire: QPY and OpenQASM decoding with validation, what the planner needs to
know about a circuit, memory estimates per simulation method, and Qiskit-style count keys.

Shared by the client (encoding), the coordinator (validating what clients send) and the node
(decoding shards). Everything that reads untrusted bytes raises
:class:`~qscale.errors.InvalidArgumentError` with a message fit for a client, never a parser
traceback.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from qiskit import QuantumCircuit, qpy

from qscale.errors import InvalidArgumentError

__all__ = [
    "METHODS",
    "CircuitInfo",
    "describe",
    "dump_qpy",
    "load_qpy",
    "qpy_version",
    "parse_qasm",
    "estimate_memory_bytes",
    "max_statevector_qubits",
    "format_counts",
    "memory_width",
    "split_registers",
    "pack_memory",
    "unpack_memory_bits",
    "pack_parameter_values",
    "unpack_parameter_values",
]

#: Aer simulation methods a job may ask for.
METHODS = (
    "automatic",
    "statevector",
    "density_matrix",
    "stabilizer",
    "matrix_product_state",
    "extended_stabilizer",
)

#: Operations every Aer method, the stabilizer one included, simulates.
CLIFFORD_OPS = frozenset(
    {"id", "x", "y", "z", "h", "s", "sdg", "sx", "sxdg", "cx", "cy", "cz", "swap", "ecr",
     "barrier", "measure", "reset", "delay", "pauli"}
)

_QPY_MAGIC = b"QISKIT"
# QPY file header: magic(6s) qpy_version(B) qiskit major, minor, patch(BBB) number of programs(Q)
_QPY_HEADER = struct.Struct("!6sBBBBQ")
_STATE_BYTES_PER_AMPLITUDE = 16  # complex128


@dataclass(frozen=True)
class CircuitInfo:
    """What the coordinator needs to know about a circuit to plan and place it."""

    name: str
    num_qubits: int
    num_clbits: int
    creg_sizes: tuple[tuple[str, int], ...]
    num_operations: int
    clifford: bool
    """Only Clifford operations: Aer's automatic method uses the stabilizer simulator."""
    measures: bool
    final_measurements_only: bool
    """No reset, no control flow, and nothing acts on a qubit after it is measured: every shot
    samples the same final state, so splitting shots would repeat the simulation."""
    qpy_version: int = 0
    """QPY version of the payload the nodes will decode (0: unknown)."""
    parameters: tuple[str, ...] = ()
    """Names of the circuit's unbound parameters, in ``circuit.parameters`` order."""
    creg_clbits: tuple[tuple[int, ...], ...] = ()
    """For each classical register, the circuit clbit index of each of its bits."""


def dump_qpy(circuit: QuantumCircuit) -> bytes:
    """One circuit as QPY bytes."""
    buf = io.BytesIO()
    qpy.dump(circuit, buf)
    return buf.getvalue()


def qpy_version(data: bytes) -> int:
    """The QPY format version in a payload's header (0 if it has none)."""
    return data[6] if len(data) > 6 and data.startswith(_QPY_MAGIC) else 0


def load_qpy(data: bytes, *, max_bytes: int = 64 << 20) -> QuantumCircuit:
    """Decode QPY bytes holding exactly one circuit.

    Raises:
        InvalidArgumentError: the bytes are not QPY, hold no circuit or several, use a QPY
            version this Qiskit cannot read, or fail to decode.
    """
    if len(data) > max_bytes:
        raise InvalidArgumentError(f"QPY payload is {len(data)} bytes; the limit is {max_bytes}")
    if len(data) < _QPY_HEADER.size or not data.startswith(_QPY_MAGIC):
        raise InvalidArgumentError("not a QPY payload (missing QISKIT header)")
    _, version, _, _, _, programs = _QPY_HEADER.unpack_from(data)
    if version > qpy.QPY_VERSION:
        raise InvalidArgumentError(
            f"QPY version {version} is newer than this server reads ({qpy.QPY_VERSION}); "
            "upgrade qiskit on the server or dump with an older version"
        )
    if programs != 1:
        raise InvalidArgumentError(f"a QPY payload must hold exactly one circuit, this one holds {programs}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = qpy.load(io.BytesIO(data))
    except Exception as exc:  # any parser failure is the payload's fault
        raise InvalidArgumentError(f"malformed QPY payload: {type(exc).__name__}") from exc
    if len(loaded) != 1 or not isinstance(loaded[0], QuantumCircuit):
        raise InvalidArgumentError("QPY payload does not hold a quantum circuit")
    return loaded[0]


_QASM_VERSION = re.compile(r"^\s*(?://[^\n]*\n\s*|/\*.*?\*/\s*)*OPENQASM\s+(\d+)(?:\.\d+)?\s*;", re.S)


def parse_qasm(text: str, *, max_chars: int = 16 << 20) -> QuantumCircuit:
    """Parse OpenQASM 2 or 3 (by its ``OPENQASM`` header; 2 when there is none).

    OpenQASM 2 is parsed with no include path: only the standard ``qelib1.inc`` is known.

    Raises:
        InvalidArgumentError: syntax errors, unsupported statements, oversize source.
    """
    if len(text) > max_chars:
        raise InvalidArgumentError(f"OpenQASM source is {len(text)} characters; the limit is {max_chars}")
    match = _QASM_VERSION.match(text)
    major = int(match.group(1)) if match else 2
    try:
        if major == 3:
            from qiskit import qasm3

            return qasm3.loads(text)
        if major == 2:
            from qiskit import qasm2

            return qasm2.loads(
                text, include_path=(), custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS
            )
    except Exception as exc:  # the parsers raise several unrelated types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError(f"OpenQASM {major} error: {message[:300]}") from exc
    raise InvalidArgumentError(f"unsupported OpenQASM version {major}; use 2 or 3")


def _final_measurements_only(circuit: QuantumCircuit) -> bool:
    measured: set[int] = set()
    for inst in circuit.data:
        op = inst.operation
        if op.name == "reset" or getattr(op, "blocks", None) or getattr(op, "condition", None):
            return False
        qubits = {circuit.find_bit(q).index for q in inst.qubits}
        if op.name == "measure":
            measured |= qubits
        elif op.name != "barrier" and qubits & measured:
            return False
    return True


def describe(circuit: QuantumCircuit, name: str = "") -> CircuitInfo:
    """Summarise a circuit for planning and placement."""
    names = {inst.operation.name for inst in circuit.data}
    return CircuitInfo(
        name=name or circuit.name,
        num_qubits=circuit.num_qubits,
        num_clbits=circuit.num_clbits,
        creg_sizes=tuple((reg.name, reg.size) for reg in circuit.cregs),
        num_operations=len(circuit.data),
        clifford=names <= CLIFFORD_OPS,
        measures="measure" in names or any(
            getattr(inst.operation, "blocks", None) for inst in circuit.data
        ),
        final_measurements_only=_final_measurements_only(circuit),
        parameters=tuple(p.name for p in circuit.parameters),
        creg_clbits=tuple(tuple(circuit.find_bit(b).index for b in reg) for reg in circuit.cregs),
    )


def resolved_method(method: str, info: CircuitInfo) -> str:
    """The method Aer will use: ``automatic`` picks the stabilizer simulator for Clifford circuits."""
    if method in ("", "automatic"):
        return "stabilizer" if info.clifford else "statevector"
    return method


def estimate_memory_bytes(info: CircuitInfo, method: str) -> int:
    """Memory one simulation of the circuit needs with ``method`` (the state, not the process)."""
    n = info.num_qubits
    method = resolved_method(method, info)
    if method == "statevector":
        return _STATE_BYTES_PER_AMPLITUDE << n
    if method == "density_matrix":
        return _STATE_BYTES_PER_AMPLITUDE << (2 * n)
    if method in ("stabilizer", "extended_stabilizer"):
        return (1 << 20) + math.ceil(n * n / 2)
    # matrix_product_state: the bond dimension decides; charge a fixed working set.
    return 256 << 20


def max_statevector_qubits(memory_bytes: int) -> int:
    """The widest statevector that fits in ``memory_bytes``."""
    if memory_bytes < _STATE_BYTES_PER_AMPLITUDE:
        return 0
    return int(math.floor(math.log2(memory_bytes / _STATE_BYTES_PER_AMPLITUDE)))


def memory_width(num_clbits: int) -> int:
    """Bytes per shot of packed per-shot memory."""
    return max(1, -(-num_clbits // 8))


def pack_memory(hex_outcomes: Iterable[str], width: int) -> bytes:
    """Aer's per-shot hexadecimal outcomes as ``width`` little-endian bytes each."""
    return b"".join(int(h, 16).to_bytes(width, "little") for h in hex_outcomes)


def unpack_memory_bits(memory: bytes, width: int, num_clbits: int) -> np.ndarray:
    """Packed per-shot memory as a bool array of shape (shots, num_clbits), column j = clbit j."""
    raw = np.frombuffer(memory, dtype=np.uint8)
    if width <= 0 or raw.size % width:
        raise InvalidArgumentError(f"per-shot memory of {raw.size} bytes is not a multiple of {width}")
    bits = np.unpackbits(raw.reshape(-1, width), axis=1, bitorder="little")
    return bits[:, :num_clbits].astype(bool)


def pack_parameter_values(names: Sequence[str], values: np.ndarray) -> tuple[list[str], int, bytes]:
    """(names, num_sets, float64 little-endian row-major bytes) for a (num_sets, len(names)) array."""
    array = np.asarray(values, dtype="<f8")
    if array.ndim != 2 or array.shape[1] != len(names):
        raise InvalidArgumentError(f"parameter values must have shape (sets, {len(names)}), got {array.shape}")
    return list(names), int(array.shape[0]), array.tobytes()


def unpack_parameter_values(names: Sequence[str], num_sets: int, data: bytes) -> np.ndarray:
    """The (num_sets, len(names)) float64 array of packed parameter values, checked."""
    expected = num_sets * len(names) * 8
    if num_sets < 0 or len(data) != expected:
        raise InvalidArgumentError(
            f"parameter values hold {len(data)} bytes; {num_sets} sets of {len(names)} float64 need {expected}")
    array = np.frombuffer(data, dtype="<f8").reshape(num_sets, len(names))
    if not np.all(np.isfinite(array)):
        raise InvalidArgumentError("parameter values must be finite numbers")
    return array


def split_registers(bits: str, creg_sizes: Sequence[tuple[str, int]]) -> str:
    """Insert Qiskit's register separators into a bitstring (last register first)."""
    parts = []
    end = len(bits)
    for _, size in creg_sizes:
        parts.append(bits[end - size : end])
        end -= size
    return " ".join(reversed(parts))


def format_counts(
    hex_counts: Mapping[str, int], num_clbits: int, creg_sizes: Sequence[tuple[str, int]]
) -> dict[str, int]:
    """Aer's hexadecimal counts as Qiskit bitstrings: clbit 0 rightmost, registers separated
    by spaces, last register first (what ``Result.get_counts()`` returns)."""
    split = len(creg_sizes) > 1 and sum(size for _, size in creg_sizes) == num_clbits
    out: dict[str, int] = {}
    for key, value in hex_counts.items():
        bits = format(int(key, 16), "b").zfill(num_clbits) if num_clbits else ""
        if split:
            bits = split_registers(bits, creg_sizes)
        out[bits] = out.get(bits, 0) + int(value)
    return out


def merge_counts(target: dict[str, int], counts: Iterable[tuple[str, int]]) -> None:
    """Add ``counts`` into ``target`` in place."""
    for key, value in counts:
        target[key] = target.get(key, 0) + int(value)
