"""``qscale-coordinator tls-init`` and :mod:`qscale.certificates`: the files it writes, and that
they work: a real coordinator serves mutual TLS with them, the ``nodes`` command and a real
``qscale-node`` connect with the client and node certificates, on 127.0.0.1 with OS-chosen
ports."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import wait_until
from qscale.certificates import parse_host, write_tls_files
from qscale.client import Client
from qscale.coordinator import cli as coordinator_cli
from qscale.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from qscale.security import TLSConfig

pytestmark = pytest.mark.timeout(240)

BIN = Path(sys.executable).parent
COORDINATOR = BIN / "qscale-coordinator"
NODE = BIN / "qscale-node"
HEALTHCHECK = BIN / "qscale-healthcheck"
FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem", "node.pem",
         "node-key.pem")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any ``QSCALE_*`` setting: each test gives its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSCALE_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _script(path: Path) -> str:
    assert path.is_file() and os.access(path, os.X_OK), f"{path} is not installed (pip install -e .)"
    return str(path)


def _tls_init(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_script(COORDINATOR), "tls-init", str(directory), *args], capture_output=True, text=True,
                          timeout=60, env=_clean_env(), cwd=directory.parent)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@contextmanager
def _process(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that is stopped (SIGTERM, then SIGKILL) however the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# ------------------------------------------------------------------ the files themselves

def test_tls_init_writes_a_ca_server_client_and_node_certificate(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    result = _tls_init(out, "--host", "coordinator.example", "--host", "10.0.0.5", "--host", "[::1]")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert _mode(out) == 0o700
    for name in FILES:
        assert _mode(out / name) == (0o600 if name.endswith("-key.pem") else 0o644), name
        assert str(out / name) in result.stdout or name in result.stdout, f"{name} not reported"
    # The exact flags and variables, with the paths written.
    for text in (f"--tls-cert {out}/server.pem --tls-key {out}/server-key.pem --tls-ca {out}/ca.pem",
                 f"qscale-node --coordinator coordinator.example:50051 --tls-ca {out}/ca.pem "
                 f"--tls-cert {out}/node.pem --tls-key {out}/node-key.pem",
                 f"qscale-coordinator nodes --coordinator coordinator.example:50051 --tls-ca {out}/ca.pem "
                 f"--tls-cert {out}/client.pem --tls-key {out}/client-key.pem",
                 f"QSCALE_TLS_CA={out}/ca.pem QSCALE_TLS_CERT={out}/node.pem QSCALE_TLS_KEY={out}/node-key.pem",
                 "qscale-healthcheck coordinator.example:50051"):
        assert text in result.stdout, f"{text!r} not in:\n{result.stdout}"

    ca, server = _cert(out / "ca.pem"), _cert(out / "server.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Exactly what was named: no localhost or 127.0.0.1 added behind the user's back.
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    usage = {"server.pem": ExtendedKeyUsageOID.SERVER_AUTH, "client.pem": ExtendedKeyUsageOID.CLIENT_AUTH,
             "node.pem": ExtendedKeyUsageOID.CLIENT_AUTH}
    for name, oid in usage.items():
        cert = _cert(out / name)
        cert.verify_directly_issued_by(ca)
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [oid]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        days = (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).days
        assert 363 <= days <= 365


def test_tls_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert _tls_init(out, "--host", "localhost").returncode == 0
    before = {name: (out / name).read_bytes() for name in FILES}

    again = _tls_init(out, "--host", "localhost")
    assert again.returncode == coordinator_cli.EXIT_INPUT
    assert "already holds" in again.stderr and "--force" in again.stderr
    assert {name: (out / name).read_bytes() for name in FILES} == before, "a refused run changed a file"

    # One file in the way is enough to refuse, and then nothing at all is written.
    other = tmp_path / "other"
    other.mkdir()
    (other / "alice.pem").write_text("somebody's certificate\n")
    refused = _tls_init(other, "--host", "localhost", "--client", "alice")
    assert refused.returncode == coordinator_cli.EXIT_INPUT and "alice.pem" in refused.stderr
    assert sorted(p.name for p in other.iterdir()) == ["alice.pem"]
    assert (other / "alice.pem").read_text() == "somebody's certificate\n"

    # --force replaces every file with a new CA's; a link in the way is replaced, not followed.
    victim = tmp_path / "victim"
    victim.write_text("not a key\n")
    (out / "server-key.pem").unlink()
    (out / "server-key.pem").symlink_to(victim)
    forced = _tls_init(out, "--host", "localhost", "--force")
    assert forced.returncode == 0, forced.stderr
    assert victim.read_text() == "not a key\n"
    assert not (out / "server-key.pem").is_symlink()
    assert (out / "ca.pem").read_bytes() != before["ca.pem"]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES), "no temporary file is left behind"
    for name in FILES:
        assert _mode(out / name) == (0o600 if name.endswith("-key.pem") else 0o644), name


def test_key_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    for umask, directory in ((0o000, tmp_path / "open"), (0o077, tmp_path / "closed")):
        old = os.umask(umask)
        try:
            files = write_tls_files(directory, ["localhost"], clients=["a", "b"], nodes=[])
        finally:
            os.umask(old)
        assert list(files.clients) == ["a", "b"] and files.nodes == {}
        for path in files.paths():
            assert _mode(path) == (0o600 if path.name.endswith("-key.pem") else 0o644), (umask, path.name)


@pytest.mark.parametrize(("args", "message"), [
    (["--host", "coordinator:50051"], "without a port"),
    (["--host", "https://coordinator.example"], "without a port"),
    (["--host", "bad_name.example"], "not a DNS label"),
    (["--host=-lead.example"], "not a DNS label"),
    (["--host", "10.0.0.300"], "neither an IP address nor a DNS name"),
    (["--host", "[coordinator]"], "brackets hold an IPv6 address"),
    (["--host", "bücher.example"], "punycode"),
    (["--host", " "], "empty host"),
    (["--host", "localhost", "--client", "server"], "taken by the CA or server files"),
    (["--host", "localhost", "--client", "x", "--node", "x"], "given twice"),
    (["--host", "localhost", "--client", "../escape"], "a name is 1 to 64"),
    (["--host", "localhost", "--days", "0"], "--days"),
])
def test_tls_init_refuses_bad_hosts_and_names(tmp_path: Path, args: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tls"
    assert coordinator_cli.main(["tls-init", str(out), *args]) == coordinator_cli.EXIT_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing is written for a bad argument"


def test_tls_init_needs_a_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        coordinator_cli.main(["tls-init", str(tmp_path / "tls")])
    assert info.value.code == 2 and "--host" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="at least one --host"):
        write_tls_files(tmp_path / "tls", [])
    (tmp_path / "file").write_text("")
    with pytest.raises(FailedPreconditionError, match="not a directory"):
        write_tls_files(tmp_path / "file", ["localhost"])


def test_parse_host() -> None:
    assert parse_host("coordinator.example.") == x509.DNSName("coordinator.example")
    assert parse_host("*.qscale.svc") == x509.DNSName("*.qscale.svc")
    assert parse_host("[2001:db8::1]") == x509.IPAddress(ipaddress.ip_address("2001:db8::1"))
    assert parse_host(" 127.0.0.1 ") == x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    with pytest.raises(InvalidArgumentError, match="scope"):
        parse_host("fe80::1%eth0")


# ------------------------------------------------------- the files in a real mutual-TLS cluster

def test_tls_init_files_serve_mutual_tls_to_the_cli_and_a_real_node(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    made = _tls_init(tls, "--host", "127.0.0.1", "--host", "coordinator.example", "--client", "alice",
                     "--node", "worker")
    assert made.returncode == 0, made.stderr
    rogue = tmp_path / "rogue"  # the same names from another CA
    assert _tls_init(rogue, "--host", "127.0.0.1", "--client", "alice").returncode == 0

    address_file = tmp_path / "address"
    serve = [_script(COORDINATOR), "serve", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
             "--address-file", str(address_file), "--heartbeat-interval", "0.5",
             "--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server-key.pem"),
             "--tls-ca", str(tls / "ca.pem")]
    with _process(serve, tmp_path / "coordinator.log", _clean_env(QSCALE_DECODE_WORKERS="1"), tmp_path) as coord:
        wait_until(lambda: coord.poll() is not None or (address_file.exists() and address_file.read_text().strip()),
                   60, "the coordinator to listen")
        assert coord.poll() is None, (tmp_path / "coordinator.log").read_text()
        address = address_file.read_text().strip()
        port = address.rsplit(":", 1)[1]
        alice = ["--tls-ca", str(tls / "ca.pem"), "--tls-cert", str(tls / "alice.pem"),
                 "--tls-key", str(tls / "alice-key.pem")]

        def cli_nodes() -> list[dict[str, object]]:
            run = subprocess.run([_script(COORDINATOR), "nodes", "--coordinator", address, "--json", *alice],
                                 capture_output=True, text=True, timeout=90, env=_clean_env(), cwd=tmp_path)
            assert run.returncode == 0, run.stderr
            return list(json.loads(run.stdout))

        assert cli_nodes() == []

        # A real node joins with the node certificate, given as the variables tls-init printed.
        node_env = _clean_env(QSCALE_TLS_CA=str(tls / "ca.pem"), QSCALE_TLS_CERT=str(tls / "worker.pem"),
                              QSCALE_TLS_KEY=str(tls / "worker-key.pem"))
        node = [_script(NODE), "--coordinator", address, "--name", "tls-node", "--slots", "1", "--cores", "1",
                "--memory-budget", "512M", "--drain-grace", "2", "--parent-pid", str(os.getpid())]
        with _process(node, tmp_path / "node.log", node_env, tmp_path) as node_proc:
            with Client(address, tls=TLSConfig(str(tls / "alice.pem"), str(tls / "alice-key.pem"),
                                               str(tls / "ca.pem")), timeout=10) as client:
                def joined() -> bool:
                    assert node_proc.poll() is None, (tmp_path / "node.log").read_text()
                    return any(n.name == "tls-node" and n.state == "alive" for n in client.nodes())

                wait_until(joined, 90, "the node to join over mutual TLS", interval=0.2)
            listed = cli_nodes()
            assert [(n["name"], n["state"]) for n in listed] == [("tls-node", "alive")], listed

        # Callers without a certificate of this CA get no connection at all.
        refused = [TLSConfig(ca=str(tls / "ca.pem")),  # no client certificate
                   TLSConfig(str(rogue / "alice.pem"), str(rogue / "alice-key.pem"), str(tls / "ca.pem")),
                   TLSConfig(str(tls / "alice.pem"), str(tls / "alice-key.pem"), str(rogue / "ca.pem"))]
        for tls_config in refused:
            with Client(address, tls=tls_config, timeout=5) as stranger:
                with pytest.raises(UnavailableError):
                    stranger.nodes()

        # The health probe: the IP address and the DNS name are both in the certificate, another
        # name is not.
        def probe(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([_script(HEALTHCHECK), *args, "--timeout", "10", *alice], capture_output=True,
                                  text=True, timeout=60, env=_clean_env(), cwd=tmp_path)

        assert probe(address).returncode == 0
        assert probe(address, "--server-name", "coordinator.example").returncode == 0
        wrong = probe(f"127.0.0.1:{port}", "--server-name", "elsewhere.example")
        assert wrong.returncode == 1 and "UNAVAILABLE" in wrong.stderr
