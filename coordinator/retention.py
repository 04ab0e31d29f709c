"""Retention: how long the coordinator's state keeps the results of finished jobs.

The state keeps the results (circuits, parameter values, shard results, noise model) of the
newest ``keep_jobs`` finished jobs, each for at most ``keep_jobs_for_s``; an older job is
*pruned*: its results are deleted and only its status record stays, marked with the time it was
pruned. The status records of pruned jobs are kept up to ``keep_pruned_jobs``; older ones are
deleted entirely, and such a job is then unknown (NOT_FOUND, "no job ...").

:meth:`Store.prune <qscale.coordinator.store.Store.prune>` does the work in one transaction, at
a cost that follows what it prunes (partial indexes hold only the jobs it may touch), on the
runtime's writer thread (a :class:`Prune` write), never on the event loop;
:meth:`Runtime.maybe_prune <qscale.coordinator.runtime.Runtime.maybe_prune>` decides when, from
the coordinator's tick. Freed pages are reused by SQLite, so the state file stops growing once
the limits are reached.

A pruned job read back from the store is a :class:`PrunedJob`: its status (state, error,
times, user, priority, shots and circuits asked for) without anything to plan or count.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from qscale.coordinator.jobs import DONE, Job

__all__ = ["PrunedJob", "Prune", "retention_policy", "pruned_message", "format_span", "PRUNE_BATCH"]

PRUNE_BATCH = 5000
"""Most jobs one prune call prunes (and most records it deletes): a backlog (after the limits were
lowered) is worked off over several calls, so that no write waits long behind one."""


@dataclass(eq=False)
class PrunedJob(Job):
    """A finished job whose results retention deleted: only its status is left. It has no
    circuits, shards or totals; :attr:`shots_total` and :attr:`num_circuits` are the stored
    figures."""

    stored_shots_total: int = 0
    stored_num_circuits: int = 0
    pruned_at: float = 0.0
    """Wall time its results were deleted."""
    retention: str = ""
    """The retention policy in words (set by the runtime, for the message of :func:`pruned_message`)."""

    def __post_init__(self) -> None:
        self.pruned = True
        if self.state == DONE:
            self.shots_done = self.stored_shots_total

    @property
    def shots_total(self) -> int:  # type: ignore[override]
        return self.stored_shots_total

    @property
    def num_circuits(self) -> int:
        return self.stored_num_circuits


@dataclass(eq=False)
class Prune:
    """A write for the runtime's writer thread: prune as :meth:`Store.prune
    <qscale.coordinator.store.Store.prune>` does; the thread fills in what it did."""

    keep: int
    older_than_wall: float | None
    keep_pruned: int
    now_wall: float
    limit: int = PRUNE_BATCH
    pruned: int = 0
    """Jobs pruned (set by the writer thread)."""
    deleted: int = 0
    """Status records deleted entirely (set by the writer thread)."""
    pruned_ids: list[str] = field(default_factory=list)
    """The ids of the jobs pruned (set by the writer thread)."""
    oldest_kept: float | None = None
    """``finished_at`` of the oldest finished job whose results are still kept, after the prune."""
    failed: bool = False
    """The prune raised (logged by the writer thread); nothing of it was committed."""

    @property
    def capped(self) -> bool:
        """It stopped at :attr:`limit`: there may be more to prune."""
        return self.pruned >= self.limit or self.deleted >= self.limit


def format_span(seconds: float) -> str:
    """``7 days``, ``1 day``, ``3 hours``, ``90 minutes``, ``45 s``: a retention period in words."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0 or seconds >= 10 * size:
            n = seconds / size
            text = f"{n:,.0f}" if n == int(n) or n >= 10 else f"{n:,.1f}"
            return f"{text} {unit}{'' if text == '1' else 's'}"
    return f"{seconds:g} s"


def retention_policy(keep: int, keep_for_s: float) -> str:
    """``the coordinator keeps the results of the newest 10,000 finished jobs, for at most 7 days``."""
    if keep and keep_for_s:
        return (f"the coordinator keeps the results of the newest {keep:,} finished jobs, "
                f"for at most {format_span(keep_for_s)}")
    if keep:
        return f"the coordinator keeps the results of the newest {keep:,} finished jobs"
    if keep_for_s:
        return f"the coordinator keeps the results of finished jobs for at most {format_span(keep_for_s)}"
    return "the coordinator keeps every result now, but it did not when this job was pruned"


def pruned_message(job: Job) -> str:
    """Why a pruned job has no result: when it finished, and the retention policy."""
    when = datetime.datetime.fromtimestamp(job.finished_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    policy = job.retention if isinstance(job, PrunedJob) and job.retention else "a retention limit"
    return f"job {job.job_id} finished at {when} and its results were pruned by retention ({policy})"
