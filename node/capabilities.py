"""What a node tells the coordinator when it registers, and what its widest statevector means
for a shard (:func:`statevector_width`, shared by the coordinator's placement and the node's
own check, so that the two always agree).

The daemon's parent process never imports qiskit: what depends on the installed qiskit and
qiskit-aer (methods, QPY version, versions, widest statevector) comes from a warmed-up worker's
:class:`~qscale.node.worker.WorkerInfo`, so it describes what the workers really run. For the
same reason this module stays light: the coordinator imports :func:`statevector_width` from it,
and the node reads a circuit's width from its QPY header (:func:`qpy_num_qubits`) without qiskit.
"""

from __future__ import annotations

import socket
import struct
from importlib import metadata

from qscale._version import __version__
from qscale.node.config import NodeConfig
from qscale.node.worker import WorkerInfo
from qscale.proto.v1 import node_pb2

__all__ = ["build_capabilities", "installed_version", "statevector_width", "qpy_num_qubits", "QPY_HEADER_VERSIONS"]

# Methods whose state grows as 2**(factor * n) for n qubits: the statevector width they need.
_STATEVECTOR_FACTOR = {
    "": 1,  # no method named: Aer's automatic choice
    "automatic": 1,  # the planner resolves automatic; what is left of it is treated as a statevector
    "statevector": 1,
    "unitary": 2,  # a 2**n x 2**n matrix
    "density_matrix": 2,  # a 2**n x 2**n matrix
    "superop": 4,  # a 4**n x 4**n matrix
}
# Methods whose memory does not grow as 2**n: the widest statevector does not bound them.
_UNBOUNDED = frozenset({"stabilizer", "extended_stabilizer", "matrix_product_state"})


def statevector_width(method: str, num_qubits: int) -> int | None:
    """The statevector width (qubits) a simulation of ``num_qubits`` qubits with the Aer
    ``method`` needs, to compare with a node's ``max_statevector_qubits`` (``--max-qubits``);
    None when that bound does not apply to the method.

    Statevector and automatic (the planner has resolved it: a Clifford circuit's shard names
    the stabilizer method) count ``n``; density_matrix and unitary ``2n`` (a ``2**n x 2**n``
    matrix), superop ``4n``. The stabilizer, extended_stabilizer and matrix_product_state
    methods are not bounded by it (None): they are how a cluster reaches wider circuits. A
    method not named here counts as a statevector (``n``).
    """
    if method in _UNBOUNDED:
        return None
    return _STATEVECTOR_FACTOR.get(method, 1) * max(0, num_qubits)


# QPY file header from version 10 on: magic, version, qiskit major/minor/patch, programs, symbolic
# encoding; then a type key (b"q": circuit); from version 16 a table of program offsets; then the
# circuit header (version 12 on): name size, global phase type and size, qubits, ...
_QPY_FILE_HEADER = struct.Struct("!6sBBBBQc")
_QPY_OFFSET = struct.Struct("!Q")
_QPY_CIRCUIT_HEADER = struct.Struct("!H1cHIIQIQI")
#: QPY versions whose headers :func:`qpy_num_qubits` reads (13, the oldest accepted, to 18).
QPY_HEADER_VERSIONS = range(13, 19)


def qpy_num_qubits(data: bytes) -> int | None:
    """Qubits of the first circuit of a QPY payload, read from its headers without qiskit;
    None when the payload is not a QPY circuit of a version whose layout this reader knows
    (:data:`QPY_HEADER_VERSIONS`) or is cut short."""
    if len(data) < _QPY_FILE_HEADER.size + 1:
        return None
    magic, version, _major, _minor, _patch, programs, _encoding = _QPY_FILE_HEADER.unpack_from(data)
    if magic != b"QISKIT" or version not in QPY_HEADER_VERSIONS or programs < 1:
        return None
    pos = _QPY_FILE_HEADER.size
    if data[pos:pos + 1] != b"q":
        return None
    pos += 1
    if version >= 16:
        if len(data) < pos + _QPY_OFFSET.size:
            return None
        (pos,) = _QPY_OFFSET.unpack_from(data, pos)
    if pos < 0 or len(data) < pos + _QPY_CIRCUIT_HEADER.size:
        return None
    return int(_QPY_CIRCUIT_HEADER.unpack_from(data, pos)[3])


def installed_version(distribution: str) -> str:
    """Version of an installed distribution, ``""`` when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return ""


def build_capabilities(config: NodeConfig, worker: WorkerInfo) -> node_pb2.NodeCapabilities:
    """The node's :class:`NodeCapabilities` from its configuration and a warmed-up worker.

    ``max_statevector_qubits`` is the widest statevector one slot's memory holds, capped by
    ``config.max_qubits`` (``--max-qubits``) when that is set.
    """
    widest = worker.max_statevector_qubits
    if config.max_qubits > 0:
        widest = min(widest, config.max_qubits) if widest > 0 else config.max_qubits
    return node_pb2.NodeCapabilities(
        name=config.name,
        hostname=socket.gethostname(),
        cores=config.cores,
        slots=config.slots,
        memory_budget_bytes=config.memory_budget,
        methods=list(worker.methods),
        max_statevector_qubits=widest,
        qpy_version=worker.qpy_version,
        qscale_version=__version__,
        qiskit_version=worker.qiskit_version or installed_version("qiskit"),
        aer_version=worker.aer_version or installed_version("qiskit-aer"),
    )
