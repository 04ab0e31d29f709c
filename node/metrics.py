"""What a node exports: Prometheus metrics on ``--metrics-port`` and the standard gRPC health
service on ``--health-port``.

Metrics (prefixed ``qscale_node_``): ``shards_total{outcome}`` (done, failed, aborted,
handed_back), ``simulation_seconds_total`` (wall seconds its workers spent on shards),
``worker_crashes_total`` (worker processes that died under a shard), ``slots{state}`` (busy,
total) and ``connected`` (1 while it has a session with the coordinator).

Health: the overall status (service ``""``) is SERVING while the daemon runs and NOT_SERVING
once it drains; service ``qscale.node`` is SERVING only while the node is connected to its
coordinator. A node only dials out, so the health server is for local probes (Kubernetes,
systemd watchdogs), never for the coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any

__all__ = ["NodeMetrics", "NodeHealth"]

log = logging.getLogger(__name__)

HEALTH_SERVICE = "qscale.node"


class NodeMetrics:
    """The node's counters, in a registry of their own, served when ``port`` is given."""

    def __init__(self, busy: Callable[[], float], total: Callable[[], float], connected: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        r = self.registry
        self.shards = Counter("qscale_node_shards", "Shards this node ran, by outcome", ["outcome"], registry=r)
        for outcome in ("done", "failed", "aborted", "handed_back"):
            self.shards.labels(outcome)
        self.simulation_seconds = Counter("qscale_node_simulation_seconds",
                                          "Wall seconds the node's workers spent running shards", registry=r)
        self.worker_crashes = Counter("qscale_node_worker_crashes",
                                      "Worker processes that died while running a shard", registry=r)
        slots = Gauge("qscale_node_slots", "Slots busy and in all", ["state"], registry=r)
        slots.labels("busy").set_function(busy)
        slots.labels("total").set_function(total)
        Gauge("qscale_node_connected", "1 while the node has a session with its coordinator",
              registry=r).set_function(connected)
        self._server: Any = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` from a daemon thread; returns the bound port."""
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class NodeHealth:
    """A small gRPC server with only the standard health service."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self._pb2 = health_pb2
        self.servicer = health.HealthServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="qscale-health"))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self._server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_insecure_port(address)
        self.set(serving=True, connected=False)

    def start(self) -> int:
        self._server.start()
        log.info("gRPC health service on port %d", self.port)
        return self.port

    def set(self, *, serving: bool, connected: bool) -> None:
        status = self._pb2.HealthCheckResponse
        self.servicer.set("", status.SERVING if serving else status.NOT_SERVING)
        self.servicer.set(HEALTH_SERVICE, status.SERVING if serving and connected else status.NOT_SERVING)

    def close(self) -> None:
        self.servicer.enter_graceful_shutdown()
        self._server.stop(1.0)
