"""The coordinator's gRPC server: wiring of store, scheduler, runtime and servicers, the
periodic tick (liveness, backup copies), the health service; and :class:`EmbeddedCoordinator`
to run one in a background thread."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from qscale.coordinator import sandbox
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.dashboard import Dashboard
from qscale.coordinator.http import HttpServer, metrics_app
from qscale.coordinator.metrics import CoordinatorMetrics
from qscale.coordinator.runtime import Runtime
from qscale.coordinator.scheduler import Scheduler
from qscale.coordinator.servicers import JobServicer, NodeServicer, add_services
from qscale.coordinator.users import Users
from qscale.coordinator.store import Store
from qscale.errors import FailedPreconditionError, UnavailableError
from qscale.proto.v1 import jobs_pb2_grpc, node_pb2_grpc
from qscale.security import AuthInterceptor, TLSConfig, Tokens, is_loopback_address

__all__ = ["CoordinatorServer", "EmbeddedCoordinator"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
SERVICES = ("qscale.v1.NodeService", "qscale.v1.JobService")


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 2_000),  # nodes ping every 5 s
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def load_security(config: CoordinatorConfig) -> tuple[Tokens, grpc.ServerCredentials | None]:
    """The tokens to check and the TLS credentials to serve with (None: plain), read from the
    files and values of ``config``. Refuses a non-loopback address without tokens unless
    ``config.insecure``.

    Raises:
        FailedPreconditionError: no credentials on a non-loopback address; an unreadable file.
        InvalidArgumentError: a bad token, tokens for one role only, a TLS cert without key.
    """
    tokens = Tokens.load(node_files=[config.node_tokens_file], client_files=[config.client_tokens_file],
                         node_tokens=[config.node_token], client_tokens=[config.client_token])
    tls = TLSConfig(config.tls_cert, config.tls_key, config.tls_ca)
    credentials = tls.server_credentials() if tls.enabled else None
    loopback = is_loopback_address(config.listen)
    if not tokens.enabled and not loopback:
        if not config.insecure:
            raise FailedPreconditionError(
                f"refusing to listen on {config.listen} without credentials: any machine that reaches it could "
                "register nodes and submit, read or cancel jobs. Configure node and client tokens "
                "(--node-tokens-file and --client-tokens-file, or $QSCALE_NODE_TOKEN and $QSCALE_CLIENT_TOKEN), "
                "listen on 127.0.0.1, or pass --insecure to serve without authentication anyway")
        log.warning("serving on %s WITHOUT AUTHENTICATION (--insecure): anyone who reaches it can use it",
                    config.listen)
    elif tokens.enabled and credentials is None and not loopback:
        log.warning("serving on %s with tokens but without TLS: tokens cross the network in clear text "
                    "(use --tls-cert and --tls-key)", config.listen)
    log.info("security: %s, %s", f"{len(tokens.node)} node and {len(tokens.client)} client token(s)"
             if tokens.enabled else "no authentication",
             ("mutual TLS" if tls.ca else "TLS") if credentials is not None else "no TLS")
    return tokens, credentials


class CoordinatorServer:
    """A coordinator on the current asyncio loop: ``await start()``, ``await stop()``.

    ``clock`` is monotonic (liveness, timeouts); ``wall`` stamps what is displayed."""

    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.wall = wall
        self.address = ""
        self._temp_state: str | None = None
        self._server: grpc.aio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qscale-intake")
        self.store: Store | None = None
        self.core: Scheduler | None = None
        self.runtime: Runtime | None = None
        self.health: health_aio.HealthServicer | None = None
        self._jobs: JobServicer | None = None
        self._sandbox: sandbox.SandboxPool | None = None
        self.metrics = CoordinatorMetrics()
        self.metrics_port = 0
        """Bound port of the metrics endpoint (0: off)."""
        self.dashboard_port = 0
        """Bound port of the status page (0: off)."""
        self._dashboard: Dashboard | None = None
        self._metrics_http: HttpServer | None = None

    async def start(self) -> str:
        """Open the state, recover unfinished jobs, and serve. Returns the bound ``host:port``.

        Raises:
            FailedPreconditionError: the address is not loopback and no tokens are configured
                (unless ``config.insecure``), a TLS or token file cannot be read, or the
                address cannot be bound.
            InvalidArgumentError: tokens for one role only, a short token, a TLS cert without key.
        """
        tokens, credentials = load_security(self.config)
        state_dir = self.config.state_dir
        if state_dir is None:
            state_dir = self._temp_state = tempfile.mkdtemp(prefix="qscale-state-")
        self.store = Store(state_dir)
        self.health = health_aio.HealthServicer()
        self.users = users = Users.from_config(tokens, self.config)
        self.core = Scheduler(self.config, metrics=self.metrics, wall=self.wall, users=users.get)
        self.runtime = runtime = Runtime(self.core, self.store, asyncio.get_running_loop())
        recovered = runtime.recover(self.clock())
        server = grpc.aio.server(options=grpc_options(self.config.limits.max_message_bytes),
                                 interceptors=[AuthInterceptor(tokens)] if tokens.enabled else None)
        self._jobs = JobServicer(runtime, self.config, self.clock, self._executor, users)
        add_services(server, (node_pb2_grpc.add_NodeServiceServicer_to_server,
                              NodeServicer(runtime, self.config, self.clock)),
                     (jobs_pb2_grpc.add_JobServiceServicer_to_server, self._jobs))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            if credentials is not None:
                port = server.add_secure_port(self.config.listen, credentials)
            else:
                port = server.add_insecure_port(self.config.listen)
        except RuntimeError as exc:
            runtime.close()
            self.store.close()
            raise FailedPreconditionError(f"cannot listen on {self.config.listen}: {exc}") from exc
        host = self.config.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        try:
            await self._serve_http(_http_host(host), runtime)
        except BaseException:
            await self._stop_http()
            runtime.close()
            self.store.close()
            raise
        # Circuits are decoded in sandbox processes; they warm up in the background.
        self._sandbox = sandbox.open_pool(self.config.limits)
        await server.start()
        self._server = server
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._ticker = asyncio.create_task(self._tick_forever())
        log.info("coordinator listening on %s (state in %s, %d job(s) recovered)", self.address, state_dir, recovered)
        return self.address

    async def _serve_http(self, host: str, runtime: Runtime) -> None:
        """Metrics and dashboard (those configured), on this loop.

        Raises:
            FailedPreconditionError: a port cannot be bound.
        """
        if self.config.metrics_port:
            self._metrics_http = HttpServer(metrics_app(self.metrics.registry), "metrics", "/metrics")
            try:
                self.metrics_port = await self._metrics_http.start(host, self.config.metrics_port)
            except OSError as exc:
                raise FailedPreconditionError(f"cannot serve metrics on port {self.config.metrics_port}: {exc}"
                                              ) from exc
        if self.config.dashboard_port:
            self._dashboard = Dashboard(runtime, users=self.users, clock=self.wall, monotonic=self.clock)
            try:
                self.dashboard_port = await self._dashboard.start(host, self.config.dashboard_port)
            except OSError as exc:
                raise FailedPreconditionError(
                    f"cannot serve the dashboard on port {self.config.dashboard_port}: {exc}") from exc

    async def _stop_http(self) -> None:
        if self._metrics_http is not None:
            await self._metrics_http.stop()
            self._metrics_http = None
        if self._dashboard is not None:
            await self._dashboard.stop()
            self._dashboard = None

    async def _tick_forever(self) -> None:
        """Liveness and backup copies, a few times per heartbeat interval: a silent node is
        suspected within a fraction of an interval of the moment it qualifies."""
        assert self.core is not None and self.runtime is not None
        period = min(self.config.heartbeat_interval_s / 4, self.config.suspect_after / 4, 0.25)
        while True:
            await asyncio.sleep(period)
            try:
                self.runtime.apply(self.core.tick(self.clock()))
                self.runtime.maybe_prune(self.wall())
            except Exception:
                log.exception("tick failed")

    async def wait(self) -> None:
        """Until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving: refuse new jobs, report NOT_SERVING, end Watch streams (UNAVAILABLE, so
        clients retry) and node streams (nodes reconnect with backoff), close the state. Jobs
        in flight resume when a coordinator starts again on the same state directory."""
        if self._server is None:
            return
        if self._jobs is not None:
            self._jobs.begin_shutdown()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.core is not None:
            for node in list(self.core.nodes.values()):
                if node.stream is not None:
                    node.stream.put_nowait(None)  # type: ignore[attr-defined]
        await self._server.stop(grace)
        self._server = None
        await self._stop_http()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.runtime is not None:
            self.runtime.close()
        if self._sandbox is not None:
            sandbox.release(self._sandbox)
            self._sandbox = None
        if self.store is not None:
            self.store.close()
        if self._temp_state is not None:
            shutil.rmtree(self._temp_state, ignore_errors=True)
        log.info("coordinator on %s stopped", self.address)


def _http_host(grpc_host: str) -> str:
    """Where the HTTP endpoints listen: the gRPC listen host, brackets of IPv6 removed."""
    host = grpc_host.strip("[]")
    return host if host not in ("", "*") else "0.0.0.0"


class EmbeddedCoordinator:
    """A :class:`CoordinatorServer` on its own event loop in a background thread.

    Used by :class:`qscale.LocalCluster` and the tests::

        with EmbeddedCoordinator(CoordinatorConfig(listen="127.0.0.1:0")) as coord:
            client = qscale.Client(coord.address)
    """

    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.server = CoordinatorServer(config, clock=clock, wall=wall)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qscale-coordinator", daemon=True)
        self._started = False

    @property
    def address(self) -> str:
        return self.server.address

    def start(self, timeout: float = 30.0) -> str:
        """Start serving; returns the bound address."""
        self._thread.start()
        try:
            address = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            raise
        self._started = True
        return address

    def call(self, fn: Callable[..., _T], *args: Any, timeout: float = 10.0) -> _T:
        """Run ``fn(*args)`` on the coordinator's loop thread (to read scheduler state safely)."""
        if not self._started:
            raise UnavailableError("coordinator not running")

        async def run() -> _T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self, grace: float = 1.0, timeout: float = 30.0) -> None:
        """Stop the server and its thread. Safe to call twice."""
        if self._started:
            self._started = False
            try:
                asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(timeout)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout)
                self._loop.close()

    def __enter__(self) -> EmbeddedCoordinator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
