"""Packed outcomes (qscale.outcomes): the one encoding of counts from the node to the client.
Formatting is checked against Qiskit's own, checks against hostile input, merging and top-k
against plain dicts, and the sampler's register extraction against ``BitArray``'s own."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from qiskit.primitives import BitArray
from qiskit.result.postprocess import format_counts

from qscale.outcomes import Outcomes, OutcomeTotals, check_outcomes, outcome_width
from qscale.primitives import _register_bytes
from qscale.proto.v1 import common_pb2

REGISTERS = [[("c", 5)], [("a", 2), ("b", 3)], [("a", 1), ("b", 0), ("c", 4)]]


def _random_hex_counts(rng: random.Random, num_clbits: int, n: int) -> dict[str, int]:
    return {hex(rng.getrandbits(num_clbits)): rng.randrange(1, 9) for _ in range(n)}


@pytest.mark.parametrize("num_clbits", [0, 1, 5, 8, 13, 64, 65, 130])
@pytest.mark.parametrize("many", [False, True])  # formatted one by one, or as arrays
def test_bitstrings_and_hex_keys_are_those_qiskit_gives(num_clbits: int, many: bool) -> None:
    rng = random.Random(num_clbits)
    counts = _random_hex_counts(rng, num_clbits, 300 if many else 5) if num_clbits else {"0x0": 4}
    outcomes = Outcomes.from_hex_counts(counts, outcome_width(num_clbits))
    assert outcomes.hex_dict() == counts
    assert outcomes.shots == sum(counts.values())
    assert Outcomes.from_proto(outcomes.to_proto()).hex_dict() == counts
    assert Outcomes.from_proto(outcomes.to_proto()) == outcomes != Outcomes.empty(outcomes.width)
    if not num_clbits:  # no classical bits: every shot reads the empty bitstring
        assert outcomes.to_dict(0) == {"": 4}
        return
    for registers in ([("c", num_clbits)], [("a", num_clbits // 2), ("b", num_clbits - num_clbits // 2)]):
        header = {"memory_slots": num_clbits, "creg_sizes": [list(r) for r in registers]}
        assert outcomes.to_dict(num_clbits, registers) == format_counts(counts, header)


@pytest.mark.parametrize("registers", REGISTERS)
@pytest.mark.parametrize("many", [False, True])
def test_registers_split_bitstrings_as_in_qiskit(registers: list[tuple[str, int]], many: bool) -> None:
    counts = {hex(k): k + 1 for k in range(32)} if many else {"0x0": 1, "0x1b": 2, "0x5": 3}
    header = {"memory_slots": 5, "creg_sizes": [list(r) for r in registers]}
    assert Outcomes.from_hex_counts(counts, 1).to_dict(5, registers) == format_counts(counts, header)


def test_bits_outside_every_register_are_kept_unsplit() -> None:
    """Qiskit would drop clbits no register holds; qscale shows every bit and does not split."""
    assert Outcomes.from_hex_counts({"0x1b": 2}, 1).to_dict(5, [("a", 3)]) == {"11011": 2}
    many = Outcomes.from_hex_counts({hex(k): 1 for k in range(32)}, 1)
    assert many.to_dict(5, [("a", 3)]) == {format(k, "05b"): 1 for k in range(32)}


def test_per_shot_memory_formats_like_counts() -> None:
    memory = bytes([3, 0, 1, 0, 3, 0])  # three shots of a 10-bit circuit
    assert Outcomes.from_memory(memory, 2).bitstrings(10, [("a", 4), ("b", 6)]) == \
        ["000000 0011", "000000 0001", "000000 0011"]


def test_top_k_is_most_frequent_first_ties_by_value() -> None:
    outcomes = Outcomes.from_hex_counts({"0x1": 5, "0x2": 9, "0x3": 5, "0x4": 1, "0x0": 5}, 1)
    assert list(outcomes.top(3).hex_dict().items()) == [("0x2", 9), ("0x0", 5), ("0x1", 5)]
    assert list(outcomes.top(0).hex_dict()) == ["0x2", "0x0", "0x1", "0x3", "0x4"]
    assert len(outcomes.top(99)) == 5


def test_totals_merge_incrementally_to_the_sum_of_their_parts() -> None:
    rng = random.Random(3)
    for width, bits in ((2, 12), (9, 70)):
        totals, truth = OutcomeTotals(width), Counter[str]()
        for _ in range(200):
            part = _random_hex_counts(rng, bits, rng.randrange(1, 300))
            totals.add(Outcomes.from_hex_counts(part, width))
            truth.update(part)
        merged = totals.merged()
        assert merged.hex_dict() == dict(truth) and totals.shots == sum(truth.values())
        assert list(merged.integers()) == sorted(merged.integers())
        assert check_outcomes(merged.to_proto(), bits, totals.shots) == ""


def _message(values: list[int], counts: list[int], width: int) -> common_pb2.Outcomes:
    return common_pb2.Outcomes(width=width, values=b"".join(v.to_bytes(width, "little") for v in values),
                               counts=b"".join(c.to_bytes(8, "little") for c in counts))


@pytest.mark.parametrize(("message", "num_clbits", "shots", "problem"), [
    (_message([0, 3], [4, 6], 1), 2, 10, ""),
    (_message([0, 3], [4, 6], 1), 2, 11, "add up to 10"),
    (_message([0, 4], [4, 6], 1), 2, 10, "does not fit in 2"),
    (_message([0, 1 << 12], [4, 6], 2), 12, 10, "does not fit in 12"),
    (_message([3, 0], [4, 6], 1), 2, 10, "ascending"),
    (_message([3, 3], [4, 6], 1), 2, 10, "ascending"),
    (_message([0, 1], [0, 10], 1), 2, 10, "below 1"),
    (_message([0, 1], [1 << 63, (1 << 63) + 10], 1), 2, 10, "above the shots"),
    (_message([0], [10], 2), 2, 10, "2 bytes wide"),
    (common_pb2.Outcomes(width=1, values=b"\x00", counts=b"\x0a"), 2, 10, "bytes of values"),
    (common_pb2.Outcomes(), 2, 10, "0 bytes wide"),
    (_message(list(range(11)), [1] * 11, 1), 8, 10, "11 distinct outcomes for 10 shots"),
    (_message([5, 1 << 69], [4, 6], 9), 70, 10, ""),
    (_message([1 << 69, 5], [4, 6], 9), 70, 10, "ascending"),
])
def test_checks_refuse_what_a_node_must_not_send(message: common_pb2.Outcomes, num_clbits: int, shots: int,
                                                 problem: str) -> None:
    got = check_outcomes(message, num_clbits, shots)
    assert (problem in got and got) if problem else got == ""


@pytest.mark.parametrize(("width", "num_clbits"), [(1, 5), (2, 13), (3, 20), (9, 70)])
def test_register_bytes_are_those_of_bitarray(width: int, num_clbits: int) -> None:
    rng = np.random.default_rng(width)
    rows = rng.integers(0, 256, size=(40, width), dtype=np.uint8)
    rows[:, -1] &= (1 << (num_clbits - 8 * (width - 1))) - 1
    bits = np.unpackbits(rows, axis=1, bitorder="little")[:, :num_clbits].astype(bool)
    for positions in (list(range(num_clbits)), list(range(2, num_clbits)), [0, 1, 2], [1, 0, 4],
                      list(range(8, num_clbits)), []):
        expected = BitArray.from_bool_array(bits[:, positions], order="little").array
        got = _register_bytes(rows, positions)
        assert got.shape == expected.shape and np.array_equal(got, expected), positions
