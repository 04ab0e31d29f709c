"""The node registry: node records, ids, and liveness decisions.

Liveness is judged on a monotonic clock (never the wall clock: an NTP step must not declare
every node lost at once), in two steps. A node not heard from (heartbeat or stream message)
for ``suspect_after`` seconds is *suspected*: the scheduler gives each shard it holds a backup
copy, and the node keeps its work. It is declared *lost* only when it has been silent past the
heartbeat timeout **and** suspected for the rest of that time: a coordinator whose own loop
stalled first suspects everyone (and then hears them again), it never loses them at once.
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from qscale.coordinator.jobs import Attempt
from qscale.coordinator.planner import ShardPlan
from qscale.errors import InvalidArgumentError
from qscale.node.capabilities import statevector_width
from qscale.proto.v1 import node_pb2

__all__ = ["Node", "Registry", "valid_node_id"]

_LOST_NODES_KEPT = 1000
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,40}-[0-9a-f]{8}")


def valid_node_id(text: str) -> bool:
    """Whether ``text`` has the shape of an id this coordinator hands out."""
    return _NODE_ID.fullmatch(text) is not None


@dataclass(eq=False)
class Node:
    node_id: str
    caps: node_pb2.NodeCapabilities
    registered_at: float
    """Wall time (display only)."""
    last_heard: float
    """Monotonic time of the last heartbeat or stream message."""
    state: str = "alive"  # alive, draining, lost
    suspected_since: float | None = None
    """Monotonic time it was suspected (silent, or its stream broke); None while it is heard."""
    stream: object | None = None
    """Handle of its Work stream: decisions name it, the scheduler never calls it."""
    running: dict[str, Attempt] = field(default_factory=dict)
    """Attempts in hand: running, or queued on the node behind its busy slots."""
    shards_done: int = 0
    in_hand_limit: int = 1
    """Most attempts the node is given at once: its slots plus the prefetch."""
    sent: dict[str, set[int]] = field(default_factory=dict)
    """job id -> circuits whose QPY went to the node on its stream (sent once per job)."""
    noise_sent: set[str] = field(default_factory=set)
    """Jobs whose noise model went to the node."""
    pool: int | None = None
    """Where placement files it: free slots (> 0), 0 for prefetch, None for neither."""
    overbook: int | None = None
    """Where placement files it for overbooking: its lowest class waiting; None: not there."""
    waiting: dict[int, int] = field(default_factory=dict)
    """Priority class -> attempts in hand that wait for a slot (by the coordinator's reckoning)."""
    last_heartbeat: float = 0.0
    """Monotonic time of its last heartbeat (0: none yet)."""
    lost_at: float = 0.0
    """Monotonic time it was declared lost."""

    @property
    def status(self) -> str:
        """What ``nodes`` shows: ``alive``, ``suspected``, ``draining`` or ``lost``."""
        if self.state == "alive" and self.suspected_since is not None:
            return "suspected"
        return self.state

    @property
    def lowest_waiting(self) -> int | None:
        """The lowest priority class of an attempt it holds that waits for a slot; None: none."""
        return min(self.waiting) if self.waiting else None

    def hold(self, attempt: Attempt) -> None:
        """It was given ``attempt`` (running at once if ``attempt.running_at`` is set)."""
        self.running[attempt.token] = attempt
        if not attempt.running_at:
            self.waiting[attempt.priority] = self.waiting.get(attempt.priority, 0) + 1

    def drop(self, attempt: Attempt) -> None:
        """``attempt`` ended or was taken from it."""
        if self.running.pop(attempt.token, None) is not None and not attempt.running_at:
            self._unwait(attempt)

    def mark_running(self, attempt: Attempt, wall: float, now: float) -> None:
        """``attempt`` took a slot (at wall time ``wall``, monotonic ``now``)."""
        if attempt.running_at:
            return
        attempt.running_at, attempt.running_since = wall, now
        if attempt.token in self.running:
            self._unwait(attempt)

    def confirm_running(self, attempt: Attempt, wall: float, now: float) -> None:
        """``attempt`` sent a chunk, so it runs. If the coordinator's reckoning had every slot
        taken by others, its latest guess was wrong (the node took a shard in hand before one
        sent ahead of it arrived): that attempt waits again."""
        if attempt.running_at:
            return
        running = [a for a in self.running.values() if a.running_at]
        if len(running) >= self.caps.slots:
            guesses = [a for a in running if not a.partial] or running
            wrong = max(guesses, key=lambda a: a.running_since)
            wrong.running_at = wrong.running_since = 0.0
            self.waiting[wrong.priority] = self.waiting.get(wrong.priority, 0) + 1
        self.mark_running(attempt, wall, now)

    def next_waiting(self) -> Attempt | None:
        """The attempt it runs next when a slot frees: the highest run order, the first given
        among equals (as the node itself picks)."""
        best: Attempt | None = None
        for attempt in self.running.values():
            if not attempt.running_at and (best is None or attempt.order > best.order):
                best = attempt
        return best

    def _unwait(self, attempt: Attempt) -> None:
        left = self.waiting.get(attempt.priority, 0) - 1
        if left > 0:
            self.waiting[attempt.priority] = left
        else:
            self.waiting.pop(attempt.priority, None)

    @property
    def usable(self) -> bool:
        """Whether new work may go to it."""
        return self.state == "alive" and self.suspected_since is None and self.stream is not None

    @property
    def slot_memory(self) -> int:
        """Memory one slot may use: what the node itself checks before running a shard."""
        return self.caps.memory_budget_bytes // max(1, self.caps.slots)

    def can_hold(self, shard: ShardPlan) -> bool:
        """Whether the node offers the shard's method, reads its QPY, has a slot big enough, and
        simulates a statevector as wide as the shard's method needs (its
        ``max_statevector_qubits``, capped by ``qscale-node --max-qubits``; 0 or less: no bound;
        the node checks the same with :func:`~qscale.node.capabilities.statevector_width`)."""
        method = shard.method
        method_ok = method in ("", "automatic") or method in self.caps.methods
        qpy_ok = not self.caps.qpy_version or shard.qpy_version <= self.caps.qpy_version
        widest = self.caps.max_statevector_qubits
        width = statevector_width(method, shard.num_qubits) if widest > 0 else None
        width_ok = width is None or width <= widest
        return method_ok and qpy_ok and width_ok and shard.memory_bytes <= self.slot_memory

    def forget_payloads(self, job_id: str | None = None) -> None:
        """What the node kept of a job (or of every job) is unknown: send it again."""
        if job_id is None:
            self.sent.clear()
            self.noise_sent.clear()
        else:
            self.sent.pop(job_id, None)
            self.noise_sent.discard(job_id)


def _same_machine(a: Node, b: Node) -> bool:
    return a.caps.name == b.caps.name and a.caps.hostname == b.caps.hostname


def check_capabilities(caps: node_pb2.NodeCapabilities) -> None:
    if caps.slots < 1 or caps.slots > 4096:
        raise InvalidArgumentError("node capabilities: slots must be between 1 and 4096")
    if caps.memory_budget_bytes < 0 or caps.cores < 0:
        raise InvalidArgumentError("node capabilities: cores and memory budget must be >= 0")
    if len(caps.name) > 200 or len(caps.hostname) > 255:
        raise InvalidArgumentError("node capabilities: name or hostname too long")


class Registry:
    """Nodes by id, their silence in order, and the recently lost ones (for ``nodes``)."""

    def __init__(self, lost_ttl_s: float) -> None:
        self.nodes: dict[str, Node] = {}
        self.lost: OrderedDict[str, Node] = OrderedDict()
        """Nodes declared lost, oldest loss first; they age out after ``lost_ttl_s``."""
        self.lost_ttl_s = lost_ttl_s
        self._by_heard: OrderedDict[str, Node] = OrderedDict()  # least recently heard first
        self.suspected: dict[str, Node] = {}
        self.slots_total = 0

    def new_id(self, caps: node_pb2.NodeCapabilities, previous: str = "") -> str:
        """``previous`` when the node may have it back (well formed, not held by a node here);
        otherwise a fresh id from the node's name."""
        if previous and valid_node_id(previous) and previous not in self.nodes:
            return previous
        label = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in caps.name)[:40] or "node"
        return f"{label}-{uuid.uuid4().hex[:8]}"

    def add(self, node: Node) -> None:
        """File a new node; a lost entry of the same id, or of the same machine (name and
        hostname), leaves the list of lost nodes: a machine is listed once."""
        self.lost.pop(node.node_id, None)
        same = [n.node_id for n in self.lost.values() if _same_machine(n, node)]
        for node_id in same:
            del self.lost[node_id]
        self.nodes[node.node_id] = node
        self._by_heard[node.node_id] = node
        self.slots_total += node.caps.slots

    def heard(self, node: Node, now: float) -> bool:
        """The node spoke; returns True if that ends a suspicion."""
        node.last_heard = now
        self._by_heard.move_to_end(node.node_id)
        if node.suspected_since is not None and node.stream is not None:
            self.clear_suspicion(node)
            return True
        return False

    def suspect(self, node: Node, now: float) -> None:
        node.suspected_since = now
        self.suspected[node.node_id] = node

    def clear_suspicion(self, node: Node) -> None:
        node.suspected_since = None
        self.suspected.pop(node.node_id, None)

    def remove(self, node: Node, now: float) -> None:
        """Declare the node lost."""
        node.state = "lost"
        node.lost_at = now
        del self.nodes[node.node_id]
        self._by_heard.pop(node.node_id, None)
        self.suspected.pop(node.node_id, None)
        self.slots_total -= node.caps.slots
        if any(_same_machine(n, node) for n in self.nodes.values()):
            return  # it already came back under another id: list the machine once
        self.lost[node.node_id] = node
        while len(self.lost) > _LOST_NODES_KEPT:
            self.lost.popitem(last=False)

    def silent(self, now: float, suspect_after: float, timeout: float) -> tuple[list[Node], list[Node]]:
        """(nodes to suspect, nodes to declare lost) at ``now``. Looks only at silent and
        suspected nodes."""
        suspect, lose = [], []
        for node in self._by_heard.values():  # least recently heard first: stop at the first in time
            silence = now - node.last_heard
            if silence <= suspect_after:
                break
            if node.suspected_since is None:
                suspect.append(node)
            elif silence > timeout and now - node.suspected_since >= timeout - suspect_after:
                lose.append(node)
        # A node whose stream broke and that did not come back is lost even if it still heartbeats.
        for node in self.suspected.values():
            since = node.suspected_since
            if node.stream is None and since is not None and now - since > timeout and node not in lose:
                lose.append(node)
        return suspect, lose

    def age_out(self, now: float) -> int:
        """Forget lost nodes older than the TTL; returns how many."""
        aged = 0
        while self.lost:
            node = next(iter(self.lost.values()))
            if now - node.lost_at <= self.lost_ttl_s:
                break
            self.lost.popitem(last=False)
            aged += 1
        return aged

    def listed(self) -> Iterable[Node]:
        """Every node ``nodes`` shows: those here, then the lost ones, newest loss first."""
        yield from self.nodes.values()
        yield from reversed(self.lost.values())
