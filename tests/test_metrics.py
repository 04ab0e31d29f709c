"""Prometheus metrics and gRPC health of the coordinator and the nodes, scraped for real."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import fast_config, free_port, slow_circuit, wait_until
from qscale.logs import JsonFormatter


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``http://127.0.0.1:PORT/metrics`` by (name, labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_scrape_after_a_node_is_killed_shows_the_loss_the_reassignment_and_exact_shots(make_cluster) -> None:
    port = free_port()
    cluster = make_cluster(2, slots_per_node=2, config=fast_config(metrics_port=port))
    client = cluster.client
    assert cluster.coordinator is not None and cluster.coordinator.server.metrics_port == port
    job = client.submit(slow_circuit(), shots=3000, seed=8)
    victim = wait_until(lambda: next((n for n in client.nodes() if n.state == "alive" and n.running), None), 60,
                        "a node running a shard")
    proc = cluster.processes[int(victim.name.rsplit("-", 1)[1])]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    result = job.result(timeout=180)
    assert result.shots == 3000
    # Its stream broke at once (suspected, backup copies); it is declared lost at the timeout.
    wait_until(lambda: any(n.state == "lost" for n in client.nodes()), 30, "the killed node to be declared lost")
    m = scrape(port)
    assert m[("qscale_shots_completed_total", ())] == 3000
    assert m[("qscale_nodes_lost_total", (("reason", "stream"),))] == 1
    assert m[("qscale_nodes_suspected_total", ())] >= 1
    assert m[("qscale_shard_attempts_total", (("outcome", "lost"),))] + \
        m[("qscale_shard_attempts_total", (("outcome", "cancelled"),))] >= 1
    assert m[("qscale_shards_reassigned_total", ())] + m[("qscale_shard_backups_total", ())] >= 1
    assert m[("qscale_jobs_finished_total", (("state", "done"),))] == 1
    assert m[("qscale_nodes", (("state", "alive"),))] == 1
    assert m[("qscale_slots", (("state", "total"),))] == 2
    assert m[("qscale_shards", (("state", "queued"),))] == 0
    assert m[("qscale_job_latency_seconds_count", ())] == 1
    assert m[("qscale_shard_duration_seconds_count", ())] == result.status.shards_total
    assert m[("qscale_heartbeat_lag_seconds_count", ())] > 0
    assert m[("qscale_stale_results_dropped_total", ())] == 0


def test_node_metrics_and_health(make_cluster) -> None:
    cluster = make_cluster(0)
    metrics_port, health_port = free_port(), free_port()
    command = [*cluster.node_command("metered"), "--metrics-port", str(metrics_port),
               "--health-port", str(health_port)]
    log_path = cluster.log_dir / "metered.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cluster.log_dir)
    channel = grpc.insecure_channel(f"127.0.0.1:{health_port}")
    try:
        cluster.client.wait_for_nodes(1, timeout=60)
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            try:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            except grpc.RpcError:
                return -1

        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: status("") == serving and status("qscale.node") == serving, 30, "node health SERVING")
        result = cluster.client.submit(slow_circuit(10, 2), shots=500, seed=1).result(timeout=120)
        m = scrape(metrics_port)
        assert m[("qscale_node_shards_total", (("outcome", "done"),))] == result.status.shards_total
        assert m[("qscale_node_simulation_seconds_total", ())] > 0
        assert m[("qscale_node_worker_crashes_total", ())] == 0
        assert m[("qscale_node_connected", ())] == 1
        assert m[("qscale_node_slots", (("state", "total"),))] == 1
        proc.send_signal(signal.SIGTERM)  # drains: health turns NOT_SERVING, then the process leaves
        assert proc.wait(30) == 0
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_json_logs_carry_ids() -> None:
    record = logging.LogRecord("qscale.coordinator.scheduler", logging.INFO, __file__, 1,
                               "job %s shard %d -> node %s (attempt %d)", ("1f2e3d4c5b6a7980", 3, "local-0-ab12cd34", 1),
                               None)
    line = json.loads(JsonFormatter().format(record))
    assert line["job_id"] == "1f2e3d4c5b6a7980" and line["shard"] == 3 and line["node_id"] == "local-0-ab12cd34"
    assert line["level"] == "info" and line["logger"] == "qscale.coordinator.scheduler"
    assert line["message"].startswith("job 1f2e3d4c5b6a7980 shard 3")


def test_serve_logs_json_lines(tmp_path) -> None:
    """The real coordinator writes one JSON object per line on stderr."""
    address_file = tmp_path / "address"
    proc = subprocess.Popen([sys.executable, "-m", "qscale.coordinator", "serve", "--listen", "127.0.0.1:0",
                             "--state-dir", str(tmp_path / "state"), "--address-file", str(address_file),
                             "--log-format", "json"], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_until(lambda: address_file.exists() and address_file.read_text().strip(), 60, "the coordinator")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "message"} <= set(x) for x in lines)
    assert any("listening on" in x["message"] for x in lines)


def test_the_coordinator_serves_its_dashboard_behind_the_client_token(make_cluster) -> None:
    import urllib.error

    node_token, client_token = "n" * 32, "c" * 32
    port = free_port()
    cluster = make_cluster(1, config=fast_config(dashboard_port=port), node_token=node_token,
                           client_token=client_token)
    assert cluster.coordinator is not None and cluster.coordinator.server.dashboard_port == port
    cluster.client.submit(slow_circuit(4, 1), shots=100, seed=1).result(timeout=60)

    def get(token: str | None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status
        except urllib.error.HTTPError as err:
            return err.code

    assert get(None) == 401 and get(node_token) == 401  # a join token is not a client token
    assert get(client_token) == 200
