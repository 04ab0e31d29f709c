"""The coordinator's read-only status page, served on ``--dashboard-port``.

Routes (``GET``; ``HEAD`` answers the same headers without a body):

==================  ===========================================================================
``/``               the page: cluster totals, nodes, jobs with progress, a shots/s sparkline;
                    it refreshes itself from ``/api/status`` every 2 s (no reload)
``/api/status``     the JSON snapshot the page shows (see :meth:`Dashboard.status`)
``/healthz``        ``ok`` (never asks for credentials)
==================  ===========================================================================

Anything else is 404, any other method 405. With authentication on (``tokens`` given), every
route but ``/healthz`` asks for a client (API) token: as the password of HTTP Basic (any user
name) or as ``Authorization: Bearer <token>``; without one it answers 401 with
``WWW-Authenticate: Basic realm="qscale"``, so a browser prompts for it and then resends it with
the page's own requests.

The page needs no build step and no outside network: inline CSS and vanilla JS, allowed by a
``Content-Security-Policy`` with a fresh nonce per response; data is inserted as text only.

Threading: the HTTP server runs in daemon threads (:class:`http.server.ThreadingHTTPServer`),
while the :class:`~qscale.coordinator.scheduler.Scheduler` lives on the coordinator's event loop
and is not thread-safe. The HTTP threads never touch it: a snapshot (plain JSON-able data) is
built by a coroutine on the loop and handed over; when the loop does not answer in time the
request gets 503. A task on the loop samples ``shots_counted`` every ``sample_s`` seconds and
keeps ``history_s / sample_s`` samples for the shots/s series.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import html
import json
import logging
import math
import re
import secrets
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from qscale._version import __version__
from qscale.coordinator.jobs import FINAL_STATES, Job
from qscale.coordinator.nodes import Node
from qscale.coordinator.runtime import Runtime
from qscale.proto.v1 import common_pb2

__all__ = ["Dashboard", "rate_series"]

log = logging.getLogger(__name__)

FINISHED_JOBS_SHOWN = 50
"""Most recent finished jobs in a snapshot."""
ACTIVE_JOBS_SHOWN = 200
"""Most unfinished jobs in a snapshot (the oldest first); the totals count them all."""
LOST_NODES_SHOWN = 20
"""Most recently lost nodes in a snapshot."""
RATE_NOW_WINDOW_S = 10.0
"""The "shots/s now" figure is the rate over about this many seconds."""
_CACHE_S = 0.5  # snapshots are reused this long: viewers never cost the loop more than 2 snapshots/s
_MAX_CONNECTIONS = 32  # connections served at once; more are closed at once
_REQUEST_TIMEOUT_S = 10.0  # a client that sends nothing for this long is disconnected
_MAX_AUTH_HEADER = 4096

_DONE = common_pb2.JOB_STATE_DONE
_QUEUED = common_pb2.JOB_STATE_QUEUED
_RUNNING = common_pb2.JOB_STATE_RUNNING
_PLAIN_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


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


def _job_view(job: Job, now: float) -> dict[str, Any]:
    end = job.finished_at if job.final and job.finished_at else now
    names = [info.name for info in job.infos]
    return {
        "job_id": job.job_id,
        "state": _state_name(job.state),
        "final": job.final,
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


def _row_view(row: Sequence[Any]) -> dict[str, Any]:
    """A finished job known only from the store's job list (not in memory any more)."""
    job_id, created, state, shots, n_circuits, error, finished = row
    done = state == _DONE
    return {
        "job_id": job_id, "state": _state_name(state), "final": True,
        "progress": 100.0 if done else None, "shots_done": shots if done else None, "shots_total": shots,
        "shards_done": None, "shards_running": 0, "shards_total": None, "nodes_used": None,
        "circuits": n_circuits, "name": "", "created_at": created, "started_at": None,
        "finished_at": finished or None,
        "wall_s": round(max(0.0, finished - created), 3) if finished else None, "error": error,
    }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self._slots = threading.BoundedSemaphore(_MAX_CONNECTIONS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can hang offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("dashboard: too many connections; closing one from %s", client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "qscale-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    timeout = _REQUEST_TIMEOUT_S

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("dashboard %s: " + format, self.client_address[0], *args)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.command not in ("GET", "HEAD"):
            self._guarded(allowed=False)
            return False  # answered: the base class dispatches nothing
        return True

    def do_GET(self) -> None:  # noqa: N802 - the base class's naming
        self._guarded(allowed=True)

    do_HEAD = do_GET  # noqa: N815

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests (the base class's errors) get a plain answer with our headers."""
        self.close_connection = True
        self._reply(code, f"{code} {HTTPStatus(code).phrase}\n".encode(), "text/plain; charset=utf-8")

    def _guarded(self, allowed: bool) -> None:
        try:
            self._route(allowed)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception:
            log.exception("dashboard: %s %s failed", self.command, urlsplit(self.path).path[:200])
            try:
                self._reply(500, b"500 Internal Server Error\n", "text/plain; charset=utf-8")
            except OSError:
                pass

    def _route(self, allowed: bool) -> None:
        dashboard = self.server.dashboard
        path = urlsplit(self.path).path
        if path == "/healthz":
            if allowed:
                self._reply(200, b"ok\n", "text/plain; charset=utf-8")
            else:
                self._reply(405, b"405 Method Not Allowed\n", "text/plain; charset=utf-8", allow=True)
            return
        if not dashboard.authorised(self._presented_token()):
            log.debug("dashboard: %s %s from %s without a valid client token", self.command, path[:200],
                      self.client_address[0])
            self._reply(401, b"401 Unauthorized: present a client token (HTTP Basic password or Bearer)\n",
                        "text/plain; charset=utf-8",
                        extra={"WWW-Authenticate": 'Basic realm="qscale", charset="UTF-8"'})
            return
        if not allowed:
            self._reply(405, b"405 Method Not Allowed\n", "text/plain; charset=utf-8", allow=True)
        elif path == "/":
            snapshot = dashboard.status()
            nonce = secrets.token_urlsafe(18)
            self._reply(200 if snapshot is not None else 503, render_page(snapshot, nonce),
                        "text/html; charset=utf-8", nonce=nonce)
        elif path == "/api/status":
            snapshot = dashboard.status()
            if snapshot is None:
                self._reply(503, b'{"error": "the coordinator did not answer in time"}\n',
                            "application/json")
            else:
                body = json.dumps(snapshot, separators=(",", ":"), allow_nan=False).encode()
                self._reply(200, body, "application/json")
        else:
            self._reply(404, b"404 Not Found\n", "text/plain; charset=utf-8")

    def _presented_token(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header or len(header) > _MAX_AUTH_HEADER:
            return None
        scheme, _, value = header.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer":
            return value or None
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
            _user, colon, password = decoded.partition(":")
            return password if colon and password else None
        return None

    def _reply(self, status: int, body: bytes, content_type: str, *, nonce: str | None = None,
               allow: bool = False, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _page_csp(nonce) if nonce else _PLAIN_CSP)
        if allow:
            self.send_header("Allow", "GET, HEAD")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _page_csp(nonce: str) -> str:
    return (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Dashboard:
    """The read-only status page of a coordinator, over HTTP from a daemon thread.

    Args:
        runtime: the coordinator's runtime (its scheduler and store); read only on ``loop``.
        loop: the event loop ``runtime`` lives on.
        host: address to listen on (an IPv6 address works too).
        port: port to listen on; 0 lets the OS choose (see the return value of :meth:`start`).
        tokens: when given, every route but ``/healthz`` requires a client token for which this
            predicate returns True (it should compare in constant time); None: no authentication.
        clock: unix time, for wall times and the shots/s samples.
        monotonic: the scheduler's clock, for heartbeat ages.
        history_s: how much shots/s history to keep.
        sample_s: how often ``core.shots_counted`` is sampled.
        snapshot_timeout_s: how long a request waits for the loop before answering 503.

    Example (in ``CoordinatorServer.start``, on the coordinator's loop; ``tokens`` is the
    :class:`~qscale.security.Tokens` of the gRPC server)::

        dashboard = Dashboard(self.runtime, asyncio.get_running_loop(), host=host, port=port,
                              tokens=(lambda t: tokens.role_of(t) == CLIENT) if tokens.enabled else None)
        port = dashboard.start()
        ...
        dashboard.stop()
    """

    def __init__(
        self,
        runtime: Runtime,
        loop: asyncio.AbstractEventLoop,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        tokens: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        history_s: float = 600.0,
        sample_s: float = 2.0,
        snapshot_timeout_s: float = 5.0,
    ) -> None:
        if sample_s <= 0 or history_s < sample_s:
            raise ValueError("need sample_s > 0 and history_s >= sample_s")
        self.core = runtime.core
        self.store = runtime.store
        self.loop = loop
        self.host = host.strip("[]")
        self.port = port
        self.tokens = tokens
        self.clock = clock
        self.monotonic = monotonic
        self.history_s = history_s
        self.sample_s = sample_s
        self.snapshot_timeout_s = snapshot_timeout_s
        self._samples: deque[tuple[float, int]] = deque(maxlen=int(round(history_s / sample_s)) + 1)
        """(time, core.shots_counted): written and read on the loop only."""
        self._sampler: asyncio.Task[None] | None = None
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._cache: dict[str, Any] | None = None
        self._cache_at = -math.inf
        self._cache_lock = threading.Lock()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> int:
        """Bind and serve from a daemon thread; returns the bound port. Never waits on the loop,
        so it may be called from the loop's own thread.

        Raises:
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            return self.port
        self._server = _HTTPServer((self.host, self.port), self)
        self.port = int(self._server.server_address[1])
        self._stopped = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="qscale-dashboard", daemon=True)
        self._thread.start()
        try:
            self.loop.call_soon_threadsafe(self._begin_sampling)
        except RuntimeError:  # the loop is closed
            self.stop()
            raise
        host = f"[{self.host}]" if ":" in self.host else self.host
        log.info("dashboard on http://%s:%d/ (%s)", host, self.port,
                 "client token required" if self.tokens is not None else "no authentication")
        return self.port

    def stop(self) -> None:
        """Stop serving and sampling. Safe to call twice, and from the loop's thread."""
        self._stopped = True
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._end_sampling()
        else:
            try:
                self.loop.call_soon_threadsafe(self._end_sampling)
            except RuntimeError:  # the loop is closed: nothing runs on it any more
                pass

    def _begin_sampling(self) -> None:
        if not self._stopped and self._sampler is None:
            self._sampler = self.loop.create_task(self._sample_forever(), name="qscale-dashboard-sampler")

    def _end_sampling(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None

    async def _sample_forever(self) -> None:
        while True:
            try:
                self._samples.append((self.clock(), int(self.core.shots_counted)))
            except Exception:
                log.exception("dashboard: sampling shots failed")
            await asyncio.sleep(self.sample_s)

    # ------------------------------------------------------------------ requests

    def authorised(self, token: str | None) -> bool:
        """Whether a request presenting ``token`` (None: no token) may read the dashboard."""
        if self.tokens is None:
            return True
        if not token:
            return False
        try:
            return bool(self.tokens(token))
        except Exception as exc:  # the message could quote the token: log its type only
            log.error("dashboard: token check failed (%s)", type(exc).__name__)
            return False

    def status(self) -> dict[str, Any] | None:
        """The current snapshot (JSON-able), built on the loop; None when the loop did not answer
        within ``snapshot_timeout_s``. Snapshots are reused for half a second. Call it from any
        thread but the loop's.

        Keys: ``version``, ``now`` (unix s), ``totals`` (nodes_alive, nodes_draining, nodes_lost,
        slots_busy, slots_total, jobs_running, jobs_queued, shards_queued, shards_running,
        shots_counted, shots_per_s, stale_results_dropped), ``nodes`` (live nodes, then up to 20
        recently lost ones: id, capabilities, state, running, last_heartbeat_age_s, stale...),
        ``jobs`` (unfinished ones, then the 50 most recent finished ones: state, progress in %,
        shots and shards done/total, nodes_used, wall_s, error...; None where unknown),
        ``jobs_active_total``, ``stale_after_s`` and ``shots_per_s`` (``sample_s``,
        ``history_s`` and ``points``: [time, shots/s] pairs, oldest first).
        """
        deadline = time.monotonic() + self.snapshot_timeout_s
        if not self._cache_lock.acquire(timeout=self.snapshot_timeout_s):
            return None
        try:
            if self._cache is not None and time.monotonic() - self._cache_at < _CACHE_S:
                return self._cache
            coro = self._snapshot()
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            except RuntimeError:  # the loop is closed
                coro.close()
                return None
            try:
                snapshot = future.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                future.cancel()
                log.warning("dashboard: the coordinator's loop did not answer within %.1fs",
                            self.snapshot_timeout_s)
                return None
            except concurrent.futures.CancelledError:
                return None
            self._cache, self._cache_at = snapshot, time.monotonic()
            return snapshot
        finally:
            self._cache_lock.release()

    async def _snapshot(self) -> dict[str, Any]:
        """Runs on the loop: everything the page shows, as plain data."""
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
        for job in core.jobs.values():
            (finished if job.final else active).append(job)
        active.sort(key=lambda j: j.created_at)
        finished.sort(key=lambda j: j.finished_at or j.created_at, reverse=True)
        jobs = [_job_view(j, now) for j in active[:ACTIVE_JOBS_SHOWN]]
        recent = [_job_view(j, now) for j in finished[:FINISHED_JOBS_SHOWN]]
        if len(recent) < FINISHED_JOBS_SHOWN:  # after a restart: older jobs are only in the store
            known = {j.job_id for j in core.jobs.values()}
            limit = min(1000, FINISHED_JOBS_SHOWN + len(active))
            for row in self.store.recent_jobs(limit):
                if row[0] not in known and row[2] in FINAL_STATES:
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
            "stale_after_s": stale_after,
            "totals": {
                "nodes_alive": len(alive),
                "nodes_draining": sum(1 for n in live if n.state == "draining"),
                "nodes_lost": len(core.registry.lost),
                "slots_busy": sum(min(len(n.running), n.caps.slots) for n in alive),
                "slots_total": sum(n.caps.slots for n in alive),
                "jobs_running": sum(1 for j in active if j.state == _RUNNING),
                "jobs_queued": sum(1 for j in active if j.state == _QUEUED),
                "shards_queued": sum(j.shards_queued for j in active),
                "shards_running": sum(j.shards_running for j in active),
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


# ---------------------------------------------------------------------- the page

def _fmt_int(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def _fmt_age(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{round(s)} s"
    if s < 7200:
        return f"{round(s / 60)} min"
    return f"{s / 3600:.1f} h"


def _fmt_bytes(b: int) -> str:
    if not b:
        return "–"
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _fmt_rate(r: float) -> str:
    return f"{round(r):,}" if r >= 100 else f"{r:.1f}"


def _td(text: str, cls: str = "") -> str:
    return f'<td class="{html.escape(cls)}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"


def _render_nodes(snapshot: dict[str, Any]) -> str:
    rows = []
    for n in snapshot["nodes"]:
        cls = " ".join(c for c, on in (("stale", n["stale"]), ("lost", n["state"] == "lost")) if on)
        cells = (
            _td(n["node_id"], "mono"), _td(n["hostname"]), _td(n["state"], f"state-{n['state']}"),
            _td(str(n["slots"]), "num"), _td(str(n["running"]), "num"), _td(str(n["cores"]), "num"),
            _td(_fmt_bytes(n["memory_budget_bytes"]), "num"), _td(", ".join(n["methods"]), "methods"),
            _td(str(n["max_statevector_qubits"] or "–"), "num"), _td(_fmt_int(n["shards_done"]), "num"),
            _td(_fmt_age(n["last_heartbeat_age_s"]), "num hb"),
        )
        rows.append((f'<tr class="{cls}">' if cls else "<tr>") + "".join(cells) + "</tr>")
    return "".join(rows) or '<tr><td colspan="11" class="muted">no nodes</td></tr>'


def _render_jobs(snapshot: dict[str, Any]) -> str:
    rows = []
    for j in snapshot["jobs"]:
        progress = j["progress"]
        bar = ('<td class="progress">' + (f'<progress max="100" value="{progress}"></progress> {progress:.1f}%'
                                          if progress is not None else "–") + "</td>")
        name = j["name"] + (f" (+{j['circuits'] - 1})" if j["circuits"] > 1 and j["name"] else "")
        cells = (
            _td(j["job_id"], "mono"), _td(j["state"], f"state-{j['state']}"), bar,
            _td(f"{_fmt_int(j['shots_done'])} / {_fmt_int(j['shots_total'])}", "num"),
            _td(f"{_fmt_int(j['shards_done'])} / {_fmt_int(j['shards_total'])}", "num"),
            _td(str(len(j["nodes_used"])) if j["nodes_used"] is not None else "–", "num"),
            _td(name or f"{j['circuits']} circuit(s)", "name"), _td(_fmt_age(j["wall_s"]), "num"),
            _td(j["error"], "err"),
        )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(rows) or '<tr><td colspan="9" class="muted">no jobs yet</td></tr>'


def _render_totals(snapshot: dict[str, Any] | None) -> dict[str, str]:
    if snapshot is None:
        return {k: "–" for k in ("NODES", "SLOTS", "JOBS", "RATE", "SHOTS")}
    t = snapshot["totals"]
    return {
        "NODES": f"{t['nodes_alive']} / {t['nodes_lost']}",
        "SLOTS": f"{t['slots_busy']} / {t['slots_total']}",
        "JOBS": f"{t['jobs_running']} / {t['jobs_queued']}",
        "RATE": _fmt_rate(t["shots_per_s"]),
        "SHOTS": _fmt_int(t["shots_counted"]),
    }


def render_page(snapshot: dict[str, Any] | None, nonce: str) -> bytes:
    """The page, with the tables of ``snapshot`` already in it (readable without JavaScript)."""
    values = _render_totals(snapshot)
    values["NODE_ROWS"] = _render_nodes(snapshot) if snapshot else ""
    values["JOB_ROWS"] = _render_jobs(snapshot) if snapshot else ""
    values["BANNER"] = "" if snapshot else "The coordinator did not answer in time; retrying…"
    values["BANNER_CLASS"] = "" if snapshot else "show"
    values["VERSION"] = html.escape(__version__)
    values["NONCE"] = nonce
    # One pass over the template: text from the snapshot is never scanned for placeholders.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _PAGE).encode()


_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>qscale</title>
<link rel="icon" href="data:,">
<style nonce="{{NONCE}}">
:root { color-scheme: light dark; --fg: #1d2330; --muted: #6b7585; --bg: #f4f5f7; --card: #fff; --line: #e2e5ea;
  --accent: #2f6fde; --warn: #b35c00; --bad: #c0362c; --ok: #1f8a4c; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e9ef; --muted: #9aa3b2; --bg: #14171c; --card: #1c2027;
  --line: #2c323c; --accent: #6aa0ff; --warn: #f0a040; --bad: #ff6b5e; --ok: #4cc27a; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  background: var(--bg); color: var(--fg); }
header { display: flex; align-items: center; gap: 2rem; flex-wrap: wrap; padding: .7rem 1.2rem;
  background: var(--card); border-bottom: 1px solid var(--line); }
header h1 { margin: 0 1rem 0 0; font-size: 1.4rem; letter-spacing: .02em; }
.stat { display: flex; flex-direction: column; }
.stat b { font-size: 1.25rem; font-variant-numeric: tabular-nums; }
.stat span { color: var(--muted); font-size: .72rem; text-transform: uppercase; letter-spacing: .05em; }
#banner { display: none; margin: 1rem 1.2rem 0; padding: .5rem .8rem; border-radius: 6px;
  background: var(--card); border: 1px solid var(--bad); color: var(--bad); }
#banner.show { display: block; }
main { padding: 1rem 1.2rem; display: grid; gap: 1rem; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: .6rem .9rem;
  overflow-x: auto; }
h2 { font-size: 1rem; margin: .1rem 0 .5rem; }
h2 .muted { font-weight: normal; font-size: .85rem; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .28rem .55rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { color: var(--muted); font-weight: 600; font-size: .78rem; }
tbody tr:last-child td { border-bottom: none; }
.num { text-align: right; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85rem; }
.muted { color: var(--muted); }
.state-alive, .state-done { color: var(--ok); }
.state-draining, .state-queued { color: var(--warn); }
.state-lost, .state-failed { color: var(--bad); }
.state-running { color: var(--accent); }
.state-cancelled { color: var(--muted); }
tr.stale td.hb { color: var(--bad); font-weight: 700; }
tr.lost td { opacity: .55; }
td.methods, td.name { white-space: normal; max-width: 18rem; overflow-wrap: anywhere; }
td.err { white-space: normal; max-width: 26rem; color: var(--bad); overflow-wrap: anywhere; }
progress { width: 7rem; height: .75rem; vertical-align: middle; accent-color: var(--accent); }
.spark-wrap { display: flex; gap: 1rem; align-items: stretch; }
#spark { flex: 1; height: 90px; display: block; border-bottom: 1px solid var(--line); }
#spark-line { fill: none; stroke: var(--accent); stroke-width: 1.6; }
#spark-area { fill: var(--accent); opacity: .14; stroke: none; }
.spark-axis { display: flex; flex-direction: column; justify-content: space-between; color: var(--muted);
  font-size: .75rem; text-align: right; min-width: 5rem; }
footer { color: var(--muted); font-size: .78rem; padding: 0 1.2rem 1rem; }
</style>
</head>
<body>
<header>
  <h1>qscale</h1>
  <div class="stat"><b id="t-nodes">{{NODES}}</b><span>nodes alive / lost</span></div>
  <div class="stat"><b id="t-slots">{{SLOTS}}</b><span>slots busy / total</span></div>
  <div class="stat"><b id="t-jobs">{{JOBS}}</b><span>jobs running / queued</span></div>
  <div class="stat"><b id="t-rate">{{RATE}}</b><span>shots/s now</span></div>
  <div class="stat"><b id="t-shots">{{SHOTS}}</b><span>shots counted</span></div>
</header>
<div id="banner" class="{{BANNER_CLASS}}" role="status">{{BANNER}}</div>
<main>
<section>
  <h2>Shots per second <span class="muted" id="spark-window">last 10 minutes</span></h2>
  <div class="spark-wrap">
    <svg id="spark" viewBox="0 0 1000 100" preserveAspectRatio="none" role="img" aria-label="shots per second">
      <polygon id="spark-area" points=""></polygon>
      <polyline id="spark-line" points="" vector-effect="non-scaling-stroke"></polyline>
    </svg>
    <div class="spark-axis"><span id="spark-max">–</span><span>0 shots/s</span></div>
  </div>
</section>
<section>
  <h2>Nodes</h2>
  <table>
    <thead><tr><th>node</th><th>host</th><th>state</th><th class="num">slots</th><th class="num">running</th>
      <th class="num">cores</th><th class="num">memory budget</th><th>methods</th><th class="num">max qubits</th>
      <th class="num">shards done</th><th class="num">last heartbeat</th></tr></thead>
    <tbody id="nodes">{{NODE_ROWS}}</tbody>
  </table>
</section>
<section>
  <h2>Jobs</h2>
  <table>
    <thead><tr><th>job</th><th>state</th><th>progress</th><th class="num">shots</th><th class="num">shards</th>
      <th class="num">nodes</th><th>circuits</th><th class="num">wall time</th><th>error</th></tr></thead>
    <tbody id="jobs">{{JOB_ROWS}}</tbody>
  </table>
</section>
</main>
<footer><span id="updated">server-rendered</span> · qscale {{VERSION}} · read-only · refreshes every 2 s</footer>
<script nonce="{{NONCE}}">
"use strict";
(() => {
  const REFRESH_MS = 2000;
  const $ = (id) => document.getElementById(id);
  const fmtInt = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US");
  const fmtAge = (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  };
  const fmtBytes = (b) => !b ? "–" : b >= 2 ** 30 ? (b / 2 ** 30).toFixed(1) + " GiB" : (b / 2 ** 20).toFixed(0) + " MiB";
  const fmtRate = (r) => r >= 100 ? Math.round(r).toLocaleString("en-US") : Number(r).toFixed(1);

  // Every string from the server goes in as text (textContent), never as markup.
  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = (text === null || text === undefined) ? "–" : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }
  function emptyRow(cols, text) {
    const tr = document.createElement("tr");
    const td = cell(tr, text, "muted");
    td.colSpan = cols;
    return tr;
  }
  function renderNodes(nodes) {
    const rows = nodes.map((n) => {
      const tr = document.createElement("tr");
      if (n.stale) tr.classList.add("stale");
      if (n.state === "lost") tr.classList.add("lost");
      const id = cell(tr, n.node_id, "mono");
      id.title = [n.name, "qscale " + n.qscale_version, "qiskit " + n.qiskit_version, "aer " + n.aer_version].join(" · ");
      cell(tr, n.hostname);
      cell(tr, n.state, "state-" + n.state);
      cell(tr, n.slots, "num");
      cell(tr, n.running, "num");
      cell(tr, n.cores, "num");
      cell(tr, fmtBytes(n.memory_budget_bytes), "num");
      cell(tr, (n.methods || []).join(", "), "methods");
      cell(tr, n.max_statevector_qubits || "–", "num");
      cell(tr, fmtInt(n.shards_done), "num");
      cell(tr, fmtAge(n.last_heartbeat_age_s), "num hb");
      return tr;
    });
    $("nodes").replaceChildren(...(rows.length ? rows : [emptyRow(11, "no nodes")]));
  }
  function renderJobs(jobs) {
    const rows = jobs.map((j) => {
      const tr = document.createElement("tr");
      cell(tr, j.job_id, "mono");
      cell(tr, j.state, "state-" + j.state);
      const td = document.createElement("td");
      td.className = "progress";
      if (j.progress === null || j.progress === undefined) {
        td.textContent = "–";
      } else {
        const bar = document.createElement("progress");
        bar.max = 100;
        bar.value = j.progress;
        td.append(bar, " " + Number(j.progress).toFixed(1) + "%");
      }
      tr.appendChild(td);
      cell(tr, fmtInt(j.shots_done) + " / " + fmtInt(j.shots_total), "num");
      const shards = cell(tr, fmtInt(j.shards_done) + " / " + fmtInt(j.shards_total), "num");
      if (j.shards_running) shards.title = j.shards_running + " running";
      const nodes = cell(tr, j.nodes_used ? j.nodes_used.length : null, "num");
      if (j.nodes_used) nodes.title = j.nodes_used.join("\\n");
      const more = j.circuits > 1 && j.name ? " (+" + (j.circuits - 1) + ")" : "";
      cell(tr, j.name ? j.name + more : j.circuits + " circuit(s)", "name");
      cell(tr, fmtAge(j.wall_s), "num");
      cell(tr, j.error, "err");
      return tr;
    });
    $("jobs").replaceChildren(...(rows.length ? rows : [emptyRow(9, "no jobs yet")]));
  }
  function renderSpark(series, now) {
    const W = 1000, H = 100, PAD = 4, span = series.history_s;
    const pts = series.points.filter((p) => p[0] >= now - span);
    const peak = pts.reduce((m, p) => Math.max(m, p[1]), 0);
    const top = peak > 0 ? peak * 1.1 : 1;
    const xy = pts.map(([t, r]) => [(t - (now - span)) / span * W, H - PAD - r / top * (H - 2 * PAD)]);
    const str = (p) => p[0].toFixed(1) + "," + p[1].toFixed(1);
    $("spark-line").setAttribute("points", xy.map(str).join(" "));
    $("spark-area").setAttribute("points", xy.length
      ? [[xy[0][0], H], ...xy, [xy[xy.length - 1][0], H]].map(str).join(" ") : "");
    $("spark-max").textContent = pts.length < 2 ? "collecting samples…" : "peak " + fmtRate(peak) + " shots/s";
    $("spark-window").textContent = "last " + Math.round(span / 60) + " minutes";
  }
  function render(s) {
    const t = s.totals;
    $("t-nodes").textContent = t.nodes_alive + " / " + t.nodes_lost;
    $("t-slots").textContent = t.slots_busy + " / " + t.slots_total;
    $("t-jobs").textContent = t.jobs_running + " / " + t.jobs_queued;
    $("t-rate").textContent = fmtRate(t.shots_per_s);
    $("t-shots").textContent = fmtInt(t.shots_counted);
    renderNodes(s.nodes);
    renderJobs(s.jobs);
    renderSpark(s.shots_per_s, s.now);
    $("updated").textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString("en-GB");
    document.body.dataset.live = "1";
  }
  function banner(text) {
    const b = $("banner");
    b.textContent = text || "";
    b.classList.toggle("show", !!text);
  }
  // Relative to the page (works behind a path prefix), without any user:password@ of the
  // page's URL: fetch refuses URLs with credentials; the browser resends Basic auth itself.
  const url = new URL("api/status", location.href);
  url.username = "";
  url.password = "";
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const resp = await fetch(url, {cache: "no-store", credentials: "same-origin",
                                     headers: {"Accept": "application/json"}});
      if (resp.status === 401) {
        banner("Not authorised: reload the page and log in with a client token (any user name).");
      } else if (!resp.ok) {
        banner("The coordinator did not answer (HTTP " + resp.status + "); retrying…");
      } else {
        render(await resp.json());
        banner(null);
      }
    } catch (err) {
      banner("Dashboard unreachable; retrying…");
    } finally {
      busy = false;
    }
  }
  refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
})();
</script>
</body>
</html>
"""
