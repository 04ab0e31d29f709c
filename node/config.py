"""Node configuration: :class:`NodeConfig`, whose every setting comes from its default, then
its ``QSCALE_*`` variable, then its ``qscale-node`` flag (see :mod:`qscale.settings`).

This module is imported by the daemon's parent process: it must stay light (no qiskit).
"""

from __future__ import annotations

import os
import socket
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from qscale.errors import InvalidArgumentError
from qscale.settings import Connection, LogLevel, Size, setting

__all__ = ["NodeConfig", "format_bytes", "default_memory_budget", "default_cores"]


def format_bytes(n: int) -> str:
    """``n`` bytes in a short human form (``"1.5 GiB"``), for messages and logs."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _cgroup_memory_limit() -> int | None:
    """The cgroup (container) memory limit, when there is one."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as fh:
                raw = fh.read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            return int(raw)
    return None


def default_memory_budget() -> int:
    """Half the memory of the machine (or of the container, when it is limited)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = 8 << 30
    limit = _cgroup_memory_limit()
    if limit is not None:
        physical = min(physical, limit)
    return max(physical // 2, 1 << 20)


def default_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class NodeConfig(Connection):
    """Everything ``qscale-node`` can be told (see :meth:`~qscale.settings.Settings.from_env`).
    Variables: ``QSCALE_NODE_`` + the name in capitals (``QSCALE_NODE_SLOTS``), but those shared
    with the other programs: ``QSCALE_COORDINATOR`` and ``QSCALE_TLS_*`` (:class:`Connection`),
    ``QSCALE_LOG_LEVEL`` and ``QSCALE_LOG_FORMAT``."""

    env_prefix: ClassVar[str] = "QSCALE_NODE_"
    what: ClassVar[str] = "node"

    name: str = setting(factory=socket.gethostname, shown="the hostname", metavar="NAME")
    """Node name shown by the coordinator; not necessarily unique."""
    slots: int = setting(1, ge=1)
    """Shards run at once, one worker process each."""
    cores: int = setting(factory=default_cores, shown="all this process may use", ge=1)
    """CPU cores to use, shared evenly by the slots."""
    memory_budget: Size = setting(factory=default_memory_budget, ge=1 << 20,
                                  shown="half the machine's or container's memory")
    """Memory for simulations, all slots together, e.g. 512M or 4G: each slot gets an equal part
    and Aer's memory cap is set from it."""
    max_qubits: int = setting(0, ge=0)
    """Widest statevector this node simulates; shards that need a wider one are not sent to it
    (statevector and automatic count their qubits, density_matrix twice its qubits, unitary twice,
    superop four times; stabilizer, extended_stabilizer and matrix_product_state are not capped).
    0: only the memory of a slot caps it."""
    drain_grace_s: float = setting(30.0, ge=0)
    """On SIGTERM, how long running shards may go on before they are aborted and handed back."""
    reconnect_min_s: float = setting(0.2, gt=0)
    """First delay before registering again after the coordinator could not be reached."""
    reconnect_max_s: float = setting(5.0, gt=0)
    """Longest delay between two attempts to reach the coordinator (the delay doubles up to it)."""
    parent_pid: int | None = setting(None, ge=1, metavar="PID")
    """Exit when this process is gone (the local cluster sets it so that nodes never outlive it)."""
    log_level: LogLevel = setting("INFO", env="QSCALE_LOG_LEVEL", metavar="LEVEL")
    """DEBUG, INFO, WARNING or ERROR."""
    log_format: Literal["text", "json"] = setting("text", env="QSCALE_LOG_FORMAT")
    """text, or json: one object per line for log shippers."""
    metrics_port: int = setting(0, ge=0, le=65535)
    """Serve Prometheus metrics on http://0.0.0.0:PORT/metrics; 0: off."""
    health_port: int = setting(0, ge=0, le=65535)
    """Serve the standard gRPC health service on this port (all interfaces); 0: off."""
    token: str | None = setting(secret=True)
    """Join token sent with every call (only from $QSCALE_NODE_TOKEN, never a flag)."""
    token_file: str | None = setting()
    """File holding the join token; wins over $QSCALE_NODE_TOKEN (the token itself)."""

    @model_validator(mode="after")
    def _check(self) -> NodeConfig:
        if not self.name.strip():
            raise InvalidArgumentError("node name must not be empty")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise InvalidArgumentError(
                f"reconnect_max_s ({self.reconnect_max_s!r}) must be >= reconnect_min_s ({self.reconnect_min_s!r})")
        if self.token is not None and len(self.token.strip()) < 16:
            raise InvalidArgumentError("the node token is too short (at least 16 characters)")
        return self

    def resolved_token(self) -> str | None:
        """The join token: read from :attr:`token_file` when set, else :attr:`token`.

        Raises:
            InvalidArgumentError, FailedPreconditionError: the file holds no single valid token
                or cannot be read.
        """
        from qscale.security import NODE, check_token, read_token

        if self.token_file:
            return read_token(self.token_file, NODE)
        return check_token(self.token.strip(), "$QSCALE_NODE_TOKEN") if self.token else None

    @property
    def threads_per_worker(self) -> int:
        """OpenMP threads of each worker process: the cores shared evenly by the slots."""
        return max(1, self.cores // self.slots)

    @property
    def slot_memory_budget(self) -> int:
        """Bytes one slot (one simulation) may use: the memory budget shared evenly by the slots."""
        return self.memory_budget // self.slots

    def to_dict(self) -> dict[str, Any]:
        """The effective settings as plain JSON-friendly values (derived ones included; the
        token shown as ``<hidden>``)."""
        return {**super().to_dict(), "threads_per_worker": self.threads_per_worker,
                "slot_memory_budget": self.slot_memory_budget}
