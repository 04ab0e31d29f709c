"""The deployment files in deploy/ against the real CLIs.

Every ``qscale-coordinator serve`` / ``qscale-node`` command they run, every ``--flag`` and
every ``QSCALE_*`` variable they set must exist (flags are read from the CLIs' own argparse
parsers, variables from the package source and the parsers' help), values must parse, and the
numbers that several files repeat must agree: the gRPC, metrics and dashboard ports, a node's
memory budget against its memory limit, its drain grace against the stop timeout.

Nothing is built or deployed here (see deploy/README.md for what was tried by hand); the
Dockerfile and the systemd units are read with small parsers below, YAML with PyYAML.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from qscale.coordinator.config import CoordinatorConfig, Limits, Planning
from qscale.errors import InvalidArgumentError, QScaleError
from qscale.node.config import NodeConfig
from qscale.settings import parse_size

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"

COORDINATOR = "qscale-coordinator serve"
NODE = "qscale-node"
SOURCES = ("Dockerfile", "compose", "k8s", "systemd")

# Memory a node needs beyond --memory-budget: the daemon, and one worker process (Python with
# Qiskit and Aer imported, ~120 MiB measured, plus transpiler working set) per slot. The same
# rule is written in the comments of compose.yaml, k8s/node.yaml and the node unit.
NODE_DAEMON_OVERHEAD = 512 << 20
NODE_SLOT_OVERHEAD = 512 << 20
# The coordinator: itself, and each decode sandbox process's warmed-up size plus the address
# space it may grow by (QSCALE_DECODE_MEMORY_BYTES).
COORDINATOR_BASE = 1 << 30
SANDBOX_WARM = 256 << 20
# A node's stop timeout must exceed its drain grace by this much (hand back shards, say goodbye).
STOP_MARGIN_S = 10.0

UID = 10001


# ------------------------------------------------------------------------------ small parsers

def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed: the deployment tests need it (add `pyyaml` to the test extra "
                    "in pyproject.toml)", pytrace=False)
    return yaml


@cache
def _yaml_docs(path: Path) -> tuple[Any, ...]:
    return tuple(doc for doc in _yaml().safe_load_all(path.read_text()) if doc is not None)


def compose() -> dict[str, Any]:
    (doc,) = _yaml_docs(COMPOSE)
    return doc


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every Kubernetes object in deploy/k8s/."""
    files = sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    assert files, "no Kubernetes manifests in deploy/k8s/"
    return [(f"deploy/k8s/{path.name}", doc) for path in files for doc in _yaml_docs(path)]


def k8s_object(kind: str, name: str) -> tuple[str, dict[str, Any]]:
    found = [(where, obj) for where, obj in k8s_objects()
             if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s/, found {len(found)}"
    return found[0]


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str]:
        """A JSON-array (exec form) argument list, or the shell form split like a shell."""
        text = self.value.strip()
        return json.loads(text) if text.startswith("[") else shlex.split(text)


@cache
def dockerfile() -> tuple[Instruction, ...]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, value = text.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued line"
    return tuple(out)


def final_stage() -> list[Instruction]:
    instructions = list(dockerfile())
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def _docker_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM."""
    args: dict[str, str] = {}
    for ins in dockerfile():
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.value:
            name, _, default = ins.value.partition("=")
            args[name.strip()] = default.strip()
    return args


def _key_values(text: str) -> dict[str, str]:
    """``A=1 B="two words"`` (Dockerfile ENV, systemd Environment=)."""
    return dict(item.split("=", 1) for item in shlex.split(text) if "=" in item)


Unit = dict[str, dict[str, list[str]]]


@cache
def systemd_unit(name: str) -> Unit:
    """A unit file as {section: {key: [values, in order]}} (keys may repeat)."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"deploy/systemd/{name}: cannot read line {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service_value(unit: Unit, key: str) -> str | None:
    values = unit.get("Service", {}).get(key)
    return values[-1] if values else None


def env_file(path: Path, *, commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines of an environment file; with ``commented``, also the ``#KEY=VALUE`` examples."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if commented and re.match(r"#\s*[A-Z][A-Z0-9_]*=", line):
            line = line.lstrip("#").strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.relative_to(ROOT)}: not KEY=VALUE: {raw!r}"
        out[key.strip()] = value.strip().strip('"')
    return out


def _port(address: str) -> int:
    return int(str(address).rsplit(":", 1)[1])


def _duration_s(text: str | int | float) -> float:
    """``60``, ``"60s"``, ``"1m30s"``, ``"2min"``, ``"500ms"`` in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h)?", text.replace(" ", ""))
    assert parts and "".join(n + (u or "") for n, u in parts) == text.replace(" ", ""), f"not a duration: {text!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


def _k8s_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity: ``8Gi`` (binary) or ``8G`` (decimal)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity))
    assert match, f"not a Kubernetes quantity: {quantity!r}"
    factor = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
              "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2)]
    return int(float(match.group(1)) * factor)


def _k8s_cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ------------------------------------------------------------------------ the CLIs, for real

@cache
def serve_parser() -> argparse.ArgumentParser:
    from qscale.coordinator.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


@cache
def node_parser() -> argparse.ArgumentParser:
    from qscale.node.cli import build_parser

    return build_parser()


def parser_for(program: str) -> argparse.ArgumentParser:
    return serve_parser() if program == COORDINATOR else node_parser()


def options(program: str) -> tuple[dict[str, argparse.Action], set[str]]:
    """The accepted option strings of ``program`` (to their actions), and the refused ones
    (``--token``: secrets are never flags)."""
    known: dict[str, argparse.Action] = {}
    refused: set[str] = set()
    for action in parser_for(program)._actions:
        target = refused if action.dest.startswith("_refused_") else known
        for flag in action.option_strings:
            if isinstance(target, set):
                target.add(flag)
            else:
                target[flag] = action
    return known, refused


def _package_sources(role: str) -> list[Path]:
    own = ROOT / ("coordinator" if role == COORDINATOR else "node")
    return sorted(own.glob("*.py")) + sorted((ROOT / "qscale").glob("*.py"))


@cache
def known_env(program: str) -> frozenset[str]:
    """Every QSCALE_* variable ``program`` can read: named in its package source (its own
    folder and the shared qscale package), in its parser's help, or by a setting of its
    configuration (:meth:`qscale.settings.Settings.settings`)."""
    pattern = re.compile(r"QSCALE_[A-Z0-9_]*[A-Z0-9]")
    names = {m for path in _package_sources(program) for m in pattern.findall(path.read_text())}
    parser = parser_for(program)
    texts = [parser.description or "", parser.epilog or ""] + [a.help or "" for a in parser._actions]
    names |= {m for text in texts for m in pattern.findall(text)}
    models = (CoordinatorConfig, Limits, Planning) if program == COORDINATOR else (NodeConfig,)
    names |= {spec.env for model in models for spec in model.settings().values()}
    names.discard("QSCALE_")
    return frozenset(names)


# -------------------------------------------------------------------- what the files run

@dataclass
class Invocation:
    """One place that runs a qscale program: its arguments and its environment."""

    where: str
    program: str  # COORDINATOR or NODE
    args: list[str]
    env: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> dict[str, str]:
        """``--flag`` -> value as written (``"true"`` for a flag that takes none)."""
        known, _ = options(self.program)
        out: dict[str, str] = {}
        i = 0
        while i < len(self.args):
            token = self.args[i]
            i += 1
            if not token.startswith("--"):
                continue
            flag, eq, value = token.partition("=")
            action = known.get(flag)
            takes_value = action is None or action.nargs != 0
            if eq:
                out[flag] = value
            elif takes_value and i < len(self.args) and not self.args[i].startswith("--"):
                out[flag] = self.args[i]
                i += 1
            else:
                out[flag] = "true"
        return out

    def setting(self, flag: str, var: str) -> str | None:
        """What the program uses for a setting: the flag wins over the variable."""
        return self.flags().get(flag, self.env.get(var))


def _split_program(argv: list[str], where: str) -> tuple[str, list[str]]:
    assert argv, f"{where}: empty command"
    name = Path(argv[0]).name
    if name in ("qscale-coordinator", "qscale"):
        assert argv[1:2] == ["serve"], f"{where}: runs `{' '.join(argv[:2])}`, expected `qscale-coordinator serve`"
        return COORDINATOR, argv[2:]
    assert name == "qscale-node", f"{where}: runs {argv[0]!r}, not qscale-coordinator serve or qscale-node"
    return NODE, argv[1:]


def dockerfile_invocations() -> list[Invocation]:
    stage = final_stage()
    cmds = [ins for ins in stage if ins.keyword == "CMD"]
    assert cmds, "deploy/Dockerfile has no CMD"
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            env.update(_key_values(ins.value))
    program, args = _split_program(cmds[-1].exec_form(), "deploy/Dockerfile CMD")
    return [Invocation(f"deploy/Dockerfile:{cmds[-1].line} CMD", program, args, env)]


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def compose_invocations() -> list[Invocation]:
    out = []
    for name, service in compose()["services"].items():
        command = service.get("command")
        assert isinstance(command, list), f"deploy/compose.yaml services.{name}.command: use the list form"
        program, args = _split_program([str(c) for c in command], f"deploy/compose.yaml services.{name}")
        out.append(Invocation(f"deploy/compose.yaml services.{name}", program, args, _compose_env(service),
                              {"service": name, "spec": service}))
    return out


def _workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(where, obj) for where, obj in k8s_objects()
            if obj.get("kind") in ("StatefulSet", "Deployment", "DaemonSet", "Job", "Pod")]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def k8s_invocations() -> list[Invocation]:
    out = []
    for where, obj in _workloads():
        for container in _pod_spec(obj)["containers"]:
            label = f"{where} {obj['kind']}/{obj['metadata']['name']} container {container['name']}"
            env = {e["name"]: str(e.get("value", "<valueFrom>")) for e in container.get("env", [])}
            argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
            program, args = _split_program(argv, label)
            out.append(Invocation(label, program, args, env, {"object": obj, "container": container}))
    return out


UNIT_ENV = {
    "qscale-coordinator.service": "coordinator.env.example",
    "qscale-node.service": "node.env.example",
}


def systemd_invocations() -> list[Invocation]:
    out = []
    for unit_name, example in UNIT_ENV.items():
        unit = systemd_unit(unit_name)
        where = f"deploy/systemd/{unit_name}"
        exec_start = service_value(unit, "ExecStart")
        assert exec_start, f"{where}: no ExecStart="
        argv = shlex.split(exec_start.lstrip("-@:+!"))
        env: dict[str, str] = {}
        for line in unit["Service"].get("Environment", []):
            env.update(_key_values(line))
        env.update(env_file(SYSTEMD / example))  # EnvironmentFile= is read after Environment=
        program, args = _split_program(argv, where)
        out.append(Invocation(f"{where} (+ {example})", program, args, env, {"unit": unit, "name": unit_name}))
    return out


def invocations(source: str) -> list[Invocation]:
    return {"Dockerfile": dockerfile_invocations, "compose": compose_invocations, "k8s": k8s_invocations,
            "systemd": systemd_invocations}[source]()


def all_invocations() -> list[Invocation]:
    return [inv for source in SOURCES for inv in invocations(source)]


def _one(source: str, program: str) -> Invocation:
    found = [inv for inv in invocations(source) if inv.program == program]
    assert len(found) == 1, f"{source}: expected one `{program}`, found {len(found)}"
    return found[0]


def node_config(inv: Invocation) -> NodeConfig:
    """The node's effective settings, computed by the node's own code."""
    flags = inv.flags()
    env = {k: v for k, v in inv.env.items() if k.startswith("QSCALE_")}
    budget = flags.get("--memory-budget")
    return NodeConfig.from_env(
        env,
        coordinator=flags.get("--coordinator"),
        slots=int(flags["--slots"]) if "--slots" in flags else None,
        cores=int(flags["--cores"]) if "--cores" in flags else None,
        memory_budget=parse_size(budget) if budget else None,
        drain_grace_s=float(flags["--drain-grace"]) if "--drain-grace" in flags else None,
    )


def coordinator_config(inv: Invocation) -> CoordinatorConfig:
    flags = inv.flags()
    env = {k: v for k, v in inv.env.items() if k.startswith("QSCALE_")}
    return CoordinatorConfig.from_env(env, listen=flags.get("--listen"), state_dir=flags.get("--state-dir"))


# ============================================================================ commands, flags, env

@pytest.mark.parametrize("source", SOURCES)
def test_every_flag_exists_in_the_cli(source: str) -> None:
    problems = []
    for inv in invocations(source):
        known, refused = options(inv.program)
        expects_value = False
        for token in inv.args:
            if not token.startswith("--"):
                if not expects_value:
                    problems.append(f"{inv.where}: stray argument {token!r} (`{inv.program}` takes no positionals)")
                expects_value = False
                continue
            flag, eq, _ = token.partition("=")
            action = known.get(flag)
            if flag in refused:
                problems.append(f"{inv.where}: {flag} is refused by `{inv.program}` (secrets never go on a "
                                "command line: use a token file)")
            elif action is None:
                problems.append(f"{inv.where}: flag {flag} does not exist in `{inv.program}` (not in its "
                                "argparse parser yet?)")
            expects_value = not eq and (action is None or action.nargs != 0)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", SOURCES)
def test_every_qscale_variable_exists(source: str) -> None:
    problems = []
    for inv in invocations(source):
        for name in sorted(inv.env):
            if name.startswith("QSCALE_") and name not in known_env(inv.program):
                problems.append(f"{inv.where}: `{inv.program}` reads no variable {name}")
            if re.fullmatch(r"QSCALE_(NODE|CLIENT)_TOKEN", name):
                problems.append(f"{inv.where}: {name} puts a token in the environment of a deployment file; "
                                f"point {name}_FILE / the *_TOKENS_FILE variables at a mounted secret instead")
    assert not problems, "\n".join(problems)


def test_commented_examples_in_the_env_files_exist_too() -> None:
    problems = []
    for unit_name, example in UNIT_ENV.items():
        program = COORDINATOR if "coordinator" in unit_name else NODE
        for name in env_file(SYSTEMD / example, commented=True):
            if not name.startswith("QSCALE_"):
                problems.append(f"deploy/systemd/{example}: {name} is not a QSCALE_* variable")
            elif name not in known_env(program):
                problems.append(f"deploy/systemd/{example}: `{program}` reads no variable {name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", SOURCES)
def test_values_parse_with_the_real_parsers_and_configs(source: str) -> None:
    """Flags through the CLI's argparse parser (types such as --memory-budget 3G), environment
    through the config classes' from_env (QSCALE_NODE_MEMORY_BUDGET=16G, heartbeats ...).
    Flags the CLI does not have are left to test_every_flag_exists_in_the_cli."""
    problems = []
    for inv in invocations(source):
        known, _ = options(inv.program)
        present = [token for flag, value in inv.flags().items() if flag in known
                   for token in ([flag] if known[flag].nargs == 0 else [flag, value])]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser_for(inv.program).parse_args(present)
        except SystemExit:
            problems.append(f"{inv.where}: `{inv.program} {' '.join(present)}`: {stderr.getvalue().strip()}")
        try:
            coordinator_config(inv) if inv.program == COORDINATOR else node_config(inv)
        except (QScaleError, ValueError) as exc:
            problems.append(f"{inv.where}: {exc}")
    assert not problems, "\n".join(problems)


def test_the_programs_are_the_installed_console_scripts() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("qscale-coordinator") == "qscale.coordinator.cli:main"
    assert scripts.get("qscale-node") == "qscale.node.cli:main"
    assert scripts.get("qscale-healthcheck") == "qscale.healthcheck:main"
    for inv in systemd_invocations():
        exec_start = service_value(inv.extra["unit"], "ExecStart") or ""
        assert exec_start.startswith("/opt/qscale/bin/"), f"{inv.where}: ExecStart not from the /opt/qscale venv"


# ============================================================================ ports agree

def _container_ports(spec: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in spec.get("ports", [])}


def _compose_container_port(mapping: Any) -> int:
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).split(":")[-1].split("/")[0])


@cache
def port_observations() -> dict[str, dict[str, int]]:
    """For each port kind, where it is written and as what."""
    seen: dict[str, dict[str, int]] = {"grpc": {}, "metrics": {}, "dashboard": {}, "node metrics": {}}

    def note(kind: str, where: str, value: Any) -> None:
        if value is not None:
            seen[kind][where] = int(value)

    def coordinator_ports(inv: Invocation) -> None:
        listen = inv.setting("--listen", "QSCALE_LISTEN")
        note("grpc", f"{inv.where}: --listen / QSCALE_LISTEN", _port(listen) if listen else None)
        note("metrics", f"{inv.where}: --metrics-port / QSCALE_METRICS_PORT",
             inv.setting("--metrics-port", "QSCALE_METRICS_PORT"))
        note("dashboard", f"{inv.where}: --dashboard-port / QSCALE_DASHBOARD_PORT",
             inv.setting("--dashboard-port", "QSCALE_DASHBOARD_PORT"))

    def node_ports(inv: Invocation) -> None:
        address = inv.setting("--coordinator", "QSCALE_COORDINATOR")
        note("grpc", f"{inv.where}: --coordinator / QSCALE_COORDINATOR", _port(address) if address else None)
        note("node metrics", f"{inv.where}: --metrics-port / QSCALE_NODE_METRICS_PORT",
             inv.setting("--metrics-port", "QSCALE_NODE_METRICS_PORT"))

    for inv in all_invocations():
        (coordinator_ports if inv.program == COORDINATOR else node_ports)(inv)

    # compose: published container ports and the healthcheck.
    coord = compose()["services"]["coordinator"]
    health = [str(t) for t in coord["healthcheck"]["test"]]
    addresses = [t for t in health[2:] if re.fullmatch(r"[\w.\-\[\]:]+:\d+", t)]
    note("grpc", "deploy/compose.yaml services.coordinator.healthcheck", _port(addresses[0]) if addresses else None)

    # Kubernetes: container ports, Service ports, probes, scrape annotations.
    for inv in k8s_invocations():
        container, obj = inv.extra["container"], inv.extra["object"]
        ports = _container_ports(container)
        annotations = obj["spec"]["template"]["metadata"].get("annotations", {})
        if inv.program == COORDINATOR:
            note("grpc", f"{inv.where}: containerPort grpc", ports.get("grpc"))
            note("metrics", f"{inv.where}: containerPort metrics", ports.get("metrics"))
            note("dashboard", f"{inv.where}: containerPort dashboard", ports.get("dashboard"))
            note("metrics", f"{inv.where}: prometheus.io/port", annotations.get("prometheus.io/port"))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "grpc" in container.get(probe, {}):
                    note("grpc", f"{inv.where}: {probe}.grpc.port", container[probe]["grpc"]["port"])
        else:
            note("node metrics", f"{inv.where}: containerPort metrics", ports.get("metrics"))
            note("node metrics", f"{inv.where}: prometheus.io/port", annotations.get("prometheus.io/port"))
            probe = container.get("livenessProbe", {})
            port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
            note("node metrics", f"{inv.where}: livenessProbe port",
                 ports.get(port) if isinstance(port, str) else port)
    for where, obj in k8s_objects():
        if obj.get("kind") != "Service":
            continue
        for p in obj["spec"]["ports"]:
            kind = {"grpc": "grpc", "metrics": "metrics", "dashboard": "dashboard"}.get(p["name"])
            assert kind, f"{where} Service/{obj['metadata']['name']}: unexpected port name {p['name']!r}"
            note(kind, f"{where} Service/{obj['metadata']['name']} port {p['name']}", p["port"])
    return seen


@pytest.mark.parametrize("kind", ["grpc", "metrics", "dashboard", "node metrics"])
def test_ports_agree_across_files(kind: str) -> None:
    seen = port_observations()[kind]
    assert seen, f"no {kind} port found in any deployment file"
    values = set(seen.values())
    assert len(values) == 1, f"the {kind} port differs between files:\n" + "\n".join(
        f"  {port:>6}  {where}" for where, port in sorted(seen.items(), key=lambda kv: kv[1]))
    (port,) = values
    assert 0 < port < 65536


def test_every_place_a_port_must_appear_names_one() -> None:
    """Each file states each port it needs: a port found nowhere in a file is not 'agreeing'."""
    seen = port_observations()
    must = {
        "grpc": ["deploy/Dockerfile", "services.coordinator:", "services.node:", "services.coordinator.healthcheck",
                 "StatefulSet/qscale-coordinator", "Deployment/qscale-node", "Service/qscale-coordinator port",
                 "readinessProbe", "livenessProbe", "qscale-coordinator.service", "qscale-node.service"],
        "metrics": ["deploy/Dockerfile", "services.coordinator:", "StatefulSet/qscale-coordinator",
                    "Service/qscale-coordinator port", "prometheus.io/port", "qscale-coordinator.service"],
        "dashboard": ["deploy/Dockerfile", "services.coordinator:", "StatefulSet/qscale-coordinator",
                      "Service/qscale-coordinator port", "qscale-coordinator.service"],
        "node metrics": ["services.node:", "Deployment/qscale-node", "prometheus.io/port", "livenessProbe",
                         "qscale-node.service"],
    }
    missing = [f"{kind}: nothing in {needle!r}" for kind, needles in must.items() for needle in needles
               if not any(needle in where for where in seen[kind])]
    assert not missing, "\n".join(missing)


def test_dockerfile_exposes_exactly_the_ports_in_use() -> None:
    exposed = {int(p.split("/")[0]) for ins in final_stage() if ins.keyword == "EXPOSE" for p in ins.value.split()}
    seen = port_observations()
    used = {next(iter(seen[kind].values())) for kind in ("grpc", "metrics", "dashboard", "node metrics")}
    assert exposed == used, f"deploy/Dockerfile EXPOSE {sorted(exposed)} but the files use {sorted(used)}"


def test_compose_publishes_the_coordinator_ports_and_nothing_for_nodes() -> None:
    services = compose()["services"]
    coord = services["coordinator"]
    seen = port_observations()
    published = {_compose_container_port(p) for p in coord.get("ports", [])}
    wanted = {next(iter(seen[kind].values())) for kind in ("grpc", "metrics", "dashboard")}
    assert published == wanted, f"coordinator publishes {sorted(published)}, expected {sorted(wanted)}"
    node = services["node"]
    assert "ports" not in node, "a node only dials out; fixed host ports would also break --scale node=N"
    assert "container_name" not in node, "container_name breaks `docker compose up --scale node=N`"
    assert "hostname" not in node, "a fixed hostname gives every scaled node the same name"
    node_inv = _one("compose", NODE)
    assert node_inv.setting("--coordinator", "QSCALE_COORDINATOR").rsplit(":", 1)[0] == "coordinator", (
        "nodes must dial the coordinator service by its compose name")


def test_k8s_node_dials_the_coordinator_service() -> None:
    node = _one("k8s", NODE)
    host = node.setting("--coordinator", "QSCALE_COORDINATOR").rsplit(":", 1)[0]
    k8s_object("Service", host.split(".")[0])


def test_k8s_service_target_ports_resolve() -> None:
    _, sts = k8s_object("StatefulSet", "qscale-coordinator")
    (container,) = _pod_spec(sts)["containers"]
    ports = _container_ports(container)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for where, svc in k8s_objects():
        if svc["kind"] != "Service":
            continue
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), (
            f"{where} Service/{svc['metadata']['name']}: selector matches no coordinator pod")
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            resolved = ports.get(target) if isinstance(target, str) else target
            assert resolved == p["port"], f"{where} Service/{svc['metadata']['name']} port {p['name']}: " \
                                          f"targetPort {target!r} is container port {resolved}, not {p['port']}"
    assert sts["spec"]["serviceName"] in {obj["metadata"]["name"] for _, obj in k8s_objects()
                                          if obj["kind"] == "Service" and obj["spec"].get("clusterIP") == "None"}


# ============================================================================ memory, CPU, stop timeouts

def _node_memory_rule(where: str, config: NodeConfig, limit: int) -> str | None:
    need = config.memory_budget + NODE_DAEMON_OVERHEAD + NODE_SLOT_OVERHEAD * config.slots
    if limit < need:
        return (f"{where}: memory limit {limit / 2**30:.2f} GiB is below --memory-budget "
                f"{config.memory_budget / 2**30:.2f} GiB + 512 MiB + {config.slots} slot(s) x 512 MiB "
                f"= {need / 2**30:.2f} GiB")
    return None


def test_node_memory_budget_fits_the_memory_limit() -> None:
    problems = []
    inv = _one("compose", NODE)
    limits = inv.extra["spec"]["deploy"]["resources"]["limits"]
    config = node_config(inv)
    assert "--memory-budget" in inv.flags(), f"{inv.where}: set --memory-budget to match the memory limit"
    problems.append(_node_memory_rule(inv.where, config, parse_size(str(limits["memory"]))))
    if "cpus" in limits:
        assert config.cores == int(float(limits["cpus"])), f"{inv.where}: --cores differs from the CPU limit"

    inv = _one("k8s", NODE)
    resources = inv.extra["container"]["resources"]
    config = node_config(inv)
    assert "--memory-budget" in inv.flags(), f"{inv.where}: set --memory-budget to match the memory limit"
    problems.append(_node_memory_rule(inv.where, config, _k8s_bytes(resources["limits"]["memory"])))
    assert _k8s_bytes(resources["requests"]["memory"]) >= config.memory_budget, (
        f"{inv.where}: the memory request is below the budget: the scheduler could place it where it cannot run")
    cpu = resources["limits"].get("cpu", resources["requests"].get("cpu"))
    assert cpu is None or config.cores == int(_k8s_cpus(cpu)), f"{inv.where}: --cores differs from the CPU limit"

    inv = _one("systemd", NODE)
    memory_max = service_value(inv.extra["unit"], "MemoryMax")
    if memory_max:
        problems.append(_node_memory_rule(inv.where, node_config(inv), parse_size(memory_max)))
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


def test_coordinator_memory_limit_covers_its_decode_sandboxes() -> None:
    def need(inv: Invocation) -> int:
        limits = coordinator_config(inv).limits
        return COORDINATOR_BASE + limits.decode_workers * (SANDBOX_WARM + limits.decode_memory_bytes)

    problems = []
    inv = _one("compose", COORDINATOR)
    limit = parse_size(str(inv.extra["spec"]["deploy"]["resources"]["limits"]["memory"]))
    if limit < need(inv):
        problems.append(f"{inv.where}: memory limit {limit / 2**30:.2f} GiB < {need(inv) / 2**30:.2f} GiB")
    inv = _one("k8s", COORDINATOR)
    limit = _k8s_bytes(inv.extra["container"]["resources"]["limits"]["memory"])
    if limit < need(inv):
        problems.append(f"{inv.where}: memory limit {limit / 2**30:.2f} GiB < {need(inv) / 2**30:.2f} GiB")
    inv = _one("systemd", COORDINATOR)
    memory_max = service_value(inv.extra["unit"], "MemoryMax")
    if memory_max and parse_size(memory_max) < need(inv):
        problems.append(f"{inv.where}: MemoryMax={memory_max} < {need(inv) / 2**30:.2f} GiB")
    assert not problems, "\n".join(problems)


def test_node_stop_timeouts_cover_the_drain_grace() -> None:
    stops = {
        "compose": lambda inv: _duration_s(inv.extra["spec"].get("stop_grace_period", "10s")),
        "k8s": lambda inv: float(_pod_spec(inv.extra["object"]).get("terminationGracePeriodSeconds", 30)),
        "systemd": lambda inv: _duration_s(service_value(inv.extra["unit"], "TimeoutStopSec") or "90s"),
    }
    problems = []
    for source, stop_of in stops.items():
        inv = _one(source, NODE)
        grace, stop = node_config(inv).drain_grace_s, stop_of(inv)
        if stop < grace + STOP_MARGIN_S:
            problems.append(f"{inv.where}: stops after {stop:g} s but a draining node may take its drain grace "
                            f"({grace:g} s) + {STOP_MARGIN_S:g} s")
    assert not problems, "\n".join(problems)


# ============================================================================ image

def test_dockerfile_base_user_volume_and_entrypoint() -> None:
    args = _docker_args()
    froms = [ins.value.split()[0] for ins in dockerfile() if ins.keyword == "FROM"]
    resolved = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), f) for f in froms]
    assert resolved[-1] == "python:3.11-slim", f"runtime base is {resolved[-1]}"
    stage = final_stage()
    users = [ins.value for ins in stage if ins.keyword == "USER"]
    assert users, "deploy/Dockerfile: no USER in the runtime stage (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    assert int(uid) == UID and (not gid or int(gid) == UID)
    run = " ".join(ins.value for ins in stage if ins.keyword == "RUN")
    assert f"--uid {UID}" in run and f"--gid {UID}" in run, "the qscale user is created with the uid of USER"
    volumes = [v for ins in stage if ins.keyword == "VOLUME" for v in ins.exec_form()]
    state_dir = _one("Dockerfile", COORDINATOR).setting("--state-dir", "QSCALE_STATE_DIR")
    assert state_dir in volumes, f"the state dir {state_dir} must be a VOLUME (found {volumes})"
    assert re.search(rf"install -d -o qscale -g qscale [^&]*{re.escape(state_dir)}", run), (
        "the state dir must exist and belong to the qscale user before VOLUME")
    (entrypoint,) = [ins.exec_form() for ins in stage if ins.keyword == "ENTRYPOINT"]
    assert Path(entrypoint[0]).name == "tini" and "tini" in run, "tini is PID 1 and forwards SIGTERM"
    assert not any(ins.keyword == "HEALTHCHECK" for ins in stage), (
        "the image also runs nodes, whose health service is off unless --health-port is given (and on another "
        "port): the healthcheck belongs in compose")


def test_dockerfile_bakes_in_no_secret_and_copies_only_the_package() -> None:
    for ins in dockerfile():
        if ins.keyword in ("ENV", "ARG"):
            names = _key_values(ins.value) if "=" in ins.value else {ins.value: ""}
            for name in names:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY", name.upper()), (
                    f"deploy/Dockerfile:{ins.line}: {ins.keyword} {name} would bake a secret into the image")
    sources = [src for ins in dockerfile() if ins.keyword == "COPY" and "--from=" not in ins.value
               for src in [t for t in shlex.split(ins.value) if not t.startswith("--")][:-1]]
    allowed = [line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    assert "*" in lines, "deploy/Dockerfile.dockerignore should be an allow-list starting with `*`"
    for src in sources:
        assert src.rstrip("/") in allowed, f"COPY {src}: not let in by deploy/Dockerfile.dockerignore"
    for needed in ("pyproject.toml", "README.md", "qscale", "coordinator", "node"):  # pyproject's package dirs
        assert any(s.rstrip("/") == needed for s in sources), f"the build stage does not COPY {needed}"
    assert not any("secrets" in s for s in sources)


def test_healthcheck_comes_with_the_package_into_the_image() -> None:
    """``qscale-healthcheck`` is a console script of the package: the image gets it from
    ``pip install .`` (its build stage runs it), not from a file copied in beside it."""
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("qscale-healthcheck") == "qscale.healthcheck:main"
    copies = [shlex.split(ins.value) for ins in dockerfile() if ins.keyword == "COPY"]
    assert not any("healthcheck" in arg for c in copies for arg in c), "qscale-healthcheck comes with the package"
    run = " ".join(ins.value for ins in dockerfile() if ins.keyword == "RUN")
    assert "/opt/qscale/bin/qscale-healthcheck" in run, "the build stage should run the installed qscale-healthcheck"
    env = {k: v for ins in final_stage() if ins.keyword == "ENV" for k, v in _key_values(ins.value).items()}
    assert env.get("PATH", "").split(":")[0] == "/opt/qscale/bin", "the console scripts must be on PATH"


# ============================================================================ compose

def test_compose_tokens_come_from_secret_files() -> None:
    doc = compose()
    declared = doc.get("secrets", {})
    for name, spec in declared.items():
        assert Path(spec["file"]).parts[:2] == (".", "secrets") or Path(spec["file"]).parts[0] == "secrets", (
            f"secret {name}: keep token files under deploy/secrets/ (git-ignored)")
    assert "/secrets/" in (DEPLOY / ".gitignore").read_text().split()
    wanted = {COORDINATOR: ("QSCALE_NODE_TOKENS_FILE", "QSCALE_CLIENT_TOKENS_FILE"), NODE: ("QSCALE_NODE_TOKEN_FILE",)}
    for inv in compose_invocations():
        service_secrets = {s if isinstance(s, str) else s["source"]: s for s in inv.extra["spec"].get("secrets", [])}
        for var in wanted[inv.program]:
            path = inv.env.get(var)
            assert path, f"{inv.where}: {var} not set"
            name = Path(path).name
            assert path == f"/run/secrets/{name}" and name in service_secrets and name in declared, (
                f"{inv.where}: {var}={path} is not one of the service's compose secrets")


def _published_host_ip(mapping: Any) -> str:
    """The host address a compose port mapping binds ("" for every interface)."""
    if isinstance(mapping, dict):
        return str(mapping.get("host_ip", ""))
    text = str(mapping).split("/")[0]
    if text.startswith("["):  # "[::1]:50051:50051"
        return text[1:text.index("]")]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else ""


def test_compose_publishes_every_coordinator_port_on_loopback_only() -> None:
    """gRPC (tokens in clear text without TLS), metrics and the status page: none is published
    on every interface by default; compose.yaml says how to open 50051 once TLS is on."""
    import ipaddress

    ports = compose()["services"]["coordinator"].get("ports", [])
    assert ports
    for mapping in ports:
        host_ip = _published_host_ip(mapping)
        assert host_ip and ipaddress.ip_address(host_ip).is_loopback, (
            f"deploy/compose.yaml publishes {mapping!r} on every interface: bind it to 127.0.0.1")
    grpc_port = next(iter(port_observations()["grpc"].values()))
    assert f"127.0.0.1:{grpc_port}:{grpc_port}" in [str(p) for p in ports]
    text = COMPOSE.read_text()
    assert "TLS" in text and f'"{grpc_port}:{grpc_port}"' in text, (
        "compose.yaml should say how to publish the gRPC port to other machines, with TLS")


def test_compose_coordinator_health_and_state() -> None:
    services = compose()["services"]
    coord = services["coordinator"]
    test = [str(t) for t in coord["healthcheck"]["test"]]
    assert test[0] == "CMD" and test[1] == "qscale-healthcheck", test
    assert services["node"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    state_dir = _one("compose", COORDINATOR).setting("--state-dir", "QSCALE_STATE_DIR")
    volumes = [str(v) for v in coord.get("volumes", [])]
    named = [v.split(":")[0] for v in volumes if v.split(":")[1:2] == [state_dir]]
    assert named and named[0] in compose().get("volumes", {}), f"the state dir {state_dir} must be a named volume"


# ============================================================================ Kubernetes

def test_k8s_containers_keep_the_image_entrypoint() -> None:
    for inv in k8s_invocations():
        assert "command" not in inv.extra["container"], (
            f"{inv.where}: set `args`, not `command`, so the image's entrypoint (tini) stays PID 1")


def test_k8s_coordinator_statefulset() -> None:
    where, sts = k8s_object("StatefulSet", "qscale-coordinator")
    assert sts["spec"]["replicas"] == 1, f"{where}: one coordinator owns the state"
    pod = _pod_spec(sts)
    (container,) = pod["containers"]
    inv = _one("k8s", COORDINATOR)
    state_dir = inv.setting("--state-dir", "QSCALE_STATE_DIR")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts.get(claim["metadata"]["name"]) == state_dir, f"{where}: the claim is not mounted at {state_dir}"

    from qscale.coordinator.server import SERVICES

    for probe in ("readinessProbe", "livenessProbe"):
        grpc_probe = container[probe].get("grpc")
        assert grpc_probe, f"{where}: {probe} should be Kubernetes' native gRPC probe"
        assert grpc_probe.get("service", "") in ("", *SERVICES), f"{where}: {probe} asks for an unknown service"


def test_k8s_node_probes_do_not_depend_on_the_coordinator() -> None:
    inv = _one("k8s", NODE)
    container = inv.extra["container"]
    assert "readinessProbe" not in container, "no Service sends traffic to nodes: readiness means nothing"
    for probe in ("livenessProbe", "startupProbe"):
        spec = container.get(probe, {})
        assert "exec" not in spec and "grpc" not in spec, (
            f"{inv.where}: {probe} must not dial the coordinator (its outage would restart every node)")


def test_k8s_token_files_are_mounted_from_the_secret() -> None:
    where, secret = k8s_object("Secret", "qscale-tokens")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    wanted = {COORDINATOR: ("QSCALE_NODE_TOKENS_FILE", "QSCALE_CLIENT_TOKENS_FILE"), NODE: ("QSCALE_NODE_TOKEN_FILE",)}
    for inv in k8s_invocations():
        pod = _pod_spec(inv.extra["object"])
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for var in wanted[inv.program]:
            path = Path(inv.env[var])
            mount = next((m for m in inv.extra["container"]["volumeMounts"] if Path(m["mountPath"]) == path.parent),
                         None)
            assert mount and mount.get("readOnly"), f"{inv.where}: {var}={path} is not on a read-only mount"
            volume = volumes[mount["name"]]["secret"]
            assert volume["secretName"] == secret["metadata"]["name"]
            items = {item["path"]: item["key"] for item in volume.get("items", [])}
            key = items.get(path.name, path.name if not items else None)
            assert key in keys, f"{inv.where}: {var}={path} is no key of Secret {secret['metadata']['name']}"
        if inv.program == NODE:
            assert set(items.values()) == {"node.token"}, "nodes should see their join token only"


def test_k8s_secret_placeholders_are_refused(tmp_path: Path) -> None:
    """Applying the example Secret unchanged must stop the cluster, not run it with a known token."""
    from qscale.security import read_token_file

    _, secret = k8s_object("Secret", "qscale-tokens")
    for key, value in secret.get("stringData", {}).items():
        path = tmp_path / key
        path.write_text(value)
        with pytest.raises(InvalidArgumentError):
            read_token_file(path)


def test_k8s_pods_run_as_non_root_and_restricted() -> None:
    problems = []
    for where, obj in _workloads():
        label = f"{where} {obj['kind']}/{obj['metadata']['name']}"
        pod = _pod_spec(obj)
        sc = pod.get("securityContext", {})
        if not (sc.get("runAsNonRoot") and sc.get("runAsUser") == UID and sc.get("runAsGroup") == UID):
            problems.append(f"{label}: pod securityContext must run as non-root uid/gid {UID} (the image's)")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{label}: seccompProfile RuntimeDefault")
        for c in pod["containers"]:
            csc = c.get("securityContext", {})
            if csc.get("allowPrivilegeEscalation") is not False or csc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{label} {c['name']}: allowPrivilegeEscalation false, capabilities drop ALL")
            if "limits" not in c.get("resources", {}) or "memory" not in c["resources"]["limits"]:
                problems.append(f"{label} {c['name']}: no memory limit")
        annotations = obj["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/path") != "/metrics":
            problems.append(f"{label}: prometheus.io/scrape and prometheus.io/path annotations")
    assert not problems, "\n".join(problems)


# ============================================================================ systemd

def test_systemd_units() -> None:
    problems = []
    for inv in systemd_invocations():
        unit, name = inv.extra["unit"], inv.extra["name"]
        service = unit.get("Service", {})
        expected = {
            "User": "qscale", "Group": "qscale", "Restart": "on-failure", "KillSignal": "SIGTERM",
            "KillMode": "mixed", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
            "ProtectHome": "yes", "EnvironmentFile": f"/etc/qscale/{UNIT_ENV[name].removesuffix('.example')}",
        }
        for key, value in expected.items():
            if service_value(unit, key) != value:
                problems.append(f"{inv.where}: {key}={service_value(unit, key)}, expected {value}")
        if "WantedBy" not in unit.get("Install", {}):
            problems.append(f"{inv.where}: no [Install] WantedBy=")
        # Every %d/<id> token file must be a LoadCredential= of the unit.
        credentials = {c.split(":", 1)[0] for c in service.get("LoadCredential", [])}
        for var, value in inv.env.items():
            if value.startswith("%d/") and value[3:] not in credentials:
                problems.append(f"{inv.where}: {var}={value} but no LoadCredential={value[3:]}:...")
        for key in env_file(SYSTEMD / UNIT_ENV[name], commented=True):
            if not key.startswith("QSCALE_"):
                problems.append(f"deploy/systemd/{UNIT_ENV[name]}: {key} is not a QSCALE_* variable")
    coord = _one("systemd", COORDINATOR)
    state_dir = coord.setting("--state-dir", "QSCALE_STATE_DIR")
    state = service_value(coord.extra["unit"], "StateDirectory")
    if not state or state_dir != f"/var/lib/{state}":
        problems.append(f"{coord.where}: QSCALE_STATE_DIR={state_dir} is not the unit's StateDirectory={state}")
    assert not problems, "\n".join(problems)


# ============================================================================ no secrets anywhere

def test_no_token_is_committed_under_deploy() -> None:
    hexlike = re.compile(r"\b[0-9a-fA-F]{32,}\b")
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and "secrets" not in path.relative_to(DEPLOY).parts:
            assert not hexlike.search(path.read_text(errors="replace")), f"{path.relative_to(ROOT)} holds a token?"


# ============================================================================ the healthcheck, for real

@pytest.fixture
def served_coordinator(tmp_path: Path) -> Iterator[str]:
    """`qscale-coordinator serve` with token files, as compose runs it (but on a free loopback port)."""
    (tmp_path / "node.tokens").write_text("n" * 32 + "\n")
    (tmp_path / "client.tokens").write_text("c" * 32 + "\n")
    for f in ("node.tokens", "client.tokens"):
        (tmp_path / f).chmod(0o600)
    env = {**os.environ, "QSCALE_NODE_TOKENS_FILE": str(tmp_path / "node.tokens"),
           "QSCALE_CLIENT_TOKENS_FILE": str(tmp_path / "client.tokens"), "QSCALE_DECODE_WORKERS": "1"}
    address_file = tmp_path / "address"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qscale.coordinator.cli", "serve", "--listen", "127.0.0.1:0",
         "--state-dir", str(tmp_path / "state"), "--address-file", str(address_file), "--log-level", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (address_file.exists() and address_file.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"the coordinator exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                pytest.fail("the coordinator did not start within 60 s")
            time.sleep(0.05)
        yield address_file.read_text().strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


HEALTHCHECK = Path(sys.executable).parent / "qscale-healthcheck"


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``qscale-healthcheck`` console script (beside this interpreter)."""
    assert HEALTHCHECK.is_file() and os.access(HEALTHCHECK, os.X_OK), (
        f"{HEALTHCHECK} is not installed: it is a console script of the package (pip install -e .)")
    return subprocess.run([str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30)


def test_healthcheck_against_a_real_coordinator(served_coordinator: str) -> None:
    from qscale.coordinator.server import SERVICES

    assert _healthcheck(served_coordinator).returncode == 0
    for service in SERVICES:
        result = _healthcheck(served_coordinator, "--service", service)
        assert result.returncode == 0, result.stderr
    result = _healthcheck(served_coordinator, "--service", "no.such.Service")
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _healthcheck(f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    result = _healthcheck(f"127.0.0.1:{port}", "--tls-ca", str(DEPLOY / "missing-ca.pem"))
    assert result.returncode == 1 and "missing-ca.pem" in result.stderr
    result = _healthcheck(f"127.0.0.1:{port}", "--tls-cert", "client.pem")
    assert result.returncode == 2 and "--tls-cert and --tls-key go together" in result.stderr
