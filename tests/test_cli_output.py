"""What the CLI prints at its edges: a reader that stops early, and asking for no outcomes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import bell
from qscale.circuits import dump_qpy
from qscale.local import LocalCluster

CLI = [sys.executable, "-m", "qscale.coordinator"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, QSCALE_COORDINATOR=""))


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(1, cores_per_node=1) as c:
        yield c


@pytest.mark.parametrize("command", ["nodes", "jobs"])
def test_a_closed_pipe_is_not_a_traceback(cluster: LocalCluster, command: str) -> None:
    """``nodes --json | head`` : the reader goes away before the command writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    try:
        proc = subprocess.run([*CLI, command, "--json", "--coordinator", cluster.address], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env=dict(os.environ, QSCALE_COORDINATOR=""))
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141, proc.stderr  # as a command killed by SIGPIPE


def test_top_zero_prints_no_outcome_table(cluster: LocalCluster, tmp_path: Path) -> None:
    path = tmp_path / "bell.qpy"
    path.write_bytes(dump_qpy(bell()))
    proc = _cli("submit", str(path), "--shots", "100", "--seed", "3", "--wait", "--top", "0",
                "--coordinator", cluster.address)
    assert proc.returncode == 0, proc.stderr
    assert "share" not in proc.stdout and not set("┏┃│└") & set(proc.stdout), proc.stdout  # no table
    assert "100 shots" in proc.stdout
    shown = _cli("submit", str(path), "--shots", "100", "--seed", "3", "--wait", "--top", "1", "--json",
                 "--coordinator", cluster.address)
    assert shown.returncode == 0 and json.loads(shown.stdout)["results"][0]["shots"] == 100
    negative = _cli("result", "x", "--top", "-1", "--coordinator", cluster.address)
    assert negative.returncode == 2 and "--top" in negative.stderr
