"""Coordinator configuration: :class:`CoordinatorConfig` with its :class:`Limits` and the
:class:`Planning` settings of its planning policy. Every setting comes from its default, then its
``QSCALE_*`` variable, then its ``serve`` flag (see :mod:`qscale.settings`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from qscale.coordinator.planner import PlanningPolicy
from qscale.errors import InvalidArgumentError
from qscale.settings import DEFAULT_ADDRESS, LogLevel, Settings, Size, setting

__all__ = ["Limits", "Planning", "CoordinatorConfig", "DEFAULT_ADDRESS"]

_MAX_NESTING_DEPTH = 256  # the checks recurse once per level


class Limits(Settings):
    """Caps on what a client may submit, and on the sandbox that decodes it.

    Circuits are decoded and checked in sandboxed subprocesses
    (:mod:`qscale.coordinator.sandbox`), within ``decode_memory_bytes`` and ``decode_timeout_s``.
    Variables: ``QSCALE_`` + the name in capitals (``QSCALE_MAX_QUBITS``, ``QSCALE_DECODE_TIMEOUT``).
    """

    what: ClassVar[str] = "limits"

    max_message_bytes: Size = setting(256 << 20, gt=0, le=(1 << 31) - 1)
    """Largest gRPC message the coordinator accepts or sends (below 2G, a gRPC limit)."""
    max_circuit_bytes: Size = setting(64 << 20, gt=0)
    """Largest QPY payload or OpenQASM source of one circuit."""
    max_circuits: Size = setting(100_000, gt=0)
    """Most circuits in one job."""
    max_shots: Size = setting(100_000_000, gt=0)
    """Most shots per circuit."""
    max_qubits: Size = setting(1024, gt=0)
    """Widest circuit accepted at all (nodes narrow this further by method and memory)."""
    max_clbits: Size = setting(16_384, gt=0)
    """Most classical bits in one circuit."""
    max_experiments: Size = setting(1_000_000, gt=0)
    """Most experiments (circuit x parameter set) in one job: the cap on parameter sets."""
    max_observables: Size = setting(10_000, gt=0)
    """Most observables (Pauli labels) per circuit of an estimator job."""
    max_expectation_values: Size = setting(16_000_000, gt=0)
    """Most expectation values (parameter sets x observables, over all circuits) in an estimator
    job; its result carries 8 bytes for each."""
    max_operations: Size = setting(1_000_000, gt=0)
    """Most operations in one circuit, counted with every custom gate replaced by its definition
    and every control-flow block expanded (a for loop's body once per iteration)."""
    max_nesting_depth: Size = setting(32, gt=0, le=_MAX_NESTING_DEPTH)
    """Deepest nesting of custom gate definitions and control-flow blocks in one circuit."""
    max_noise_model_bytes: Size = setting(4 << 20, gt=0)
    """Largest serialised noise model."""
    decode_workers: Size = setting(2, gt=0)
    """Sandbox processes that decode and check submitted circuits."""
    decode_memory_bytes: Size = setting(2 << 30, ge=64 << 20)
    """Address space a sandbox process may grow by, beyond what it holds after warming up
    (RLIMIT_AS); a payload that needs more is refused."""
    decode_timeout_s: float = setting(10.0, gt=0)
    """Longest a sandbox process may spend on one circuit (or the noise model) before it is
    killed and the payload refused."""


class Planning(Settings):
    """The settings of :class:`~qscale.coordinator.planner.PlanningPolicy` (its other fields keep
    their defaults); :meth:`CoordinatorConfig.from_env` turns them into its ``policy``."""

    what: ClassVar[str] = "planning"

    shots_per_shard: Size = setting(PlanningPolicy.shots_per_shard, ge=0)
    """Cap on the shots of one shard where shots cost a simulation each; 0: shards are sized by
    estimated cost only."""
    target_shards: Size = setting(PlanningPolicy.target_shards, ge=1)
    """A job with enough work is cut into about this many shards: the most nodes that share one
    job evenly."""


class CoordinatorConfig(Settings):
    """Everything ``qscale-coordinator serve`` can be told. Variables: ``QSCALE_`` + the name in
    capitals less ``_S`` (``QSCALE_HEARTBEAT_TIMEOUT``)."""

    what: ClassVar[str] = "coordinator"

    listen: str = setting(DEFAULT_ADDRESS, metavar="HOST:PORT")
    """HOST:PORT to serve on; port 0 lets the OS choose."""
    state_dir: str | None = setting(shown="a temporary directory, lost on exit")
    """Directory of the SQLite state."""
    address_file: str | None = setting()
    """Write the bound HOST:PORT to this file once serving (useful with port 0)."""
    heartbeat_interval_s: float = setting(1.0, gt=0)
    """How often nodes heartbeat; sent to them in every reply."""
    heartbeat_timeout_s: float = setting(10.0, gt=0)
    """A node silent this long (and suspected since --suspect-after) is declared lost: its shards
    are requeued, and what it sends later is dropped as stale."""
    suspect_after_s: float = setting(0.0, ge=0)
    """A node silent this long, or whose work stream broke, is suspected: every shard it holds
    gets a backup copy on free capacity at once (the first result counts); the node keeps its
    work and is simply alive again when it speaks. 0: two heartbeat intervals."""
    lost_node_ttl_s: float = setting(600.0, ge=0)
    """How long a lost node stays listed by `nodes` (a node that registers again replaces its
    entry at once)."""
    max_shard_failures: int = setting(3, ge=1)
    """A shard that failed this many times (on different nodes when there are any) fails its job."""
    max_shard_losses: int = setting(3, ge=1)
    """A shard whose nodes were lost this many times while running it fails its job."""
    prefetch_per_slot: Size = setting(1, ge=0)
    """Shards a node is given beyond its slots, per slot, so that its next shard is in hand when
    one ends (0: no pipelining)."""
    backup_after_s: float = setting(2.0, ge=0)
    """A shard running this long, at least --backup-slowdown times longer than expected from the
    job's finished shards, gets a backup copy on an idle node once nothing of its job is queued;
    the first result wins (0: no backup copies)."""
    backup_slowdown: float = setting(2.0, ge=1)
    """How much slower than expected a shard must be to get a backup copy."""
    max_jobs_per_user: Size = setting(1000, ge=0)
    """Most unfinished (queued or running) jobs one user may have; a Submit beyond it is refused
    with RESOURCE_EXHAUSTED. 0: no limit. A user's ``max-jobs=`` in the client tokens file wins."""
    max_queued_shots_per_user: Size = setting(0, ge=0)
    """Most shots one user may have queued (asked for by unfinished jobs and not yet counted);
    a Submit beyond it is refused with RESOURCE_EXHAUSTED. 0: no limit (``max-queued-shots=``)."""
    max_slots_per_user: Size = setting(0, ge=0)
    """Most shards of one user that nodes may hold at once (running, or held next in line for a
    slot); the rest of their work waits while other users' runs. 0: no limit (``max-slots=``)."""
    keep_jobs: Size = setting(10_000, ge=0)
    """Finished jobs whose results the state keeps; the results of older ones are pruned (their
    status stays readable and says so). 0: keep every result."""
    keep_jobs_for_s: float = setting(7 * 86400.0, ge=0)
    """Seconds a finished job's results are kept at most; 0: no time limit."""
    keep_pruned_jobs: Size = setting(100_000, ge=0)
    """Status records of pruned jobs the state keeps; older ones are deleted (such a job is then
    unknown). 0: keep every status record."""
    finished_jobs_in_memory: Size = setting(1000, ge=0)
    """Finished jobs kept in memory for quick reads; older ones are read back from the state."""
    watch_min_interval_s: float = setting(0.05, ge=0)
    """Least time between two progress updates on one Watch stream."""
    node_tokens_file: str | None = setting()
    """Join tokens nodes may present, one per line (TOKEN [NAME]), # comments (or one token in
    $QSCALE_NODE_TOKEN)."""
    client_tokens_file: str | None = setting()
    """API tokens clients may present, one per line: TOKEN [USER] [OPTION ...] with options admin,
    weight=W, max-jobs=N, max-queued-shots=N, max-slots=N; # comments (or one token of user
    'default' in $QSCALE_CLIENT_TOKEN)."""
    node_token: str | None = setting(secret=True)
    """One more accepted join token (only from $QSCALE_NODE_TOKEN, never a flag)."""
    client_token: str | None = setting(secret=True)
    """One more accepted API token (only from $QSCALE_CLIENT_TOKEN, never a flag)."""
    tls_cert: str | None = setting(metavar="PEM")
    """Serve TLS with this certificate chain; needs --tls-key."""
    tls_key: str | None = setting(metavar="PEM")
    """Private key of --tls-cert."""
    tls_ca: str | None = setting(metavar="PEM")
    """Require client certificates signed by this CA: mutual TLS."""
    insecure: bool = setting(False)
    """Allow a non-loopback --listen address without tokens (anyone who reaches it can use it)."""
    metrics_port: int = setting(0, ge=0, le=65535)
    """Serve Prometheus metrics on http://HOST:PORT/metrics, HOST as in --listen; 0: off."""
    dashboard_port: int = setting(0, ge=0, le=65535)
    """Serve the read-only status page on http://HOST:PORT/, HOST as in --listen; 0: off. It asks
    for a client token (HTTP Basic password or Bearer) when authentication is on."""
    log_level: LogLevel = setting("INFO", metavar="LEVEL")
    """DEBUG, INFO, WARNING or ERROR."""
    log_format: Literal["text", "json"] = setting("text")
    """text, or json: one object per line for log shippers."""
    limits: Limits = Field(default_factory=Limits)
    policy: PlanningPolicy = Field(default_factory=PlanningPolicy)

    @model_validator(mode="after")
    def _check(self) -> CoordinatorConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise InvalidArgumentError("heartbeat timeout must be longer than the heartbeat interval")
        if self.suspect_after_s >= self.heartbeat_timeout_s:
            raise InvalidArgumentError("suspect-after must be between 0 and the heartbeat timeout")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, then ``QSCALE_*`` variables, then ``overrides`` that are not None: fields of
        this class, or of :class:`Limits` and :class:`Planning` by name (``max_qubits=30``,
        ``target_shards=8``) unless ``limits`` or ``policy`` is given whole."""
        env = os.environ if environ is None else environ
        parts = {model: {k: overrides.pop(k) for k in list(overrides) if k in model.model_fields}
                 for model in (Limits, Planning)}
        if overrides.get("limits") is None:
            overrides["limits"] = Limits.from_env(env, **parts[Limits])
        if overrides.get("policy") is None:
            overrides["policy"] = PlanningPolicy(**dict(Planning.from_env(env, **parts[Planning])))
        return super().from_env(env, **overrides)

    @property
    def suspect_after(self) -> float:
        """``suspect_after_s``, or two heartbeat intervals (at most half the timeout) when 0."""
        return self.suspect_after_s or min(2 * self.heartbeat_interval_s, self.heartbeat_timeout_s / 2)
