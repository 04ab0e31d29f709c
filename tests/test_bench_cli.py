"""benchmarks/bench.py: its command line, where its results go, and a tiny quick run that writes
nothing inside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/bench.py imported as a script would see it (benchmarks/ on the path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench as module

    return module


def test_defaults_and_estimator_delegation(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert args.only == list(bench.WORKLOADS) and args.configs is None and args.estimator is None
    assert args.repeat == 3 and args.output is None

    args = bench.parse_args(["--only", "all", "--repeat", "2", "--c2-cap", "22"])
    assert args.only == list(bench.WORKLOADS)
    assert args.estimator.only == ["E1", "E2", "C1", "C2"]
    assert (args.estimator.repeat, args.estimator.c2_cap, args.estimator.quick) == (2, 22, False)
    assert args.estimator.job_timeout == 1800.0  # estimator.py's own default when none is given

    args = bench.parse_args(["--only", "C1,W7", "--quick"])
    assert args.only == ["W7"] and args.estimator.only == ["C1"] and args.estimator.quick
    assert args.repeat == 1 and args.estimator.repeat == 1

    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "W9"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "pool-fancy"])


def test_default_configurations(bench: ModuleType) -> None:
    specs = bench.workload_specs(quick=False)
    assert "pool-basic" in specs["W1"].configs
    assert all("pool-basic" not in specs[k].configs for k in specs if k != "W1")
    assert {"qscale-2nodes-raw", "aer-default-transpile"} <= set(specs["W2"].configs)
    assert {"qscale-1node-all", "aer-default"} <= set(specs["W3"].configs) & set(specs["W7"].configs)
    # Every configuration a target needs runs by default.
    for ratio in bench.RATIO_SPECS:
        needed = {ratio.numerator, ratio.denominator} - {""}
        assert needed <= set(specs[ratio.workload].configs), ratio
    plan = {k: list(s.configs) for k, s in specs.items()}
    seconds, unknown = bench.estimate_plan(plan, 3)
    assert not unknown and seconds < 30 * 60


def test_output_paths(bench: ModuleType, tmp_path: Path) -> None:
    assert bench.output_paths(tmp_path) == (tmp_path / "results.json", tmp_path / "results.md",
                                            tmp_path / "estimator-results.json")
    target = tmp_path / "run.json"
    assert bench.output_paths(target) == (target, tmp_path / "run.md", tmp_path / "run-estimator.json")
    default, _, _ = bench.output_paths(None)
    try:
        assert default.parent.parent == Path(tempfile.gettempdir())
        assert REPO not in default.resolve().parents
    finally:
        default.parent.rmdir()


def _snapshot(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in folder.iterdir() if p.name != "__pycache__"}


def test_quick_run_writes_nothing_in_the_checkout(tmp_path: Path) -> None:
    before = _snapshot(BENCHMARKS)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench.py"), "--quick", "--repeat", "1", "--only", "W1,W6",
         "--configs", "aer-1thread,aer-default"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _snapshot(BENCHMARKS) == before
    written = sorted(p.name for p in tmp_path.glob("qscale-bench-*/*"))
    assert written == ["results.json", "results.md"], (written, proc.stdout[-2000:])
    assert "Targets" in proc.stdout and "took" in proc.stdout
