"""Which job's shard goes next: priority classes first, then fair share between users within a
class, then fair share between each user's jobs, and the planned order within a job.

* **Classes** are strict: a class is served only when no higher one has a shard waiting (and
  running shards are never stopped to make room).
* **Users** within a class: the one with the least *service* (slot-seconds) divided by its weight
  goes first, so users with weights 3 and 1 who both keep the cluster busy get 75 % and 25 % of
  its slot-seconds.
* **Jobs** of one user within a class: the one with the least service goes first, so a short job
  submitted behind a long one starts on one of the next free slots instead of after the long one.

Service is charged when a shard is dispatched (its estimated duration) and corrected when its
attempt ends (by what it actually ran, see :meth:`FairQueue.charge`), so an order changes only
on events: jobs are kept in heaps and picking the next one costs O(u log u + log j) for u users
with work queued in a class and j of their jobs, not the number of queued jobs.

A new job starts at its user's current *virtual time* (the service of the job of theirs served
last), and a user who had no unfinished job in a class comes back at the class's (the key of the
user served last), not with the credit of their idle time: a user back after an hour away shares
the cluster from then on instead of taking all of it for an hour (start-time fair queueing). A
user whose jobs only run for a while, with nothing queued, keeps their place.

Pure bookkeeping: no clock, no I/O, no knowledge of nodes. The
:class:`~qscale.coordinator.scheduler.Scheduler` asks :meth:`FairQueue.best` for the next job,
takes a shard of it (or blocks the job or its user for the rest of the dispatch round when
nothing of it fits or the user is at a quota) and charges what attempts cost.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["FairQueue", "QueuedJob"]


@dataclass(eq=False)
class QueuedJob:
    """A job known to the queue: its queued shard indices and the service it has had."""

    job_id: str
    user: str
    priority: int
    shards: deque[int] = field(default_factory=deque)
    """Indices of shards waiting, in planned order (a shard queued again goes first). May hold
    indices no longer queued (the scheduler skips them)."""
    service: float = 0.0
    """Slot-seconds charged to this job (estimates of running attempts included)."""
    active: bool = False
    """In its flow's heap: it has shards waiting."""
    version: int = 0
    """Of its current heap entry; older entries are stale."""


@dataclass(eq=False)
class _Flow:
    """One user's jobs with shards waiting in one class."""

    user: str
    weight: float
    service: float
    order: int
    """Tie-break: the flow created first goes first."""
    heap: list[tuple[float, int, int, str]] = field(default_factory=list)
    """(service, arrival, version, job id) of its active jobs; stale entries are skipped."""
    vtime: float = 0.0
    """Service of the job it served last: where a new job starts."""
    active: int = 0
    """Jobs with shards waiting."""
    jobs: int = 0
    """Jobs not final: the flow lasts as long as it has one."""

    @property
    def key(self) -> float:
        return self.service / self.weight


@dataclass(eq=False)
class _Class:
    flows: dict[str, _Flow] = field(default_factory=dict)
    vtime: float = 0.0
    """Key of the flow served last: where a user with no job left comes back."""


class FairQueue:
    """Queued work by class, user and job, served fairly (see the module's docstring)."""

    def __init__(self, weight_of: Callable[[str], float] = lambda user: 1.0) -> None:
        self._weight_of = weight_of
        self._classes: dict[int, _Class] = {}
        self._jobs: dict[str, QueuedJob] = {}
        self._arrival = itertools.count()
        self._blocked_flows: set[tuple[int, str]] = set()
        self._blocked_jobs: list[QueuedJob] = []

    def __len__(self) -> int:
        """Jobs with shards waiting."""
        return sum(flow.active for cls in self._classes.values() for flow in cls.flows.values())

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> QueuedJob | None:
        return self._jobs.get(job_id)

    # ------------------------------------------------------------------ jobs in and out

    def add(self, job_id: str, user: str, priority: int, shards: Iterable[int]) -> QueuedJob:
        """Know a job (once, when it is accepted) with the shards it has waiting."""
        entry = self._jobs.get(job_id)
        if entry is None:
            entry = self._jobs[job_id] = QueuedJob(job_id, user, priority)
            flow = self._flow(entry)
            flow.jobs += 1
            first = self._top(flow)  # never behind every job of its user with work waiting
            entry.service = min(flow.vtime, first.service) if first is not None else flow.vtime
        entry.shards.extend(shards)
        if entry.shards:
            self._activate(entry)
        return entry

    def requeue(self, job_id: str, index: int) -> None:
        """A shard of a known job waits again: it goes first within its job."""
        entry = self._jobs.get(job_id)
        if entry is None:
            return
        entry.shards.appendleft(index)
        self._activate(entry)

    def remove(self, job_id: str) -> None:
        """Forget a job (it reached a final state)."""
        entry = self._jobs.pop(job_id, None)
        if entry is None:
            return
        if entry.active:
            self._deactivate(entry)
        cls = self._classes.get(entry.priority)
        flow = cls.flows.get(entry.user) if cls is not None else None
        if flow is not None:
            flow.jobs -= 1
            if flow.jobs <= 0:  # no job left: the user comes back at the class's virtual time
                del cls.flows[entry.user]  # type: ignore[union-attr]
                if not cls.flows:  # type: ignore[union-attr]
                    del self._classes[entry.priority]

    def taken(self, entry: QueuedJob) -> None:
        """The scheduler took shards of ``entry`` (the job :meth:`best` returned): move the
        virtual times to it, and retire it if nothing of it waits any more."""
        cls = self._classes.get(entry.priority)
        flow = cls.flows.get(entry.user) if cls is not None else None
        if flow is not None:
            cls.vtime = max(cls.vtime, flow.key)  # type: ignore[union-attr]
            flow.vtime = max(flow.vtime, entry.service)
        if not entry.shards and entry.active:
            self._deactivate(entry)

    def charge(self, job_id: str, seconds: float) -> None:
        """Add ``seconds`` of service (negative: a correction) to a job and to its user's flow."""
        entry = self._jobs.get(job_id)
        if entry is None or not seconds:
            return
        entry.service += seconds
        cls = self._classes.get(entry.priority)
        flow = cls.flows.get(entry.user) if cls is not None else None
        if flow is not None:
            flow.service += seconds
        if entry.active:
            self._push(entry)

    # ------------------------------------------------------------------ choosing

    def best(self) -> QueuedJob | None:
        """The job whose shard should go next, among those not blocked in this round."""
        for priority in sorted(self._classes, reverse=True):
            cls = self._classes[priority]
            for flow in sorted(cls.flows.values(), key=lambda f: (f.key, f.order)):
                if (priority, flow.user) in self._blocked_flows:
                    continue
                entry = self._top(flow)
                if entry is not None:
                    return entry
        return None

    def block_job(self, entry: QueuedJob) -> None:
        """Nothing of this job fits now: pass over it until :meth:`end_round`."""
        cls = self._classes.get(entry.priority)
        flow = cls.flows.get(entry.user) if cls is not None else None
        if flow is not None and flow.heap and flow.heap[0][3] == entry.job_id:
            heapq.heappop(flow.heap)
            self._blocked_jobs.append(entry)

    def block_user(self, entry: QueuedJob) -> None:
        """The job's user may not take more now (a quota): pass over its jobs in this class
        until :meth:`end_round`."""
        self._blocked_flows.add((entry.priority, entry.user))

    def end_round(self) -> None:
        """Put back what this dispatch round passed over."""
        self._blocked_flows.clear()
        blocked, self._blocked_jobs = self._blocked_jobs, []
        for entry in blocked:
            if entry.active and self._jobs.get(entry.job_id) is entry:
                self._push(entry)

    # ------------------------------------------------------------------ internals

    def _flow(self, entry: QueuedJob) -> _Flow:
        cls = self._classes.get(entry.priority)
        if cls is None:
            cls = self._classes[entry.priority] = _Class()
        flow = cls.flows.get(entry.user)
        if flow is None:
            # At the class's virtual time, but never behind every user with work waiting (the
            # high-water mark can pass them when what ran took less than its estimate).
            vtime = min([cls.vtime] + [f.key for f in cls.flows.values() if f.active])
            weight = max(1e-9, float(self._weight_of(entry.user)))
            flow = cls.flows[entry.user] = _Flow(entry.user, weight, vtime * weight, next(self._arrival))
        return flow

    def _activate(self, entry: QueuedJob) -> None:
        if entry.active:
            return
        flow = self._flow(entry)
        entry.active = True
        flow.active += 1
        self._push(entry)

    def _deactivate(self, entry: QueuedJob) -> None:
        entry.active = False
        entry.version += 1
        cls = self._classes.get(entry.priority)
        flow = cls.flows.get(entry.user) if cls is not None else None
        if flow is not None:
            flow.active -= 1

    def _push(self, entry: QueuedJob) -> None:
        entry.version += 1
        flow = self._flow(entry)
        heapq.heappush(flow.heap, (entry.service, next(self._arrival), entry.version, entry.job_id))

    def _top(self, flow: _Flow) -> QueuedJob | None:
        heap = flow.heap
        while heap:
            _, _, version, job_id = heap[0]
            entry = self._jobs.get(job_id)
            if entry is not None and entry.active and entry.version == version:
                return entry
            heapq.heappop(heap)
        return None
