"""Authentication and transport security: role tokens on every RPC, TLS and mutual TLS, the
loopback-by-default rule, and secrets that never travel on a command line."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import bell, wait_until
from qscale.certificates import write_tls_files
from qscale.circuits import dump_qpy
from qscale.client import Client
from qscale.coordinator import cli as coordinator_cli
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.server import EmbeddedCoordinator
from qscale.coordinator.servicers import JobServicer, NodeServicer
from qscale.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from qscale.local import LocalCluster
from qscale.node import cli as node_cli
from qscale.node.config import NodeConfig
from qscale.proto.v1 import jobs_pb2, jobs_pb2_grpc, node_pb2, node_pb2_grpc
from qscale.security import (
    TLSConfig,
    Tokens,
    is_loopback_address,
    make_channel,
    read_token,
    read_token_file,
    required_role,
)

pytestmark = pytest.mark.timeout(120)

NODE_TOKEN = "node-join-token-0123456789abcdef"
CLIENT_TOKEN = "client-api-token-0123456789abcdef"
UNKNOWN_TOKEN = "not-a-token-we-know-0123456789ab"
CLI = [sys.executable, "-m", "qscale.coordinator"]
_SECURITY_ENV = ("QSCALE_NODE_TOKEN", "QSCALE_NODE_TOKEN_FILE", "QSCALE_CLIENT_TOKEN", "QSCALE_CLIENT_TOKEN_FILE",
                 "QSCALE_NODE_TOKENS_FILE", "QSCALE_CLIENT_TOKENS_FILE", "QSCALE_TLS_CERT", "QSCALE_TLS_KEY",
                 "QSCALE_TLS_CA", "QSCALE_LISTEN", "QSCALE_COORDINATOR")


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests decide every credential themselves."""
    for var in _SECURITY_ENV:
        monkeypatch.delenv(var, raising=False)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SECURITY_ENV}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------ PKI

@dataclass(frozen=True)
class PKI:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_cert: str
    """A client certificate signed by another CA."""
    rogue_key: str


def _make_pki(directory: Path) -> PKI:
    """A CA with a server certificate for localhost and 127.0.0.1 and a client certificate, and
    a client certificate of another CA, written by ``tls-init``'s own code."""
    ours = write_tls_files(directory / "ours", ["localhost", "127.0.0.1"], clients=["qscale-client"], nodes=[])
    other = write_tls_files(directory / "other", ["localhost"], clients=["qscale-client"], nodes=[])
    (client_cert, client_key), (rogue_cert, rogue_key) = ours.clients["qscale-client"], other.clients["qscale-client"]
    return PKI(ca=str(ours.ca), server_cert=str(ours.server_cert), server_key=str(ours.server_key),
               client_cert=str(client_cert), client_key=str(client_key), rogue_cert=str(rogue_cert),
               rogue_key=str(rogue_key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return _make_pki(tmp_path_factory.mktemp("pki"))


# ------------------------------------------------- (a) every RPC, every wrong credential

_METHODS: dict[str, tuple[type, str]] = {
    "Register": (NodeServicer, "node"), "Work": (NodeServicer, "node"),
    "Submit": (JobServicer, "client"), "GetJob": (JobServicer, "client"), "Watch": (JobServicer, "client"),
    "GetResult": (JobServicer, "client"), "Cancel": (JobServicer, "client"), "ListJobs": (JobServicer, "client"),
    "ListNodes": (JobServicer, "client"),
}


def _counting(name: str, method: Callable[..., Any], calls: dict[str, int]) -> Callable[..., Any]:
    """``method`` that counts its calls (an async generator stays one, so gRPC streams it)."""
    if inspect.isasyncgenfunction(method):
        async def gen_wrapper(self: Any, request: Any, context: Any) -> Any:
            calls[name] += 1
            async for item in method(self, request, context):
                yield item
        return gen_wrapper

    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        calls[name] += 1
        return await method(self, request, context)
    return wrapper


@dataclass
class AuthCoordinator:
    coordinator: EmbeddedCoordinator
    calls: dict[str, int]
    client: Client
    job_id: str
    node_id: str

    @property
    def address(self) -> str:
        return self.coordinator.address

    def snapshot(self) -> tuple[Any, ...]:
        """What an authorised client sees: jobs, nodes, the queued job."""
        jobs = [(j.job_id, j.state, j.shots_done, j.shards_running) for j in self.client.jobs()]
        nodes = [(n.node_id, n.state, n.running) for n in self.client.nodes()]
        status = self.client.job(self.job_id).status()
        return jobs, nodes, status.state, status.shards_running, status.shots_done


def _capabilities() -> node_pb2.NodeCapabilities:
    return node_pb2.NodeCapabilities(name="raw", hostname="test", cores=1, slots=1, memory_budget_bytes=1 << 30,
                                      methods=["automatic", "statevector"], max_statevector_qubits=20,
                                      qpy_version=13)


@pytest.fixture(scope="module")
def auth_coord() -> Iterator[AuthCoordinator]:
    """A coordinator with tokens, its servicers counting every handler call; holding one
    queued job and one registered node without a work stream (so nothing runs)."""
    calls = dict.fromkeys(_METHODS, 0)
    patch = pytest.MonkeyPatch()
    for name, (cls, _) in _METHODS.items():
        patch.setattr(cls, name, _counting(name, getattr(cls, name), calls))
    config = CoordinatorConfig(listen="127.0.0.1:0", heartbeat_interval_s=2.0, heartbeat_timeout_s=3600.0,
                               node_token=NODE_TOKEN, client_token=CLIENT_TOKEN)
    coordinator = EmbeddedCoordinator(config)
    client: Client | None = None
    try:
        coordinator.start()
        client = Client(coordinator.address, token=CLIENT_TOKEN, timeout=10)
        job = client.submit(bell(), shots=100, seed=1)
        with make_channel(coordinator.address, token=NODE_TOKEN) as channel:
            reply = node_pb2_grpc.NodeServiceStub(channel).Register(
                node_pb2.RegisterRequest(capabilities=_capabilities()), timeout=10)
        yield AuthCoordinator(coordinator, calls, client, job.job_id, reply.node_id)
    finally:
        if client is not None:
            client.close()
        coordinator.stop()
        patch.undo()


def _call(channel: grpc.Channel, method: str, coord: AuthCoordinator) -> None:
    """One call of ``method`` with a plausible request; raises grpc.RpcError when refused."""
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    nodes = node_pb2_grpc.NodeServiceStub(channel)
    ref = jobs_pb2.JobRef(job_id=coord.job_id)
    t = 10
    if method == "Submit":
        source = jobs_pb2.CircuitSource(qpy=dump_qpy(bell()), name="bell", shots=10)
        jobs.Submit(jobs_pb2.SubmitRequest(circuits=[source]), timeout=t)
    elif method == "GetJob":
        jobs.GetJob(ref, timeout=t)
    elif method == "Watch":
        list(jobs.Watch(jobs_pb2.WatchRequest(job_id=coord.job_id), timeout=t))
    elif method == "GetResult":
        jobs.GetResult(ref, timeout=t)
    elif method == "Cancel":
        jobs.Cancel(ref, timeout=t)
    elif method == "ListJobs":
        jobs.ListJobs(jobs_pb2.ListJobsRequest(limit=10), timeout=t)
    elif method == "ListNodes":
        jobs.ListNodes(jobs_pb2.ListNodesRequest(), timeout=t)
    elif method == "Register":
        nodes.Register(node_pb2.RegisterRequest(capabilities=_capabilities()), timeout=t)
    elif method == "Work":
        hello = node_pb2.NodeMessage(hello=node_pb2.StreamHello(node_id=coord.node_id))
        beat = node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(sequence=1))
        replies = list(nodes.Work(iter([hello, beat]), timeout=t))
        assert [r.heartbeat_reply.known for r in replies if r.WhichOneof("kind") == "heartbeat_reply"] == [True]
    else:  # pragma: no cover
        raise AssertionError(method)


def _channel_for(case: str, role: str, address: str) -> grpc.Channel:
    """A channel carrying the credentials of ``case`` for a method that needs ``role``."""
    if case == "no token":
        return grpc.insecure_channel(address)
    if case == "wrong role":
        return make_channel(address, token=CLIENT_TOKEN if role == "node" else NODE_TOKEN)
    if case == "unknown token":
        return make_channel(address, token=UNKNOWN_TOKEN)
    if case == "not bearer":
        channel = grpc.insecure_channel(address)
        token = NODE_TOKEN if role == "node" else CLIENT_TOKEN
        return grpc.intercept_channel(channel, _RawHeader(f"Basic {token}"))
    raise AssertionError(case)  # pragma: no cover


class _RawHeader(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamStreamClientInterceptor):
    """Sends a raw ``authorization`` value (to try schemes other than Bearer)."""

    def __init__(self, value: str) -> None:
        from qscale.security import _CallDetails

        self._value, self._details = value, _CallDetails

    def _with(self, d: Any) -> Any:
        return self._details(d.method, d.timeout, [("authorization", self._value)], d.credentials,
                             d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with(details), requests)


_EXPECTED = {"no token": grpc.StatusCode.UNAUTHENTICATED, "wrong role": grpc.StatusCode.PERMISSION_DENIED,
             "unknown token": grpc.StatusCode.UNAUTHENTICATED, "not bearer": grpc.StatusCode.UNAUTHENTICATED}


@pytest.mark.parametrize("case", list(_EXPECTED))
@pytest.mark.parametrize("method", list(_METHODS))
def test_every_rpc_refuses_bad_credentials_and_changes_nothing(auth_coord: AuthCoordinator, method: str,
                                                               case: str) -> None:
    role = _METHODS[method][1]
    before = auth_coord.snapshot()
    handled = dict(auth_coord.calls)
    with _channel_for(case, role, auth_coord.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, method, auth_coord)
    err = info.value
    assert err.code() == _EXPECTED[case], (method, case, err.details())
    if case == "wrong role":
        assert f"needs a {role} token" in err.details()
    assert auth_coord.calls == handled, f"the {method} handler ran for a refused call"
    assert auth_coord.snapshot() == before


def test_refusals_map_to_qscale_errors(auth_coord: AuthCoordinator) -> None:
    with Client(auth_coord.address, token=NODE_TOKEN, timeout=10) as wrong_role:
        with pytest.raises(PermissionDeniedError, match="needs a client token"):
            wrong_role.nodes()
    with Client(auth_coord.address, token=UNKNOWN_TOKEN, timeout=10) as unknown:
        with pytest.raises(UnauthenticatedError, match="missing or invalid credentials"):
            unknown.submit(bell(), shots=10)
    with Client(auth_coord.address, timeout=10) as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.jobs()
    assert [j.job_id for j in auth_coord.client.jobs()] == [auth_coord.job_id]


def test_health_check_needs_no_token(auth_coord: AuthCoordinator) -> None:
    with grpc.insecure_channel(auth_coord.address) as channel:
        for service in ("", "qscale.v1.JobService", "qscale.v1.NodeService"):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_right_tokens_reach_every_client_method(auth_coord: AuthCoordinator) -> None:
    # Runs after the refusal matrix (file order): it changes state on purpose.
    with make_channel(auth_coord.address, token=CLIENT_TOKEN) as channel:
        for method in ("GetJob", "ListJobs", "ListNodes"):
            _call(channel, method, auth_coord)
        with pytest.raises(grpc.RpcError) as info:  # past the check: the job is not finished
            _call(channel, "GetResult", auth_coord)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        _call(channel, "Cancel", auth_coord)
        _call(channel, "Watch", auth_coord)  # returns once the job is final (cancelled)
    with make_channel(auth_coord.address, token=NODE_TOKEN) as channel:
        _call(channel, "Work", auth_coord)  # a work stream with a heartbeat (the job is cancelled: nothing runs)
    assert all(auth_coord.calls[m] > 0 for m in ("GetJob", "ListJobs", "ListNodes", "GetResult", "Cancel",
                                                  "Watch", "Work", "Register", "Submit"))


# ------------------------------------------------------- (b) an authenticated cluster

def test_authenticated_cluster_runs_a_job(make_cluster: Callable[..., LocalCluster], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = make_cluster(2, node_token=NODE_TOKEN, client_token=CLIENT_TOKEN)
    result = cluster.client.submit(bell(), shots=2000, seed=3).result(timeout=60)
    assert result.results[0].shots == 2000 and sum(result.counts[0].values()) == 2000
    assert set(result.counts[0]) <= {"00", "11"}
    assert len([n for n in cluster.client.nodes() if n.state == "alive"]) == 2

    # The token from the environment, directly or through a file.
    monkeypatch.setenv("QSCALE_CLIENT_TOKEN", CLIENT_TOKEN)
    with Client(cluster.address, timeout=10) as from_env:
        assert from_env.job(result.job_id).status().state.value == "done"
    monkeypatch.delenv("QSCALE_CLIENT_TOKEN")
    token_file = tmp_path / "client.token"
    token_file.write_text(f"# the API token\n{CLIENT_TOKEN}\n")
    monkeypatch.setenv("QSCALE_CLIENT_TOKEN_FILE", str(token_file))
    with Client(cluster.address, timeout=10) as from_file:
        assert [j.job_id for j in from_file.jobs()] == [result.job_id]
    monkeypatch.delenv("QSCALE_CLIENT_TOKEN_FILE")

    # The CLI takes --token-file; without a token it is refused.
    addr = ["--coordinator", cluster.address, "--json"]
    assert coordinator_cli.main(["status", result.job_id, "--token-file", str(token_file), *addr]) == 0
    assert coordinator_cli.main(["nodes", *addr]) == coordinator_cli.EXIT_AUTH
    # A node without the join token cannot join: it says which setting to fix and exits 5.
    stray_log = tmp_path / "stray.log"
    with stray_log.open("wb") as log:
        stray = subprocess.Popen(cluster.node_command("stray"), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=_clean_env(PYTHONUNBUFFERED="1"), cwd=tmp_path)
    try:
        wait_until(lambda: stray.poll() is not None, 60, "the node without a token to be refused")
        assert stray.returncode == 5 and "UNAUTHENTICATED" in stray_log.read_text(), stray_log.read_text()
        assert "$QSCALE_NODE_TOKEN" in stray_log.read_text(), stray_log.read_text()
        assert len(cluster.client.nodes()) == 2
    finally:
        stray.kill()
        stray.wait(10)


# -------------------------------------------------------------- (c) TLS and mutual TLS

def test_tls_cluster_runs_a_job(make_cluster: Callable[..., LocalCluster], pki: PKI) -> None:
    cluster = make_cluster(1, tls=TLSConfig(pki.server_cert, pki.server_key), client_tls=TLSConfig(ca=pki.ca))
    result = cluster.client.submit(bell(), shots=500, seed=5).result(timeout=60)
    assert sum(result.counts[0].values()) == 500
    with make_channel(cluster.address, tls=TLSConfig(ca=pki.ca)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with Client(cluster.address, timeout=5) as plain:  # no TLS: no handshake, no service
        with pytest.raises(UnavailableError):
            plain.nodes()
    with Client(cluster.address, tls=TLSConfig(ca=pki.rogue_cert), timeout=5) as untrusting:
        with pytest.raises(UnavailableError):  # the server's certificate is not signed by this CA
            untrusting.nodes()


def test_mutual_tls_cluster_runs_a_job_and_refuses_callers_without_a_certificate(
        make_cluster: Callable[..., LocalCluster], pki: PKI) -> None:
    cluster = make_cluster(2, tls=TLSConfig(pki.server_cert, pki.server_key, pki.ca),
                           client_tls=TLSConfig(pki.client_cert, pki.client_key, pki.ca),
                           node_token=NODE_TOKEN, client_token=CLIENT_TOKEN)
    result = cluster.client.submit(bell(), shots=1000, seed=9).result(timeout=60)
    assert sum(result.counts[0].values()) == 1000
    for tls in (TLSConfig(ca=pki.ca), TLSConfig(pki.rogue_cert, pki.rogue_key, pki.ca)):
        with Client(cluster.address, token=CLIENT_TOKEN, tls=tls, timeout=5) as refused:
            with pytest.raises(UnavailableError):
                refused.nodes()
    # A certificate alone is not enough: tokens are still checked.
    with Client(cluster.address, tls=cluster.client_tls, timeout=5) as no_token:
        with pytest.raises(UnauthenticatedError):
            no_token.nodes()


def test_tls_config_errors(tmp_path: Path, pki: PKI) -> None:
    with pytest.raises(InvalidArgumentError, match="without its key"):
        TLSConfig(cert=pki.server_cert)
    with pytest.raises(InvalidArgumentError, match="without its certificate"):
        TLSConfig(key=pki.server_key)
    with pytest.raises(InvalidArgumentError, match="needs its certificate and key"):
        TLSConfig(ca=pki.ca).server_credentials()
    with pytest.raises(FailedPreconditionError, match="cannot read the TLS certificate"):
        TLSConfig(str(tmp_path / "missing.pem"), pki.server_key).server_credentials()
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(InvalidArgumentError, match="not a PEM file"):
        TLSConfig(ca=str(not_pem)).channel_credentials()
    with pytest.raises(InvalidArgumentError, match="without its key"):
        EmbeddedCoordinator(CoordinatorConfig(listen="127.0.0.1:0", tls_cert=pki.server_cert)).start()
    assert TLSConfig.from_env({}) is None
    assert TLSConfig.from_env({"QSCALE_TLS_CA": pki.ca}) == TLSConfig(ca=pki.ca)


# ------------------------------------------------------- (d) loopback unless credentials

def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = (tmp_path / "serve.log").open("wb")
    try:
        return subprocess.Popen([*CLI, "serve", "--state-dir", str(tmp_path / "state"), *args], stdout=log,
                                stderr=log, stdin=subprocess.DEVNULL, env=env or _clean_env(), cwd=tmp_path)
    finally:
        log.close()


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def test_serve_on_a_public_address_needs_credentials_or_insecure(tmp_path: Path) -> None:
    refused = subprocess.run([*CLI, "serve", "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "s0")],
                             capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=tmp_path)
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0:0 without credentials" in refused.stderr
    assert "--insecure" in refused.stderr and "--node-tokens-file" in refused.stderr
    assert not (tmp_path / "s0").exists(), "nothing may be created before the check"

    for name, args, env in (
        ("insecure", ["--insecure"], _clean_env()),
        ("tokens", [], _clean_env(QSCALE_NODE_TOKEN=NODE_TOKEN, QSCALE_CLIENT_TOKEN=CLIENT_TOKEN)),
    ):
        workdir = tmp_path / name
        workdir.mkdir()
        addr_file = workdir / "address"
        proc = _serve(workdir, "--listen", "0.0.0.0:0", "--address-file", str(addr_file), *args, env=env)
        try:
            wait_until(lambda: proc.poll() is not None or (addr_file.exists() and addr_file.read_text().strip()),
                       60, "the coordinator to listen")
            assert proc.poll() is None, (workdir / "serve.log").read_text()
            port = addr_file.read_text().strip().rsplit(":", 1)[1]
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert _stop(proc) == 0
        finally:
            _stop(proc)
        log = (workdir / "serve.log").read_text()
        if name == "insecure":
            assert "WITHOUT AUTHENTICATION" in log
        else:
            assert "1 node and 1 client token(s)" in log and NODE_TOKEN not in log and CLIENT_TOKEN not in log


def test_tokens_for_one_role_only_are_refused(tmp_path: Path) -> None:
    for config in (CoordinatorConfig(listen="127.0.0.1:0", node_token=NODE_TOKEN),
                   CoordinatorConfig(listen="127.0.0.1:0", client_token=CLIENT_TOKEN)):
        with pytest.raises(InvalidArgumentError, match="configure both roles"):
            EmbeddedCoordinator(config).start()
    with pytest.raises(InvalidArgumentError, match="same token"):
        Tokens(frozenset([NODE_TOKEN]), frozenset([NODE_TOKEN]))


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50051", True), ("127.1.2.3:0", True), ("localhost:1", True), ("[::1]:50051", True),
    ("unix:/tmp/qscale.sock", True), ("0.0.0.0:50051", False), ("[::]:50051", False), (":50051", False),
    ("10.0.0.5:50051", False), ("coordinator.example:50051", False), ("localhost.evil.example:1", False),
])
def test_is_loopback_address(address: str, loopback: bool) -> None:
    assert is_loopback_address(address) is loopback


# ------------------------------------------------ (e) token files, no secrets on argv

def test_token_files_hold_several_tokens_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "client.tokens"
    old, new = "old-client-token-aaaaaaaaaaaaaaaa", "new-client-token-bbbbbbbbbbbbbbbb"
    path.write_text(f"# API tokens, one per line\n\n{old}   # expires Friday\n  {new}\n{new}\n")
    assert read_token_file(path) == (old, new)
    with pytest.raises(InvalidArgumentError, match="holds 2 tokens"):
        read_token(path)
    short = tmp_path / "short"
    short.write_text("# fine\nabc123\n")
    with pytest.raises(InvalidArgumentError, match=r"line 2: token too short") as info:
        read_token_file(short)
    assert "abc123" not in str(info.value)
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(InvalidArgumentError, match="holds no token"):
        read_token_file(empty)
    with pytest.raises(FailedPreconditionError, match="cannot read token file"):
        read_token_file(tmp_path / "missing")
    accented = tmp_path / "accented"
    accented.write_text("tökenvalue-aaaaaaaaaaaaaaaa\n")
    with pytest.raises(InvalidArgumentError, match="printable ASCII"):
        read_token_file(accented)
    spaced = tmp_path / "spaced"  # fields after the token: a user name, then options
    spaced.write_text(f"{old} two words\n")
    with pytest.raises(InvalidArgumentError, match="line 1: field 3 is no option 'words'") as info:
        read_token_file(spaced)
    assert old not in str(info.value)

    tokens = Tokens.load(node_files=[None], client_files=[path], node_tokens=[NODE_TOKEN])
    assert tokens.role_of(old) == tokens.role_of(new) == "client"
    assert tokens.role_of(NODE_TOKEN) == "node"
    assert tokens.role_of(UNKNOWN_TOKEN) is None and tokens.role_of("") is None and tokens.role_of(None) is None
    assert old not in repr(tokens) and NODE_TOKEN not in repr(tokens)
    assert required_role("/qscale.v1.NodeService/Work") == "node"
    assert required_role("/qscale.v1.JobService/Submit") == "client"
    assert required_role("/grpc.health.v1.Health/Check") == "open"
    assert required_role("/some.Other/Method") is None

    # Rotation: a coordinator reading the files accepts both client tokens.
    node_file = tmp_path / "node.tokens"
    node_file.write_text(NODE_TOKEN + "\n")
    config = CoordinatorConfig(listen="127.0.0.1:0", node_tokens_file=str(node_file), client_tokens_file=str(path))
    with EmbeddedCoordinator(config) as coordinator:
        for token in (old, new):
            with Client(coordinator.address, token=token, timeout=10) as client:
                assert client.nodes() == []
        with Client(coordinator.address, token=CLIENT_TOKEN, timeout=10) as client:
            with pytest.raises(UnauthenticatedError):
                client.nodes()


def test_coordinator_config_reads_tokens_from_env_and_files(tmp_path: Path) -> None:
    env = {"QSCALE_NODE_TOKEN": NODE_TOKEN, "QSCALE_CLIENT_TOKEN": CLIENT_TOKEN,
           "QSCALE_NODE_TOKENS_FILE": "/etc/qscale/node.tokens", "QSCALE_TLS_CA": "/etc/qscale/ca.pem"}
    config = CoordinatorConfig.from_env(env, client_tokens_file="/x/client.tokens", insecure=True)
    assert (config.node_token, config.client_token) == (NODE_TOKEN, CLIENT_TOKEN)
    assert (config.node_tokens_file, config.client_tokens_file) == ("/etc/qscale/node.tokens", "/x/client.tokens")
    assert config.tls_ca == "/etc/qscale/ca.pem" and config.insecure
    assert NODE_TOKEN not in repr(config) and CLIENT_TOKEN not in repr(config)


def test_print_config_masks_tokens(tmp_path: Path) -> None:
    env = _clean_env(QSCALE_NODE_TOKEN=NODE_TOKEN, QSCALE_CLIENT_TOKEN=CLIENT_TOKEN)
    proc = subprocess.run([*CLI, "serve", "--print-config", "--client-tokens-file", "/etc/qscale/client.tokens"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["node_token"] == shown["client_token"] == "<hidden>"
    assert shown["client_tokens_file"] == "/etc/qscale/client.tokens"
    assert NODE_TOKEN not in proc.stdout and CLIENT_TOKEN not in proc.stdout

    node = subprocess.run([sys.executable, "-m", "qscale.node", "--print-config", "--tls-ca", "/etc/ca.pem"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert node.returncode == 0, node.stderr
    shown = json.loads(node.stdout)
    assert shown["token"] == "<hidden>" and shown["tls_ca"] == "/etc/ca.pem"
    assert NODE_TOKEN not in node.stdout


def test_node_config_token_and_tls(tmp_path: Path) -> None:
    token_file = tmp_path / "node.token"
    token_file.write_text("# join token\n" + NODE_TOKEN + "\n")
    cfg = NodeConfig.from_env({"QSCALE_NODE_TOKEN": "ignored-when-a-file-is-given"}, token_file=str(token_file))
    assert cfg.resolved_token() == NODE_TOKEN and cfg.tls_config() is None
    assert NODE_TOKEN not in repr(cfg)
    cfg = NodeConfig.from_env({"QSCALE_NODE_TOKEN": NODE_TOKEN, "QSCALE_TLS_CA": "/ca.pem"})
    assert cfg.resolved_token() == NODE_TOKEN and cfg.tls_config() == TLSConfig(ca="/ca.pem")
    assert cfg.to_dict()["token"] == "<hidden>"
    with pytest.raises(InvalidArgumentError, match="too short"):
        NodeConfig.from_env({"QSCALE_NODE_TOKEN": "short"})
    with pytest.raises(InvalidArgumentError, match="together"):
        NodeConfig.from_env({}, tls_cert="/c.pem")
    missing = node_cli.main(["--token-file", str(tmp_path / "missing"), "--coordinator", "127.0.0.1:1"])
    assert missing == 2


@pytest.mark.parametrize("argv", [
    ["nodes", "--token", CLIENT_TOKEN],
    ["jobs", f"--token={CLIENT_TOKEN}"],
    ["status", "job", "--tok", CLIENT_TOKEN],
    ["serve", "--node-token", NODE_TOKEN],
    ["serve", "--client-token", CLIENT_TOKEN],
    ["serve", "--token", CLIENT_TOKEN],
])
def test_no_token_on_the_coordinator_command_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        coordinator_cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert CLIENT_TOKEN not in err and NODE_TOKEN not in err
    assert "not accepted" in err or "ambiguous" in err


@pytest.mark.parametrize("argv", [["--token", NODE_TOKEN], [f"--token={NODE_TOKEN}"], ["--tok", NODE_TOKEN]])
def test_no_token_on_the_node_command_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        node_cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert NODE_TOKEN not in err
    assert "--token" not in node_cli.build_parser().format_help().replace("--token-file", "")
