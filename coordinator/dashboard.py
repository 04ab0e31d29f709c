"""The coordinator's read-only dashboard, served on ``--dashboard-port`` by aiohttp on the
coordinator's event loop (:mod:`qscale.coordinator.http`).

Routes (``GET``; ``HEAD`` answers the same headers without a body):

======================  =======================================================================
``/``                   the overview: cluster totals, nodes, jobs with progress, shots/s
``/jobs/{job_id}``      a job: progress, its outcome histogram (``?circuit=N`` picks the
                        circuit) and a timeline of its shard attempts, one row per node
``/api/status``         the overview's data as JSON (see :meth:`Dashboard.status`)
``/api/jobs/{job_id}``  a job's data as JSON (see :meth:`Dashboard.job`)
``/static/{name}``      ``dashboard.js`` and ``dashboard.css``
``/healthz``            ``ok`` (never asks for credentials)
======================  =======================================================================

The pages are static files shipped in the package (``qscale/coordinator/static``): the HTML
holds no data; ``dashboard.js`` fetches the JSON every 2 s and renders everything, charts
included (plain SVG), inserting data as text only. Nothing is loaded from outside.

With authentication, a viewer is the user of the client token they present
(:class:`~qscale.coordinator.users.Users`): the job list and the job pages show that user's own
jobs only, unless the user is an admin; the cluster's totals and nodes are everyone's. Without
authentication every viewer sees every job.

Every view is built on the loop from the scheduler's memory, at a bounded cost: at most
``ACTIVE_JOBS_SHOWN`` + ``FINISHED_JOBS_SHOWN`` job rows, ``TOP_OUTCOMES`` outcomes (from the
job's cached top-k) and the last ``TIMELINE_ATTEMPTS`` attempts of a job; a view is reused for
half a second, so viewers never cost the loop more than a few views per second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import Any

from aiohttp import web

from qscale._version import __version__
from qscale.coordinator.http import AUTH_KEY, PAGE_CSP, HttpServer, make_app
from qscale.coordinator.jobs import FINAL_STATES, Attempt, Job
from qscale.coordinator.nodes import Node
from qscale.coordinator.runtime import Runtime
from qscale.coordinator.users import DEFAULT_USER, Identity, Users
from qscale.proto.v1 import common_pb2
from qscale.results import priority_name

__all__ = ["Dashboard", "rate_series"]

log = logging.getLogger(__name__)

FINISHED_JOBS_SHOWN = 50
"""Most recent finished jobs in the overview."""
ACTIVE_JOBS_SHOWN = 200
"""Most unfinished jobs in the overview (the oldest first); the totals count them all."""
LOST_NODES_SHOWN = 20
"""Most recently lost nodes in the overview."""
RATE_NOW_WINDOW_S = 10.0
"""The "shots/s now" figure is the rate over about this many seconds."""
TOP_OUTCOMES = 16
"""Outcomes in a job's histogram (the most frequent)."""
TIMELINE_ATTEMPTS = 1500
"""Most attempts in a job's timeline: the latest ones, plus any older one still running."""
FAILURES_SHOWN = 20
"""Most recent failed, refused or lost attempts listed with their errors."""
ATTEMPT_COLUMNS = ("shard", "node", "sent", "start", "end", "outcome", "backup")
"""The fields of a timeline row: shard index, index into the timeline's ``nodes``; in seconds
from the timeline's ``t0``: when it was sent to the node, when it likely began to run there
(None: it waits in the node's queue, or never ran; see :attr:`Attempt.running_at`) and when it
ended (None: not yet); its outcome; whether it is a backup copy."""

_CACHE_S = 0.5
_CACHED_JOBS = 32
_CACHED_VIEWERS = 64
_EVERYONE = Identity(DEFAULT_USER, True)
"""The viewer without authentication (or behind a bare token predicate): sees every job."""
_DONE = common_pb2.JOB_STATE_DONE
_QUEUED = common_pb2.JOB_STATE_QUEUED
_RUNNING = common_pb2.JOB_STATE_RUNNING
_STATIC = {
    "index.html": "text/html",
    "job.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


def rate_series(samples: Iterable[tuple[float, int]]) -> list[tuple[float, float]]:
    """Shots per second between consecutive ``(time, shots counted)`` samples, stamped with the
    later time. A counter that went down (a new scheduler) counts as 0 for that interval; samples
    whose time did not advance are skipped."""
    series: list[tuple[float, float]] = []
    prev: tuple[float, int] | None = None
    for t, shots in samples:
        if prev is None or t > prev[0]:
            if prev is not None:
                series.append((t, max(0, shots - prev[1]) / (t - prev[0])))
            prev = (t, shots)
    return series


def _state_name(state: int) -> str:
    try:
        return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()
    except ValueError:
        return f"state {state}"


def _progress(done: int, total: int) -> float:
    """Percent, rounded down to 0.1 (100.0 only when every shot is counted)."""
    if total <= 0:
        return 0.0
    return min(100.0, math.floor(1000 * done / total) / 10)


def _node_view(node: Node, now: float, stale_after: float) -> dict[str, Any]:
    caps = node.caps
    age = max(0.0, now - node.last_heard)
    return {
        "node_id": node.node_id,
        "name": caps.name,
        "hostname": caps.hostname,
        "state": node.status,
        "slots": caps.slots,
        "running": len(node.running),
        "cores": caps.cores,
        "memory_budget_bytes": caps.memory_budget_bytes,
        "methods": list(caps.methods),
        "max_statevector_qubits": caps.max_statevector_qubits,
        "qscale_version": caps.qscale_version,
        "qiskit_version": caps.qiskit_version,
        "aer_version": caps.aer_version,
        "registered_at": node.registered_at,
        "shards_done": node.shards_done,
        "last_heartbeat_age_s": round(age, 3),
        "stale": node.state != "lost" and age > stale_after,
    }


def _visible(viewer: Identity, user: str | None) -> bool:
    """Whether ``viewer`` may see a job of ``user`` (None: not known, so admins only)."""
    return viewer.admin or (user is not None and user == viewer.user)


def _job_view(job: Job, now: float) -> dict[str, Any]:
    end = job.finished_at if job.final and job.finished_at else now
    names = [info.name for info in job.infos]
    return {
        "job_id": job.job_id,
        "user": job.user,
        "priority": priority_name(job.priority),
        "pruned": bool(job.pruned),
        "state": _state_name(job.state),
        "final": job.final,
        "detail": True,
        "progress": _progress(job.shots_done, job.shots_total),
        "shots_done": job.shots_done,
        "shots_total": job.shots_total,
        "shards_done": job.shards_done,
        "shards_running": job.shards_running,
        "shards_total": len(job.shards),
        "nodes_used": sorted(job.nodes_used),
        "circuits": len(names),
        "name": names[0][:120] if names else "",
        "created_at": job.created_at,
        "started_at": job.started_at or None,
        "finished_at": job.finished_at or None,
        "wall_s": round(max(0.0, end - job.created_at), 3),
        "error": job.error,
    }


def _row_user(row: Sequence[Any]) -> str | None:
    """The user of a row of the store's job list: its 8th column, None where the store has none."""
    return str(row[7]) if len(row) > 7 and row[7] is not None else None


def _row_view(row: Sequence[Any]) -> dict[str, Any]:
    """A finished job known only from the store's job list (not in memory any more): (job_id,
    created_at, state, shots_total, num_circuits, error, finished_at[, user, priority, pruned])."""
    job_id, created, state, shots, n_circuits, error, finished = row[:7]
    done = state == _DONE
    return {
        "job_id": job_id, "user": _row_user(row) or "",
        "priority": priority_name(int(row[8])) if len(row) > 8 else None,
        "pruned": bool(row[9]) if len(row) > 9 else None,
        "state": _state_name(state), "final": True, "detail": False,
        "progress": 100.0 if done else None, "shots_done": shots if done else None, "shots_total": shots,
        "shards_done": None, "shards_running": 0, "shards_total": None, "nodes_used": None,
        "circuits": n_circuits, "name": "", "created_at": created, "started_at": None,
        "finished_at": finished or None,
        "wall_s": round(max(0.0, finished - created), 3) if finished else None, "error": error,
    }


def _load_static() -> dict[str, bytes]:
    folder = resources.files("qscale.coordinator").joinpath("static")
    try:
        return {name: folder.joinpath(name).read_bytes() for name in _STATIC}
    except OSError as exc:
        raise FileNotFoundError(f"the dashboard's files are missing from the installed package "
                                f"(qscale/coordinator/static: {exc}); reinstall qscale") from exc


class Dashboard:
    """The read-only dashboard of a coordinator, served on the coordinator's event loop.

    Args:
        runtime: the coordinator's runtime (its scheduler and store); read on the loop only.
        users: the coordinator's users. When they are authenticated, every route but
            ``/healthz`` requires a client token, and a viewer sees their own jobs only (an
            admin every job); otherwise (or None) there is no authentication and every viewer
            sees every job.
        tokens: instead of ``users``, a bare predicate: every route but ``/healthz`` requires a
            client token for which it returns True (it should compare in constant time), and
            every such viewer sees every job. Kept for callers that know no users.
        clock: unix time, for wall times and the shots/s samples.
        monotonic: the scheduler's clock, for heartbeat ages.
        history_s: how much shots/s history to keep.
        sample_s: how often ``core.shots_counted`` is sampled.

    Example (in ``CoordinatorServer.start``, on the coordinator's loop; ``tokens`` is the
    :class:`~qscale.security.Tokens` of the gRPC server)::

        dashboard = Dashboard(self.runtime, users=Users.from_config(tokens, config))
        port = await dashboard.start("0.0.0.0", 8080)
        ...
        await dashboard.stop()
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        users: Users | None = None,
        tokens: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        history_s: float = 600.0,
        sample_s: float = 2.0,
    ) -> None:
        if sample_s <= 0 or history_s < sample_s:
            raise ValueError("need sample_s > 0 and history_s >= sample_s")
        if users is not None and tokens is not None:
            raise ValueError("give the dashboard users or a token predicate, not both")
        self.core = runtime.core
        self.store = runtime.store
        self.users = users
        self.tokens = tokens
        self._identify: Callable[[str], Identity | None] | None = None
        """The viewer of a presented token (None: refused); None: no authentication."""
        if users is not None and users.authenticated:
            self._identify = users.identify_token
        elif tokens is not None:
            predicate = tokens
            self._identify = lambda token: _EVERYONE if predicate(token) else None
        self.clock = clock
        self.monotonic = monotonic
        self.history_s = history_s
        self.sample_s = sample_s
        self._files = _load_static()
        self._samples: deque[tuple[float, int]] = deque(maxlen=int(round(history_s / sample_s)) + 1)
        """(time, core.shots_counted), oldest first."""
        self._sampler: asyncio.Task[None] | None = None
        self._server: HttpServer | None = None
        self._status: OrderedDict[Identity, tuple[float, bytes]] = OrderedDict()
        """Recent overviews, per viewer (a viewer's own jobs differ from another's)."""
        self._jobs: OrderedDict[tuple[str, int], tuple[float, int, bytes]] = OrderedDict()

    @property
    def port(self) -> int:
        """The bound port (0 before :meth:`start`)."""
        return self._server.port if self._server is not None else 0

    # ------------------------------------------------------------------ life cycle

    def app(self) -> web.Application:
        """The aiohttp application of the dashboard's routes (authentication included)."""
        return make_app([
            web.get("/", self._page("index.html")),
            web.get(r"/jobs/{job_id:[0-9A-Za-z_.\-]{1,128}}", self._page("job.html")),
            web.get("/static/{name}", self._asset),
            web.get("/api/status", self._api_status),
            web.get(r"/api/jobs/{job_id:[0-9A-Za-z_.\-]{1,128}}", self._api_job),
        ], self._identify)

    async def start(self, host: str, port: int) -> int:
        """Serve on ``host:port`` (port 0: the OS chooses) and start sampling shots/s; returns
        the bound port. Call it on the coordinator's loop.

        Raises:
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            return self._server.port
        server = HttpServer(self.app(), "dashboard", "/",
                            "client token required" if self._identify is not None else "no authentication")
        bound = await server.start(host, port)
        self._server = server
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever(),
                                                               name="qscale-dashboard-sampler")
        return bound

    async def stop(self) -> None:
        """Stop serving and sampling. Safe to call twice."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    async def _sample_forever(self) -> None:
        while True:
            try:
                self._samples.append((self.clock(), int(self.core.shots_counted)))
            except Exception:
                log.exception("dashboard: sampling shots failed")
            await asyncio.sleep(self.sample_s)

    # ------------------------------------------------------------------ routes

    def _page(self, name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def page(request: web.Request) -> web.Response:
            return web.Response(body=self._files[name], content_type=_STATIC[name], charset="utf-8",
                                headers={"Content-Security-Policy": PAGE_CSP})
        return page

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC or name.endswith(".html"):
            raise web.HTTPNotFound()
        return web.Response(body=self._files[name], content_type=_STATIC[name], charset="utf-8")

    @staticmethod
    def _viewer(request: web.Request) -> Identity:
        """Who asks: the identity of their token (every job's viewer without authentication)."""
        who = request.get(AUTH_KEY)
        return who if isinstance(who, Identity) else _EVERYONE

    async def _api_status(self, request: web.Request) -> web.Response:
        viewer = self._viewer(request)
        mono = time.monotonic()
        cached = self._status.get(viewer)
        if cached is None or mono - cached[0] >= _CACHE_S:
            cached = self._status[viewer] = (mono, _json(self.status(viewer)))
            while len(self._status) > _CACHED_VIEWERS:
                self._status.popitem(last=False)
        self._status.move_to_end(viewer)
        return web.Response(body=cached[1], content_type="application/json")

    async def _api_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        text = request.query.get("circuit", "0")
        if not text.isdigit() or len(text) > 9:
            return _json_error(400, f"circuit must be a circuit index (0, 1, ...), not {text[:40]!r}")
        circuit = int(text)
        job = self.core.jobs.get(job_id)
        if job is not None and not _visible(self._viewer(request), job.user):
            job = None  # another user's job: as unknown as one that does not exist
        if job is None:
            return _json_error(404, f"job {job_id} is not among the jobs the coordinator holds in memory (unknown, "
                               "or finished long ago: its result is still in the store)")
        if circuit >= len(job.infos):
            return _json_error(400, f"job {job_id} has {len(job.infos)} circuit(s): no circuit {circuit}")
        mono = time.monotonic()
        key = (job_id, circuit)
        cached = self._jobs.get(key)
        if cached is None or mono - cached[0] >= _CACHE_S or cached[1] != id(job):
            cached = self._jobs[key] = (mono, id(job), _json(self.job(job, circuit)))
            while len(self._jobs) > _CACHED_JOBS:
                self._jobs.popitem(last=False)
        self._jobs.move_to_end(key)
        return web.Response(body=cached[2], content_type="application/json")

    # ------------------------------------------------------------------ views

    def status(self, viewer: Identity = _EVERYONE) -> dict[str, Any]:
        """The overview (JSON-able) as ``viewer`` sees it: the jobs they may see (every job for
        an admin, their own otherwise), everyone's totals and nodes. Call it on the
        coordinator's loop.

        Keys: ``version``, ``now`` (unix s), ``viewer`` (``user``, ``admin``, ``authenticated``),
        ``totals`` (nodes_alive, nodes_draining, nodes_lost,
        slots_busy, slots_total, jobs_running, jobs_queued, shards_queued, shards_running,
        shots_counted, shots_per_s, stale_results_dropped), ``nodes`` (live nodes, then up to 20
        recently lost ones: id, capabilities, state, running, last_heartbeat_age_s, stale...),
        ``jobs`` (unfinished ones, then the 50 most recent finished ones: user, priority, state,
        progress in %, shots and shards done/total, nodes_used, wall_s, error, ``detail``
        (whether ``/api/jobs/{id}`` knows it)...; None where unknown), ``jobs_active_total``
        (the viewer's),
        ``stale_after_s`` and ``shots_per_s`` (``sample_s``, ``history_s`` and ``points``:
        [time, shots/s] pairs, oldest first).
        """
        core = self.core
        now = self.clock()
        config = core.config
        stale_after = min(config.heartbeat_timeout_s, max(3.0, 2.0 * config.heartbeat_interval_s))
        live = list(core.nodes.values())
        lost = list(core.registry.lost.values())[-LOST_NODES_SHOWN:][::-1]
        age_now = self.monotonic()
        nodes = [_node_view(n, age_now, stale_after) for n in live + lost]
        alive = [n for n in live if n.state == "alive"]

        active: list[Job] = []
        finished: list[Job] = []
        everyone: list[Job] = []  # unfinished, every user's: for the totals
        for job in core.jobs.values():
            if not job.final:
                everyone.append(job)
            if _visible(viewer, job.user):
                (finished if job.final else active).append(job)
        active.sort(key=lambda j: j.created_at)
        finished.sort(key=lambda j: j.finished_at or j.created_at, reverse=True)
        jobs = [_job_view(j, now) for j in active[:ACTIVE_JOBS_SHOWN]]
        recent = [_job_view(j, now) for j in finished[:FINISHED_JOBS_SHOWN]]
        if len(recent) < FINISHED_JOBS_SHOWN:  # after a restart: older jobs are only in the store
            known = {j.job_id for j in core.jobs.values()}
            limit = min(1000, FINISHED_JOBS_SHOWN + len(active))
            for row in self._stored_jobs(limit, viewer):
                if row[0] not in known and row[2] in FINAL_STATES and _visible(viewer, _row_user(row)):
                    recent.append(_row_view(row))
            recent.sort(key=lambda j: j["finished_at"] or j["created_at"], reverse=True)
        jobs += recent[:FINISHED_JOBS_SHOWN]

        samples = list(self._samples)
        points = rate_series(samples)
        # "Now": from the oldest sample of the last few seconds to the live counter.
        window = [s for s in samples if s[0] >= now - RATE_NOW_WINDOW_S] or samples[-1:]
        if window and now - window[0][0] >= self.sample_s:
            rate_now = max(0, core.shots_counted - window[0][1]) / (now - window[0][0])
        else:  # just started: too short an interval to say
            rate_now = points[-1][1] if points else 0.0
        return {
            "version": __version__,
            "now": now,
            "viewer": {"user": viewer.user, "admin": viewer.admin, "authenticated": self._identify is not None},
            "stale_after_s": stale_after,
            "totals": {
                "nodes_alive": len(alive),
                "nodes_draining": sum(1 for n in live if n.state == "draining"),
                "nodes_lost": len(core.registry.lost),
                "slots_busy": sum(min(len(n.running), n.caps.slots) for n in alive),
                "slots_total": sum(n.caps.slots for n in alive),
                "jobs_running": sum(1 for j in everyone if j.state == _RUNNING),
                "jobs_queued": sum(1 for j in everyone if j.state == _QUEUED),
                "shards_queued": sum(j.shards_queued for j in everyone),
                "shards_running": sum(j.shards_running for j in everyone),
                "shots_counted": core.shots_counted,
                "shots_per_s": round(rate_now, 3),
                "stale_results_dropped": core.stale_dropped,
            },
            "nodes": nodes,
            "jobs": jobs,
            "jobs_active_total": len(active),
            "shots_per_s": {"sample_s": self.sample_s, "history_s": self.history_s,
                            "points": [[round(t, 3), round(r, 3)] for t, r in points]},
        }

    def _stored_jobs(self, limit: int, viewer: Identity) -> Sequence[Sequence[Any]]:
        """The newest rows of the store's job list that ``viewer`` may see."""
        return self.store.list_jobs(limit, None if viewer.admin else viewer.user)

    def job(self, job: Job, circuit: int = 0) -> dict[str, Any]:
        """A job's page (JSON-able). Call it on the coordinator's loop.

        It does not check who asks: the route does (a viewer's own job, or any for an admin).

        Keys: ``version``, ``now``; ``job`` (the overview's row, plus ``method``, ``seed``,
        ``estimator``, ``shards_queued``); ``circuit`` (``index``, ``count`` of circuits, ``name``,
        ``num_qubits``, ``num_clbits``, ``shots`` so far, running shards' finished chunks
        included, ``outcomes``: the ``TOP_OUTCOMES`` most frequent as [bitstring, count], most
        frequent first, ``other_shots``: the shots of all the others; no outcomes for an
        estimator job); ``timeline`` (``t0``, ``t1``: unix s of the job's start and end (now
        while it runs), ``nodes``: [{node_id, state}], ``columns`` and ``attempts``: rows of
        :data:`ATTEMPT_COLUMNS`, oldest first, ``attempts_total`` and ``attempts_shown``);
        ``failures`` (the latest failed, refused or lost attempts of the timeline with their
        ``error``).
        """
        core = self.core
        now = self.clock()
        view = _job_view(job, now)
        view.update(method=job.method, seed=job.seed, estimator=job.estimator, shards_queued=job.shards_queued)

        info = job.infos[circuit]
        outcomes: list[list[Any]] = []
        shots = other = 0
        if job.totals and not job.estimator:
            totals = job.totals[circuit]
            top = totals.top(TOP_OUTCOMES)
            counts = top.to_dict(info.num_clbits, info.creg_sizes)
            outcomes = [[bits, int(n)] for bits, n in counts.items()]
            shots = int(totals.progress_shots)
            other = max(0, shots - sum(n for _, n in outcomes))

        tail = job.attempts[-TIMELINE_ATTEMPTS:]
        shown = {id(a) for a in tail}
        older = [a for a in core.attempts.values() if a.job_id == job.job_id and id(a) not in shown]
        attempts = sorted(older, key=lambda a: a.started_at) + tail
        t0 = job.started_at or job.created_at
        if attempts:
            t0 = min(t0, attempts[0].started_at)
        t1 = job.finished_at if job.final and job.finished_at else now
        index: dict[str, int] = {}
        rows = []
        for a in attempts:
            node = index.setdefault(a.node_id, len(index))
            end = round(a.ended_at - t0, 3) if not a.running and a.ended_at else None
            start = round(a.running_at - t0, 3) if a.running_at else None
            rows.append([a.shard_index, node, round(a.started_at - t0, 3), start, end, a.outcome, a.backup])
        failures = [_failure(a, t0) for a in attempts if a.error and a.outcome in ("failed", "refused", "lost")]
        return {
            "version": __version__,
            "now": now,
            "job": view,
            "circuit": {
                "index": circuit, "count": len(job.infos), "name": info.name[:200],
                "num_qubits": info.num_qubits, "num_clbits": info.num_clbits,
                "shots": shots, "outcomes": outcomes, "other_shots": other,
            },
            "timeline": {
                "t0": t0, "t1": max(t0, t1),
                "nodes": [{"node_id": n, "state": self._node_state(n)} for n in index],
                "columns": list(ATTEMPT_COLUMNS),
                "attempts": rows,
                "attempts_total": len(job.attempts),
                "attempts_shown": len(rows),
            },
            "failures": failures[-FAILURES_SHOWN:][::-1],
        }

    def _node_state(self, node_id: str) -> str:
        node = self.core.nodes.get(node_id) or self.core.registry.lost.get(node_id)
        return node.status if node is not None else "gone"


def _failure(attempt: Attempt, t0: float) -> dict[str, Any]:
    return {"shard": attempt.shard_index, "node_id": attempt.node_id, "outcome": attempt.outcome,
            "at": round((attempt.ended_at or attempt.started_at) - t0, 3), "error": attempt.error[:300]}


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def _json_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=_json({"error": message}), content_type="application/json")
