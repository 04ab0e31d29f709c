"""What the CLI says about a result: why the job has its shards (and ``--shots-per-shard`` to
spread it), readable shares, each circuit's name and the method that ran. Real subprocesses,
real local clusters."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qiskit import qpy

from conftest import bell
from qscale.local import LocalCluster
from test_cli import ROOT, cli
from test_job_details import METHODS, NAMES, _files

SEED24 = str(ROOT / "examples" / "hadamard24.qasm")
_ROW = re.compile(r"^│ ([01 ]+) │ +(\d+) │ +(\S+) │$")


def _shares(stdout: str) -> list[tuple[int, str]]:
    """(count, share) of every row of the outcome tables."""
    return [(int(m[2]), m[3]) for line in stdout.splitlines() if (m := _ROW.match(line.strip()))]


def test_run_explains_its_shards_and_spreads_them_on_request() -> None:
    # 100,000 shots over 2^24 near-uniform outcomes: every share is a few in 100,000.
    text = cli("run", SEED24, "--shots", "100000", "--seed", "3", "--local-nodes", "2")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    why = [line for line in lines if re.match(r"^\d+ shards: the job is about [\d.]+ m?s of estimated work", line)]
    assert why and why[0].endswith("smallest shard target is 50 ms; --shots-per-shard N spreads it further"), text.stdout
    header = next(line for line in lines if line.startswith("circuit 0 "))
    assert header.startswith("circuit 0 'hadamard24': 100000 shots") and header.endswith("stabilizer method"), header
    shares = _shares(text.stdout)
    assert len(shares) == 10 and all(count >= 1 for count, _ in shares)
    assert all(float(share) > 0 for _, share in shares), text.stdout

    spread = cli("run", SEED24, "--shots", "30000", "--seed", "3", "--local-nodes", "2", "--shots-per-shard", "2000",
                 "--json")
    assert spread.returncode == 0, spread.stderr
    out = json.loads(spread.stdout)
    meta = out["metadata"]
    assert meta["shards"] == 15 and meta["plan"]["limit"] == "shots_per_shard"
    assert meta["plan"]["explanation"].startswith("15 shards: at most 2,000 shots per shard")
    assert out["results"][0]["method"] == "stabilizer" and meta["method"] == "stabilizer"
    # The plan does not depend on the cluster: one node gives the same counts.
    alone = cli("run", SEED24, "--shots", "30000", "--seed", "3", "--local-nodes", "1", "--shots-per-shard", "2000",
                "--json")
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["results"] == out["results"]


def test_names_and_methods_in_the_table_and_the_json(tmp_path: Path) -> None:
    files = [str(p) for p in _files(tmp_path)]
    broken = tmp_path / "broken.qasm"
    broken.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0]\ncx q[0], q[1];\n')
    saved = tmp_path / "result.json"
    with LocalCluster(1, cores_per_node=1) as cluster:
        addr = ["--coordinator", cluster.address]
        proc = cli("submit", *files, "--shots", "300", "--seed", "2", "--wait", "--output", str(saved), *addr)
        assert proc.returncode == 0, proc.stderr
        for index, (name, method) in enumerate(zip(NAMES, METHODS)):
            assert f"circuit {index} '{name}': 300 shots" in proc.stdout
            header = next(line for line in proc.stdout.splitlines() if line.startswith(f"circuit {index} "))
            assert header.endswith(f"{method} method"), header
        assert re.search(r"^\d+ shards?: the job is about ", proc.stdout, re.M), proc.stdout
        data = json.loads(saved.read_text())
        assert [r["name"] for r in data["results"]] == NAMES
        assert [r["method"] for r in data["results"]] == METHODS
        assert data["metadata"]["plan"]["shards"] == data["metadata"]["shards"]

        again = cli("result", data["job_id"], "--json", *addr)
        assert json.loads(again.stdout)["results"] == data["results"]

        bad = cli("submit", str(broken), "--shots", "10", *addr)
        assert bad.returncode == 2 and bad.stderr.startswith(f"error: {broken}: OpenQASM 2 error at line 6"), \
            bad.stderr

        # A QPY circuit named "bell" in a file of another name.
        other = tmp_path / "experiment-7.qpy"
        with other.open("wb") as fh:
            qpy.dump(bell(), fh)
        table = cli("submit", str(other), "--shots", "100", "--wait", *addr)
        assert table.returncode == 0 and "circuit 0 'bell': 100 shots" in table.stdout, table.stdout


def test_a_share_is_never_shown_as_zero() -> None:
    from qscale.coordinator.cli import _share

    for shots in (1, 7, 10_000, 30_000, 1_000_000, 10**8, (1 << 63) - 1):
        for count in {1, 2, 3, shots // 3 or 1, shots - 1 or 1, shots}:
            shown = _share(count, shots)
            assert float(shown) > 0, (count, shots, shown)
            assert abs(float(shown) - count / shots) <= 0.01 * count / shots + 5e-5, (count, shots, shown)
    assert _share(0, 100) == "0"
    assert _share(5017, 10_000) == "0.5017"
    assert _share(1, 10_000) == "1.00e-04"
