"""What a node tells the coordinator when it registers.

The daemon's parent process never imports qiskit: what depends on the installed qiskit and
qiskit-aer (methods, QPY version, versions, widest statevector) comes from a warmed-up worker's
:class:`~qscale.node.worker.WorkerInfo`, so it describes what the workers really run.
"""

from __future__ import annotations

import socket
from importlib import metadata

from qscale._version import __version__
from qscale.node.config import NodeConfig
from qscale.node.worker import WorkerInfo
from qscale.proto.v1 import node_pb2

__all__ = ["build_capabilities", "installed_version"]


def installed_version(distribution: str) -> str:
    """Version of an installed distribution, ``""`` when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return ""


def build_capabilities(config: NodeConfig, worker: WorkerInfo) -> node_pb2.NodeCapabilities:
    """The node's :class:`NodeCapabilities` from its configuration and a warmed-up worker."""
    return node_pb2.NodeCapabilities(
        name=config.name,
        hostname=socket.gethostname(),
        cores=config.cores,
        slots=config.slots,
        memory_budget_bytes=config.memory_budget,
        methods=list(worker.methods),
        max_statevector_qubits=worker.max_statevector_qubits,
        qpy_version=worker.qpy_version,
        qscale_version=__version__,
        qiskit_version=worker.qiskit_version or installed_version("qiskit"),
        aer_version=worker.aer_version or installed_version("qiskit-aer"),
    )
