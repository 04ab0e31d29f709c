"""Carries out the scheduler's decisions on the coordinator's event loop.

* messages go onto the node's Work stream (an ``asyncio.Queue`` drained by its servicer);
* shard results and final job states go to one writer thread that commits whatever has piled
  up in one transaction (group commit: one fsync for many results, none on the event loop);
* watchers of a job are woken once the writes decided with the change are committed, so a job
  is never reported final before its results are on disk.

It also reads what the scheduler does not keep in memory: finished jobs from the store, and
the jobs to recover at start; and applies retention (:meth:`Runtime.maybe_prune`, from the
coordinator's tick): the pruning itself runs on the writer thread, in order with the other writes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from qscale.coordinator.decisions import CloseStream, Decision, FinishJob, Notify, RecordShard, Send
from qscale.coordinator.jobs import FINAL_STATES, Job
from qscale.coordinator.retention import Prune, PrunedJob, retention_policy
from qscale.coordinator.scheduler import Scheduler
from qscale.coordinator.store import Store
from qscale.errors import InvalidArgumentError, NotFoundError

__all__ = ["Runtime", "JobEvents", "Writer"]

log = logging.getLogger(__name__)

_Write = RecordShard | FinishJob | Prune
_Batch = tuple[list[_Write], Callable[[], None] | None]

PRUNE_INTERVAL_S = 1.0
"""Least wall time between two prunes."""


class Writer:
    """A thread that commits writes in groups, in the order they were submitted, and then calls
    each batch's callback on the event loop. Shard results and final states that piled up go in
    one transaction; a :class:`~qscale.coordinator.retention.Prune` runs after them, in one of
    its own (it touches only jobs whose final state is committed)."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.pending = 0
        """Batches submitted and not yet committed (read and written on the loop)."""
        self._thread = threading.Thread(target=self._run, name="qscale-writer", daemon=True)
        self._thread.start()

    def submit(self, writes: list[_Write], then: Callable[[], None] | None = None) -> None:
        self.pending += 1
        self._queue.put((writes, then))

    async def settled(self) -> None:
        """Until everything submitted so far is committed."""
        if self.pending:
            done = self.loop.create_future()
            self.submit([], lambda: done.done() or done.set_result(None))
            await done

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:  # everything that piled up meanwhile goes in the same transaction
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            writes = [w for ws, _ in batch for w in ws]
            prunes = [w for w in writes if isinstance(w, Prune)]
            if prunes:
                writes = [w for w in writes if not isinstance(w, Prune)]
            try:
                if writes:
                    self.store.apply(writes)  # type: ignore[arg-type]
            except Exception:  # a full disk must not stop the cluster; results stay in memory
                log.exception("could not commit %d result(s) and state change(s) to the store", len(writes))
            for prune in prunes:
                self._prune(prune)
            try:
                self.loop.call_soon_threadsafe(self._committed, [then for _, then in batch])
            except RuntimeError:  # the loop is closed: the coordinator stopped
                return

    def _prune(self, prune: Prune) -> None:
        try:
            prune.pruned, prune.deleted = self.store.prune(
                prune.keep, prune.older_than_wall, prune.keep_pruned, now_wall=prune.now_wall, limit=prune.limit,
                pruned_ids=prune.pruned_ids)
            prune.oldest_kept = self.store.oldest_kept()
        except Exception:
            prune.failed = True
            log.exception("retention: could not prune the state")

    def _committed(self, callbacks: list[Callable[[], None] | None]) -> None:
        self.pending -= len(callbacks)
        for callback in callbacks:
            if callback is not None:
                callback()

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)


class _Subscription:
    """One watcher's view of a job's changes: set by a change, cleared by the watcher."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()


class JobEvents:
    """Wakes Watch streams when their job changes. A job has an entry only while someone
    watches it."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[_Subscription]] = {}

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever the job changes, for as long as the ``with`` block lasts."""
        sub = _Subscription()
        self._subscribers.setdefault(job_id, set()).add(sub)
        try:
            yield sub.changed
        finally:
            subs = self._subscribers.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[job_id]

    def notify(self, job_id: str) -> None:
        for sub in self._subscribers.get(job_id, ()):
            sub.changed.set()

    def __len__(self) -> int:
        """Jobs watched now."""
        return len(self._subscribers)


class Runtime:
    """The scheduler, the store and the job events of one coordinator, on its event loop."""

    def __init__(self, core: Scheduler, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.store = store
        self.events = JobEvents()
        self.writer = Writer(store, loop)
        self._prune_due = True
        """Jobs finished since the last prune (and at start: whatever the state holds)."""
        self._prune_running: Prune | None = None
        self._last_prune = float("-inf")
        self._oldest_kept: float | None = None
        """``finished_at`` of the oldest finished job whose results the state keeps (after the last
        prune; None: none, or not known yet)."""

    def apply(self, decisions: Iterable[Decision]) -> None:
        """Carry out decisions in order. Watchers are woken at once when nothing was written,
        otherwise once the writes are committed."""
        writes: list[RecordShard | FinishJob] = []
        notify: dict[str, None] = {}
        for d in decisions:
            if isinstance(d, Send):
                d.stream.put_nowait(d.message)  # type: ignore[attr-defined]
            elif isinstance(d, Notify):
                notify[d.job_id] = None
            elif isinstance(d, CloseStream):
                d.stream.put_nowait(None)  # type: ignore[attr-defined]
            else:
                if isinstance(d, FinishJob):
                    self._prune_due = True
                writes.append(d)
        if writes:
            self.writer.submit(writes, (lambda: self._notify(notify)) if notify else None)
        else:
            self._notify(notify)

    def _notify(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.events.notify(job_id)

    def recover(self, now: float) -> int:
        """Queue every unfinished job of the store again, with the results it already has."""
        recovered = 0
        for job, results in self.store.unfinished_jobs(FINAL_STATES):
            self.apply(self.core.accept(job, job.plan(), now, done=results))
            recovered += 1
        return recovered

    def get_job(self, job_id: str) -> Job:
        """A job by id, from memory or (finished jobs no longer in memory) from the store. A job
        whose results retention pruned is a :class:`~qscale.coordinator.retention.PrunedJob`
        (its status only; not kept in memory)."""
        job = self.core.jobs.get(job_id)
        if job is not None:
            return job
        if len(job_id) > 64:
            raise InvalidArgumentError("job id too long")
        loaded = self.store.load_job(job_id, with_payloads=False)
        if loaded is None:
            raise NotFoundError(f"no job {job_id!r}")
        job, results = loaded
        if isinstance(job, PrunedJob):  # its circuits are gone: nothing to plan
            config = self.core.config
            job.retention = retention_policy(config.keep_jobs, config.keep_jobs_for_s)
            return job
        job.start(job.plan(), results)
        self.core.remember(job)
        return job

    def maybe_prune(self, now_wall: float) -> bool:
        """Apply retention when it may have something to do: at most once per
        :data:`PRUNE_INTERVAL_S` of wall time, when jobs finished since the last prune, the
        oldest kept result may have expired, or the last prune stopped at its batch limit; never
        while one is running. The prune runs on the writer thread; then the jobs it pruned leave
        the scheduler's memory. Call from the event loop (the coordinator's tick). Returns
        whether a prune was started."""
        config = self.core.config
        keep, keep_for = config.keep_jobs, config.keep_jobs_for_s
        if self._prune_running is not None:
            return False
        if self._last_prune <= now_wall < self._last_prune + PRUNE_INTERVAL_S:
            return False  # (a wall clock stepped back does not hold retention off)
        if not keep and not keep_for and self._last_prune > float("-inf"):
            return False  # results are kept for ever: nothing new gets pruned (old records: at start)
        expired = bool(keep_for) and self._oldest_kept is not None and self._oldest_kept + keep_for < now_wall
        if not (self._prune_due or expired):
            return False
        self._prune_due = False
        self._last_prune = now_wall
        prune = Prune(keep=keep, older_than_wall=now_wall - keep_for if keep_for else None,
                      keep_pruned=config.keep_pruned_jobs, now_wall=now_wall)
        self._prune_running = prune
        self.writer.submit([prune], lambda: self._pruned(prune))
        return True

    def _pruned(self, prune: Prune) -> None:
        """On the loop, once a prune is committed: forget its jobs, note what is left."""
        self._prune_running = None
        if prune.failed:
            return  # logged; tried again once more jobs finish
        self._oldest_kept = prune.oldest_kept
        if prune.capped:
            self._prune_due = True  # a backlog: more next time
        if prune.pruned_ids:
            self.core.forget(prune.pruned_ids)  # their results are gone from the store

    def existing_job(self, request_key: str) -> Job | None:
        """The job an earlier Submit with this idempotency key created, if any."""
        if not request_key:
            return None
        if len(request_key) > 128:
            raise InvalidArgumentError("request key too long (at most 128 characters)")
        job_id = self.store.job_for_request_key(request_key)
        return self.get_job(job_id) if job_id is not None else None

    def close(self) -> None:
        """Commit what is queued and stop the writer."""
        self.writer.close()
