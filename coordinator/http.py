"""The coordinator's HTTP endpoints, served by aiohttp on the coordinator's own event loop.

One implementation for both of them (no threads; handlers read the scheduler directly, since
they run on the loop it lives on):

* the read-only dashboard (:mod:`qscale.coordinator.dashboard` builds its application);
* ``/metrics`` for Prometheus (:func:`metrics_app`).

Every response carries ``Cache-Control: no-store``, ``X-Content-Type-Options: nosniff``,
``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and a ``Content-Security-Policy``
(``default-src 'none'`` unless the handler set a page policy). Only ``GET`` and ``HEAD`` are
served: any other method is answered 405 with ``Allow: GET, HEAD``. With an ``authorise``
check, every path but ``/healthz`` needs a token: the password of HTTP Basic (any user
name) or ``Authorization: Bearer <token>``; without one the answer is 401 with
``WWW-Authenticate: Basic realm="qscale"`` so that a browser asks for it. What the check
returns for an accepted token (an identity, say) is left in the request under :data:`AUTH_KEY`
for the handlers.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HttpServer", "make_app", "metrics_app", "presented_token", "PLAIN_CSP", "PAGE_CSP", "AUTH_KEY"]

log = logging.getLogger(__name__)

PLAIN_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
"""The policy of everything that is not a page."""
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The policy of the dashboard's pages: scripts and styles from the dashboard's own files only."""
ALLOWED_METHODS = ("GET", "HEAD")
AUTH_KEY: Any = web.RequestKey("qscale_auth", object) if hasattr(web, "RequestKey") else "qscale_auth"
"""Request key of what ``authorise`` returned for the request's token (True without authentication);
a typed key where aiohttp has them (3.12 on), a string before."""
_MAX_AUTH_HEADER = 4096
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_TEXT = "text/plain"
_UNAUTHORISED = "401 Unauthorized: present a client token (HTTP Basic password or Bearer)\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def presented_token(header: str | None) -> str | None:
    """The token in an ``Authorization`` header: the Bearer value, or the password of Basic
    (any user name); None when there is none or the header is malformed."""
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


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text, content_type=_TEXT, charset="utf-8", headers=headers)


def make_app(routes: list[web.RouteDef], authorise: Callable[[str], object] | None = None) -> web.Application:
    """An application serving ``routes`` (``GET``; ``HEAD`` too) behind the checks above.

    Args:
        routes: ``web.get(...)`` definitions.
        authorise: None: no authentication; else whether a presented token may read: a falsy
            answer refuses it, anything else is kept in the request under :data:`AUTH_KEY` (it
            should compare in constant time). An exception in it counts as a refusal.
    """

    def authorised(request: web.Request) -> object:
        if authorise is None:
            return True
        token = presented_token(request.headers.get("Authorization"))
        if not token:
            return None
        try:
            return authorise(token)
        except Exception as exc:  # the message could quote the token: log its type only
            log.error("http: token check failed (%s)", type(exc).__name__)
            return None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path != "/healthz":
            who = authorised(request)
            if not who:
                log.debug("http: %s %s from %s without a valid token", request.method, path[:200], request.remote)
                return _plain(401, _UNAUTHORISED, {"WWW-Authenticate": 'Basic realm="qscale", charset="UTF-8"'})
            request[AUTH_KEY] = who
        if request.method not in ALLOWED_METHODS:
            return _plain(405, "405 Method Not Allowed\n", {"Allow": ", ".join(ALLOWED_METHODS)})
        try:
            return await handler(request)
        except web.HTTPException as exc:  # 404 from the router
            return _plain(exc.status, f"{exc.status} {exc.reason}\n")
        except Exception:
            log.exception("http: %s %s failed", request.method, path[:200])
            return _plain(500, "500 Internal Server Error\n")

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(_SECURITY_HEADERS)
        response.headers.setdefault("Content-Security-Policy", PLAIN_CSP)
        response.headers["Server"] = "qscale"

    app = web.Application(middlewares=[guard])
    app.on_response_prepare.append(headers)
    app.add_routes([web.get("/healthz", _healthz), *routes])
    return app


async def _healthz(request: web.Request) -> web.Response:
    return _plain(200, "ok\n")


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """``/metrics``: the Prometheus text exposition of ``registry``; ``/healthz``: ``ok``.
    Scrapes need no token (as with any Prometheus endpoint: keep the port private)."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return make_app([web.get("/metrics", metrics)])


class HttpServer:
    """An aiohttp application served on the running event loop.

    Args:
        app: what to serve (see :func:`make_app`).
        name: what it is, for the log line (``dashboard``, ``metrics``).
        path: the path the log line points at.
        detail: appended to the log line in parentheses (e.g. whether a token is needed).

    Example (in a coroutine on the coordinator's loop)::

        server = HttpServer(metrics_app(registry), "metrics", "/metrics")
        port = await server.start("127.0.0.1", 0)
        ...
        await server.stop()
    """

    def __init__(self, app: web.Application, name: str, path: str = "/", detail: str = "") -> None:
        self.app = app
        self.name = name
        self.path = path
        self.detail = detail
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (port 0: the OS chooses) and serve; returns the bound port and logs
        where, once.

        Raises:
            OSError: the address cannot be bound.
        """
        if self._runner is not None:
            return self.port
        host = host.strip("[]")
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, keepalive_timeout=15.0,
                               shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        shown = f"[{host}]" if ":" in host else host
        log.info("%s on http://%s:%d%s%s", self.name, shown, self.port, self.path,
                 f" ({self.detail})" if self.detail else "")
        return self.port

    async def stop(self) -> None:
        """Stop serving (open connections are closed). Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
