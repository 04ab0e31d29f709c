"""The coordinator's read-only dashboard: its JSON, its headers, authentication, and the page
rendered by a real headless browser (Debian's ``chromium``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import fast_config, ghz, wait_until
from qscale.coordinator.dashboard import Dashboard, rate_series
from qscale.local import LocalCluster

SHOTS = 2000
TOKEN = "s3cret-token-value"
# A circuit name with markup in it: the page must show it as text, never as an element.
HOSTILE_NAME = '<b id="xss">bell</b>'
REPO = Path(__file__).resolve().parent.parent


class Env:
    def __init__(self, cluster: LocalCluster, loop: asyncio.AbstractEventLoop, job_id: str, node_ids: list[str]):
        self.cluster = cluster
        self.loop = loop
        self.job_id = job_id
        self.node_ids = node_ids

    @property
    def runtime(self) -> Any:
        assert self.cluster.coordinator is not None and self.cluster.coordinator.server.runtime is not None
        return self.cluster.coordinator.server.runtime


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """Two nodes and one finished job, shared by the tests of this module."""
    cluster = LocalCluster(2, cores_per_node=1, config=fast_config())
    cluster.start()
    try:
        assert cluster.coordinator is not None
        # The coordinator's event loop: ``call`` runs a function on it.
        loop = cluster.coordinator.call(asyncio.get_running_loop)
        circuit = ghz(3)
        circuit.name = HOSTILE_NAME
        job = cluster.client.submit(circuit, shots=SHOTS, seed=1)
        result = job.result(timeout=120)
        assert sum(result.counts[0].values()) == SHOTS
        node_ids = [n.node_id for n in cluster.client.nodes() if n.state == "alive"]
        assert len(node_ids) == 2
        yield Env(cluster, loop, job.job_id, node_ids)
    finally:
        cluster.stop()


def request(url: str, *, method: str = "GET", headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def check_security_headers(headers: dict[str, str]) -> None:
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


def test_status_lists_nodes_and_finished_job(env: Env) -> None:
    dashboard = Dashboard(env.runtime, env.loop, host="127.0.0.1", port=0)
    port = dashboard.start()
    base = f"http://127.0.0.1:{port}"
    try:
        status, headers, body = request(base + "/api/status")
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        check_security_headers(headers)
        snap = json.loads(body)
        nodes = {n["node_id"]: n for n in snap["nodes"]}
        assert set(env.node_ids) <= set(nodes)
        for node_id in env.node_ids:
            node = nodes[node_id]
            assert node["state"] == "alive" and node["slots"] == 1 and node["cores"] == 1
            assert node["memory_budget_bytes"] > 0 and node["methods"] and node["max_statevector_qubits"] > 0
            assert 0 <= node["last_heartbeat_age_s"] < 60
        jobs = {j["job_id"]: j for j in snap["jobs"]}
        job = jobs[env.job_id]
        assert job["state"] == "done" and job["final"] is True
        assert job["progress"] == 100
        assert job["shots_done"] == job["shots_total"] == SHOTS
        assert job["shards_done"] == job["shards_total"] >= 1
        assert job["nodes_used"] and set(job["nodes_used"]) <= set(nodes)
        assert job["name"] == HOSTILE_NAME and job["error"] == "" and job["wall_s"] > 0
        totals = snap["totals"]
        assert totals["nodes_alive"] == 2 and totals["slots_total"] == 2
        assert totals["jobs_running"] == totals["jobs_queued"] == 0
        assert totals["shots_counted"] >= SHOTS
        assert snap["shots_per_s"]["history_s"] == 600 and isinstance(snap["shots_per_s"]["points"], list)

        # The page: server-rendered tables, markup from data escaped, a fresh nonce per response.
        status, headers, body = request(base + "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        check_security_headers(headers)
        page = body.decode()
        assert "<title>qscale</title>" in page
        for node_id in env.node_ids:
            assert node_id in page
        assert env.job_id in page
        assert html_escaped(HOSTILE_NAME) in page and HOSTILE_NAME not in page
        nonce = re.search(r"'nonce-([^']+)'", headers["Content-Security-Policy"]).group(1)  # type: ignore[union-attr]
        assert f'<script nonce="{nonce}">' in page and f'<style nonce="{nonce}">' in page
        _, headers2, _ = request(base + "/")
        assert f"'nonce-{nonce}'" not in headers2["Content-Security-Policy"]
        assert "http://" not in page.replace(base, "") and "https://" not in page  # nothing from outside

        status, headers, body = request(base + "/", method="HEAD")
        assert status == 200 and body == b""

        status, headers, body = request(base + "/healthz")
        assert (status, body) == (200, b"ok\n")
        check_security_headers(headers)

        status, headers, _ = request(base + "/nope")
        assert status == 404
        check_security_headers(headers)
        status, headers, _ = request(base + "/api/status/../../etc/passwd")
        assert status == 404

        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"):
            status, headers, _ = request(base + "/api/status", method=method)
            assert status == 405, method
            assert headers["Allow"] == "GET, HEAD"
            check_security_headers(headers)
    finally:
        dashboard.stop()
    dashboard.stop()  # twice is fine


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def test_client_token_required_when_auth_is_on(env: Env) -> None:
    dashboard = Dashboard(env.runtime, env.loop, host="127.0.0.1", port=0, tokens=lambda t: t == TOKEN)
    port = dashboard.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {TOKEN}x"},
                 basic("viewer", "wrong"), basic(TOKEN, ""), {"Authorization": "Basic !!!not-base64"},
                 {"Authorization": f"Token {TOKEN}"}, {"Authorization": TOKEN}]
        for path in ("/", "/api/status", "/nope"):
            for headers in wrong:
                status, reply_headers, body = request(base + path, headers=headers)
                assert status == 401, (path, headers)
                assert reply_headers["WWW-Authenticate"].startswith('Basic realm="qscale"')
                check_security_headers(reply_headers)
                assert TOKEN.encode() not in body
        status, _, _ = request(base + "/", method="POST")
        assert status == 401

        for headers in (basic("anyone", TOKEN), basic("", TOKEN), {"Authorization": f"Bearer {TOKEN}"},
                        {"Authorization": f"bearer  {TOKEN} "}):
            status, _, body = request(base + "/api/status", headers=headers)
            assert status == 200, headers
            assert env.job_id in {j["job_id"] for j in json.loads(body)["jobs"]}
        status, _, body = request(base + "/", headers=basic("anyone", TOKEN))
        assert status == 200 and env.job_id.encode() in body
        status, _, _ = request(base + "/nope", headers=basic("anyone", TOKEN))
        assert status == 404

        status, _, body = request(base + "/healthz")  # probes carry no token
        assert (status, body) == (200, b"ok\n")
    finally:
        dashboard.stop()


class FakeCore:
    """Just enough of a Runtime and its Scheduler; each clock tick counts 10 more shots."""

    def __init__(self) -> None:
        self.ticks = 0
        self.core = self
        self.nodes: dict[str, Any] = {}
        self.registry = SimpleNamespace(lost={})
        self.jobs: dict[str, Any] = {}
        self.queue: deque[Any] = deque()
        self.stale_dropped = 0
        self.config = fast_config()
        self.store = SimpleNamespace(recent_jobs=lambda limit: [])

    @property
    def shots_counted(self) -> int:
        return 10 * self.ticks

    def clock(self) -> float:
        self.ticks += 1
        return 1000.0 + self.ticks


def test_shots_per_second_series_is_bounded_and_right() -> None:
    assert rate_series([]) == []
    assert rate_series([(0.0, 0), (2.0, 100), (4.0, 100), (4.0, 500), (6.0, 50), (8.0, 70)]) == [
        (2.0, 50.0), (4.0, 0.0), (6.0, 0.0), (8.0, 10.0)]

    core = FakeCore()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dashboard = Dashboard(core, loop, host="127.0.0.1", port=0, clock=core.clock,  # type: ignore[arg-type]
                          history_s=0.1, sample_s=0.01)
    try:
        port = dashboard.start()
        wait_until(lambda: core.ticks > 40, 30, "the sampler to take 40 samples")
        status, _, body = request(f"http://127.0.0.1:{port}/api/status")
        assert status == 200
        snap = json.loads(body)
        points = snap["shots_per_s"]["points"]
        assert 1 <= len(points) <= 10  # history_s / sample_s
        assert all(rate == 10.0 for _, rate in points)
        assert snap["totals"]["shots_per_s"] == 10.0
        assert snap["nodes"] == [] and snap["jobs"] == []
    finally:
        dashboard.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_loop_not_answering_gives_503() -> None:
    core = FakeCore()
    loop = asyncio.new_event_loop()  # never running: snapshots are never taken
    dashboard = Dashboard(core, loop, host="127.0.0.1", port=0, snapshot_timeout_s=0.2)  # type: ignore[arg-type]
    try:
        port = dashboard.start()
        status, headers, body = request(f"http://127.0.0.1:{port}/api/status")
        assert status == 503 and b"did not answer" in body
        check_security_headers(headers)
        status, _, body = request(f"http://127.0.0.1:{port}/")
        assert status == 503 and b"did not answer in time" in body
        status, _, _ = request(f"http://127.0.0.1:{port}/healthz")
        assert status == 200
    finally:
        dashboard.stop()
        loop.run_until_complete(asyncio.sleep(0.05))  # let the cancelled snapshots finish
        loop.close()


# ---------------------------------------------------------------------- real browser

def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def _artifact_path() -> Path:
    folder = os.environ.get("QSCALE_TEST_ARTIFACTS")
    path = Path(folder) if folder else REPO / "tests" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path / "dashboard.png"


def _run_browser(chromium: str, args: list[str], profile: Path, timeout: float = 90.0) -> str:
    """Run headless chromium in a session of its own; whatever is left of it is killed."""
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
           "--virtual-time-budget=5000", f"--user-data-dir={profile}", "--no-first-run",
           "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--mute-audio", *args]
    env = dict(os.environ, HOME=str(profile), XDG_CONFIG_HOME=str(profile / "config"),
               XDG_CACHE_HOME=str(profile / "cache"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {timeout}s: {' '.join(args)}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its zygote and renderers too
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(10)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
    return out.decode(errors="replace")


def _png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the decoded image data) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, chunk = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def test_page_renders_in_a_real_browser(env: Env) -> None:
    chromium = _chromium()
    if chromium is None:
        if _ci():
            pytest.fail("chromium is not installed: .ci/run must install it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI must have it")
    dashboard = Dashboard(env.runtime, env.loop, host="127.0.0.1", port=0, tokens=lambda t: t == TOKEN)
    port = dashboard.start()
    # Credentials in the URL: the browser sends them as Basic auth, and the page's own fetches
    # of /api/status must get through with them too.
    url = f"http://viewer:{TOKEN}@127.0.0.1:{port}/"
    profile = Path(tempfile.mkdtemp(prefix="qscale-chromium-"))
    screenshot = _artifact_path()
    try:
        screenshot.unlink(missing_ok=True)
        dom = _run_browser(chromium, ["--dump-dom", url], profile / "dom")
        assert 'data-live="1"' in dom, f"the page's script did not render /api/status:\n{dom[:3000]}"
        for node_id in env.node_ids:
            assert node_id in dom
        assert env.job_id in dom
        assert "100.0%" in dom and f"{SHOTS:,} / {SHOTS:,}" in dom
        assert html_escaped(HOSTILE_NAME).replace("&quot;", '"') in dom  # shown as text...
        assert '<b id="xss">' not in dom  # ...never as markup
        banner = re.search(r'<div id="banner"[^>]*>([^<]*)</div>', dom)
        assert banner is not None and banner.group(1) == "", f"the page shows an error: {banner}"

        _run_browser(chromium, [f"--screenshot={screenshot}", url], profile / "shot")
        assert screenshot.is_file(), "chromium wrote no screenshot"
        data = screenshot.read_bytes()
        width, height, distinct = _png_facts(data)
        assert (width, height) == (1280, 900)
        assert len(data) > 10_000 and distinct > 20, "the screenshot looks blank"
    finally:
        dashboard.stop()
        shutil.rmtree(profile, ignore_errors=True)
