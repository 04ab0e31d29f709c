"""A coordinator that cannot be reached, never answers, speaks the other transport or refuses the
credentials: every client command, the Python client and the node say so soon and plainly, with
the setting to change (see qscale.rpc). Real CLI and node processes, real coordinators, OS-chosen
loopback ports; every process is stopped, whatever happens."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import bell, free_port, wait_until
from qscale.circuits import dump_qpy
from qscale.client import Client
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.server import EmbeddedCoordinator
from qscale.errors import UnavailableError

pytestmark = pytest.mark.timeout(240)

CLI = [sys.executable, "-m", "qscale.coordinator"]
NODE_TOKEN = "node-join-token-0123456789abcdef"
CLIENT_TOKEN = "client-api-token-0123456789abcdef"
# gRPC's own log lines (absl format), e.g. "I1201 02:24:19.952547   30044 ssl_transport_security.cc:2563] ..."
GRPC_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+\S+:\d+\]", re.M)
_OURS = ("QSCALE_NODE_TOKEN", "QSCALE_NODE_TOKEN_FILE", "QSCALE_CLIENT_TOKEN", "QSCALE_CLIENT_TOKEN_FILE",
         "QSCALE_TLS_CERT", "QSCALE_TLS_KEY", "QSCALE_TLS_CA", "QSCALE_COORDINATOR", "QSCALE_CONNECT_TIMEOUT",
         "GRPC_VERBOSITY")


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _OURS:
        monkeypatch.delenv(var, raising=False)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Run:
    args: list[str]
    code: int
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return f"{' '.join(self.args)}: exit {self.code} after {self.seconds:.1f} s\n{self.stderr}"


def _run_all(commands: list[list[str]], tmp_path: Path, *, limit: float = 40.0,
             env: dict[str, str] | None = None) -> list[Run]:
    """Run the CLI commands at once; each is killed after ``limit`` seconds (exit -9)."""
    started: list[tuple[list[str], subprocess.Popen[bytes], float, Path]] = []
    try:
        for i, args in enumerate(commands):
            err = tmp_path / f"cli-{i}.err"
            with err.open("wb") as fh:
                proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=fh,
                                        stdin=subprocess.DEVNULL, env=env or _env(), cwd=tmp_path)
            started.append((args, proc, time.monotonic(), err))
        runs: list[Run | None] = [None] * len(started)
        deadline = time.monotonic() + limit
        while any(r is None for r in runs) and time.monotonic() < deadline:
            for i, (args, proc, t0, err) in enumerate(started):
                if runs[i] is None and proc.poll() is not None:
                    runs[i] = Run(args, proc.returncode, err.read_text(), time.monotonic() - t0)
            time.sleep(0.02)
        return [r if r is not None else Run(args, -9, err.read_text(), limit)
                for r, (args, _, _, err) in zip(runs, started)]
    finally:
        for _, proc, _, _ in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def silent_address() -> Iterator[str]:
    """A loopback port that takes TCP connections (the kernel completes them) and never says a
    word: what a coordinator behind a dropped route or a non-gRPC port looks like to a client."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield "127.0.0.1:%d" % listener.getsockname()[1]


@pytest.fixture
def qpy_file(tmp_path: Path) -> Path:
    path = tmp_path / "bell.qpy"
    path.write_bytes(dump_qpy(bell()))
    return path


def _client_commands(qpy_file: Path) -> list[list[str]]:
    return [["submit", str(qpy_file), "--shots", "10"], ["nodes"], ["status", "j-0"], ["watch", "j-0"]]


def _clean(run: Run) -> None:
    assert "Traceback" not in run.stderr and not GRPC_LOG_LINE.search(run.stderr), run


# ------------------------------------------------------------------ unreachable

def test_every_client_command_fails_fast_on_a_closed_port(tmp_path: Path, qpy_file: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    runs = _run_all([[*args, "--coordinator", address] for args in _client_commands(qpy_file)], tmp_path)
    for run in runs:
        assert run.code == 3 and "coordinator unavailable" in run.stderr and "Connection refused" in run.stderr, run
        assert run.seconds < 8, run  # about 1 s of process start and 0.7 s of gRPC retries
        _clean(run)


def test_every_client_command_gives_up_on_a_coordinator_that_never_answers(
        tmp_path: Path, qpy_file: Path, silent_address: str) -> None:
    commands = _client_commands(qpy_file)
    runs = _run_all([[*args, "--coordinator", silent_address] for args in commands[:2]]
                    + [[*commands[2], "--coordinator", silent_address, "--connect-timeout", "1"]], tmp_path)
    runs += _run_all([[*commands[3], "--coordinator", silent_address]], tmp_path,
                     env=_env(QSCALE_CONNECT_TIMEOUT="1"))
    for run in runs:
        assert run.code == 3 and "nothing answered within the connect timeout" in run.stderr, run
        assert "--connect-timeout" in run.stderr and "$QSCALE_CONNECT_TIMEOUT" in run.stderr, run
        _clean(run)
    default, short = runs[:2], runs[2:]
    assert all(4.5 < run.seconds < 12 for run in default), [str(r) for r in default]  # the 5 s default
    assert all(run.seconds < 5 for run in short), [str(r) for r in short]  # 1 s, set by flag or variable


def test_python_client_fails_fast(silent_address: str) -> None:
    with Client(silent_address, connect_timeout=1) as client:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="nothing answered within the connect timeout"):
            client.nodes()
        assert time.monotonic() - t0 < 3
    with Client(f"127.0.0.1:{free_port()}") as client:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="Connection refused"):
            client.submit(bell(), shots=10)
        assert time.monotonic() - t0 < 3
    # (The 5 s default, through the same Client, is timed by the CLI test above.)


# ------------------------------------------------------------------ credentials

@pytest.fixture
def auth_coordinator() -> Iterator[EmbeddedCoordinator]:
    coordinator = EmbeddedCoordinator(CoordinatorConfig(listen="127.0.0.1:0", node_token=NODE_TOKEN,
                                                        client_token=CLIENT_TOKEN))
    coordinator.start()
    try:
        yield coordinator
    finally:
        coordinator.stop()


def _token_file(tmp_path: Path, name: str, token: str) -> str:
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


def test_refused_credentials_exit_5_naming_the_settings(tmp_path: Path, auth_coordinator: EmbeddedCoordinator
                                                       ) -> None:
    address = ["--coordinator", auth_coordinator.address]
    wrong = _token_file(tmp_path, "wrong.token", "not-a-token-we-know-0123456789ab")
    node = _token_file(tmp_path, "node.token", NODE_TOKEN)
    runs = _run_all([["nodes", *address], ["jobs", *address, "--token-file", wrong],
                     ["status", "j-0", *address, "--token-file", node]], tmp_path)
    for run in runs:
        assert run.code == 5, run
        for setting in ("--token-file", "$QSCALE_CLIENT_TOKEN", "$QSCALE_CLIENT_TOKEN_FILE"):
            assert setting in run.stderr, run
        _clean(run)
    assert "not an API token" in runs[2].stderr, runs[2]
    right = _token_file(tmp_path, "client.token", CLIENT_TOKEN)
    ok = _run_all([["nodes", *address, "--token-file", right]], tmp_path)[0]
    assert ok.code == 0, ok


def _node(tmp_path: Path, name: str, coordinator: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "qscale.node", "--coordinator", coordinator, "--name", name,
                                 "--cores", "1", "--memory-budget", "512M", "--parent-pid", str(os.getpid())],
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(**env),
                                cwd=tmp_path)
    return proc, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_node_with_a_refused_join_token_exits_5_naming_the_settings(
        tmp_path: Path, auth_coordinator: EmbeddedCoordinator) -> None:
    started = [_node(tmp_path, "unknown", auth_coordinator.address, QSCALE_NODE_TOKEN="not-a-token-we-know-0123456789ab"),
               _node(tmp_path, "client-role", auth_coordinator.address, QSCALE_NODE_TOKEN=CLIENT_TOKEN)]
    try:
        for proc, log in started:
            try:
                code = proc.wait(90)  # the worker starts first: a few seconds
            except subprocess.TimeoutExpired:
                pytest.fail(f"the node kept running with a refused token:\n{log.read_text()}")
            text = log.read_text()
            assert code == 5, text
            for setting in ("--token-file", "$QSCALE_NODE_TOKEN_FILE", "$QSCALE_NODE_TOKEN"):
                assert setting in text, text
            assert "Traceback" not in text and not GRPC_LOG_LINE.search(text), text
        assert "UNAUTHENTICATED" in started[0][1].read_text() and "PERMISSION_DENIED" in started[1][1].read_text()
    finally:
        for proc, _ in started:
            _stop(proc)


# ------------------------------------------------------------------ TLS on one side only

@dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    other_ca: str


def _make_certs(directory: Path) -> Certs:
    """A CA and a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey,
             ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(name: str, data: bytes) -> str:
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    pem = serialization.Encoding.PEM
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = cert("test CA", ca_key, None, ca_key, True)
    server = cert("127.0.0.1", server_key, ca.subject, ca_key, False)
    other = cert("another CA", other_key, None, other_key, True)
    return Certs(ca=write("ca.pem", ca.public_bytes(pem)), server_cert=write("server.pem", server.public_bytes(pem)),
                 server_key=write("server.key", server_key.private_bytes(
                     pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
                 other_ca=write("other-ca.pem", other.public_bytes(pem)))


def test_tls_on_one_side_only_says_so(tmp_path: Path) -> None:
    certs = _make_certs(tmp_path)
    coordinators = [EmbeddedCoordinator(CoordinatorConfig(listen="127.0.0.1:0", **tls)) for tls in (
        {"tls_cert": certs.server_cert, "tls_key": certs.server_key},
        {},
        {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "tls_ca": certs.ca})]
    node: subprocess.Popen[bytes] | None = None
    try:
        tls, plain, mutual = (c.start() for c in coordinators)
        node, node_log = _node(tmp_path, "plain-node", tls)
        runs = _run_all([["nodes", "--coordinator", tls],
                         ["nodes", "--coordinator", plain, "--tls-ca", certs.ca],
                         ["nodes", "--coordinator", tls, "--tls-ca", certs.other_ca],
                         ["nodes", "--coordinator", mutual, "--tls-ca", certs.ca]], tmp_path)
        for run in runs:
            assert run.code == 3, run
            _clean(run)
        assert "probably speaks TLS" in runs[0].stderr and "--tls-ca PEM" in runs[0].stderr, runs[0]
        assert "$QSCALE_TLS_CA" in runs[0].stderr, runs[0]
        assert "probably does not speak TLS" in runs[1].stderr and "--tls-ca" in runs[1].stderr, runs[1]
        assert "not signed by the CA" in runs[2].stderr and "--tls-ca PEM" in runs[2].stderr, runs[2]
        assert "client certificate" in runs[3].stderr and "--tls-cert PEM --tls-key PEM" in runs[3].stderr, runs[3]
        with Client(tls) as client, pytest.raises(UnavailableError, match="probably speaks TLS"):
            client.nodes()
        wait_until(lambda: "probably speaks TLS" in node_log.read_text(), 90,
                   "the node to log that the coordinator speaks TLS")
        text = node_log.read_text()
        assert "--tls-ca PEM or $QSCALE_TLS_CA" in text and not GRPC_LOG_LINE.search(text), text
        assert node.poll() is None, text  # a transport mismatch may be a coordinator mid-change: it keeps trying
    finally:
        if node is not None:
            _stop(node)
        for coordinator in coordinators:
            coordinator.stop()
