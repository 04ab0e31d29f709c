"""The coordinator's read-only dashboard, served by aiohttp on a real coordinator's event loop:
its JSON, its headers, authentication, the coordinator's own wiring (dashboard and metrics,
logged once), a job's outcomes and shard timeline through a node loss, and both pages rendered
by a real headless browser (Debian's ``chromium``)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conftest import fast_config, free_port, ghz, slow_circuit, wait_until
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.dashboard import Dashboard, _row_user, _row_view, rate_series
from qscale.coordinator.users import DEFAULT_USER, Users
from qscale.local import LocalCluster
from qscale.results import JobResult
from qscale.security import Tokens

SHOTS = 2000
TOKEN = "s3cret-token-value"
# A circuit name with markup in it: the page must show it as text, never as an element.
HOSTILE_NAME = '<b id="xss">bell</b>'
REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "coordinator" / "static"
_T = TypeVar("_T")


class Env:
    def __init__(self, cluster: LocalCluster, job_id: str, result: JobResult, node_ids: list[str]) -> None:
        self.cluster = cluster
        assert cluster.coordinator is not None
        self.base = f"http://127.0.0.1:{cluster.coordinator.server.dashboard_port}"
        """The coordinator's own dashboard (``dashboard_port``), without authentication."""
        self.job_id = job_id
        self.result = result
        self.node_ids = node_ids


def on_loop(cluster: LocalCluster, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
    """Run ``coro`` on the coordinator's event loop, from the test's thread."""
    assert cluster.coordinator is not None
    loop = cluster.coordinator.call(asyncio.get_running_loop)
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@contextmanager
def serving(cluster: LocalCluster, **kwargs: Any) -> Iterator[tuple[Dashboard, str]]:
    """A dashboard on the cluster coordinator's loop, on a port the OS chose; always stopped."""
    assert cluster.coordinator is not None and cluster.coordinator.server.runtime is not None
    dashboard = Dashboard(cluster.coordinator.server.runtime, **kwargs)
    port = on_loop(cluster, dashboard.start("127.0.0.1", 0))
    try:
        yield dashboard, f"http://127.0.0.1:{port}"
    finally:
        on_loop(cluster, dashboard.stop())


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """Two nodes and one finished job of two shards, shared by the tests of this module."""
    cluster = LocalCluster(2, cores_per_node=1, config=fast_config(dashboard_port=free_port()))
    cluster.start()
    try:
        circuit = ghz(3)
        circuit.name = HOSTILE_NAME
        job = cluster.client.submit(circuit, shots=SHOTS, seed=1)
        result = job.result(timeout=120)
        assert sum(result.counts[0].values()) == SHOTS
        node_ids = [n.node_id for n in cluster.client.nodes() if n.state == "alive"]
        assert len(node_ids) == 2
        yield Env(cluster, job.job_id, result, node_ids)
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


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    status, reply_headers, body = request(url, headers=headers)
    assert status == 200, (url, status, body[:500])
    assert reply_headers["Content-Type"] == "application/json"
    return json.loads(body)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def check_security_headers(headers: dict[str, str]) -> None:
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["Server"] == "qscale"


def outside_urls(text: str) -> set[str]:
    """Absolute URLs in a page or script, but the SVG namespace name (an identifier, never fetched)."""
    return set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"'<>]*", text)) - {"http://www.w3.org/2000/svg"}


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# ---------------------------------------------------------------------- HTTP

def test_status_api_static_pages_and_headers(env: Env) -> None:
    with serving(env.cluster) as (_, base):
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
        assert snap["viewer"] == {"user": DEFAULT_USER, "admin": True, "authenticated": False}
        jobs = {j["job_id"]: j for j in snap["jobs"]}
        job = jobs[env.job_id]
        assert job["state"] == "done" and job["final"] is True and job["detail"] is True
        assert job["user"] == DEFAULT_USER and job["priority"] == "normal" and job["pruned"] is False
        assert job["progress"] == 100
        assert job["shots_done"] == job["shots_total"] == SHOTS
        assert job["shards_done"] == job["shards_total"] == 2
        assert job["nodes_used"] and set(job["nodes_used"]) <= set(nodes)
        assert job["name"] == HOSTILE_NAME and job["error"] == "" and job["wall_s"] > 0
        totals = snap["totals"]
        assert totals["nodes_alive"] == 2 and totals["slots_total"] == 2
        assert totals["jobs_running"] == totals["jobs_queued"] == 0
        assert totals["shots_counted"] >= SHOTS
        assert snap["shots_per_s"]["history_s"] == 600 and isinstance(snap["shots_per_s"]["points"], list)

        # The pages: static files that hold no data (one renderer: the script), scripts and
        # styles from the dashboard's own files only, nothing from outside.
        for path, script in (("/", "static/dashboard.js"), (f"/jobs/{env.job_id}", "../static/dashboard.js")):
            status, headers, body = request(base + path)
            assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8", path
            check_security_headers(headers)
            csp = headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "style-src 'self'" in csp and "nonce" not in csp
            page = body.decode()
            assert "<title>qscale" in page and f'<script src="{script}" defer></script>' in page
            assert not re.search(r"<script(?![^>]*\bsrc=)", page), "an inline script"
            assert "<style" not in page and " style=" not in page, "an inline style"
            assert env.job_id not in page and not any(n in page for n in env.node_ids), "data rendered twice"
            assert not outside_urls(page), outside_urls(page)
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            status, headers, body = request(f"{base}/static/{name}")
            assert status == 200 and headers["Content-Type"] == f"{kind}; charset=utf-8"
            check_security_headers(headers)
            assert body == (STATIC / name).read_bytes()
            assert not outside_urls(body.decode()), outside_urls(body.decode())
        for path in ("/static/index.html", "/static/nope.js", "/static/../dashboard.py", "/jobs/a%20b",
                     "/api/jobs/", "/nope", "/api/status/../../etc/passwd"):
            status, headers, _ = request(base + path)
            assert status == 404, path
            check_security_headers(headers)

        status, headers, body = request(base + "/", method="HEAD")
        assert status == 200 and body == b""

        status, headers, body = request(base + "/healthz")
        assert (status, body) == (200, b"ok\n")
        check_security_headers(headers)

        for path in ("/api/status", "/", "/healthz", "/static/dashboard.js"):
            for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
                status, headers, _ = request(base + path, method=method)
                assert status == 405, (path, method)
                assert headers["Allow"] == "GET, HEAD"
                check_security_headers(headers)
            # A method HTTP does not define is refused by aiohttp's parser before any route.
            status, headers, body = request(base + path, method="FOO")
            assert status == 400 and headers["Content-Type"].startswith("text/plain") and b"qscale" not in body


def test_job_api_gives_the_outcome_histogram_and_the_shard_timeline(env: Env) -> None:
    base = env.base  # the coordinator's own dashboard
    data = get_json(f"{base}/api/jobs/{env.job_id}")
    job = data["job"]
    assert job["job_id"] == env.job_id and job["state"] == "done" and job["progress"] == 100
    assert job["shots_done"] == SHOTS and job["shards_total"] == 2 and job["name"] == HOSTILE_NAME
    assert job["seed"] == 1 and job["estimator"] is False
    assert job["user"] == DEFAULT_USER and job["priority"] == "normal"

    circuit = data["circuit"]
    assert circuit["index"] == 0 and circuit["count"] == 1 and circuit["name"] == HOSTILE_NAME
    assert circuit["num_qubits"] == circuit["num_clbits"] == 3
    assert circuit["shots"] == SHOTS and circuit["other_shots"] == 0
    assert dict(circuit["outcomes"]) == env.result.counts[0]  # GHZ: 000 and 111 only
    counts = [n for _, n in circuit["outcomes"]]
    assert counts == sorted(counts, reverse=True)

    tl = data["timeline"]
    assert tl["columns"] == ["shard", "node", "sent", "start", "end", "outcome", "backup"]
    assert tl["attempts_total"] == tl["attempts_shown"] == len(tl["attempts"]) == len(env.result.attempts)
    assert {n["node_id"] for n in tl["nodes"]} <= set(env.node_ids)
    assert all(n["state"] == "alive" for n in tl["nodes"])
    col = {name: i for i, name in enumerate(tl["columns"])}
    span = tl["t1"] - tl["t0"]
    seen = set()
    for row in tl["attempts"]:
        node_id = tl["nodes"][row[col["node"]]]["node_id"]
        seen.add((row[col["shard"]], node_id, row[col["outcome"]]))
        assert 0 <= row[col["sent"]] <= row[col["start"]] <= row[col["end"]] <= span + 1e-3, row
        assert row[col["backup"]] is False
    # The same attempts the client's result lists.
    assert seen == {(a.shard_index, a.node_id, a.outcome) for a in env.result.attempts}
    assert {s for s, _, o in seen if o == "done"} == {0, 1}
    assert data["failures"] == []

    # Errors are JSON with a reason; the page of any well-formed id is served (its script
    # shows the API's answer).
    for query, status_code in (("?circuit=1", 400), ("?circuit=x", 400), ("?circuit=-1", 400)):
        status, headers, body = request(f"{base}/api/jobs/{env.job_id}{query}")
        assert status == status_code and headers["Content-Type"].startswith("application/json"), query
        assert json.loads(body)["error"]
    status, _, body = request(f"{base}/api/jobs/0123456789abcdef")
    assert status == 404 and "not among the jobs" in json.loads(body)["error"]
    status, _, body = request(f"{base}/jobs/0123456789abcdef")
    assert status == 200 and b'data-page="job"' in body


def test_client_token_required_when_auth_is_on(env: Env) -> None:
    with serving(env.cluster, tokens=lambda t: t == TOKEN) as (_, base):
        wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {TOKEN}x"},
                 basic("viewer", "wrong"), basic(TOKEN, ""), {"Authorization": "Basic !!!not-base64"},
                 {"Authorization": f"Token {TOKEN}"}, {"Authorization": TOKEN}]
        paths = ("/", "/api/status", "/nope", f"/jobs/{env.job_id}", f"/api/jobs/{env.job_id}",
                 "/static/dashboard.js")
        for path in paths:
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
            snap = get_json(base + "/api/status", headers)
            assert env.job_id in {j["job_id"] for j in snap["jobs"]}
        for path in paths:
            status, _, _ = request(base + path, headers=basic("anyone", TOKEN))
            assert status == (404 if path == "/nope" else 200), path
        assert get_json(f"{base}/api/jobs/{env.job_id}", basic("anyone", TOKEN))["job"]["job_id"] == env.job_id

        status, _, body = request(base + "/healthz")  # probes carry no token
        assert (status, body) == (200, b"ok\n")


ALICE = "alice-dashboard-token-aaaaaaaaaa"
BOB = "bob-dashboard-token-bbbbbbbbbbbbb"
OPS = "ops-dashboard-token-cccccccccccccc"
PLAIN = "plain-dashboard-token-dddddddddd"


def _users(tmp_path: Path) -> Users:
    path = tmp_path / "client.tokens"
    path.write_text(f"{ALICE} alice\n{BOB} bob weight=2\n{OPS} ops admin\n{PLAIN}\n")
    path.chmod(0o600)
    return Users.from_config(Tokens.load(client_files=[path], node_tokens=["node-dashboard-token-eeeeeeeee"]),
                             CoordinatorConfig())


def test_each_user_sees_their_own_jobs_and_an_admin_every_job(env: Env, tmp_path: Path) -> None:
    cluster = env.cluster
    owners = {}
    for user in ("alice", "bob"):
        job = cluster.client.submit(ghz(2), shots=100, seed=2)
        job.result(timeout=120)
        owners[job.job_id] = user

    async def own() -> None:  # who submitted them, as the coordinator records it with authentication
        assert cluster.coordinator is not None and cluster.coordinator.server.runtime is not None
        for job_id, user in owners.items():
            cluster.coordinator.server.runtime.core.jobs[job_id].user = user

    on_loop(cluster, own())
    alice_job, bob_job = owners
    with serving(cluster, users=_users(tmp_path)) as (_, base):
        def listed(token: str) -> set[str]:
            snap = get_json(base + "/api/status", basic("anyone", token))
            assert snap["totals"]["nodes_alive"] == 2  # the cluster's totals are everyone's
            return {j["job_id"] for j in snap["jobs"]}

        everyone = listed(OPS)
        assert {alice_job, bob_job, env.job_id} <= everyone
        # One after the other within the overview's cache time: each viewer gets their own list.
        assert listed(ALICE) == {alice_job} and listed(BOB) == {bob_job}
        assert env.job_id in listed(PLAIN) and not {alice_job, bob_job} & listed(PLAIN)
        snap = get_json(base + "/api/status", {"Authorization": f"Bearer {ALICE}"})
        assert snap["viewer"] == {"user": "alice", "admin": False, "authenticated": True}
        assert [(j["user"], j["priority"]) for j in snap["jobs"]] == [("alice", "normal")]
        assert get_json(base + "/api/status", basic("x", OPS))["viewer"]["admin"] is True

        # A job page: the owner's and an admin's; to anyone else as unknown as a job that is not.
        for token in (ALICE, OPS):
            data = get_json(f"{base}/api/jobs/{alice_job}", basic("anyone", token))
            assert data["job"]["user"] == "alice" and data["job"]["priority"] == "normal"
        for token in (BOB, PLAIN):
            status, _, body = request(f"{base}/api/jobs/{alice_job}", headers=basic("anyone", token))
            assert status == 404 and "not among the jobs" in json.loads(body)["error"]
        for headers in ({}, basic("alice", "wrong"), basic("anyone", "node-dashboard-token-eeeeeeeee")):
            status, _, _ = request(base + "/api/status", headers=headers)
            assert status == 401

    # Without authentication (users without tokens): everyone sees every job.
    with serving(cluster, users=Users.from_config(Tokens(), CoordinatorConfig())) as (_, base):
        snap = get_json(base + "/api/status")
        assert {alice_job, bob_job, env.job_id} <= {j["job_id"] for j in snap["jobs"]}
        assert snap["viewer"] == {"user": DEFAULT_USER, "admin": True, "authenticated": False}


def test_dashboard_takes_users_or_a_token_predicate_not_both(env: Env, tmp_path: Path) -> None:
    assert env.cluster.coordinator is not None and env.cluster.coordinator.server.runtime is not None
    with pytest.raises(ValueError, match="not both"):
        Dashboard(env.cluster.coordinator.server.runtime, users=_users(tmp_path), tokens=lambda t: True)


def test_store_rows_carry_their_user_when_the_store_gives_one() -> None:
    old = ("j1", 10.0, 3, 100, 1, "", 12.0)  # (job_id, created_at, state, shots, circuits, error, finished_at)
    assert _row_user(old) is None and _row_view(old)["user"] == ""
    assert _row_user((*old, "alice")) == "alice" and _row_view((*old, "alice"))["user"] == "alice"
    view = _row_view((*old, "alice"))
    assert view["job_id"] == "j1" and view["wall_s"] == 2.0 and view["detail"] is False
    assert view["priority"] is None and view["pruned"] is None
    view = _row_view((*old, "bob", 3, True))  # the store's JobRow: user, priority, pruned
    assert (view["user"], view["priority"], view["pruned"]) == ("bob", "high", True)


def test_store_rows_are_asked_for_the_viewer_s_own_jobs() -> None:
    from types import SimpleNamespace

    from qscale.coordinator.users import Identity

    asked = []
    store = SimpleNamespace(list_jobs=lambda limit, user: asked.append((limit, user)) or [("j", user)])
    dashboard = SimpleNamespace(store=store)
    assert Dashboard._stored_jobs(dashboard, 60, Identity("alice", False)) == [("j", "alice")]  # type: ignore[arg-type]
    assert Dashboard._stored_jobs(dashboard, 60, Identity("ops", True)) == [("j", None)]  # type: ignore[arg-type]
    assert asked == [(60, "alice"), (60, None)]


def test_shots_per_second_series_is_bounded_and_right(env: Env) -> None:
    assert rate_series([]) == []
    assert rate_series([(0.0, 0), (2.0, 100), (4.0, 100), (4.0, 500), (6.0, 50), (8.0, 70)]) == [
        (2.0, 50.0), (4.0, 0.0), (6.0, 0.0), (8.0, 10.0)]

    samples = [0]

    def clock() -> float:  # the real time, counting the sampler's calls
        samples[0] += 1
        return time.time()

    with serving(env.cluster, clock=clock, history_s=0.1, sample_s=0.01) as (_, base):
        wait_until(lambda: samples[0] > 40, 30, "the sampler to take 40 samples")
        snap = get_json(base + "/api/status")
        points = snap["shots_per_s"]["points"]
        assert 1 <= len(points) <= 10  # history_s / sample_s
        assert all(rate == 0.0 for _, rate in points)  # no job runs: nothing was counted meanwhile
        assert snap["totals"]["shots_per_s"] == 0.0
        assert [p[0] for p in points] == sorted(p[0] for p in points)


def test_the_coordinator_serves_dashboard_and_metrics_on_its_loop_and_logs_each_once(
        caplog: pytest.LogCaptureFixture) -> None:
    dashboard_port, metrics_port = free_port(), free_port()
    caplog.set_level(logging.INFO)
    cluster = LocalCluster(0, config=fast_config(dashboard_port=dashboard_port, metrics_port=metrics_port))
    try:
        cluster.start()
        assert cluster.coordinator is not None
        server = cluster.coordinator.server
        assert (server.dashboard_port, server.metrics_port) == (dashboard_port, metrics_port)
        lines = [r.getMessage() for r in caplog.records]
        assert [m for m in lines if m.startswith("dashboard on ")] == [
            f"dashboard on http://127.0.0.1:{dashboard_port}/ (no authentication)"], lines
        assert [m for m in lines if m.startswith("metrics on ")] == [
            f"metrics on http://127.0.0.1:{metrics_port}/metrics"], lines

        snap = get_json(f"http://127.0.0.1:{dashboard_port}/api/status")
        assert snap["totals"]["nodes_alive"] == 0 and snap["nodes"] == []
        # /metrics: the same HTTP machinery (its headers), the coordinator's registry.
        status, headers, body = request(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        check_security_headers(headers)
        assert b'qscale_nodes{state="alive"} 0.0' in body and b"qscale_shots_completed_total 0.0" in body
        status, _, _ = request(f"http://127.0.0.1:{metrics_port}/metrics", method="POST")
        assert status == 405
    finally:
        cluster.stop()
    for port in (dashboard_port, metrics_port):  # both closed with the coordinator
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(5)
            s.connect(("127.0.0.1", port))


# ---------------------------------------------------------------------- real browser

def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def need_chromium() -> str:
    chromium = _chromium()
    if chromium is None:
        if _ci():
            pytest.fail("chromium is not installed: .ci/run must install it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI must have it")
    return chromium


def _artifact_path(name: str) -> Path:
    folder = os.environ.get("QSCALE_TEST_ARTIFACTS")
    path = Path(folder) if folder else REPO / "tests" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path / name


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


def _check_rendered(dom: str) -> None:
    assert 'data-live="1"' in dom, f"the page's script did not render its data:\n{dom[:3000]}"
    banner = re.search(r'<div id="banner"[^>]*>([^<]*)</div>', dom)
    assert banner is not None and banner.group(1) == "", f"the page shows an error: {banner}"


def _screenshot(chromium: str, url: str, profile: Path, name: str) -> None:
    screenshot = _artifact_path(name)
    screenshot.unlink(missing_ok=True)
    _run_browser(chromium, [f"--screenshot={screenshot}", url], profile)
    assert screenshot.is_file(), "chromium wrote no screenshot"
    data = screenshot.read_bytes()
    width, height, distinct = _png_facts(data)
    assert (width, height) == (1280, 900)
    assert len(data) > 10_000 and distinct > 20, "the screenshot looks blank"


def test_pages_render_in_a_real_browser(env: Env) -> None:
    chromium = need_chromium()
    profile = Path(tempfile.mkdtemp(prefix="qscale-chromium-"))
    try:
        with serving(env.cluster, tokens=lambda t: t == TOKEN) as (_, base):
            # Credentials in the URL: the browser sends them as Basic auth, and the page's own
            # requests (its script, its style, the JSON) must get through with them too.
            root = base.replace("http://", f"http://viewer:{TOKEN}@")
            dom = _run_browser(chromium, ["--dump-dom", root + "/"], profile / "dom")
            _check_rendered(dom)
            for node_id in env.node_ids:
                assert node_id in dom
            assert f'<a href="jobs/{env.job_id}">{env.job_id}</a>' in dom
            assert f'<td class="user">{DEFAULT_USER}</td>' in dom and "every user's jobs" in dom
            assert "100.0%" in dom and f"{SHOTS:,} / {SHOTS:,}" in dom
            assert html_escaped(HOSTILE_NAME).replace("&quot;", '"') in dom  # shown as text...
            assert '<b id="xss">' not in dom  # ...never as markup
            _screenshot(chromium, root + "/", profile / "shot", "dashboard.png")

            dom = _run_browser(chromium, ["--dump-dom", f"{root}/jobs/{env.job_id}"], profile / "job")
            _check_rendered(dom)
            assert f'<b id="j-id" class="mono">{env.job_id}</b>' in dom
            assert f"<dt>user</dt><dd>{DEFAULT_USER}</dd><dt>priority</dt><dd>normal</dd>" in dom
            for bits, count in env.result.counts[0].items():  # one histogram bar per outcome
                assert re.search(rf'<rect [^>]*class="bar" data-outcome="{bits}" data-count="{count}"', dom), bits
            bars = re.findall(r'<rect [^>]*class="att att-(\w+)[^"]*" data-shard="(\d+)"|'
                              r'<rect [^>]*data-shard="(\d+)"[^>]*class="att att-(\w+)', dom)
            assert len(bars) == len(env.result.attempts) and all("done" in b for b in bars), bars
            for node_id in {a.node_id for a in env.result.attempts}:  # a timeline row per node
                assert f'data-node="{node_id}"' in dom
            assert html_escaped(HOSTILE_NAME).replace("&quot;", '"') in dom and '<b id="xss">' not in dom
            assert "nothing failed" in dom
            _screenshot(chromium, f"{root}/jobs/{env.job_id}", profile / "jobshot", "dashboard-job.png")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_job_page_shows_running_shards_a_lost_node_and_the_shards_run_again(
        make_cluster: Callable[..., LocalCluster]) -> None:
    """A node is killed while it runs a shard: the timeline shows its attempts running, then
    lost or cancelled, the node lost, and every shard counted once elsewhere; the browser draws it."""
    cluster = make_cluster(2)
    client = cluster.client
    with serving(cluster) as (_, base):
        job = client.submit(slow_circuit(), shots=4000, seed=3)

        def running_row() -> tuple[str, list[Any]] | None:
            data = get_json(f"{base}/api/jobs/{job.job_id}")
            tl = data["timeline"]
            col = {name: i for i, name in enumerate(tl["columns"])}
            busy = [row[col["node"]] for row in tl["attempts"]
                    if row[col["outcome"]] == "running" and row[col["start"]] is not None]
            assert len(busy) == len(set(busy)), tl  # one slot per node: one attempt runs at a time there
            for row in tl["attempts"]:
                if row[col["outcome"]] == "running" and row[col["start"]] is not None:
                    assert row[col["end"]] is None and data["job"]["state"] == "running"
                    return tl["nodes"][row[col["node"]]]["node_id"], row
            return None

        victim, _ = wait_until(running_row, 60, "a shard running on a node")  # type: ignore[misc]
        name = next(n.name for n in client.nodes() if n.node_id == victim)
        proc = cluster.processes[int(name.rsplit("-", 1)[1])]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        result = job.result(timeout=180)
        assert result.shots == 4000
        wait_until(lambda: any(n.node_id == victim and n.state == "lost" for n in client.nodes()), 30,
                   "the killed node to be declared lost")

        data = get_json(f"{base}/api/jobs/{job.job_id}")
        tl = data["timeline"]
        col = {name: i for i, name in enumerate(tl["columns"])}
        states = {n["node_id"]: n["state"] for n in tl["nodes"]}
        assert states[victim] == "lost" and list(states.values()).count("alive") == 1
        rows = [(tl["nodes"][r[col["node"]]]["node_id"], r) for r in tl["attempts"]]
        victim_ends = {r[col["outcome"]] for node, r in rows if node == victim}
        assert victim_ends & {"lost", "cancelled"}, victim_ends  # lost, or overtaken by a backup copy
        done = [r[col["shard"]] for _, r in rows if r[col["outcome"]] == "done"]
        assert sorted(done) == list(range(data["job"]["shards_total"]))  # each shard counted once
        assert {(a.shard_index, a.outcome) for a in result.attempts} == \
            {(r[col["shard"]], r[col["outcome"]]) for _, r in rows}
        lost = [f for f in data["failures"] if f["outcome"] == "lost"]
        assert all(f["node_id"] == victim and f["error"] for f in lost)

        chromium = _chromium()
        if chromium is None:
            need_chromium()
            return
        profile = Path(tempfile.mkdtemp(prefix="qscale-chromium-"))
        try:
            dom = _run_browser(chromium, ["--dump-dom", f"{base}/jobs/{job.job_id}"], profile)
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        _check_rendered(dom)
        row = re.search(rf'<g class="node-row" data-node="{victim}">(.*?)</g>', dom)
        assert row is not None, dom[:3000]
        assert ">lost · " in row.group(1)  # the row says the node is lost...
        assert re.search(r'class="att att-(lost|cancelled)', row.group(1))  # ...and draws what it lost
        assert 'class="att att-done' in dom
