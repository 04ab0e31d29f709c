"""The qscale node daemon (``qscale-node``): joins a coordinator, runs shards in simulation
worker processes, streams their counts back.

Importing this package is cheap: :class:`NodeConfig` and :class:`NodeDaemon` load on first use,
and nothing here imports qiskit (only the worker processes do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qscale.node.config import NodeConfig
    from qscale.node.daemon import NodeDaemon

__all__ = ["NodeConfig", "NodeDaemon"]


def __getattr__(name: str) -> Any:
    if name == "NodeConfig":
        from qscale.node.config import NodeConfig

        return NodeConfig
    if name == "NodeDaemon":
        from qscale.node.daemon import NodeDaemon

        return NodeDaemon
    raise AttributeError(f"module 'qscale.node' has no attribute {name!r}")
