"""Settings: each one is defined once and gets its ``QSCALE_*`` variable, its flag, its default
and its ``--help`` text from that definition; one parser reads every count and byte size."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from qscale.coordinator import cli as coordinator_cli
from qscale.coordinator.config import CoordinatorConfig, Limits
from qscale.errors import InvalidArgumentError
from qscale.node import cli as node_cli
from qscale.node.config import NodeConfig

pytestmark = pytest.mark.timeout(60)


def _commands() -> dict[str, argparse.ArgumentParser]:
    """``qscale-node`` and every subcommand of ``qscale-coordinator``, by name."""
    parser = coordinator_cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {"qscale-node": node_cli.build_parser(), "qscale-coordinator": parser}
    commands.update(sub.choices)
    return commands


def _option(command: str, flag: str) -> argparse.Action:
    parser = _commands()[command]
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_option_of_every_command_has_help() -> None:
    missing = []
    for name, parser in _commands().items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue  # refused secret flags are hidden on purpose
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without help: " + ", ".join(missing)


# Today's settings that have a flag, with their variables (names that must keep working).
SETTING_FLAGS = {
    "serve": {
        "--listen": "QSCALE_LISTEN", "--state-dir": "QSCALE_STATE_DIR",
        "--heartbeat-interval": "QSCALE_HEARTBEAT_INTERVAL", "--heartbeat-timeout": "QSCALE_HEARTBEAT_TIMEOUT",
        "--suspect-after": "QSCALE_SUSPECT_AFTER", "--lost-node-ttl": "QSCALE_LOST_NODE_TTL",
        "--max-shard-failures": "QSCALE_MAX_SHARD_FAILURES", "--prefetch-per-slot": "QSCALE_PREFETCH_PER_SLOT",
        "--backup-after": "QSCALE_BACKUP_AFTER", "--address-file": "QSCALE_ADDRESS_FILE",
        "--metrics-port": "QSCALE_METRICS_PORT", "--dashboard-port": "QSCALE_DASHBOARD_PORT",
        "--log-level": "QSCALE_LOG_LEVEL", "--log-format": "QSCALE_LOG_FORMAT",
        "--shots-per-shard": "QSCALE_SHOTS_PER_SHARD", "--target-shards": "QSCALE_TARGET_SHARDS",
        "--node-tokens-file": "QSCALE_NODE_TOKENS_FILE", "--client-tokens-file": "QSCALE_CLIENT_TOKENS_FILE",
        "--tls-cert": "QSCALE_TLS_CERT", "--tls-key": "QSCALE_TLS_KEY", "--tls-ca": "QSCALE_TLS_CA",
        "--insecure": "QSCALE_INSECURE",
        "--max-message-bytes": "QSCALE_MAX_MESSAGE_BYTES", "--max-circuit-bytes": "QSCALE_MAX_CIRCUIT_BYTES",
        "--max-circuits": "QSCALE_MAX_CIRCUITS", "--max-shots": "QSCALE_MAX_SHOTS",
        "--max-qubits": "QSCALE_MAX_QUBITS", "--max-clbits": "QSCALE_MAX_CLBITS",
        "--max-experiments": "QSCALE_MAX_EXPERIMENTS", "--max-observables": "QSCALE_MAX_OBSERVABLES",
        "--max-expectation-values": "QSCALE_MAX_EXPECTATION_VALUES", "--max-operations": "QSCALE_MAX_OPERATIONS",
        "--max-nesting-depth": "QSCALE_MAX_NESTING_DEPTH", "--max-noise-model-bytes": "QSCALE_MAX_NOISE_MODEL_BYTES",
        "--decode-workers": "QSCALE_DECODE_WORKERS", "--decode-memory-bytes": "QSCALE_DECODE_MEMORY_BYTES",
        "--decode-timeout": "QSCALE_DECODE_TIMEOUT",
    },
    "qscale-node": {
        "--coordinator": "QSCALE_COORDINATOR", "--name": "QSCALE_NODE_NAME", "--slots": "QSCALE_NODE_SLOTS",
        "--cores": "QSCALE_NODE_CORES", "--memory-budget": "QSCALE_NODE_MEMORY_BUDGET",
        "--max-qubits": "QSCALE_NODE_MAX_QUBITS", "--drain-grace": "QSCALE_NODE_DRAIN_GRACE",
        "--parent-pid": "QSCALE_NODE_PARENT_PID", "--metrics-port": "QSCALE_NODE_METRICS_PORT",
        "--health-port": "QSCALE_NODE_HEALTH_PORT", "--log-level": "QSCALE_LOG_LEVEL",
        "--log-format": "QSCALE_LOG_FORMAT", "--token-file": "QSCALE_NODE_TOKEN_FILE",
        "--tls-ca": "QSCALE_TLS_CA", "--tls-cert": "QSCALE_TLS_CERT", "--tls-key": "QSCALE_TLS_KEY",
    },
    **{command: {"--coordinator": "QSCALE_COORDINATOR", "--token-file": "QSCALE_CLIENT_TOKEN_FILE",
                 "--tls-ca": "QSCALE_TLS_CA", "--tls-cert": "QSCALE_TLS_CERT", "--tls-key": "QSCALE_TLS_KEY"}
       for command in ("submit", "estimate", "status", "cancel", "watch", "result", "nodes", "jobs")},
}


def test_every_setting_flag_names_its_variable_and_default() -> None:
    problems = []
    for command, flags in SETTING_FLAGS.items():
        for flag, var in flags.items():
            help_text = _option(command, flag).help or ""
            if not re.search(r"\(default [^;()]*(\([^)]*\)[^;()]*)*; \$" + var + r"\)$", help_text):
                problems.append(f"{command} {flag}: {help_text!r} does not end in '(default X; ${var})'")
    assert not problems, "\n".join(problems)


def test_every_defined_setting_has_its_flag_in_the_cli() -> None:
    """Whatever a settings model defines shows up as a flag, with its variable and default."""
    from qscale.coordinator.config import Planning
    from qscale.settings import ClientSettings

    problems = []
    for command, models in (("serve", (CoordinatorConfig, Limits, Planning)), ("qscale-node", (NodeConfig,)),
                            ("submit", (ClientSettings,)), ("jobs", (ClientSettings,))):
        for model in models:
            for spec in model.settings().values():
                if spec.secret:
                    assert spec.flag is None, f"{spec.name} is a secret: it must never be a flag"
                    continue
                help_text = _option(command, spec.flag).help or ""
                if not help_text.endswith(f"; ${spec.env})") or "(default " not in help_text:
                    problems.append(f"{command} {spec.flag}: {help_text!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", sorted(set(_commands()) - {"qscale-coordinator"}))
def test_help_of_every_command_renders_with_variables_and_defaults(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command == "qscale-node" else [command, "--help"]
    main = node_cli.main if command == "qscale-node" else coordinator_cli.main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith("usage:")
    for action in _commands()[command]._actions:
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction):
            assert action.help and " ".join(action.help.split())[:30].replace("%%", "%") in text, (
                f"{command} {action.option_strings or action.dest}: no help shown")
    for flag, var in SETTING_FLAGS.get(command, {}).items():
        assert f"{flag} " in text and f"${var})" in text, f"{command} --help lacks {flag} or ${var}"


# ------------------------------------------------------------------ environment

def test_coordinator_precedence_defaults_then_environment_then_flags(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("QSCALE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("QSCALE_HEARTBEAT_INTERVAL", "2")
    monkeypatch.setenv("QSCALE_HEARTBEAT_TIMEOUT", "20")
    monkeypatch.setenv("QSCALE_STATE_DIR", "/from/env")
    monkeypatch.setenv("QSCALE_MAX_CIRCUIT_BYTES", "1.5M")
    monkeypatch.setenv("QSCALE_TARGET_SHARDS", "8")
    monkeypatch.setenv("QSCALE_MAX_SHARD_FAILURES", "5")
    monkeypatch.setenv("QSCALE_ADDRESS_FILE", "/run/address")
    assert coordinator_cli.main(["serve", "--print-config", "--heartbeat-timeout", "30", "--max-shard-failures", "7",
                                 "--decode-timeout", "2.5", "--max-message-bytes", "1_000_000"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["heartbeat_interval_s"], shown["heartbeat_timeout_s"]) == (2.0, 30.0)
    assert shown["state_dir"] == "/from/env" and shown["max_shard_failures"] == 7
    assert shown["address_file"] == "/run/address"
    assert shown["limits"]["max_circuit_bytes"] == 3 << 19 and shown["limits"]["decode_timeout_s"] == 2.5
    assert shown["limits"]["max_message_bytes"] == 1_000_000 and shown["policy"]["target_shards"] == 8
    assert shown["lost_node_ttl_s"] == 600.0 and shown["limits"]["max_qubits"] == 1024  # defaults


@pytest.mark.parametrize(("env", "match"), [
    ({"QSCALE_HEARTBEAT_TIMEOUT": "x"}, "QSCALE_HEARTBEAT_TIMEOUT='x': not a number"),
    ({"QSCALE_MAX_QUBITS": "many"}, "QSCALE_MAX_QUBITS='many': not a byte count or whole number"),
    ({"QSCALE_MAX_OPERATIONS": "0"}, "QSCALE_MAX_OPERATIONS='0': max operations must be > 0"),
    ({"QSCALE_METRICS_PORT": "70000"}, "QSCALE_METRICS_PORT='70000': metrics port must be <= 65535"),
    ({"QSCALE_INSECURE": "maybe"}, "QSCALE_INSECURE='maybe': not a boolean"),
    ({"QSCALE_LOG_FORMAT": "xml"}, "QSCALE_LOG_FORMAT='xml': log format must be 'text' or 'json'"),
    ({"QSCALE_LOG_LEVEL": "loud"}, "QSCALE_LOG_LEVEL='loud': unknown log level 'loud'"),
    ({"QSCALE_TARGET_SHARDS": "0"}, "QSCALE_TARGET_SHARDS='0': target shards must be >= 1"),
    ({"QSCALE_HEARTBEAT_INTERVAL": "5", "QSCALE_HEARTBEAT_TIMEOUT": "2"}, "heartbeat timeout must be longer"),
])
def test_coordinator_environment_errors_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(match)):
        CoordinatorConfig.from_env(env)


@pytest.mark.parametrize(("env", "match"), [
    ({"QSCALE_NODE_SLOTS": "0"}, "QSCALE_NODE_SLOTS='0': slots must be >= 1, got 0"),
    ({"QSCALE_NODE_MEMORY_BUDGET": "1.5K"}, "QSCALE_NODE_MEMORY_BUDGET='1.5K': memory budget must be >= 1048576"),
    ({"QSCALE_NODE_DRAIN_GRACE": "inf"}, "QSCALE_NODE_DRAIN_GRACE='inf': drain grace must be a finite number"),
])
def test_node_environment_errors_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(match)):
        NodeConfig.from_env(env)


def test_node_byte_sizes_share_the_grammar_of_the_coordinator() -> None:
    cfg = NodeConfig.from_env({"QSCALE_NODE_MEMORY_BUDGET": "1_073_741_824"})
    assert cfg.memory_budget == 1 << 30
    assert NodeConfig.from_env({}, memory_budget="1.5G").memory_budget == 3 << 29
    with pytest.raises(InvalidArgumentError, match="QSCALE_NODE_MEMORY_BUDGET='0.3K'"):
        NodeConfig.from_env({"QSCALE_NODE_MEMORY_BUDGET": "0.3K"})  # 307.2 bytes: not whole


def test_client_settings_come_from_environment_and_flags() -> None:
    from qscale.settings import ClientSettings

    env = {"QSCALE_COORDINATOR": "env:1", "QSCALE_TLS_CA": "/env/ca.pem", "QSCALE_CLIENT_TOKEN": "t" * 20}
    settings = ClientSettings.from_env(env, tls_ca="/flag/ca.pem")
    assert (settings.coordinator, settings.tls_ca) == ("env:1", "/flag/ca.pem")
    assert settings.resolved_token() == "t" * 20 and "t" * 20 not in repr(settings)
    assert ClientSettings.from_env({"QSCALE_COORDINATOR": " "}).coordinator == "127.0.0.1:50051"
    assert _option("submit", "--coordinator").default is None  # resolved at run time, not when --help is built


def test_secrets_are_never_flags_nor_printed() -> None:
    token = "n" * 24
    config = CoordinatorConfig.from_env({"QSCALE_NODE_TOKEN": token, "QSCALE_CLIENT_TOKEN": "c" * 24})
    assert config.node_token == token and token not in repr(config)
    assert config.to_dict()["node_token"] == config.to_dict()["client_token"] == "<hidden>"
    for command in ("serve", "qscale-node", "submit"):
        help_text = " ".join(a.help or "" for a in _commands()[command]._actions if a.help != argparse.SUPPRESS)
        flags = {f for a in _commands()[command]._actions if a.help != argparse.SUPPRESS for f in a.option_strings}
        assert not {"--token", "--node-token", "--client-token"} & flags
        assert token not in help_text


def test_configs_are_frozen_and_with_validates() -> None:
    config = CoordinatorConfig()
    with pytest.raises(AttributeError):
        config.listen = "x:1"  # type: ignore[misc]
    assert config.with_(listen="127.0.0.1:0").listen == "127.0.0.1:0" and config.listen != "127.0.0.1:0"
    with pytest.raises(InvalidArgumentError, match="heartbeat interval must be > 0"):
        config.with_(heartbeat_interval_s=0)
    with pytest.raises(TypeError, match="unknown coordinator settings"):
        config.with_(colour="blue")
    with pytest.raises(InvalidArgumentError, match="slots must be an integer, got '2'"):
        NodeConfig(slots="2")  # type: ignore[arg-type]  # strict: only variables and flags are parsed
    assert Limits(max_message_bytes="64M").max_message_bytes == 64 << 20  # sizes may be written as such


# ------------------------------------------------------------------ one size parser

@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 << 20), ("1.5G", 3 << 29), ("2GiB", 2 << 30), ("1_000_000", 1_000_000), ("100B", 100),
    (" 8 g ", 8 << 30), ("4TB", 4 << 40), ("1.5K", 1536), ("0", 0), ("64k", 64 << 10), ("1P", 1 << 50),
    ("2Gi", 2 << 30), (7, 7),
])
def test_parse_size_grammar(text: str | int, expected: int) -> None:
    from qscale.settings import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "junk", "-1", "-1G", "1.5", "0.3K", "1e3", "nan", "inf", "1__0", "_1", "1_",
                                  "G", "4 G B", "4X", "5i", "5iB", "1.G", True, -5, 2.5])
def test_parse_size_rejects(text: object) -> None:
    from qscale.settings import parse_size

    with pytest.raises(InvalidArgumentError, match="not a byte count or whole number"):
        parse_size(text)  # type: ignore[arg-type]


def test_one_size_parser_for_every_setting_and_flag(capsys: pytest.CaptureFixture[str]) -> None:
    import qscale.coordinator.config as coordinator_config
    import qscale.node.config as node_config

    assert not hasattr(coordinator_config, "_parse_count") and not hasattr(node_config, "parse_bytes")
    assert Limits.from_env({"QSCALE_MAX_MESSAGE_BYTES": "1.5G"}).max_message_bytes == 3 << 29
    args = coordinator_cli._parser().parse_args(["serve", "--max-message-bytes", "1.5G", "--max-shots", "1_000"])
    assert (args.max_message_bytes, args.max_shots) == (3 << 29, 1000)
    assert node_cli.build_parser().parse_args(["--memory-budget", "1_073_741_824"]).memory_budget == 1 << 30
    with pytest.raises(SystemExit):
        coordinator_cli._parser().parse_args(["serve", "--max-shots", "-5"])
    assert "not a byte count or whole number" in capsys.readouterr().err
