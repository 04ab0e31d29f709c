"""An embedded local cluster: a coordinator in this process and N real ``qscale-node``
processes on loopback. The README quick start and most tests run on it; with a client tokens
file it is a shared cluster of several users (:meth:`LocalCluster.client_for`)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qscale.client import Client
from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.server import EmbeddedCoordinator
from qscale.errors import QScaleError
from qscale.security import CLIENT, TLSConfig, read_token_entries

__all__ = ["LocalCluster"]

log = logging.getLogger(__name__)

_NODE_SECURITY_ENV = ("QSCALE_NODE_TOKEN", "QSCALE_NODE_TOKEN_FILE", "QSCALE_TLS_CERT", "QSCALE_TLS_KEY",
                      "QSCALE_TLS_CA")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


class LocalCluster:
    """A coordinator and ``nodes`` node processes on ``127.0.0.1``, ports chosen by the OS.

    Args:
        nodes: node processes to start.
        slots_per_node: shards each node runs at once.
        cores_per_node: simulation threads per node; by default the machine's cores shared out.
        memory_budget_per_node: bytes; by default half the machine's memory shared out.
        max_qubits_per_node: every node's ``--max-qubits``: the widest statevector it simulates
            (a density matrix of n qubits counts 2n; stabilizer and matrix-product-state shards
            are not capped). 0 (default): only the memory budget bounds it.
        config: coordinator settings (``listen`` is forced to ``127.0.0.1:0``; its token and TLS
            settings, tokens files included, are replaced by the arguments below).
        log_dir: where node logs go; a temporary directory (removed on stop) when None.
        startup_timeout: seconds to wait for the nodes to join.
        node_token: join token the coordinator accepts and the nodes present (passed to them in
            ``$QSCALE_NODE_TOKEN``). Give both tokens or neither; default: no authentication
            (with ``client_tokens_file``: a random token drawn for this cluster).
        client_token: API token the coordinator accepts and :attr:`client` presents (its user
            is ``default``, unless ``client_tokens_file`` lists it for another).
        client_tokens_file: a client tokens file for the coordinator (lines ``TOKEN [USER]
            [OPTION ...]``, see :func:`~qscale.security.read_token_entries`): several users
            with their weights, quotas and admin rights. :meth:`client_for` gives a client
            presenting one of its tokens; without ``client_token``, :attr:`client` presents the
            file's first token of an admin user (else its first token). Read once, at
            construction, for that choice; the coordinator reads it when it starts.
        tls: the coordinator's TLS files (:class:`~qscale.security.TLSConfig`): ``cert`` and
            ``key`` to serve with, ``ca`` to require client certificates (mutual TLS).
        client_tls: what the nodes and :attr:`client` use to connect: ``ca`` to verify the
            coordinator, ``cert`` + ``key`` to present. Default with ``tls``: ``tls.ca`` as the
            CA and, under mutual TLS, ``tls.cert``/``tls.key`` as the client certificate.

    Example::

        with qscale.LocalCluster(nodes=3) as cluster:
            job = cluster.client.submit(circuit, shots=10_000, seed=1)
            print(job.result().counts[0])

    Several users (``tokens`` holding ``tok-alice alice weight=3``, ``tok-bob bob max-jobs=2``
    and ``tok-root root admin``)::

        with qscale.LocalCluster(nodes=2, client_tokens_file="tokens") as cluster:
            job = cluster.client_for("tok-bob").submit(circuit, shots=1000, priority="high")
            print(cluster.client.users())   # the admin's view: every user
    """

    def __init__(
        self,
        nodes: int = 2,
        *,
        slots_per_node: int = 1,
        cores_per_node: int | None = None,
        memory_budget_per_node: int | None = None,
        max_qubits_per_node: int = 0,
        config: CoordinatorConfig | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 120.0,
        node_token: str | None = None,
        client_token: str | None = None,
        client_tokens_file: str | os.PathLike[str] | None = None,
        tls: TLSConfig | None = None,
        client_tls: TLSConfig | None = None,
    ) -> None:
        if nodes < 0:
            raise ValueError("nodes must be >= 0")
        if isinstance(max_qubits_per_node, bool) or not isinstance(max_qubits_per_node, int) \
                or max_qubits_per_node < 0:
            raise ValueError(f"max_qubits_per_node must be an integer >= 0 (0: no cap), got {max_qubits_per_node!r}")
        self.client_tokens_file = os.fspath(client_tokens_file) if client_tokens_file is not None else None
        accepted = client_token  # a token accepted by value, besides the file's
        if self.client_tokens_file is not None:
            node_token = node_token or f"local-node-{secrets.token_urlsafe(24)}"
            entries = read_token_entries(self.client_tokens_file, CLIENT)
            if client_token is None:
                admins = {e.user for e in entries if e.options.get("admin")}
                client_token = next((e.token for e in entries if e.user in admins), entries[0].token)
            if client_token in {e.token for e in entries}:
                accepted = None  # the file's own: it keeps the file's user
        self.node_token = node_token
        self.client_token = client_token
        self.tls = tls
        if client_tls is None and tls is not None:
            client_tls = TLSConfig(tls.cert if tls.ca else None, tls.key if tls.ca else None, tls.ca)
        self.client_tls = client_tls
        self.num_nodes = nodes
        self.slots_per_node = slots_per_node
        cpus = os.cpu_count() or 1
        self.cores_per_node = cores_per_node or max(1, cpus // max(1, nodes))
        self.memory_budget_per_node = memory_budget_per_node or _physical_memory() // 2 // max(1, nodes)
        self.max_qubits_per_node = max_qubits_per_node
        self.config = (config or CoordinatorConfig()).with_(
            listen="127.0.0.1:0", node_tokens_file=None, client_tokens_file=self.client_tokens_file,
            node_token=node_token, client_token=accepted, tls_cert=tls.cert if tls else None,
            tls_key=tls.key if tls else None, tls_ca=tls.ca if tls else None)
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="qscale-local-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.coordinator: EmbeddedCoordinator | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self._client: Client | None = None
        self._clients: dict[str, Client] = {}
        self._counter = 0
        self._logs: dict[int, Path] = {}
        self._keep_logs = False

    @property
    def address(self) -> str:
        """``host:port`` of the coordinator."""
        if self.coordinator is None:
            raise QScaleError("the local cluster is not running")
        return self.coordinator.address

    @property
    def client(self) -> Client:
        """A client connected to the cluster, presenting ``client_token`` (see the class's
        arguments; none without authentication)."""
        if self._client is None:
            self._client = Client(self.address, token=self.client_token, tls=self.client_tls)
        return self._client

    def client_for(self, token: str, *, timeout: float = 60.0) -> Client:
        """A client connected to the cluster presenting ``token`` (one of ``client_tokens_file``'s,
        say): it acts as that token's user. The same token gives the same client, which
        :meth:`stop` closes; ``timeout`` (each call's deadline, seconds) applies when it is made."""
        client = self._clients.get(token)
        if client is None:
            client = self._clients[token] = Client(self.address, token=token, tls=self.client_tls, timeout=timeout)
        return client

    def start(self) -> LocalCluster:
        """Start the coordinator and the nodes, and wait until every node has joined."""
        self.coordinator = EmbeddedCoordinator(self.config)
        try:
            self.coordinator.start()
            for _ in range(self.num_nodes):
                self.add_node()
            self.wait_for_nodes(self.num_nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def node_command(self, name: str, coordinator: str | None = None) -> list[str]:
        """The command line of one local node (its token travels in the environment, see
        :meth:`add_node`)."""
        tls = self.client_tls or TLSConfig()
        return [
            sys.executable, "-m", "qscale.node",
            "--coordinator", coordinator or self.address,
            "--name", name,
            "--slots", str(self.slots_per_node),
            "--cores", str(self.cores_per_node),
            "--memory-budget", str(self.memory_budget_per_node),
            "--max-qubits", str(self.max_qubits_per_node),
            "--parent-pid", str(os.getpid()),
            "--drain-grace", "5",
            *(arg for flag, path in (("--tls-ca", tls.ca), ("--tls-cert", tls.cert), ("--tls-key", tls.key))
              if path for arg in (flag, path)),
        ]

    def add_node(self, coordinator: str | None = None) -> subprocess.Popen[bytes]:
        """Start one more node process (it joins on its own); returns the process."""
        name = f"local-{self._counter}"
        self._counter += 1
        log_path = self.log_dir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The node's credentials are this cluster's, never ones inherited from the caller's shell;
        # the token goes in the environment, not on the command line (which shows in ``ps``).
        for var in _NODE_SECURITY_ENV:
            env.pop(var, None)
        if self.node_token:
            env["QSCALE_NODE_TOKEN"] = self.node_token
        # cwd: ``python -m`` puts the working directory first on sys.path; from a source checkout
        # its ``qscale/`` folder (which lacks the mapped ``qscale.node``) would shadow the install.
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(self.node_command(name, coordinator), stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=self.log_dir)
        self.processes.append(proc)
        self._logs[proc.pid] = log_path
        return proc

    def _log_tail(self, proc: subprocess.Popen[bytes], lines: int = 15) -> str:
        try:
            text = self._logs[proc.pid].read_text(errors="replace")
        except (KeyError, OSError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_nodes(self, count: int, timeout: float | None = None) -> None:
        """Block until ``count`` nodes are alive; fails early if a node process dies."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            alive = sum(1 for n in self.client.nodes() if n.state == "alive")
            if alive >= count:
                return
            dead = [p for p in self.processes if p.poll() is not None]
            if dead and alive + len([p for p in self.processes if p.poll() is None]) < count:
                self._keep_logs = True
                raise QScaleError(f"a local node exited with code {dead[0].returncode}; its log ends with:\n"
                                  f"{self._log_tail(dead[0])}\n(all logs in {self.log_dir})")
            if time.monotonic() > deadline:
                self._keep_logs = True
                raise QScaleError(f"only {alive} of {count} local nodes joined; see the logs in {self.log_dir}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the nodes (SIGTERM, then SIGKILL after ``timeout``) and the coordinator."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)  # a stopped node cannot handle SIGTERM
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("local node %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait(5)
        if self._client is not None:
            self._client.close()
            self._client = None
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self.coordinator is not None:
            self.coordinator.stop()
            self.coordinator = None
        if self._own_log_dir and not self._keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
