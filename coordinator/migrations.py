"""Upgrades of the coordinator's SQLite state from older schemas, one step per version, run in
one transaction when the store opens, so a coordinator upgraded in the middle of a job keeps
every result it had counted.

* 1 -> 2: estimator jobs store their circuits' observables (a new, empty column).
* 2 -> 3: shard results hold packed outcomes (``Outcomes``) instead of a map of Aer's
  hexadecimal keys; every stored result is rewritten.
* 3 -> 4: jobs record their user and priority, and when retention pruned their results (new
  columns with defaults: existing jobs belong to ``default``, at normal priority, not pruned).
  The store creates the indexes of the new columns after the upgrade, as for a new state.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from functools import cache
from typing import Any

from qscale.circuits import memory_width
from qscale.outcomes import Outcomes
from qscale.proto.v1 import common_pb2

__all__ = ["migrate"]

log = logging.getLogger(__name__)


def _add_observables(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE circuits ADD COLUMN observables TEXT")


@cache
def _hex_shard_result() -> type:
    """The ``ShardResult`` message as schema 2 stored it (counts as ``map<string, uint64>``)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="qscale/store/v2.proto", package="qscale.store.v2",
                                               syntax="proto3")
    counts = proto.message_type.add(name="CircuitCounts")
    entry = counts.nested_type.add(name="CountsEntry")
    entry.options.map_entry = True
    field = descriptor_pb2.FieldDescriptorProto
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=field.TYPE_UINT64, label=field.LABEL_OPTIONAL)
    for name, number, kind in (("circuit_index", 1, field.TYPE_INT32), ("set_index", 3, field.TYPE_INT64),
                               ("memory", 4, field.TYPE_BYTES), ("set_count", 5, field.TYPE_INT64),
                               ("expectation_values", 6, field.TYPE_BYTES)):
        counts.field.add(name=name, number=number, type=kind, label=field.LABEL_OPTIONAL)
    counts.field.add(name="counts", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_REPEATED,
                     type_name=".qscale.store.v2.CircuitCounts.CountsEntry")
    result = proto.message_type.add(name="ShardResult")
    result.field.add(name="results", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_REPEATED,
                     type_name=".qscale.store.v2.CircuitCounts")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("qscale.store.v2.ShardResult"))


def _pack_outcomes(db: sqlite3.Connection) -> None:
    widths: dict[tuple[str, int], int] = {
        (job_id, idx): memory_width(json.loads(info)["num_clbits"])
        for job_id, idx, info in db.execute("SELECT job_id, idx, info FROM circuits")
    }
    legacy = _hex_shard_result()
    rows = db.execute("SELECT job_id, shard_index, result FROM shard_results").fetchall()
    for job_id, shard_index, blob in rows:
        old: Any = legacy.FromString(blob)
        new = common_pb2.ShardResult()
        for c in old.results:
            item = new.results.add(circuit_index=c.circuit_index, set_index=c.set_index, memory=c.memory,
                                   set_count=c.set_count, expectation_values=c.expectation_values)
            if not c.expectation_values:
                width = widths.get((job_id, c.circuit_index), 1)
                item.outcomes.CopyFrom(Outcomes.from_hex_counts(dict(c.counts), width).to_proto())
        db.execute("UPDATE shard_results SET result = ? WHERE job_id = ? AND shard_index = ?",
                   (new.SerializeToString(), job_id, shard_index))
    log.info("store: %d shard result(s) rewritten with packed outcomes (schema 3)", len(rows))


def _add_user_priority_pruned(db: sqlite3.Connection) -> None:
    present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, definition in (("user", "TEXT NOT NULL DEFAULT 'default'"),
                             ("priority", f"INTEGER NOT NULL DEFAULT {common_pb2.PRIORITY_NORMAL}"),
                             ("pruned_at", "REAL NOT NULL DEFAULT 0")):
        if name not in present:  # (a state whose version was set back by hand may have them)
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
    log.info("store: jobs record their user, priority and retention (schema 4)")


_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _add_observables, 2: _pack_outcomes, 3: _add_user_priority_pruned}
"""Schema version -> the step that upgrades it to the next one."""


def migrate(db: sqlite3.Connection, version: int, target: int) -> int:
    """Upgrade ``db`` from ``version`` towards ``target`` in one transaction; the version reached
    (``version`` itself when no step starts there)."""
    if version >= target or version not in _STEPS:
        return version
    db.execute("BEGIN IMMEDIATE")
    try:
        while version < target and version in _STEPS:
            _STEPS[version](db)
            version += 1
        db.execute(f"PRAGMA user_version={version}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return version
