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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from qiskit import QuantumCircuit, qpy
from qiskit.circuit import Barrier, ControlFlowOp, Instruction, Store
from qiskit.circuit.library import Initialize, UnitaryGate, get_standard_gate_name_mapping

from qscale.errors import InvalidArgumentError
from qscale.outcomes import outcome_width

__all__ = [
    "METHODS",
    "CircuitInfo",
    "describe",
    "dump_qpy",
    "load_qpy",
    "qpy_version",
    "parse_qasm",
    "scan_qasm",
    "check_operations",
    "MIN_QPY_VERSION",
    "estimate_memory_bytes",
    "max_statevector_qubits",
    "memory_width",
    "pack_memory",
    "unpack_memory_bits",
    "pack_parameter_values",
    "unpack_parameter_values",
    "check_pauli_labels",
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

#: Instructions Aer's density-matrix method simulates (qiskit-aer 0.17/0.18): a noisy circuit
#: using anything else runs as trajectories on the statevector method.
DENSITY_MATRIX_OPS = frozenset(
    {"barrier", "measure", "reset", "delay", "id", "x", "y", "z", "h", "s", "sdg", "sx", "sxdg", "t", "tdg",
     "p", "u", "u1", "u2", "u3", "r", "rx", "ry", "rz", "rxx", "ryy", "rzz", "rzx", "cx", "cy", "cz", "cp",
     "cu1", "swap", "ecr", "ccx", "pauli", "diagonal", "unitary", "kraus", "superop", "if_else",
     "for_loop", "while_loop", "switch_case", "break_loop", "continue_loop"}
)

#: Oldest QPY version accepted from clients. Older payloads are read by Qiskit's legacy Python
#: reader (symengine's native format among them); 13 and newer by its Rust reader.
MIN_QPY_VERSION = 13

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
    density_matrix_ok: bool = False
    """Every instruction is one Aer's density-matrix method simulates."""


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

    Only QPY versions :data:`MIN_QPY_VERSION` to ``qiskit.qpy.QPY_VERSION`` are read: older ones
    go through Qiskit's legacy Python reader, newer ones this Qiskit cannot read. The payload
    must hold one program. Messages never quote the payload.

    Raises:
        InvalidArgumentError: the bytes are not QPY, hold no circuit or several, use a QPY
            version outside the accepted range, or fail to decode.
        MemoryError: the decoder ran out of memory (callers decode untrusted payloads in a
            process with a memory limit; see :mod:`qscale.coordinator.sandbox`).
    """
    if len(data) > max_bytes:
        raise InvalidArgumentError(f"QPY payload is {len(data)} bytes; the limit is {max_bytes}")
    if len(data) < _QPY_HEADER.size or not data.startswith(_QPY_MAGIC):
        raise InvalidArgumentError("not a QPY payload (missing QISKIT header)")
    _, version, _, _, _, programs = _QPY_HEADER.unpack_from(data)
    if not MIN_QPY_VERSION <= version <= qpy.QPY_VERSION:
        raise InvalidArgumentError(
            f"QPY version {version} is not accepted: this server reads QPY versions {MIN_QPY_VERSION} to "
            f"{qpy.QPY_VERSION} (qiskit.qpy.dump(..., version=V) writes an older one; newer ones need a "
            "newer qiskit on the server)"
        )
    if programs != 1:
        raise InvalidArgumentError(f"a QPY payload must hold exactly one circuit, this one holds {programs}")
    stream = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = qpy.load(stream)
    except MemoryError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # any parser failure (a Rust panic included) is the payload's fault
        if "memory allocation" in str(exc):  # the Rust reader's out-of-memory error
            raise MemoryError("QPY decoder ran out of memory") from None
        reason = " (nested too deeply)" if isinstance(exc, RecursionError) else ""
        raise InvalidArgumentError(f"malformed QPY payload{reason}") from None
    if len(loaded) != 1 or not isinstance(loaded[0], QuantumCircuit):
        raise InvalidArgumentError("QPY payload does not hold a quantum circuit")
    return loaded[0]


_QASM_VERSION = re.compile(r"^\s*(?://[^\n]*\n\s*|/\*.*?\*/\s*)*OPENQASM\s+(\d+)(?:\.\d+)?\s*;", re.S)
# Strings are kept (an include's file name), comments blanked (newlines kept, for line numbers).
_QASM_LEXEMES = re.compile(r'"[^"\n]*"|//[^\n]*|/\*.*?\*/', re.S)
_QASM_INCLUDE = re.compile(r'\binclude\b\s*("[^"\n]*")?')
_QASM_STANDARD_INCLUDES = {2: '"qelib1.inc"', 3: '"stdgates.inc"'}
_QASM2_REGISTER = re.compile(r"\b(qreg|creg)\s+[A-Za-z_]\w*\s*\[([^\]]*)\]()()")
_QASM3_REGISTER = re.compile(
    r"\b(qubit|bit)\b(?:\s*\[([^\]]*)\])?|\b(qreg|creg)\s+[A-Za-z_]\w*\s*(?:\[([^\]]*)\])?")
_QASM3_PHYSICAL = re.compile(r"\$(\d+)")
_QASM_GATE = re.compile(r"\bgate\s+([A-Za-z_]\w*)[^{};]*\{([^{}]*)\}")
_QASM_MODIFIERS = re.compile(r"^\s*(?:(?:inv|ctrl|negctrl|pow)\s*(?:\([^()]*\))?\s*@\s*)*")
_QASM_CALLEE = re.compile(r"[A-Za-z_]\w*")
_DECIMAL = re.compile(r"\s*(\d+)\s*")


def parse_qasm(
    text: str,
    *,
    max_chars: int = 16 << 20,
    max_qubits: int = 1024,
    max_clbits: int = 16_384,
    max_operations: int = 1_000_000,
    max_nesting_depth: int = 32,
) -> QuantumCircuit:
    """Parse OpenQASM 2 or 3 (by its ``OPENQASM`` header; 2 when there is none).

    Nothing may be included but the standard library (``qelib1.inc``, ``stdgates.inc``), which
    the parsers know without a file system. Before parsing, :func:`scan_qasm` checks the source
    cheaply: register sizes, includes, gate definitions that expand to too many operations,
    nesting. Error messages give a position and a generic reason, never text from the source.

    Raises:
        InvalidArgumentError: syntax errors, unsupported statements, oversize source or registers.
        MemoryError: the parser ran out of memory (see :mod:`qscale.coordinator.sandbox`).
    """
    if len(text) > max_chars:
        raise InvalidArgumentError(f"OpenQASM source is {len(text)} characters; the limit is {max_chars}")
    match = _QASM_VERSION.match(text)
    major = int(match.group(1)) if match else 2
    if major not in (2, 3):
        raise InvalidArgumentError("unsupported OpenQASM version; use 2 or 3")
    scan_qasm(text, major, max_qubits=max_qubits, max_clbits=max_clbits, max_operations=max_operations,
              max_nesting_depth=max_nesting_depth)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if major == 3:
                from qiskit import qasm3

                return qasm3.loads(text)
            from qiskit import qasm2

            return qasm2.loads(text, include_path=(), custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
    except MemoryError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # the parsers raise several unrelated types (Rust panics too)
        raise InvalidArgumentError(_qasm_error(major, exc)) from None


def scan_qasm(
    text: str,
    major: int,
    *,
    max_qubits: int,
    max_clbits: int,
    max_operations: int,
    max_nesting_depth: int,
) -> None:
    """Check OpenQASM source without parsing it: includes, register sizes (which must be integer
    literals), physical qubit numbers, gate definitions that would expand to more than
    ``max_operations`` operations or nest deeper than ``max_nesting_depth``, and block nesting.

    Raises:
        InvalidArgumentError: naming a line, never quoting the source.
    """
    code = _QASM_LEXEMES.sub(lambda m: m.group() if m.group().startswith('"') else re.sub(r"[^\n]", " ", m.group()),
                             text)

    def fail(pos: int, reason: str) -> None:
        raise InvalidArgumentError(f"OpenQASM {major} error at line {code.count(chr(10), 0, pos) + 1}: {reason}")

    standard = _QASM_STANDARD_INCLUDES[major]
    for m in _QASM_INCLUDE.finditer(code):
        if m.group(1) != standard:
            fail(m.start(), f"only the standard library may be included ({standard}); other files are not read")
    qubits = clbits = 0
    pattern = _QASM2_REGISTER if major == 2 else _QASM3_REGISTER
    for m in pattern.finditer(code):
        keyword = m.group(1) or m.group(3)  # the latter: OpenQASM 3's qreg/creg
        designator = m.group(2) if m.group(1) else m.group(4)
        if designator is None:
            size = 1
        else:
            literal = _DECIMAL.fullmatch(designator)
            if literal is None:
                fail(m.start(), "register sizes must be integer literals")
            digits = literal.group(1)  # type: ignore[union-attr]
            size = int(digits) if len(digits) <= 12 else 1 << 40
        if keyword in ("qreg", "qubit"):
            qubits += size
            if qubits > max_qubits:
                fail(m.start(), f"the program declares more than {max_qubits} qubits, the limit")
        else:
            clbits += size
            if clbits > max_clbits:
                fail(m.start(), f"the program declares more than {max_clbits} classical bits, the limit")
    if major == 3:
        for m in _QASM3_PHYSICAL.finditer(code):
            if len(m.group(1)) > 12 or int(m.group(1)) >= max_qubits:
                fail(m.start(), f"physical qubit numbers must be below {max_qubits}, the qubit limit")
        if code.count("{") > max_nesting_depth:
            depth = 0
            for m in re.finditer(r"[{}]", code):
                depth += 1 if m.group() == "{" else -1
                if depth > max_nesting_depth:
                    fail(m.start(), f"blocks are nested deeper than {max_nesting_depth} levels, the limit")
    # Gate definitions: what each one expands to, memoised by name (a name is defined once).
    cost: dict[str, int] = {}
    depth_of: dict[str, int] = {}
    for m in _QASM_GATE.finditer(code):
        total, depth = 0, 0
        for statement in m.group(2).split(";"):
            callee = _QASM_CALLEE.match(statement, _QASM_MODIFIERS.match(statement).end())  # type: ignore[union-attr]
            if callee is None:
                continue
            total += cost.get(callee.group(), 1)
            depth = max(depth, depth_of.get(callee.group(), 0))
        if total > max_operations:
            fail(m.start(), f"a gate definition expands to more than {max_operations} operations, the limit")
        if depth + 1 > max_nesting_depth:
            fail(m.start(), f"gate definitions are nested deeper than {max_nesting_depth} levels, the limit")
        cost[m.group(1)], depth_of[m.group(1)] = total, depth + 1


# What a parser's message is about, as (words to look for, generic reason). The reason is ours:
# parser messages quote the source, so they are only searched, never passed on.
_QASM_REASONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("include", "import"), "only the standard library may be included"),
    (("already defined", "already declared", "redefin"), "a name is defined twice"),
    (("not defined", "undefined", "not declared", "unknown"), "use of an undefined name"),
    (("out-of-range", "out of range", "out of bounds"), "an index is out of range"),
    (("parameters", "arguments", "operands", "takes"), "wrong number of parameters or operands"),
    (("divide by zero", "division by zero"), "division by zero"),
    (("capital letters",), "an invalid identifier"),
    (("not supported", "unsupported", "not currently supported"), "an unsupported feature"),
    (("type",), "a type error"),
    (("needed", "expected", "expecting", "mismatched", "token", "extraneous", "missing", "no viable"),
     "syntax error"),
)
_QASM_POSITIONS = (
    re.compile(r"^\W*(?:<input>:)?(\d+),(\d+):"),  # qasm2, and qiskit's OpenQASM 3 importer
    re.compile(r"^\W*L(\d+):C(\d+):"),  # the openqasm3 reference parser
)


def _qasm_error(major: int, exc: BaseException) -> str:
    """``OpenQASM 3 error at line 4, column 2: syntax error``: a position and a generic reason."""
    position: tuple[int, int] | None = None
    text = ""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack and len(seen) < 16:  # the exception, its causes, and exceptions among their args
        item = stack.pop()
        if isinstance(item, str):
            text += " " + item.lower()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if type(item).__name__.endswith(("RecognitionException", "ParseCancellationException",
                                         "InputMismatchException", "NoViableAltException")):
            text += " syntax error expected"  # ANTLR's: its messages went to its error listener
        token = getattr(item, "offendingToken", None)
        line, column = getattr(token, "line", None), getattr(token, "column", None)
        message = str(item)
        text += " " + message.lower()
        if position is None and isinstance(line, int) and isinstance(column, int):
            position = (line, column)
        for pattern in _QASM_POSITIONS:
            found = pattern.match(message)
            if position is None and found:
                position = (int(found.group(1)), int(found.group(2)))
        stack.extend([item.__cause__, item.__context__, *item.args])
    if isinstance(exc, RecursionError):
        reason = "the program is nested too deeply"
    else:
        reason = next((r for words, r in _QASM_REASONS if any(w in text for w in words)), "invalid program")
    where = f" at line {position[0]}, column {position[1]}" if position else ""
    return f"OpenQASM {major} error{where}: {reason}"


# ------------------------------------------------------------------- allow-list

#: Standard gates, measure, reset, delay: the operation carrying one of these names must be of
#: that class (Aer executes instructions by name).
_STANDARD_CLASSES: dict[str, type] = {
    name: op.base_class for name, op in get_standard_gate_name_mapping().items()
}
_LEAF_CLASSES: dict[str, type] = {
    **_STANDARD_CLASSES,
    "barrier": Barrier,
    "unitary": UnitaryGate,
    "initialize": Initialize,
    "store": Store,
}
_STANDARD_BASES = frozenset(_STANDARD_CLASSES.values())
#: Control flow whose blocks are checked like the circuit around them.
CONTROL_FLOW_OPS = frozenset(
    {"if_else", "while_loop", "for_loop", "switch_case", "break_loop", "continue_loop", "box"}
)
#: Instructions Aer executes by name that a submitted circuit may not carry, whatever their
#: definition: Aer's save and set instructions (state snapshots, state overwrites) and its noise
#: channels (noise travels as a noise model, checked separately).
DENIED_OPS = frozenset({"kraus", "superop", "quantum_channel", "roerror", "qerror_loc"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def check_operations(
    circuit: QuantumCircuit,
    *,
    max_operations: int = 1_000_000,
    max_nesting_depth: int = 32,
    unique_names: bool = False,
) -> int:
    """Check every operation against the allow-list, recursively through custom gate definitions
    and control-flow blocks, and count the operations of the expansion without building it.
    Returns that count.

    Allowed: Qiskit's standard gates, ``measure``, ``reset``, ``delay``, ``barrier``, ``unitary``,
    ``initialize``, ``store``, the control-flow operations, and any other gate or instruction
    whose definition is itself allowed (library gates such as ``QFTGate`` and custom gates).
    Refused: Aer's save/set instructions and noise channels, operations that are not
    instructions (annotated operations, Clifford objects ...), gates with no definition (opaque),
    and operations that carry a standard name without being that standard operation.

    Each definition is walked once (memoised by the definition object, or by name when
    ``unique_names`` says a name means one definition, as in OpenQASM), so a definition that
    calls the previous one ten times, twenty levels deep, costs twenty walks, not 10**20.

    Raises:
        InvalidArgumentError: naming the operation when the name is one Qiskit or Aer defines;
            custom names from the payload are never quoted.
    """
    memo: dict[Any, tuple[int, int]] = {}
    keep: list[Any] = []  # definitions memoised by id must stay alive

    def too_deep() -> InvalidArgumentError:
        return InvalidArgumentError(
            f"custom gate definitions and control-flow blocks are nested deeper than {max_nesting_depth} "
            "levels, the limit")

    def walk(block: QuantumCircuit, level: int) -> tuple[int, int]:
        if level > max_nesting_depth:
            raise too_deep()
        total = height = 0
        for inst in block.data:
            if inst.is_standard_gate():  # one of Qiskit's standard gates, held natively: no spoofing
                total += 1
                if total > max_operations:
                    raise InvalidArgumentError(
                        f"the circuit has more than {max_operations} operations once custom gates and "
                        "control flow are expanded, the limit")
                continue
            count, h = cost(inst.operation, level)
            total += count
            height = max(height, h)
            if total > max_operations:
                raise InvalidArgumentError(
                    f"the circuit has more than {max_operations} operations once custom gates and "
                    "control flow are expanded, the limit")
        return total, height

    def cost(op: Any, level: int) -> tuple[int, int]:
        name = op.name if isinstance(getattr(op, "name", None), str) else ""
        shown = repr(name) if name in _LEAF_CLASSES or name in CONTROL_FLOW_OPS or name in DENIED_OPS else ""
        if isinstance(op, ControlFlowOp):
            if name not in CONTROL_FLOW_OPS:
                raise InvalidArgumentError(f"control-flow operation {type(op).__name__} is not accepted")
            total, height = 1, 0
            for block in op.blocks:
                count, h = walk(block, level + 1)
                total += count
                height = max(height, h + 1)
            if name == "for_loop":
                try:
                    iterations = len(op.params[0])
                except (OverflowError, TypeError):  # range(10**30): more than any limit
                    iterations = max_operations + 1
                total = 1 + (total - 1) * iterations  # the body once per iteration
            return total, height
        expected = _LEAF_CLASSES.get(name)
        if expected is not None:
            if getattr(op, "base_class", None) is not expected:
                raise InvalidArgumentError(f"an operation named {shown} is not Qiskit's {shown} operation")
            return 1, 0
        if getattr(op, "base_class", None) in _STANDARD_BASES:
            return 1, 0  # a standard gate under another name: e.g. 'cx_o0', open-controlled
        if name in DENIED_OPS or name.startswith(("save_", "set_")):
            kind = repr(name) if _NAME.fullmatch(name) else "a simulator instruction"
            raise InvalidArgumentError(f"operation {kind} is not accepted in submitted circuits")
        if not isinstance(op, Instruction):
            raise InvalidArgumentError(f"operations of type {type(op).__name__} are not accepted")
        key: Any = (name, op.num_qubits, op.num_clbits) if unique_names else None
        if key not in memo:
            try:
                definition = op.definition
            except MemoryError:
                raise
            except Exception:
                raise InvalidArgumentError("a custom operation could not be expanded") from None
            if definition is None:
                raise InvalidArgumentError(
                    "a custom operation has no definition (opaque gates are not accepted)")
            if key is None:
                key = id(definition)
        if key in memo:
            count, height = memo[key]
            if level + height > max_nesting_depth:
                raise too_deep()
            return count, height
        keep.append(definition)
        count, h = walk(definition, level + 1)
        memo[key] = (count, h + 1)
        return count, h + 1

    return walk(circuit, 0)[0]


def _final_measurements_only(circuit: QuantumCircuit) -> bool:
    # inst.name and inst.is_control_flow() read the native circuit without building a Python
    # object per gate (20x cheaper on transpiled circuits).
    measured: set[Any] = set()
    for inst in circuit.data:
        name = inst.name
        if name == "reset" or inst.is_control_flow():
            return False
        if name == "measure":
            measured.update(inst.qubits)
        elif name != "barrier" and measured and not measured.isdisjoint(inst.qubits):
            return False
    return True


def describe(circuit: QuantumCircuit, name: str = "") -> CircuitInfo:
    """Summarise a circuit for planning and placement."""
    names = {inst.name for inst in circuit.data}
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
        density_matrix_ok=names <= DENSITY_MATRIX_OPS,
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


memory_width = outcome_width
"""Bytes per shot of packed per-shot memory (the width of an outcome)."""


def pack_memory(hex_outcomes: Sequence[str], width: int) -> bytes:
    """Aer's per-shot hexadecimal outcomes as ``width`` little-endian bytes each."""
    if width <= 8:
        values = np.fromiter((int(h, 16) for h in hex_outcomes), dtype="<u8", count=len(hex_outcomes))
        return values.view(np.uint8).reshape(-1, 8)[:, :width].tobytes()
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


def check_pauli_labels(labels: Iterable[str], num_qubits: int) -> tuple[str, ...]:
    """Pauli labels as estimator work takes them: one letter of ``IXYZ`` per qubit, qubit 0
    rightmost (Qiskit's order), no phase.

    Raises:
        InvalidArgumentError: a label of another length or with another character (the message
            quotes at most 40 characters of it).
    """
    out = tuple(labels)
    for i, label in enumerate(out):
        if not isinstance(label, str) or len(label) != num_qubits or label.strip("IXYZ"):
            shown = repr(label[:40] + ("..." if len(label) > 40 else "")) if isinstance(label, str) else \
                type(label).__name__
            raise InvalidArgumentError(f"observable {i} ({shown}) is not a Pauli label of {num_qubits} letters "
                                       "from IXYZ, qubit 0 rightmost")
    return out
