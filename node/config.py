"""Node configuration: a frozen dataclass with defaults, overridden by ``QSCALE_*`` environment
variables, overridden by CLI flags (see :meth:`NodeConfig.from_env`).

This module is imported by the daemon's parent process: it must stay light (no qiskit).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qscale.errors import InvalidArgumentError

__all__ = ["NodeConfig", "parse_bytes", "format_bytes", "default_memory_budget", "default_cores"]

DEFAULT_COORDINATOR = "127.0.0.1:50051"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b?)\s*$", re.I)


def parse_bytes(text: str | int) -> int:
    """A byte count from ``"1073741824"``, ``"512M"``, ``"4G"``, ``"1.5GiB"``, ``"2TB"``.

    Suffixes are binary (K = 1024) whether or not they carry ``i``/``B``; case is ignored.

    Raises:
        InvalidArgumentError: not a non-negative size.
    """
    if isinstance(text, bool):
        raise InvalidArgumentError(f"not a byte count: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgumentError(f"a byte count cannot be negative: {text}")
        return text
    match = _BYTES.match(str(text))
    if not match or (match.group(3) and match.group(3).lower() == "i" and not match.group(2)):
        raise InvalidArgumentError(
            f"not a byte count: {text!r} (use a number of bytes or a size such as 512M, 4G, 1.5GiB)"
        )
    number, unit = match.group(1), match.group(2).upper()
    value = float(number) * _UNITS[unit]
    if not math.isfinite(value):
        raise InvalidArgumentError(f"not a byte count: {text!r}")
    return int(value)


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


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``qscale-node`` can be told."""

    coordinator: str = DEFAULT_COORDINATOR
    """HOST:PORT (any gRPC target) of the coordinator's node service."""
    name: str = field(default_factory=socket.gethostname)
    """Human-readable node name shown by the coordinator; not necessarily unique."""
    slots: int = 1
    """Shards run at once; one simulation worker process each."""
    cores: int = field(default_factory=default_cores)
    """CPU cores the node may use, shared evenly by its slots (see :attr:`threads_per_worker`)."""
    memory_budget: int = field(default_factory=default_memory_budget)
    """Bytes the node may use for simulations, all slots together; each slot gets an equal part
    and Aer's memory cap is set from it. Default: half the machine's (or container's) memory."""
    max_qubits: int = 0
    """Widest statevector the node simulates; 0: no cap beyond what a slot's memory holds.

    The node reports ``min(memory-derived width, max_qubits)`` as its ``max_statevector_qubits``
    and refuses (and the coordinator does not send it) shards whose statevector width is wider.
    The width (:func:`qscale.node.capabilities.statevector_width`) bounds only the methods whose
    memory grows as ``2**n``: statevector and automatic count ``n`` qubits, a density matrix of
    ``n`` qubits counts ``2n`` (unitary ``2n``, superop ``4n``); the stabilizer, extended
    stabilizer and matrix-product-state methods are not bounded by it."""
    drain_grace_s: float = 30.0
    """On SIGTERM, how long running shards may go on before they are aborted and handed back."""
    reconnect_min_s: float = 0.2
    """First delay before registering again after the coordinator could not be reached."""
    reconnect_max_s: float = 5.0
    """Longest delay between two attempts to reach the coordinator (backoff doubles up to it)."""
    parent_pid: int | None = None
    """Exit when this process is gone (the local cluster sets it so nodes never outlive it)."""
    log_level: str = "INFO"
    """Logging level name for the CLI's handler (DEBUG, INFO, WARNING, ERROR)."""
    log_format: str = "text"
    """``text``, or ``json`` (one object per line) for log shippers."""
    metrics_port: int = 0
    """Serve Prometheus metrics on ``http://0.0.0.0:PORT/metrics``; 0: off."""
    health_port: int = 0
    """Serve the standard gRPC health service on this port (all interfaces); 0: off."""
    token: str | None = field(default=None, repr=False)
    """Join token sent with every call (from ``$QSCALE_NODE_TOKEN``; never a CLI flag)."""
    token_file: str | None = None
    """File holding the join token (``--token-file``, ``$QSCALE_NODE_TOKEN_FILE``); wins over ``token``."""
    tls_cert: str | None = None
    """Client certificate (PEM) presented to a mutual-TLS coordinator; needs ``tls_key``."""
    tls_key: str | None = None
    """Private key (PEM) of ``tls_cert``."""
    tls_ca: str | None = None
    """CA (PEM) that signed the coordinator's certificate. Any TLS setting turns TLS on."""

    def __post_init__(self) -> None:
        if not isinstance(self.coordinator, str) or not self.coordinator.strip() or any(
            ch.isspace() for ch in self.coordinator
        ):
            raise InvalidArgumentError(f"coordinator address must be HOST:PORT, got {self.coordinator!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidArgumentError("node name must not be empty")
        _check_int("slots", self.slots, minimum=1)
        for name in ("metrics_port", "health_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise InvalidArgumentError(f"{name.replace('_', ' ')} must be between 0 and 65535")
        if self.log_format not in ("text", "json"):
            raise InvalidArgumentError(f"log format must be text or json, not {self.log_format!r}")
        _check_int("cores", self.cores, minimum=1)
        _check_int("memory budget", self.memory_budget, minimum=1 << 20, unit=" bytes (1 MiB)")
        _check_int("max qubits", self.max_qubits, minimum=0, unit=" (0: no cap)")
        if not _is_number(self.drain_grace_s) or self.drain_grace_s < 0:
            raise InvalidArgumentError(f"drain grace must be >= 0 seconds, got {self.drain_grace_s!r}")
        if not _is_number(self.reconnect_min_s) or self.reconnect_min_s <= 0:
            raise InvalidArgumentError(f"reconnect_min_s must be > 0, got {self.reconnect_min_s!r}")
        if not _is_number(self.reconnect_max_s) or self.reconnect_max_s < self.reconnect_min_s:
            raise InvalidArgumentError(
                f"reconnect_max_s ({self.reconnect_max_s!r}) must be >= reconnect_min_s ({self.reconnect_min_s!r})"
            )
        if self.parent_pid is not None:
            _check_int("parent pid", self.parent_pid, minimum=1)
        level = logging.getLevelName(str(self.log_level).upper())
        if not isinstance(level, int):
            raise InvalidArgumentError(
                f"unknown log level {self.log_level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgumentError("a TLS client certificate needs its key: give --tls-cert and --tls-key together")
        if self.token is not None and len(self.token.strip()) < 16:
            raise InvalidArgumentError("the node token is too short (at least 16 characters)")

    def resolved_token(self) -> str | None:
        """The join token: read from :attr:`token_file` when set, else :attr:`token`.

        Raises:
            InvalidArgumentError, FailedPreconditionError: the file holds no single valid token
                or cannot be read.
        """
        from qscale.security import check_token, read_token

        if self.token_file:
            return read_token(self.token_file)
        return check_token(self.token.strip(), "$QSCALE_NODE_TOKEN") if self.token else None

    def tls_config(self) -> Any:
        """A :class:`qscale.security.TLSConfig` when any TLS setting is given, else None (plain)."""
        from qscale.security import TLSConfig

        tls = TLSConfig(self.tls_cert, self.tls_key, self.tls_ca)
        return tls if tls.enabled else None

    @property
    def threads_per_worker(self) -> int:
        """OpenMP threads of each worker process: the cores shared evenly by the slots."""
        return max(1, self.cores // self.slots)

    @property
    def slot_memory_budget(self) -> int:
        """Bytes one slot (one simulation) may use: the memory budget shared evenly by the slots."""
        return self.memory_budget // self.slots

    def to_dict(self) -> dict[str, Any]:
        """The effective settings as plain JSON-friendly values (derived ones included)."""
        out = asdict(self)
        out["token"] = "<hidden>" if self.token else None  # never printed
        out["threads_per_worker"] = self.threads_per_worker
        out["slot_memory_budget"] = self.slot_memory_budget
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> NodeConfig:
        """Defaults, then ``QSCALE_*`` variables from ``environ`` (default ``os.environ``), then
        the ``overrides`` that are not None (CLI flags).

        Variables: ``QSCALE_COORDINATOR``, ``QSCALE_NODE_NAME``, ``QSCALE_NODE_SLOTS``,
        ``QSCALE_NODE_CORES``, ``QSCALE_NODE_MEMORY_BUDGET`` (bytes or 4G/512M),
        ``QSCALE_NODE_MAX_QUBITS`` (0: no cap),
        ``QSCALE_NODE_DRAIN_GRACE`` (seconds), ``QSCALE_LOG_LEVEL``, ``QSCALE_LOG_FORMAT``,
        ``QSCALE_NODE_METRICS_PORT``, ``QSCALE_NODE_HEALTH_PORT``, ``QSCALE_NODE_PARENT_PID``, ``QSCALE_NODE_TOKEN``,
        ``QSCALE_NODE_TOKEN_FILE``, ``QSCALE_TLS_CERT``, ``QSCALE_TLS_KEY``, ``QSCALE_TLS_CA``.
        Empty values are ignored.

        Raises:
            InvalidArgumentError: a variable or override that does not parse or is out of range.
            TypeError: an override that names no setting.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var, conv in _ENV:
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = conv(raw.strip())
            except (ValueError, InvalidArgumentError) as exc:
                raise InvalidArgumentError(f"{var}={raw!r}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown node settings: {unknown}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("memory_budget"), str):
            values["memory_budget"] = parse_bytes(values["memory_budget"])
        return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(what: str, value: Any, *, minimum: int, unit: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{what} must be >= {minimum}{unit}, got {value}")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("not a number") from None


_ENV: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("coordinator", "QSCALE_COORDINATOR", str),
    ("name", "QSCALE_NODE_NAME", str),
    ("slots", "QSCALE_NODE_SLOTS", _int),
    ("cores", "QSCALE_NODE_CORES", _int),
    ("memory_budget", "QSCALE_NODE_MEMORY_BUDGET", parse_bytes),
    ("max_qubits", "QSCALE_NODE_MAX_QUBITS", _int),
    ("drain_grace_s", "QSCALE_NODE_DRAIN_GRACE", _float),
    ("log_level", "QSCALE_LOG_LEVEL", str),
    ("log_format", "QSCALE_LOG_FORMAT", str),
    ("metrics_port", "QSCALE_NODE_METRICS_PORT", _int),
    ("health_port", "QSCALE_NODE_HEALTH_PORT", _int),
    ("parent_pid", "QSCALE_NODE_PARENT_PID", _int),
    ("token", "QSCALE_NODE_TOKEN", str),
    ("token_file", "QSCALE_NODE_TOKEN_FILE", str),
    ("tls_cert", "QSCALE_TLS_CERT", str),
    ("tls_key", "QSCALE_TLS_KEY", str),
    ("tls_ca", "QSCALE_TLS_CA", str),
)
