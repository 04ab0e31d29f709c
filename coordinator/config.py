"""Coordinator configuration: frozen dataclasses with defaults, overridden by ``QSCALE_*``
environment variables, overridden by CLI flags (see :meth:`CoordinatorConfig.from_env`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qscale.coordinator.planner import PlanningPolicy
from qscale.errors import InvalidArgumentError

__all__ = ["Limits", "CoordinatorConfig", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class Limits:
    """Caps on what a client may submit."""

    max_message_bytes: int = 256 << 20
    """Largest gRPC message the coordinator accepts or sends."""
    max_circuit_bytes: int = 64 << 20
    """Largest QPY payload or OpenQASM source of one circuit."""
    max_circuits: int = 100_000
    """Most circuits in one job."""
    max_shots: int = 100_000_000
    """Most shots per circuit."""
    max_qubits: int = 1024
    """Widest circuit accepted at all (nodes narrow this further by method and memory)."""
    max_experiments: int = 1_000_000
    """Most experiments (circuit x parameter set) in one job."""
    max_noise_model_bytes: int = 4 << 20
    """Largest serialised noise model."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything ``qscale-coordinator serve`` can be told."""

    listen: str = DEFAULT_ADDRESS
    """HOST:PORT to serve on; port 0 lets the OS choose."""
    state_dir: str | None = None
    """Directory of the SQLite state; a temporary directory (lost on exit) when None."""
    heartbeat_interval_s: float = 2.0
    """How often nodes heartbeat; sent to them in every reply."""
    heartbeat_timeout_s: float = 10.0
    """A node silent this long is declared lost and its shards are requeued."""
    max_shard_failures: int = 3
    """A shard that failed this many times (on different nodes when there are any) fails its job."""
    max_shard_losses: int = 3
    """A shard whose nodes were lost this many times while running it fails its job."""
    finished_jobs_in_memory: int = 1000
    """Finished jobs kept in memory for quick reads; older ones are read back from the state."""
    watch_min_interval_s: float = 0.05
    """Least time between two progress updates on one Watch stream."""
    limits: Limits = field(default_factory=Limits)
    policy: PlanningPolicy = field(default_factory=PlanningPolicy)

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise InvalidArgumentError("heartbeat interval must be > 0")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise InvalidArgumentError("heartbeat timeout must be longer than the heartbeat interval")
        if self.max_shard_failures < 1 or self.max_shard_losses < 1:
            raise InvalidArgumentError("max shard failures and losses must be >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> CoordinatorConfig:
        """Defaults, then ``QSCALE_*`` variables, then ``overrides`` that are not None."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var, conv in _ENV:
            if var in env and env[var] != "":
                try:
                    values[name] = conv(env[var])
                except ValueError as exc:
                    raise InvalidArgumentError(f"{var}={env[var]!r}: {exc}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown coordinator settings: {sorted(unknown)}")
        return cls(**values)

    def with_(self, **changes: Any) -> CoordinatorConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


_ENV: tuple[tuple[str, str, Any], ...] = (
    ("listen", "QSCALE_LISTEN", str),
    ("state_dir", "QSCALE_STATE_DIR", str),
    ("heartbeat_interval_s", "QSCALE_HEARTBEAT_INTERVAL", float),
    ("heartbeat_timeout_s", "QSCALE_HEARTBEAT_TIMEOUT", float),
    ("max_shard_failures", "QSCALE_MAX_SHARD_FAILURES", int),
)
