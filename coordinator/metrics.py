"""Prometheus metrics of the coordinator (prometheus-client), served on ``--metrics-port`` by
:func:`qscale.coordinator.http.metrics_app` on the coordinator's event loop.

Each coordinator has its own :class:`~prometheus_client.CollectorRegistry`, so several
embedded coordinators in one process (tests, notebooks) never clash. Counters and histograms
are updated by the scheduler as things happen; gauges read plain integers the scheduler keeps
(scrapes run on the loop, like the scheduler).

Names (all prefixed ``qscale_``):

=====================================  ========  ===========================================
``nodes{state}``                       gauge     nodes alive / draining
``nodes_lost_total{reason}``           counter   nodes declared lost: timeout, stream, drained
``slots{state}``                       gauge     slots busy (attempts in hand) / total
``shards{state}``                      gauge     shards queued / running
``shard_attempts_total{outcome}``      counter   attempts ended: done, failed, refused, lost,
                                                 cancelled, stale
``shards_reassigned_total``            counter   shards requeued after a loss, failure or refusal
``shard_backups_total``                counter   backup copies started for stragglers
``stale_results_dropped_total``        counter   messages from old attempts dropped, not counted
``shots_completed_total``              counter   shots counted (first result of each shard)
``jobs{state}``                        gauge     jobs queued / running
``jobs_finished_total{state}``         counter   jobs done / failed / cancelled
``job_latency_seconds``                histogram submit to final state
``shard_duration_seconds``             histogram dispatch to counted result
``heartbeat_lag_seconds``              histogram time between two heartbeats of a node
``user_jobs{user}``                    gauge     unfinished jobs of each user
``user_shots_queued{user}``            gauge     shots of a user's unfinished jobs not counted yet
``user_slots_busy{user}``              gauge     attempts of a user's shards that nodes hold
``user_slot_seconds_total{user}``      counter   slot-seconds used by a user's attempts
=====================================  ========  ===========================================

The ``user_*`` series are read from the scheduler when scraped (one per user the coordinator
has seen since it started: the users of its tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CoordinatorMetrics"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_HEARTBEAT_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30)


class CoordinatorMetrics:
    """The coordinator's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.nodes = Gauge("qscale_nodes", "Nodes registered, by state", ["state"], registry=r)
        self.nodes_lost = Counter("qscale_nodes_lost", "Nodes declared lost, by reason", ["reason"], registry=r)
        self.slots = Gauge("qscale_slots", "Node slots: busy (attempts in hand) and total", ["state"], registry=r)
        self.shards = Gauge("qscale_shards", "Shards of unfinished jobs, by state", ["state"], registry=r)
        self.attempts = Counter("qscale_shard_attempts", "Shard attempts ended, by outcome", ["outcome"],
                                registry=r)
        self.reassigned = Counter("qscale_shards_reassigned",
                                  "Shards put back in the queue after a node loss, a failure or a refusal",
                                  registry=r)
        self.suspected = Counter("qscale_nodes_suspected",
                                 "Nodes suspected (silent, or their stream broke); their shards get backup copies",
                                 registry=r)
        self.backups = Counter("qscale_shard_backups", "Backup copies started (shards of suspected nodes, slow shards)",
                               registry=r)
        self.stale = Counter("qscale_stale_results_dropped",
                             "Messages about attempts that are no longer current, dropped uncounted", registry=r)
        self.shots = Counter("qscale_shots_completed", "Shots counted (the first result of each shard)", registry=r)
        self.jobs = Gauge("qscale_jobs", "Unfinished jobs, by state", ["state"], registry=r)
        self.jobs_finished = Counter("qscale_jobs_finished", "Jobs that reached a final state", ["state"],
                                     registry=r)
        self.job_latency = Histogram("qscale_job_latency_seconds", "Submit to final state",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.shard_duration = Histogram("qscale_shard_duration_seconds", "Dispatch to counted result of a shard",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.heartbeat_lag = Histogram("qscale_heartbeat_lag_seconds", "Time between two heartbeats of a node",
                                       buckets=_HEARTBEAT_BUCKETS, registry=r)
        for outcome in ("done", "failed", "refused", "lost", "cancelled"):
            self.attempts.labels(outcome)
        for state in ("done", "failed", "cancelled"):
            self.jobs_finished.labels(state)
        for reason in ("timeout", "stream", "drained"):
            self.nodes_lost.labels(reason)

    def bind_users(self, read: Callable[[], Iterable[tuple[str, int, int, int, float]]]) -> None:
        """Serve the ``user_*`` series from ``read()``: (user, unfinished jobs, queued shots, busy
        slots, slot-seconds) per user, called at each scrape."""
        self.registry.register(_UserCollector(read))

    def bind(self, **gauges: Callable[[], float]) -> None:
        """Point gauges at the scheduler's live figures: ``nodes_alive``, ``nodes_draining``,
        ``slots_busy``, ``slots_total``, ``shards_queued``, ``shards_running``, ``jobs_queued``,
        ``jobs_running``."""
        targets: dict[str, Any] = {
            "nodes_alive": self.nodes.labels("alive"), "nodes_draining": self.nodes.labels("draining"),
            "slots_busy": self.slots.labels("busy"), "slots_total": self.slots.labels("total"),
            "shards_queued": self.shards.labels("queued"), "shards_running": self.shards.labels("running"),
            "jobs_queued": self.jobs.labels("queued"), "jobs_running": self.jobs.labels("running"),
        }
        for name, read in gauges.items():
            targets[name].set_function(read)


class _UserCollector(Collector):
    """The per-user series, read when scraped."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, int, int, int, float]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("qscale_user_jobs", "Unfinished jobs of each user", labels=["user"])
        shots = GaugeMetricFamily("qscale_user_shots_queued", "Shots of a user's unfinished jobs not counted yet",
                                  labels=["user"])
        slots = GaugeMetricFamily("qscale_user_slots_busy", "Attempts of a user's shards that nodes hold",
                                  labels=["user"])
        used = CounterMetricFamily("qscale_user_slot_seconds", "Slot-seconds used by a user's attempts",
                                   labels=["user"])
        for user, unfinished, queued, busy, seconds in self._read():
            jobs.add_metric([user], unfinished)
            shots.add_metric([user], queued)
            slots.add_metric([user], busy)
            used.add_metric([user], seconds)
        yield from (jobs, shots, slots, used)
