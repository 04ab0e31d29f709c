"""Where a shard goes: nodes filed by free slots (most free first, round robin within a group)
and, once every slot of a node is busy, by room for one more shard in hand (prefetch). Filing
and picking cost nothing per idle node, so dispatch stays cheap with a thousand of them.

A node whose slots and prefetch are full but that holds a shard still waiting for a slot is also
filed by the lowest priority class it has waiting, with room for up to one more shard per slot
(*overbooking*): a shard that must start before the waiting ones (a higher class, or the first
shard of a job with nothing running) goes there, and the node runs it on its next free slot."""

from __future__ import annotations

from collections.abc import Iterator

from qscale.coordinator.jobs import Shard
from qscale.coordinator.nodes import Node

__all__ = ["Placement"]


class Placement:
    """The index of nodes that can take work now."""

    def __init__(self) -> None:
        self._idle: dict[int, dict[str, Node]] = {}  # free slots -> nodes with that many, next first
        self._prefetch: dict[str, Node] = {}  # every slot busy, room for a shard in hand
        self._overbook: dict[int, dict[str, Node]] = {}  # lowest class waiting -> nodes with room ahead of it

    def __bool__(self) -> bool:
        """Whether any node can take a shard."""
        return bool(self._idle or self._prefetch)

    @property
    def has_idle(self) -> bool:
        return bool(self._idle)

    def can_overbook(self, below: int) -> bool:
        """Whether some node holds a waiting shard of class ``below`` or lower and has room for
        one ahead of it."""
        return any(low <= below for low in self._overbook)

    def file(self, node: Node) -> None:
        """File a node under idle (by its free slots), prefetch (room in hand) or neither. A
        node filed again goes to the back of its group (round robin)."""
        node_id = node.node_id
        if node.pool is not None:
            group = self._prefetch if node.pool == 0 else self._idle[node.pool]
            group.pop(node_id, None)
            if node.pool and not group:
                del self._idle[node.pool]
            node.pool = None
        if node.overbook is not None:
            group = self._overbook[node.overbook]
            group.pop(node_id, None)
            if not group:
                del self._overbook[node.overbook]
            node.overbook = None
        if not node.usable:
            return
        free = node.caps.slots - len(node.running)
        if free > 0:
            self._idle.setdefault(free, {})[node_id] = node
            node.pool = free
            return
        if len(node.running) < node.in_hand_limit:
            self._prefetch[node_id] = node
            node.pool = 0
        low = node.lowest_waiting
        if low is not None and len(node.running) < node.in_hand_limit + node.caps.slots:
            self._overbook.setdefault(low, {})[node_id] = node
            node.overbook = low

    def _idle_nodes(self) -> Iterator[Node]:
        """Nodes with a free slot, those with the most free slots first."""
        for free in sorted(self._idle, reverse=True):
            yield from self._idle[free].values()

    def pick(self, shard: Shard, now: float, *, idle_only: bool = False, overbook: int | None = None
             ) -> tuple[Node, bool] | None:
        """The first node that can hold the shard, idle ones first, then those with prefetch
        room, then (with ``overbook``) those holding a waiting shard of class ``overbook`` or
        lower; returns it and whether it was overbooked. A node it has not failed on or been
        refused by is preferred. Nodes that cannot hold it, those already running a copy of it
        and those that refused it less than their back-off ago are skipped; usually the first
        one fits."""
        avoid = {n for n, _ in shard.failures} | set(shard.refusals)
        running_on = {a.node_id for a in shard.live}
        running_on.update(n for n, until in shard.refused_until.items() if until > now)
        pools = [self._idle_nodes()]
        if not idle_only:
            pools.append(iter(self._prefetch.values()))
        over = len(pools)
        if overbook is not None:
            pools += [iter(self._overbook[low].values()) for low in sorted(self._overbook) if low <= overbook]
        for number, pool in enumerate(pools):
            fallback = None
            for node in pool:
                if node.node_id in running_on or not node.can_hold(shard.plan):
                    continue
                if node.node_id not in avoid:
                    return node, number >= over
                if fallback is None or shard.refusals.get(node.node_id, 0) < shard.refusals.get(fallback.node_id, 0):
                    fallback = node
            if fallback is not None:
                return fallback, number >= over
        return None
