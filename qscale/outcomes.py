"""Measured outcomes, packed: the distinct outcomes of an experiment and their counts as arrays.

This is the one encoding of counts from a node's simulator to the client's edge (the
``Outcomes`` message of ``common.proto``). A node turns Aer's counts into it once; the
coordinator checks it with vectorised tests, merges it as arrays and stores it as bytes; the
client formats Qiskit bitstrings (or Aer's hexadecimal keys) only when asked for a ``counts``
dict, and only for the outcomes it shows.

In memory an outcome is a *key*: a ``uint64`` when it fits in 8 bytes (64 classical bits or
fewer), otherwise a ``numpy.void`` of its bytes in big-endian order, so that sorting keys sorts
outcomes by value either way. Keys are kept distinct and in ascending order; counts are
``int64`` (signed, so progress can take a chunk of a lost attempt out again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from qscale.proto.v1 import common_pb2

__all__ = ["Outcomes", "OutcomeTotals", "check_outcomes", "check_many", "outcome_width"]


def outcome_width(num_clbits: int) -> int:
    """Bytes per outcome (and per shot of per-shot memory) of a circuit with ``num_clbits`` bits."""
    return max(1, -(-num_clbits // 8))


def _keys_from_le(raw: np.ndarray, width: int) -> np.ndarray:
    """Keys of ``raw`` (n x width uint8 rows, little-endian)."""
    if width <= 8:
        if width == 8:
            return np.ascontiguousarray(raw).view("<u8").ravel().astype(np.uint64, copy=False)
        padded = np.zeros((raw.shape[0], 8), dtype=np.uint8)
        padded[:, :width] = raw
        return padded.view("<u8").ravel().astype(np.uint64, copy=False)
    return np.ascontiguousarray(raw[:, ::-1]).view(f"V{width}").ravel()


def _le_from_keys(keys: np.ndarray, width: int) -> np.ndarray:
    """The n x width little-endian uint8 rows of ``keys``."""
    if width <= 8:
        return keys.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :width]
    return keys.view(np.uint8).reshape(-1, width)[:, ::-1]


def _be_bytes(keys: np.ndarray, width: int) -> np.ndarray:
    """The n x width big-endian uint8 rows of ``keys`` (most significant byte first)."""
    if width <= 8:
        return keys.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - width:]
    return keys.view(np.uint8).reshape(-1, width)


def _distinct_sorted(keys: np.ndarray) -> bool:
    """Whether byte-string keys (more than 64 classical bits: no ``>`` on them) are distinct and
    ascending."""
    if keys.size < 2:
        return True
    order = np.argsort(keys, kind="stable")
    return bool(np.all(order == np.arange(keys.size))) and bool(np.all(keys[1:] != keys[:-1]))


_FEW = 16
"""Up to this many outcomes, formatting one by one beats setting up arrays."""


class Outcomes:
    """Distinct outcomes of an experiment (ascending) and how often each occurred.

    Attributes:
        width: bytes per outcome.
        keys: the outcomes (see the module docstring), distinct, ascending.
        counts: int64 counts, one per key.

    Made from a message (:meth:`from_proto`), the arrays are decoded on first use and
    :meth:`to_proto` gives the message back as it came: outcomes that are only passed on cost
    no array work.
    """

    __slots__ = ("width", "_keys", "_counts", "_message")

    def __init__(self, width: int, keys: np.ndarray, counts: np.ndarray) -> None:
        self.width = int(width)
        self._keys: np.ndarray | None = keys
        self._counts: np.ndarray | None = counts
        self._message: common_pb2.Outcomes | None = None

    @property
    def keys(self) -> np.ndarray:
        if self._keys is None:
            self._decode()
        return self._keys  # type: ignore[return-value]

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            self._decode()
        return self._counts  # type: ignore[return-value]

    def _decode(self) -> None:
        msg = self._message
        assert msg is not None
        raw = np.frombuffer(msg.values, dtype=np.uint8).reshape(-1, self.width)
        self._keys = _keys_from_le(raw, self.width)
        self._counts = np.frombuffer(msg.counts, dtype="<u8").astype(np.int64)

    # ---- making one

    @classmethod
    def empty(cls, width: int) -> Outcomes:
        keys = np.zeros(0, dtype=np.uint64 if width <= 8 else f"V{width}")
        return cls(width, keys, np.zeros(0, dtype=np.int64))

    @classmethod
    def of(cls, width: int, value: int, count: int) -> Outcomes:
        """One outcome (an integer, clbit 0 the lowest bit) seen ``count`` times."""
        raw = np.frombuffer(int(value).to_bytes(width, "little"), dtype=np.uint8).reshape(1, width)
        return cls(width, _keys_from_le(raw, width), np.array([count], dtype=np.int64))

    @classmethod
    def from_hex_counts(cls, counts: Mapping[str, int], width: int) -> Outcomes:
        """Aer's ``{"0x5": count}`` dict, packed and sorted (on the node, once per experiment)."""
        n = len(counts)
        values = np.fromiter(counts.values(), dtype=np.int64, count=n)
        if width <= 8:
            keys = np.fromiter((int(k, 16) for k in counts), dtype=np.uint64, count=n)
        else:
            raw = np.frombuffer(b"".join(int(k, 16).to_bytes(width, "big") for k in counts), dtype=np.uint8)
            keys = raw.reshape(n, width).view(f"V{width}").ravel()
        order = np.argsort(keys, kind="stable")
        return cls(width, keys[order], values[order])

    @classmethod
    def from_memory(cls, memory: bytes, width: int) -> Outcomes:
        """Per-shot memory (``width`` little-endian bytes a shot) as one outcome per shot, in
        shot order, each counted once: not distinct, but formatted the same way."""
        raw = np.frombuffer(memory, dtype=np.uint8).reshape(-1, width)
        return cls(width, _keys_from_le(raw, width), np.ones(raw.shape[0], dtype=np.int64))

    @classmethod
    def from_proto(cls, msg: common_pb2.Outcomes) -> Outcomes:
        """Outcomes of a message (checked by :func:`check_outcomes` where it came from a peer),
        decoded when first read."""
        if len(msg.counts) % 8 or len(msg.values) != len(msg.counts) // 8 * max(1, msg.width):
            raise ValueError(f"outcomes hold {len(msg.values)} bytes of values for {len(msg.counts)} bytes of counts")
        outcomes = cls.__new__(cls)
        outcomes.width = max(1, msg.width)
        outcomes._keys = outcomes._counts = None
        outcomes._message = msg
        return outcomes

    def to_proto(self) -> common_pb2.Outcomes:
        if self._message is None:
            self._message = common_pb2.Outcomes(
                width=self.width, values=_le_from_keys(self.keys, self.width).tobytes(),
                counts=self.counts.astype("<u8").tobytes())
        return self._message

    # ---- reading one

    def __eq__(self, other: object) -> bool:
        """The same outcomes with the same counts."""
        if not isinstance(other, Outcomes):
            return NotImplemented
        return self.width == other.width and np.array_equal(self.keys, other.keys) and \
            np.array_equal(self.counts, other.counts)

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        if self._keys is None and self._message is not None:
            return len(self._message.counts) // 8
        return int(self.keys.size)

    @property
    def shots(self) -> int:
        """Sum of the counts."""
        return int(self.counts.sum())

    def integers(self) -> list[int]:
        """The outcomes as Python integers, clbit 0 the lowest bit."""
        if self.width <= 8:
            return self.keys.tolist()
        return [int.from_bytes(row.tobytes(), "big") for row in _be_bytes(self.keys, self.width)]

    def top(self, k: int) -> Outcomes:
        """The ``k`` most frequent outcomes, most frequent first, ties in ascending order
        (``k <= 0``: all of them, in that order). O(n) to select, O(k log k) to order."""
        n = len(self)
        if 0 < k < n:
            threshold = np.partition(self.counts, n - k)[n - k]
            above = np.flatnonzero(self.counts > threshold)
            tied = np.flatnonzero(self.counts == threshold)[: k - above.size]
            picked = np.concatenate([above, tied])
        else:
            picked = np.arange(n)
        order = picked[np.lexsort((picked, -self.counts[picked]))]
        return Outcomes(self.width, self.keys[order], self.counts[order])

    def bitstrings(self, num_clbits: int, creg_sizes: Sequence[tuple[str, int]] = ()) -> list[str]:
        """Qiskit bitstrings: clbit 0 rightmost; registers (when they cover every clbit) last
        first, separated by spaces. Vectorised for many outcomes; a few are formatted one by
        one, which is cheaper than setting up the arrays."""
        n = len(self)
        if num_clbits <= 0:
            return [""] * n
        sizes = [size for _, size in creg_sizes]
        cuts = np.cumsum(sizes[::-1])[:-1] if len(sizes) > 1 and sum(sizes) == num_clbits else ()
        if n <= _FEW and self.width <= 8:
            texts = [format(key, f"0{num_clbits}b") for key in self.keys.tolist()]
            if len(cuts):
                bounds = [0, *cuts.tolist(), num_clbits]
                texts = [" ".join(t[a:b] for a, b in zip(bounds, bounds[1:])) for t in texts]
            return texts
        bits = np.unpackbits(_be_bytes(self.keys, self.width), axis=1)[:, 8 * self.width - num_clbits:]
        chars = bits + np.uint8(ord("0"))
        if len(cuts):  # a space before the first bit of each register but the last one
            chars = np.insert(chars, cuts, np.uint8(ord(" ")), axis=1)
        text = np.ascontiguousarray(chars).view(f"S{chars.shape[1]}").ravel()
        return text.astype(f"U{chars.shape[1]}").tolist()

    def to_dict(self, num_clbits: int, creg_sizes: Sequence[tuple[str, int]] = ()) -> dict[str, int]:
        """``{bitstring: count}`` as ``Result.get_counts()`` gives it."""
        return dict(zip(self.bitstrings(num_clbits, creg_sizes), self.counts.tolist()))

    def hex_dict(self) -> dict[str, int]:
        """``{"0x5": count}``: Aer's own keys, as a Qiskit ``Result`` holds them."""
        return dict(zip(map(hex, self.integers()), self.counts.tolist()))

    def counts_of(self, keys: np.ndarray) -> np.ndarray:
        """The count of each of ``keys`` (0 for one not here), by binary search."""
        if not len(self):
            return np.zeros(keys.size, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self) - 1)
        return np.where(self.keys[pos] == keys, self.counts[pos], 0)

    # ---- combining

    def plus(self, other: Outcomes) -> Outcomes:
        """The sum of two (outcomes whose counts add up to zero are dropped), by one linear
        merge of the sorted keys: a binary search for each of ``other``'s, counts added where
        they meet, the others inserted in place. No sort."""
        if not len(other):
            return self
        if not len(self):
            return other
        keys, counts = self.keys, self.counts
        pos = np.searchsorted(keys, other.keys)
        meet = np.zeros(pos.size, dtype=bool)
        inside = pos < keys.size
        meet[inside] = keys[pos[inside]] == other.keys[inside]
        counts = counts.copy()
        counts[pos[meet]] += other.counts[meet]  # (keys are distinct: no position twice)
        new = ~meet
        keys = np.insert(keys, pos[new], other.keys[new])
        counts = np.insert(counts, pos[new], other.counts[new])
        keep = counts != 0
        if not keep.all():
            keys, counts = keys[keep], counts[keep]
        return Outcomes(self.width, keys, counts)

    def negated(self) -> Outcomes:
        return Outcomes(self.width, self.keys, -self.counts)


class OutcomeTotals:
    """Outcomes summed as parts come: each part is merged into the totals at once, in linear
    time (:meth:`Outcomes.plus`). Totals of a single part keep it as it came: made from a
    message, it is not even decoded, so a job of 10,000 one-shard circuits costs no array work
    per circuit on the coordinator."""

    __slots__ = ("width", "_merged", "shots")

    def __init__(self, width: int) -> None:
        self.width = width
        self._merged: Outcomes | None = None
        self.shots = 0

    def add(self, outcomes: Outcomes, sign: int = 1, *, shots: int | None = None) -> None:
        """Add (``sign`` -1: take out again) ``outcomes`` (``shots``: what their counts add up
        to, when the caller knows: nothing is decoded then)."""
        self.shots += sign * (outcomes.shots if shots is None else shots)
        part = outcomes if sign > 0 else outcomes.negated()
        self._merged = part if self._merged is None else self._merged.plus(part)

    def merged(self) -> Outcomes:
        if self._merged is None:
            self._merged = Outcomes.empty(self.width)
        return self._merged


def check_outcomes(msg: common_pb2.Outcomes, num_clbits: int, shots: int) -> str:
    """What is wrong with outcomes a peer sent for ``shots`` shots of a circuit with
    ``num_clbits`` classical bits, or ``""`` (see :func:`check_many`)."""
    return check_many([(msg, num_clbits)], shots)[1]


def check_many(messages: Sequence[tuple[common_pb2.Outcomes, int]], shots: int) -> tuple[int, str]:
    """The first of ``messages`` (outcomes, number of classical bits of their circuit), each for
    ``shots`` shots, that is wrong, and what is wrong with it; ``(-1, "")`` when all are right.

    Checked: the width, the sizes, the counts (each at least 1 and at most ``shots``, adding up
    to ``shots``), the range (below ``2**num_clbits``) and the order (distinct, ascending).
    Vectorised over all the messages at once: a chunk of 300 one-qubit experiments costs a few
    passes over 600 numbers, not 300 rounds of array calls."""
    groups: dict[int, list[int]] = {}
    for i, (msg, num_clbits) in enumerate(messages):
        width = outcome_width(num_clbits)
        if msg.width != width:
            return i, f"outcomes are {msg.width} bytes wide, expected {width} for {num_clbits} classical bits"
        n, spare = divmod(len(msg.counts), 8)
        if spare or not n or len(msg.values) != n * width:
            return i, f"outcomes hold {len(msg.values)} bytes of values for {len(msg.counts)} bytes of counts"
        if n > shots:
            return i, f"{n} distinct outcomes for {shots} shots"
        groups.setdefault(width, []).append(i)
    for width, members in groups.items():
        bad = _check_group(width, [messages[i] for i in members], shots)
        if bad is not None:
            return members[bad[0]], bad[1]
    return -1, ""


def _check_group(width: int, messages: Sequence[tuple[common_pb2.Outcomes, int]], shots: int
                 ) -> tuple[int, str] | None:
    """:func:`check_many` for messages of one width, sizes already checked."""
    sizes = np.array([len(msg.counts) // 8 for msg, _ in messages])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.repeat(np.arange(len(messages)), sizes)  # message of each outcome
    counts = np.frombuffer(b"".join(msg.counts for msg, _ in messages), dtype="<u8")
    wrong = (counts < 1) | (counts > shots)
    if wrong.any():
        return int(owner[np.argmax(wrong)]), "an outcome has a count below 1 or above the shots"
    sums = np.add.reduceat(counts, starts)  # no wrap-around: each count <= shots, n <= shots
    if (sums != shots).any():
        first = int(np.argmax(sums != shots))
        return first, f"counts add up to {int(sums[first])}, expected {shots}"
    raw = np.frombuffer(b"".join(msg.values for msg, _ in messages), dtype=np.uint8).reshape(-1, width)
    spare = 8 * width - np.array([num_clbits for _, num_clbits in messages])
    top_limit = np.repeat(np.left_shift(1, 8 - spare), sizes)  # the top byte must stay below it
    outside = (spare > 0)[owner] & (raw[:, width - 1] >= top_limit)
    if outside.any():
        first = int(owner[np.argmax(outside)])
        return first, f"an outcome does not fit in {messages[first][1]} classical bits"
    keys = _keys_from_le(raw, width)
    if keys.dtype == np.uint64:
        rising = np.ones(keys.size, dtype=bool)
        rising[1:] = keys[1:] > keys[:-1]
        rising[starts] = True  # each message starts afresh
        if not rising.all():
            return int(owner[np.argmin(rising)]), "outcomes are not distinct and in ascending order"
        return None
    for i, start in enumerate(starts):  # more than 64 classical bits: one message at a time
        if not _distinct_sorted(keys[start:start + sizes[i]]):
            return i, "outcomes are not distinct and in ascending order"
    return None
