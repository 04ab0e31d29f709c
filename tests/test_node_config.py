"""Node configuration, CLI flags, capabilities, and the daemon parent staying free of qiskit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qscale.errors import InvalidArgumentError
from qscale.node import cli
from qscale.node.capabilities import build_capabilities
from qscale.node.config import NodeConfig
from qscale.settings import parse_size
from qscale.node.worker import WorkerInfo

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1073741824", 1 << 30),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("4G", 4 << 30),
        ("4GiB", 4 << 30),
        ("4GB", 4 << 30),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("64K", 64 << 10),
        (" 8 G ", 8 << 30),
        ("100B", 100),
        (12345, 12345),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "four", "4 G B", "1e3", "i", "5i", "nan"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="byte count"):
        parse_size(text)


def test_defaults() -> None:
    cfg = NodeConfig.from_env({})
    assert cfg.coordinator == "127.0.0.1:50051"
    assert cfg.slots == 1 and cfg.cores >= 1 and cfg.name
    assert cfg.memory_budget >= 1 << 20
    assert cfg.drain_grace_s == 30.0 and cfg.parent_pid is None and cfg.log_level == "INFO"
    assert (cfg.reconnect_min_s, cfg.reconnect_max_s) == (0.2, 5.0)


def test_precedence_defaults_then_env_then_overrides() -> None:
    env = {
        "QSCALE_COORDINATOR": "coord:1234",
        "QSCALE_NODE_NAME": "from-env",
        "QSCALE_NODE_SLOTS": "4",
        "QSCALE_NODE_CORES": "8",
        "QSCALE_NODE_MEMORY_BUDGET": "2G",
        "QSCALE_NODE_DRAIN_GRACE": "5.5",
        "QSCALE_LOG_LEVEL": "debug",
    }
    cfg = NodeConfig.from_env(env)
    assert (cfg.coordinator, cfg.name, cfg.slots, cfg.cores) == ("coord:1234", "from-env", 4, 8)
    assert cfg.memory_budget == 2 << 30 and cfg.drain_grace_s == 5.5 and cfg.log_level == "DEBUG"
    assert cfg.threads_per_worker == 2 and cfg.slot_memory_budget == 512 << 20

    cfg = NodeConfig.from_env(env, slots=2, name="from-flag", coordinator=None, memory_budget="1G", parent_pid=42)
    assert (cfg.coordinator, cfg.name, cfg.slots) == ("coord:1234", "from-flag", 2)
    assert cfg.memory_budget == 1 << 30 and cfg.parent_pid == 42
    assert cfg.threads_per_worker == 4


def test_empty_env_values_are_ignored() -> None:
    assert NodeConfig.from_env({"QSCALE_NODE_SLOTS": "", "QSCALE_COORDINATOR": " "}).slots == 1


def test_threads_per_worker_is_at_least_one() -> None:
    assert NodeConfig(cores=2, slots=8, memory_budget=1 << 30).threads_per_worker == 1


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"QSCALE_NODE_SLOTS": "many"}, "QSCALE_NODE_SLOTS='many': not an integer"),
        ({"QSCALE_NODE_SLOTS": "0"}, "slots must be >= 1"),
        ({"QSCALE_NODE_CORES": "-2"}, "cores must be >= 1"),
        ({"QSCALE_NODE_MEMORY_BUDGET": "lots"}, "QSCALE_NODE_MEMORY_BUDGET='lots'"),
        ({"QSCALE_NODE_MEMORY_BUDGET": "1K"}, "memory budget must be >= 1048576"),
        ({"QSCALE_NODE_DRAIN_GRACE": "-1"}, "drain grace must be >= 0"),
        ({"QSCALE_NODE_DRAIN_GRACE": "soon"}, "QSCALE_NODE_DRAIN_GRACE='soon': not a number"),
        ({"QSCALE_LOG_LEVEL": "LOUD"}, "unknown log level 'LOUD'"),
        ({"QSCALE_COORDINATOR": "a b:1"}, "coordinator address"),
    ],
)
def test_invalid_settings_raise_clear_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match.replace("(", r"\(")):
        NodeConfig.from_env(env)


def test_invalid_overrides() -> None:
    with pytest.raises(InvalidArgumentError, match="reconnect_max_s"):
        NodeConfig.from_env({}, reconnect_min_s=2.0, reconnect_max_s=1.0)
    with pytest.raises(InvalidArgumentError, match="parent pid"):
        NodeConfig.from_env({}, parent_pid=0)
    with pytest.raises(TypeError, match="unknown node settings"):
        NodeConfig.from_env({}, colour="blue")


def test_config_is_frozen() -> None:
    cfg = NodeConfig.from_env({})
    with pytest.raises(AttributeError):
        cfg.slots = 3  # type: ignore[misc]


def test_cli_print_config(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSCALE_NODE_SLOTS", "3")
    monkeypatch.setenv("QSCALE_NODE_CORES", "6")
    rc = cli.main(["--print-config", "--memory-budget", "3G", "--coordinator", "10.0.0.1:7000", "--name", "n"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slots"] == 3 and out["cores"] == 6 and out["threads_per_worker"] == 2
    assert out["memory_budget"] == 3 << 30 and out["slot_memory_budget"] == 1 << 30
    assert out["coordinator"] == "10.0.0.1:7000" and out["name"] == "n"


def test_cli_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--slots", "0", "--print-config"]) == 2
    assert "slots must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["--memory-budget", "plenty"])
    assert exc.value.code == 2
    assert "not a byte count" in capsys.readouterr().err


def test_capabilities_come_from_config_and_worker() -> None:
    cfg = NodeConfig(name="n1", slots=2, cores=4, memory_budget=8 << 30)
    info = WorkerInfo(
        pid=1, methods=("automatic", "statevector"), qpy_version=17, qiskit_version="2.6.2",
        aer_version="0.18.2", max_statevector_qubits=27, warmup_s=0.5,
    )
    caps = build_capabilities(cfg, info)
    assert (caps.name, caps.slots, caps.cores, caps.memory_budget_bytes) == ("n1", 2, 4, 8 << 30)
    assert list(caps.methods) == ["automatic", "statevector"]
    assert (caps.qpy_version, caps.max_statevector_qubits) == (17, 27)
    assert caps.qiskit_version == "2.6.2" and caps.aer_version == "0.18.2" and caps.qscale_version
    assert caps.hostname


def test_daemon_parent_does_not_import_qiskit() -> None:
    code = (
        "import sys, qscale.node.daemon, qscale.node.cli, qscale.node.worker;"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('qiskit', 'qiskit_aer', 'numpy'));"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
