"""Coordinator configuration: frozen dataclasses with defaults, overridden by ``QSCALE_*``
environment variables, overridden by CLI flags (see :meth:`CoordinatorConfig.from_env`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qscale.coordinator.planner import PlanningPolicy
from qscale.errors import InvalidArgumentError

__all__ = ["Limits", "CoordinatorConfig", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class Limits:
    """Caps on what a client may submit, and on the sandbox that decodes it.

    Every field has a ``QSCALE_*`` environment variable (see :meth:`from_env`); ``serve`` has
    ``--max-*`` flags for the main ones. Circuits are decoded and checked in sandboxed
    subprocesses (:mod:`qscale.coordinator.sandbox`), within ``decode_memory_bytes`` and
    ``decode_timeout_s``.
    """

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
    max_clbits: int = 16_384
    """Most classical bits in one circuit."""
    max_experiments: int = 1_000_000
    """Most experiments (circuit x parameter set) in one job: the cap on parameter sets."""
    max_observables: int = 10_000
    """Most observables (Pauli labels) per circuit of an estimator job."""
    max_expectation_values: int = 16_000_000
    """Most expectation values (parameter sets x observables, over all circuits) in an estimator
    job; its result carries 8 bytes for each."""
    max_operations: int = 1_000_000
    """Most operations in one circuit, counted with every custom gate replaced by its definition
    and every control-flow block expanded (a for loop's body once per iteration)."""
    max_nesting_depth: int = 32
    """Deepest nesting of custom gate definitions and control-flow blocks in one circuit."""
    max_noise_model_bytes: int = 4 << 20
    """Largest serialised noise model."""
    decode_workers: int = 2
    """Sandbox processes that decode and check submitted circuits."""
    decode_memory_bytes: int = 2 << 30
    """Address space a sandbox process may grow by, beyond what it holds after warming up
    (``RLIMIT_AS``); a payload that needs more is refused."""
    decode_timeout_s: float = 10.0
    """Longest a sandbox process may spend on one circuit (or the noise model) before it is
    killed and the payload refused."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgumentError(f"limit {f.name} must be a positive number, got {value!r}")
        if self.max_nesting_depth > _MAX_NESTING_DEPTH:
            raise InvalidArgumentError(f"max_nesting_depth must be at most {_MAX_NESTING_DEPTH}")
        if self.decode_memory_bytes < 64 << 20:
            raise InvalidArgumentError("decode_memory_bytes must be at least 64 MiB")
        if self.max_message_bytes > (1 << 31) - 1:
            raise InvalidArgumentError("max_message_bytes must be below 2 GiB (a gRPC limit)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Limits:
        """Defaults, then ``QSCALE_MAX_*`` / ``QSCALE_DECODE_*`` variables (byte sizes may be
        written ``512M``, ``2G``), then ``overrides`` that are not None."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = "QSCALE_" + f.name.upper().removesuffix("_S")
            if env.get(var, "") != "":
                conv = float if f.type in ("float", float) else _parse_count
                try:
                    values[f.name] = conv(env[var])
                except ValueError as exc:
                    raise InvalidArgumentError(f"{var}={env[var]!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown limits: {sorted(unknown)}")
        return cls(**values)


_MAX_NESTING_DEPTH = 256  # the checks recurse once per level
_COUNT = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.I)


def _parse_count(text: str | int) -> int:
    """A count or byte size: ``"1000000"``, ``"1_000_000"``, ``"512M"``, ``"2GiB"`` (binary units)."""
    if isinstance(text, int):
        return text
    match = _COUNT.match(str(text).replace("_", ""))
    if not match:
        raise ValueError("not a whole number (sizes may end in K, M, G or T)")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything ``qscale-coordinator serve`` can be told."""

    listen: str = DEFAULT_ADDRESS
    """HOST:PORT to serve on; port 0 lets the OS choose."""
    state_dir: str | None = None
    """Directory of the SQLite state; a temporary directory (lost on exit) when None."""
    heartbeat_interval_s: float = 1.0
    """How often nodes heartbeat; sent to them in every reply."""
    heartbeat_timeout_s: float = 10.0
    """A node silent this long (and suspected since ``suspect_after_s``) is declared lost: its
    shards are requeued, and what it sends later is dropped as stale."""
    suspect_after_s: float = 0.0
    """A node silent this long, or whose work stream broke, is suspected: every shard it holds
    gets a backup copy on free capacity at once (the first result counts); the node keeps its
    work and is simply alive again when it speaks. 0: two heartbeat intervals."""
    lost_node_ttl_s: float = 600.0
    """How long a lost node stays listed by ``nodes`` (a node that registers again replaces its
    entry at once)."""
    max_shard_failures: int = 3
    """A shard that failed this many times (on different nodes when there are any) fails its job."""
    max_shard_losses: int = 3
    """A shard whose nodes were lost this many times while running it fails its job."""
    prefetch_per_slot: int = 1
    """Shards a node is given beyond its slots, per slot, so that its next shard is in hand when
    one ends (0: no pipelining)."""
    backup_after_s: float = 2.0
    """A shard running this long, at least ``backup_slowdown`` times longer than expected from
    the job's finished shards, gets a backup copy on an idle node once nothing of its job is
    queued; the first result wins (0: no backup copies)."""
    backup_slowdown: float = 2.0
    """How much slower than expected a shard must be to get a backup copy."""
    finished_jobs_in_memory: int = 1000
    """Finished jobs kept in memory for quick reads; older ones are read back from the state."""
    watch_min_interval_s: float = 0.05
    """Least time between two progress updates on one Watch stream."""
    node_tokens_file: str | None = None
    """File of join tokens nodes may present (one per line, ``#`` comments); see qscale.security."""
    client_tokens_file: str | None = None
    """File of API tokens clients may present (one per line, ``#`` comments)."""
    node_token: str | None = field(default=None, repr=False)
    """One more accepted join token (from ``$QSCALE_NODE_TOKEN``; never a CLI flag)."""
    client_token: str | None = field(default=None, repr=False)
    """One more accepted API token (from ``$QSCALE_CLIENT_TOKEN``; never a CLI flag)."""
    tls_cert: str | None = None
    """TLS certificate chain (PEM) to serve with; needs ``tls_key``."""
    tls_key: str | None = None
    """Private key (PEM) of ``tls_cert``."""
    tls_ca: str | None = None
    """CA (PEM) that callers' certificates must be signed by: turns on mutual TLS."""
    insecure: bool = False
    """Serve on a non-loopback address without tokens (refused otherwise)."""
    metrics_port: int = 0
    """Serve Prometheus metrics on ``http://HOST:PORT/metrics`` (HOST of ``listen``); 0: off."""
    dashboard_port: int = 0
    """Serve the read-only status page on ``http://HOST:PORT/`` (HOST of ``listen``); 0: off. It asks
    for a client token (HTTP Basic password or Bearer) when authentication is on."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""
    log_format: str = "text"
    """``text`` for people, ``json`` (one object per line) for log shippers."""
    limits: Limits = field(default_factory=Limits)
    policy: PlanningPolicy = field(default_factory=PlanningPolicy)

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise InvalidArgumentError("heartbeat interval must be > 0")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise InvalidArgumentError("heartbeat timeout must be longer than the heartbeat interval")
        if not 0 <= self.suspect_after_s < self.heartbeat_timeout_s:
            raise InvalidArgumentError("suspect-after must be between 0 and the heartbeat timeout")
        if self.lost_node_ttl_s < 0:
            raise InvalidArgumentError("lost node TTL must be >= 0")
        if self.max_shard_failures < 1 or self.max_shard_losses < 1:
            raise InvalidArgumentError("max shard failures and losses must be >= 1")
        for name in ("metrics_port", "dashboard_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise InvalidArgumentError(f"{name.replace('_', ' ')} must be between 0 and 65535")
        if self.log_format not in ("text", "json"):
            raise InvalidArgumentError(f"log format must be text or json, not {self.log_format!r}")
        if self.prefetch_per_slot < 0 or self.backup_after_s < 0 or self.backup_slowdown < 1:
            raise InvalidArgumentError("prefetch and backup settings: prefetch >= 0, backup after >= 0, "
                                       "slowdown >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> CoordinatorConfig:
        """Defaults, then ``QSCALE_*`` variables, then ``overrides`` that are not None.

        ``policy_overrides`` (a dict) sets fields of the planning policy the same way
        (``QSCALE_SHOTS_PER_SHARD``, ``QSCALE_TARGET_SHARDS``)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var, conv in _ENV:
            if var in env and env[var] != "":
                try:
                    values[name] = conv(env[var])
                except ValueError as exc:
                    raise InvalidArgumentError(f"{var}={env[var]!r}: {exc}") from exc
        if overrides.get("limits") is None:
            values["limits"] = Limits.from_env(env)  # QSCALE_MAX_* and QSCALE_DECODE_*
        policy_overrides = overrides.pop("policy_overrides", None) or {}
        if overrides.get("policy") is None:
            planning: dict[str, int] = {}
            for name, var in (("shots_per_shard", "QSCALE_SHOTS_PER_SHARD"), ("target_shards", "QSCALE_TARGET_SHARDS")):
                if env.get(var):
                    try:
                        planning[name] = int(env[var])
                    except ValueError as exc:
                        raise InvalidArgumentError(f"{var}={env[var]!r}: {exc}") from exc
            planning.update({k: v for k, v in policy_overrides.items() if v is not None})
            if planning:
                try:
                    values["policy"] = PlanningPolicy(**planning)
                except ValueError as exc:
                    raise InvalidArgumentError(str(exc)) from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown coordinator settings: {sorted(unknown)}")
        return cls(**values)

    @property
    def suspect_after(self) -> float:
        """``suspect_after_s``, or two heartbeat intervals (at most half the timeout) when 0."""
        return self.suspect_after_s or min(2 * self.heartbeat_interval_s, self.heartbeat_timeout_s / 2)

    def with_(self, **changes: Any) -> CoordinatorConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean (true/false, 1/0, yes/no, on/off)")


_ENV: tuple[tuple[str, str, Any], ...] = (
    ("listen", "QSCALE_LISTEN", str),
    ("state_dir", "QSCALE_STATE_DIR", str),
    ("heartbeat_interval_s", "QSCALE_HEARTBEAT_INTERVAL", float),
    ("heartbeat_timeout_s", "QSCALE_HEARTBEAT_TIMEOUT", float),
    ("suspect_after_s", "QSCALE_SUSPECT_AFTER", float),
    ("lost_node_ttl_s", "QSCALE_LOST_NODE_TTL", float),
    ("max_shard_failures", "QSCALE_MAX_SHARD_FAILURES", int),
    ("prefetch_per_slot", "QSCALE_PREFETCH_PER_SLOT", int),
    ("backup_after_s", "QSCALE_BACKUP_AFTER", float),
    ("node_tokens_file", "QSCALE_NODE_TOKENS_FILE", str),
    ("client_tokens_file", "QSCALE_CLIENT_TOKENS_FILE", str),
    ("node_token", "QSCALE_NODE_TOKEN", str.strip),
    ("client_token", "QSCALE_CLIENT_TOKEN", str.strip),
    ("tls_cert", "QSCALE_TLS_CERT", str),
    ("tls_key", "QSCALE_TLS_KEY", str),
    ("tls_ca", "QSCALE_TLS_CA", str),
    ("insecure", "QSCALE_INSECURE", _flag),
    ("metrics_port", "QSCALE_METRICS_PORT", int),
    ("dashboard_port", "QSCALE_DASHBOARD_PORT", int),
    ("log_level", "QSCALE_LOG_LEVEL", str),
    ("log_format", "QSCALE_LOG_FORMAT", str),
)
