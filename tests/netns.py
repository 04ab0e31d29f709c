"""Private networks for fault tests: network namespaces joined by veth pairs, faults with tc.

A :class:`NetLab` owns one namespace for the coordinator (``C``) and one per node (``N0``,
``N1``, ...), each named with a random suffix so that concurrent runs never meet. Node ``i`` is
linked to ``C`` by its own veth pair, created from inside ``C`` with its peer moved straight into
``N_i`` (nothing is ever created in, or changed on, the root namespace)::

    C: veth<i> 198.18.<i>.1/30  <-- veth pair -->  N_i: veth0 198.18.<i>.2/30

Addresses come from 198.18.0.0/15, the benchmarking range. No namespace has a default route:
the only addresses a process inside can reach are its own and its link's peer.

Faults are put on both ends of a link, so both directions are affected:

* ``partition``: every packet dropped, silently (no reset, no ICMP): ``tc qdisc ... netem loss
  100%`` where the kernel has sch_netem. Where it does not (netem is an optional module, left
  out of some VM kernels), the same fault is made with what such kernels usually keep: a
  ``clsact`` ingress filter running the one-instruction classic BPF program ``ret #2``
  (TC_ACT_SHOT) in direct-action mode, which drops every frame as it arrives. Either way the
  sender's TCP sees nothing come back and retransmits with its usual backoff.
* ``impair``: any netem arguments (``delay 200ms 50ms loss 5%``); needs sch_netem. Where the
  kernel lacks it, the delay-and-loss test falls back to relay.py: a userspace TCP relay in ``C``
  that the nodes dial instead, emulating delay and (as retransmission-sized holds) loss.
* ``heal``: removes whichever qdisc the fault added.

The module also holds the client agent (``python netns.py agent``): a process run inside ``C``
that reads one JSON request per line on stdin, calls :class:`qscale.Client` on the
coordinator's loopback address and writes one JSON reply per line; it exits at EOF.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

NAME_PREFIX = "qsnet-"
"""Every namespace a NetLab creates starts with this (``ip netns list | grep qsnet-``)."""

_DROP_ALL_BPF = "1,6 0 0 2,"  # classic BPF: one instruction, "ret #2" = TC_ACT_SHOT in direct-action mode
_CMD_TIMEOUT_S = 20.0


class NetLabUnavailable(Exception):
    """Namespaces cannot be made here; the message says why."""


def _run(argv: list[str], check: bool = True, timeout: float = _CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here (None when they can): not root, no ``ip`` or
    ``tc``, or creating a namespace fails (no permission, e.g. in an unprivileged container)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return f"network namespaces need root (euid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{NAME_PREFIX}probe-{secrets.token_hex(4)}"
    try:
        made = _run(["ip", "netns", "add", probe], check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    try:
        up = _run(["ip", "-n", probe, "link", "set", "lo", "up"], check=False)
        if up.returncode != 0:
            return f"cannot configure a network namespace: {up.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def our_namespaces() -> list[str]:
    """Names of the namespaces on this machine that a NetLab made (and has not deleted)."""
    listed = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(NAME_PREFIX)]


@dataclass
class NetLab:
    """Namespaces for one coordinator and ``nodes`` nodes; see the module docstring.

    Use as a context manager, or call :meth:`create` and then :meth:`destroy` in a ``finally``.
    """

    nodes: int
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[str] = field(default_factory=list)
    _faults: dict[tuple[str, str], str] = field(default_factory=dict)  # (ns, dev) -> "root" or "clsact"
    _netem: str | None = None  # None: not probed; "" available; else why not
    _bpf: str | None = None

    # ---- names and addresses -------------------------------------------------------------------

    @property
    def coordinator_ns(self) -> str:
        return f"{NAME_PREFIX}{self.suffix}-c"

    def node_ns(self, i: int) -> str:
        return f"{NAME_PREFIX}{self.suffix}-n{i}"

    @staticmethod
    def coordinator_ip(i: int) -> str:
        """The coordinator's address on node ``i``'s link (what node ``i`` connects to)."""
        return f"198.18.{i}.1"

    @staticmethod
    def node_ip(i: int) -> str:
        return f"198.18.{i}.2"

    def ends(self, i: int) -> list[tuple[str, str]]:
        """(namespace, device) of both ends of node ``i``'s link."""
        return [(self.coordinator_ns, f"veth{i}"), (self.node_ns(i), "veth0")]

    @staticmethod
    def exec_argv(ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``ns`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", ns, *argv]

    # ---- life cycle ----------------------------------------------------------------------------

    def create(self) -> NetLab:
        """Make the namespaces and links. On failure, what was made is deleted again and
        :class:`NetLabUnavailable` says why."""
        try:
            self._add_ns(self.coordinator_ns)
            for i in range(self.nodes):
                ns = self.node_ns(i)
                self._add_ns(ns)
                c = self.coordinator_ns
                _run(["ip", "-n", c, "link", "add", f"veth{i}", "type", "veth", "peer", "name", "veth0", "netns", ns])
                _run(["ip", "-n", c, "addr", "add", f"{self.coordinator_ip(i)}/30", "dev", f"veth{i}"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.node_ip(i)}/30", "dev", "veth0"])
                _run(["ip", "-n", c, "link", "set", f"veth{i}", "up"])
                _run(["ip", "-n", ns, "link", "set", "veth0", "up"])
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self.destroy()
            raise NetLabUnavailable(f"cannot build the test network: {exc}") from exc
        return self

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self.created.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def pids(self, ns: str) -> list[int]:
        """Processes living in namespace ``ns``."""
        out = _run(["ip", "netns", "pids", ns], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_leftovers(self) -> dict[str, list[int]]:
        """SIGKILL every process still inside our namespaces (only ours can be there: they are
        fresh); returns them by namespace."""
        found: dict[str, list[int]] = {}
        for ns in self.created:
            pids = [p for p in self.pids(ns) if p != os.getpid()]
            if pids:
                found[ns] = pids
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        return found

    def destroy(self) -> list[str]:
        """Delete every namespace made (their veths go with them); returns the ones whose
        deletion failed. Safe to call twice."""
        failed = []
        for ns in reversed(self.created):
            if _run(["ip", "netns", "del", ns], check=False).returncode != 0 and ns in our_namespaces():
                failed.append(ns)
        self.created = [ns for ns in self.created if ns in failed]
        self._faults.clear()
        return failed

    def __enter__(self) -> NetLab:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.kill_leftovers()
        self.destroy()

    # ---- faults --------------------------------------------------------------------------------

    def _tc(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.exec_argv(ns, ["tc", *args]), check=check)

    def netem_unavailable(self) -> str | None:
        """Why tc netem cannot be used (None when it can); probed once on a real link end."""
        if self._netem is None:
            ns, dev = self.ends(0)[0]
            added = self._tc(ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "0ms", check=False)
            if added.returncode == 0:
                self._tc(ns, "qdisc", "del", "dev", dev, "root")
                self._netem = ""
            else:
                self._netem = f"tc netem is unavailable ({added.stderr.strip()}: the kernel lacks sch_netem)"
        return self._netem or None

    def bpf_drop_unavailable(self) -> str | None:
        """Why the clsact + BPF drop filter cannot be used (None when it can)."""
        if self._bpf is None:
            ns, dev = self.ends(0)[0]
            try:
                self._add_bpf_drop(ns, dev)
            except RuntimeError as exc:
                self._bpf = f"no clsact/cls_bpf drop filter: {exc}"
            else:
                self._tc(ns, "qdisc", "del", "dev", dev, "clsact")
                self._bpf = ""
        return self._bpf or None

    def partition_method(self) -> str:
        """``netem`` or ``bpf``: how :meth:`partition` drops packets here.

        Raises:
            NetLabUnavailable: neither works on this kernel.
        """
        if not self.netem_unavailable():
            return "netem"
        if not self.bpf_drop_unavailable():
            return "bpf"
        raise NetLabUnavailable(f"cannot drop packets: {self.netem_unavailable()}; {self.bpf_drop_unavailable()}")

    def _add_bpf_drop(self, ns: str, dev: str) -> None:
        self._tc(ns, "qdisc", "add", "dev", dev, "clsact")
        try:
            self._tc(ns, "filter", "add", "dev", dev, "ingress", "bpf", "da", "bytecode", _DROP_ALL_BPF)
        except RuntimeError:
            self._tc(ns, "qdisc", "del", "dev", dev, "clsact", check=False)
            raise

    def partition(self, i: int) -> str:
        """Drop every packet on node ``i``'s link, both ways; returns the method used."""
        method = self.partition_method()
        for ns, dev in self.ends(i):
            if method == "netem":
                self._tc(ns, "qdisc", "add", "dev", dev, "root", "netem", "loss", "100%")
                self._faults[(ns, dev)] = "root"
            else:
                self._add_bpf_drop(ns, dev)
                self._faults[(ns, dev)] = "clsact"
        return method

    def impair(self, i: int, *netem: str) -> None:
        """``tc qdisc add dev X root netem <netem...>`` on both ends of node ``i``'s link."""
        reason = self.netem_unavailable()
        if reason:
            raise NetLabUnavailable(reason)
        for ns, dev in self.ends(i):
            self._tc(ns, "qdisc", "add", "dev", dev, "root", "netem", *netem)
            self._faults[(ns, dev)] = "root"

    def heal(self, i: int) -> None:
        """Remove the fault on node ``i``'s link (both ends)."""
        for ns, dev in self.ends(i):
            kind = self._faults.pop((ns, dev), None)
            if kind is not None:
                self._tc(ns, "qdisc", "del", "dev", dev, kind)

    def qdiscs(self, i: int) -> str:
        """``tc -s qdisc show`` of both ends of node ``i``'s link (for failure messages)."""
        return "\n".join(f"{ns} {dev}: " + self._tc(ns, "-s", "qdisc", "show", "dev", dev, check=False).stdout.strip()
                         for ns, dev in self.ends(i))


# ------------------------------------------------------------------------------- client agent

def _attempt(a: Any) -> dict[str, object]:
    return {"shard_index": a.shard_index, "node_id": a.node_id, "started_at": a.started_at,
            "ended_at": a.ended_at, "outcome": a.outcome, "error": a.error}


def agent() -> int:
    """Serve JSON requests from stdin with a :class:`qscale.Client` (address and token from
    ``$QSCALE_COORDINATOR`` and ``$QSCALE_CLIENT_TOKEN``); one JSON reply per line on stdout.

    Requests: ``{"op": "nodes"}``, ``{"op": "submit", "files": [...], "shots": N, "seed": S}``,
    ``{"op": "status", "job": ID}``, ``{"op": "result", "job": ID, "timeout": T}``.
    Replies: ``{"ok": true, "value": ...}`` or ``{"ok": false, "error": "..."}``.
    """
    from qscale.client import Client

    client = Client(timeout=20)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "nodes":
                value: object = [n.to_dict() for n in client.nodes()]
            elif op == "submit":
                job = client.submit_files(req["files"], shots=req["shots"], seed=req.get("seed"))
                value = job.job_id
            elif op == "status":
                value = client.job(req["job"]).status().to_dict()
            elif op == "result":
                r = client.job(req["job"]).result(timeout=req["timeout"])
                value = {**r.to_dict(), "attempts": [_attempt(a) for a in r.attempts],
                         "time": time.time()}
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, "value": value}
        except Exception as exc:  # reported to the test, which decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    client.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["agent"]:
        sys.exit(agent())
    sys.exit(f"usage: {sys.argv[0]} agent")
