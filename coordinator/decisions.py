"""What the scheduler decides, for the runtime (:mod:`qscale.coordinator.runtime`) to carry out.

The scheduler never sends, writes or wakes anything itself: every event it handles returns a
list of these, in order. That keeps its rules testable without gRPC, SQLite or sleeping, and
lets the runtime batch the writes (group commit, off the event loop).
"""

from __future__ import annotations

from dataclasses import dataclass

from qscale.proto.v1 import common_pb2, node_pb2

__all__ = ["Send", "CloseStream", "RecordShard", "FinishJob", "Notify", "Decision"]


@dataclass(frozen=True, slots=True)
class Send:
    """Put a message on a node's Work stream."""

    stream: object
    message: node_pb2.CoordinatorMessage


@dataclass(frozen=True, slots=True)
class CloseStream:
    """End a node's Work stream (the node registers again)."""

    stream: object


@dataclass(frozen=True, slots=True)
class RecordShard:
    """Persist a counted shard's results (before the job they complete is reported final)."""

    job_id: str
    shard_index: int
    result: common_pb2.ShardResult
    node_id: str
    attempt: str
    at: float


@dataclass(frozen=True, slots=True)
class FinishJob:
    """Persist a job's final state."""

    job_id: str
    state: int
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class Notify:
    """Wake the job's watchers."""

    job_id: str


Decision = Send | CloseStream | RecordShard | FinishJob | Notify
