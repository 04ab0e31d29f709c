"""Live progress in the CLI: ``watch``, and the bar of ``submit --wait``, as a user runs them.

The terminal cases run the CLI in a pseudo-terminal (so that stdout is a tty and rich draws the
bar); the others through pipes. The jobs are held back by pausing the nodes (SIGSTOP) until the
watcher has drawn its first update, so the bar is seen to move; the cluster's heartbeat timeout
is long enough that a paused node is not declared lost meanwhile.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from qiskit import qpy

from conftest import bell, fast_config, free_port, slow_circuit
from qscale.client import Client
from qscale.coordinator import cli as cli_module
from qscale.coordinator.planner import PlanningPolicy
from qscale.coordinator.server import EmbeddedCoordinator
from qscale.errors import FailedPreconditionError, JobTimeoutError, UnavailableError
from qscale.local import LocalCluster
from qscale.progress import JsonLinesView, PlainView, RateMeter, follow, format_duration
from qscale.results import JobState, JobStatus, Progress

CLI = [sys.executable, "-m", "qscale.coordinator"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PERCENT = re.compile(r"(\d+)%\s+[\d,]+/[\d,]+ shots")
FULL_BAR = re.compile(r"━{20,}\s+100%")  # rich's bar, complete (tables use ━ too, never followed by a %)


def has_bar(text: str) -> bool:
    """Whether ``text`` holds anything of the live display: a bar row, a rate or an ETA, escapes."""
    return bool(PERCENT.search(text)) or "shots/s" in text or "ETA" in text or "\x1b[" in text


def _config() -> Any:
    # Paused nodes must not be declared lost; shards of 250 shots make a few thousand shots of
    # the slow circuit a dozen shards, so the bar moves in steps.
    return fast_config(heartbeat_timeout_s=60.0, policy=PlanningPolicy(shots_per_shard=250))


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Two nodes of one core each, shared by the tests of this module."""
    cluster = LocalCluster(2, cores_per_node=1, config=_config())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def paused(processes: Sequence[subprocess.Popen[bytes]]) -> Iterator[Callable[[], None]]:
    """Stop the node processes; yields a function that resumes them (also done on exit)."""
    for proc in processes:
        os.kill(proc.pid, signal.SIGSTOP)

    def resume() -> None:
        for proc in processes:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)

    try:
        yield resume
    finally:
        resume()


def clean(raw: str) -> str:
    """Terminal output without escape sequences, one rendered line per line."""
    return ANSI.sub("", raw).replace("\r\n", "\n").replace("\r", "\n")


class Terminal:
    """A CLI process whose stdout and stderr are a pseudo-terminal of 120 x 40."""

    def __init__(self, args: Sequence[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40", QSCALE_COORDINATOR="")
        env.pop("NO_COLOR", None)
        try:
            self.proc = subprocess.Popen([*CLI, *args], stdin=slave, stdout=slave, stderr=slave, env=env,
                                         close_fds=True)
        finally:
            os.close(slave)
        self.raw = b""
        self.eof = False

    @property
    def text(self) -> str:
        return clean(self.raw.decode("utf-8", errors="replace"))

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if not ready:
            return
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every writer of the terminal is gone
            data = b""
        if data:
            self.raw += data
        else:
            self.eof = True

    def read_until(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """Read until ``predicate(text so far)``; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            if self.eof or time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout}s (exit {self.proc.poll()}); output:\n{self.text[-3000:]}")
            self._read(min(0.5, deadline - time.monotonic()))
        return self.text

    def finish(self, timeout: float) -> int:
        """Read to the end of the output; the exit code (the test fails after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(min(0.5, deadline - time.monotonic()))
            if self.proc.poll() is not None:
                self._read(0.2)  # what is left in the terminal's buffer
                if self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                    break
        try:
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the CLI did not end within {timeout}s; output:\n{self.text[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@contextmanager
def terminal(*args: str) -> Iterator[Terminal]:
    term = Terminal(args)
    try:
        yield term
    finally:
        term.close()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI through pipes (stdout is not a terminal)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, QSCALE_COORDINATOR=""))


def percents(text: str) -> list[int]:
    return [int(m) for m in PERCENT.findall(text)]


# ------------------------------------------------------------- in a terminal

def test_watch_draws_a_bar_that_reaches_100_percent(cluster: LocalCluster) -> None:
    with paused(cluster.processes) as resume:
        job = cluster.client.submit([slow_circuit(), bell()], shots=2000, seed=3)
        with terminal("watch", job.job_id, "--coordinator", cluster.address) as term:
            term.read_until(lambda text: "0/4,000 shots" in text, 60, "first rendering")
            resume()
            code = term.finish(180)
            text = term.text
    assert code == 0, text[-3000:]
    assert "Traceback" not in text
    seen = percents(text)
    assert seen[0] == 0 and seen[-1] == 100, seen
    assert any(0 < p < 100 for p in seen), f"the bar never moved between 0% and 100%: {seen}"
    last = text[text.rindex(f"job {job.job_id} done"):]
    assert "100%" in last and "4,000/4,000 shots" in last
    shards = re.search(r"(\d+)/(\d+) shards", last)
    assert shards and shards[1] == shards[2] and int(shards[1]) >= 8, last
    assert re.search(r"\b[12] nodes?\b", last), last
    assert FULL_BAR.search(last), last
    # The outcome tables of both circuits; the bell circuit's top outcomes are 00 and 11.
    assert "circuit 0" in last and "circuit 1" in last
    assert re.search(r"\b11\s+[\d,]+", last) and re.search(r"\b00\s+[\d,]+", last)


def test_watch_ctrl_c_exits_130_without_a_traceback(cluster: LocalCluster) -> None:
    with paused(cluster.processes):
        job = cluster.client.submit(slow_circuit(), shots=1000, seed=4)
        try:
            with terminal("watch", job.job_id, "--coordinator", cluster.address) as term:
                term.read_until(lambda text: "0/1,000 shots" in text, 60, "first rendering")
                term.proc.send_signal(signal.SIGINT)
                code = term.finish(30)
                text = term.text
        finally:
            job.cancel()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert f"job {job.job_id} goes on" in text


def test_submit_wait_in_a_terminal_shows_the_bar_then_the_result(cluster: LocalCluster, tmp_path: Path) -> None:
    path = tmp_path / "bell.qpy"
    with path.open("wb") as fh:
        qpy.dump(bell(), fh)
    with terminal("submit", str(path), "--shots", "1500", "--seed", "2", "--wait",
                  "--coordinator", cluster.address) as term:
        code = term.finish(120)
        text = term.text
    assert code == 0, text[-3000:]
    assert FULL_BAR.search(text) and "1,500/1,500 shots" in text, text[-3000:]
    assert "circuit 0 'bell': 1500 shots" in text  # the result table follows the bar


# ----------------------------------------------------------- through pipes

class Piped:
    """A CLI process writing to a pipe, read without Python's buffering, every read bounded."""

    def __init__(self, args: Sequence[str], stderr: Path) -> None:
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=err, bufsize=0,
                                         env=dict(os.environ, QSCALE_COORDINATOR=""))
        self.stderr_path = stderr
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.eof = False

    def _read(self, deadline: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        if ready:
            data = os.read(self.fd, 65536)
            self.buffer += data
            self.eof = not data

    def line(self, timeout: float) -> str:
        """The next line of stdout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            if self.eof or time.monotonic() > deadline:
                pytest.fail(f"no line within {timeout}s; stderr:\n{self.stderr}")
            self._read(deadline)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def rest(self, timeout: float) -> tuple[int, str]:
        """Everything left on stdout, and the exit code."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() > deadline:
                pytest.fail(f"the CLI did not end within {timeout}s; stderr:\n{self.stderr}")
            self._read(deadline)
        return self.proc.wait(max(0.1, deadline - time.monotonic())), self.buffer.decode()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_watch_json_prints_json_lines_ending_done(cluster: LocalCluster, tmp_path: Path) -> None:
    with paused(cluster.processes) as resume:
        job = cluster.client.submit(slow_circuit(), shots=1500, seed=5)
        watch = Piped(["watch", job.job_id, "--json", "--coordinator", cluster.address], tmp_path / "err")
        try:
            first = watch.line(60)  # an update while the nodes are paused
            resume()
            code, rest = watch.rest(180)
        finally:
            watch.close()
    assert code == 0, watch.stderr
    lines = [json.loads(line) for line in [first, *rest.splitlines()]]
    assert lines[0]["state"] in ("queued", "running") and lines[0]["shots_done"] == 0
    assert all(x["state"] in ("queued", "running") for x in lines[:-1])
    done = lines[-1]
    assert done["state"] == "done" and done["job_id"] == job.job_id
    assert done["shots_done"] == done["shots_total"] == 1500 and done["percent"] == 100
    assert done["shards_done"] == done["shards_total"] >= 6 and done["eta_s"] == 0
    assert done["nodes_used"] and done["wall_time_s"] > 0 and done["rate_shots_per_s"] > 0
    (top,) = done["top"]
    assert 0 < len(top) <= 5 and list(top.values()) == sorted(top.values(), reverse=True)
    assert "\x1b[" not in rest and "━" not in rest


def test_watch_into_a_pipe_and_failed_states(cluster: LocalCluster) -> None:
    done = cluster.client.submit(bell(), shots=400, seed=6)
    done.result(timeout=60)
    proc = cli("watch", done.job_id, "--coordinator", cluster.address)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith(f"job {done.job_id} done: 400/400 shots (100%)")
    assert "\x1b[" not in proc.stdout and "━" not in proc.stdout

    with paused(cluster.processes):
        cancelled = cluster.client.submit(bell(), shots=400)
        cancelled.cancel()
    proc = cli("watch", cancelled.job_id, "--json", "--coordinator", cluster.address)
    assert proc.returncode == 1 and "was cancelled" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["state"] == "cancelled"
    missing = cli("watch", "nope", "--coordinator", cluster.address)
    assert missing.returncode == 2 and "no job" in missing.stderr


def test_submit_wait_into_a_pipe_prints_no_bar(cluster: LocalCluster, tmp_path: Path) -> None:
    path = tmp_path / "bell.qpy"
    with path.open("wb") as fh:
        qpy.dump(bell(), fh)
    proc = cli("submit", str(path), "--shots", "600", "--seed", "1", "--wait", "--coordinator", cluster.address)
    assert proc.returncode == 0, proc.stderr
    assert "circuit 0 'bell': 600 shots" in proc.stdout
    for output in (proc.stdout, proc.stderr):
        assert not has_bar(output), output


def test_watch_survives_a_coordinator_restart(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    config = _config().with_(listen=address, state_dir=str(tmp_path / "state"))
    nodes = LocalCluster(0, cores_per_node=1, config=config, log_dir=tmp_path / "logs")
    coordinator = EmbeddedCoordinator(config)
    client = Client(address)
    watch: Piped | None = None
    try:
        coordinator.start()
        node = nodes.add_node(coordinator=address)
        client.wait_for_nodes(1, timeout=60)
        with paused([node]) as resume:
            job = client.submit(slow_circuit(), shots=1000, seed=7)
            watch = Piped(["watch", job.job_id, "--json", "--top", "0", "--coordinator", address],
                          tmp_path / "err")
            first = json.loads(watch.line(60))
            assert first["state"] in ("queued", "running") and "top" not in first
            coordinator.stop()
            coordinator = EmbeddedCoordinator(config)
            coordinator.start()
            resume()
        code, out = watch.rest(180)
        assert code == 0, watch.stderr
        last = json.loads(out.splitlines()[-1])
        assert last["state"] == "done" and last["shots_done"] == 1000
        assert "reconnecting" in watch.stderr and "Traceback" not in watch.stderr
    finally:
        if watch is not None:
            watch.close()
        client.close()
        nodes.stop()
        coordinator.stop()


# ------------------------------------------------------------------- units

def _status(state: JobState, done: int, total: int = 1000, error: str = "") -> JobStatus:
    return JobStatus("j1", state, error, total, done, 4, done * 4 // total, 1, 1, 1000.0,
                     1010.0 if state.final else 0.0)


def _progress(state: JobState, done: int) -> Progress:
    return Progress(_status(state, done), [{"00": done // 2, "11": done - done // 2}])


class _ScriptedJob:
    """A job whose Watch streams follow a script: per call, an exception, or a list of updates
    (where an exception breaks the stream)."""

    job_id = "j1"

    def __init__(self, script: list[list[Progress | Exception] | Exception]) -> None:
        self.script = script
        self.calls: list[dict[str, Any]] = []

    def watch(self, *, counts: bool = True, max_outcomes: int = 0, timeout: float | None = None,
              wait_for_ready: bool = False) -> Iterator[Progress]:
        self.calls.append({"counts": counts, "max_outcomes": max_outcomes, "timeout": timeout,
                           "wait_for_ready": wait_for_ready})
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        for item in step:
            if isinstance(item, Exception):
                raise item
            yield item


class _Recorder:
    def __init__(self) -> None:
        self.updates: list[Progress] = []
        self.reconnects: list[int] = []

    def update(self, progress: Progress) -> None:
        self.updates.append(progress)

    def reconnecting(self, attempt: int, error: Exception) -> None:
        self.reconnects.append(attempt)

    def finish(self, progress: Progress, nodes_used: Sequence[str] | None = None) -> None:
        raise AssertionError("follow leaves finish to its caller")


def test_follow_watches_again_waiting_for_the_coordinator_to_come_back() -> None:
    down = UnavailableError("coordinator restarting")
    job = _ScriptedJob([down] * 3 + [[_progress(JobState.RUNNING, 250), down],  # breaks mid-stream
                                     [_progress(JobState.RUNNING, 500)],  # ends without a final state
                                     [_progress(JobState.DONE, 1000)]])
    view = _Recorder()
    final = follow(job, view, top=3)
    assert final.status.state == JobState.DONE and final.status.shots_done == 1000
    assert [p.status.shots_done for p in view.updates] == [250, 500]
    assert view.reconnects == [1, 2, 3, 1, 1]  # counted afresh once updates flowed again
    # Only the first watch fails at once when the coordinator is away; every one after a break
    # waits for the channel to reconnect (gRPC's backoff does the waiting, nothing here sleeps).
    assert [c["wait_for_ready"] for c in job.calls] == [False, True, True, True, True, True]
    assert all(c["counts"] is True and c["max_outcomes"] == 3 and c["timeout"] is None for c in job.calls)


def test_follow_gives_up_at_its_timeout() -> None:
    now = [0.0]

    class _Down(_ScriptedJob):
        def watch(self, **kwargs: Any) -> Iterator[Progress]:
            now[0] += 1.0  # each watch waits a second for the coordinator, in vain
            return super().watch(**kwargs)

    job = _Down([UnavailableError("down")] * 100)
    with pytest.raises(JobTimeoutError, match="not finished after 5"):
        follow(job, _Recorder(), top=0, timeout=5, clock=lambda: now[0])
    assert len(job.calls) == 5 and job.calls[0]["counts"] is False
    assert [c["timeout"] for c in job.calls] == [5, 4, 3, 2, 1]


def test_rate_meter_eta_and_text_views() -> None:
    now = [0.0]
    meter = RateMeter(window_s=10, clock=lambda: now[0])
    meter.add(0)
    assert meter.rate() is None and meter.eta(0, 100) is None
    for t in range(1, 21):
        now[0] = float(t)
        meter.add(100 * t)
    assert meter.rate() == pytest.approx(100.0) and meter.eta(2000, 3000) == pytest.approx(10.0)
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "-:--:--"

    import io

    lines, clock = io.StringIO(), [0.0]
    plain = PlainView(lines, interval=10, clock=lambda: clock[0])
    for t, done in ((0, 0), (1, 100), (5, 200), (12, 600), (13, 700)):
        clock[0] = t
        plain.update(_progress(JobState.RUNNING, done))
    plain.finish(_progress(JobState.DONE, 1000), ["n1", "n2"])
    text = lines.getvalue().splitlines()
    assert len(text) == 3  # the first update, one 10 s later, the final state
    assert text[1].startswith("job j1 running: 600/1,000 shots (60%)") and "ETA" in text[1]
    assert text[2] == "job j1 done: 1,000/1,000 shots (100%), 4/4 shards, 2 nodes, 10.0 s"

    out = io.StringIO()
    view = JsonLinesView(out, top=1, interval=0, clock=lambda: clock[0])
    view.update(_progress(JobState.RUNNING, 400))
    view.finish(_progress(JobState.DONE, 1000), None)
    first, last = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["state"] == "running" and first["percent"] == 40
    assert first["top"] == [{"00": 200}]  # of two outcomes as frequent, the smaller comes first
    assert last["state"] == "done" and last["eta_s"] == 0 and last["nodes_used"] is None
    assert last["rate_shots_per_s"] == 100.0 and last["wall_time_s"] == 10.0


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(FailedPreconditionError, match=r"pip install 'qscale\[plot\]'"):
        cli_module._plot(None, Path("x.png"), 5)
    # Checked before anything is submitted or waited for: no coordinator is needed to see it.
    code = cli_module.main(["result", "somejob", "--plot", "x.png", "--coordinator", "127.0.0.1:1"])
    assert code == 2 and "--plot needs matplotlib" in capsys.readouterr().err
