"""Messages to nodes, built from the scheduler's records."""

from __future__ import annotations

from qscale.coordinator.jobs import Job
from qscale.coordinator.planner import ShardPlan
from qscale.proto.v1 import common_pb2, node_pb2

__all__ = ["assignment", "cancel", "forget"]


def assignment(job: Job, plan: ShardPlan, token: str, *, cached: set[int], noise_cached: bool, order: int = 0
               ) -> node_pb2.CoordinatorMessage:
    """A shard for a node: its chunks, each circuit's QPY (unless in ``cached``), the noise
    model (unless ``noise_cached``), and the ``order`` it runs in among what the node holds
    (:func:`~qscale.coordinator.jobs.run_order`)."""
    a = node_pb2.ShardAssignment(
        job_id=job.job_id,
        shard_index=plan.index,
        attempt_token=token,
        chunks=[common_pb2.Chunk(entries=[common_pb2.ChunkEntry(circuit_index=e.circuit, set_start=e.set_start,
                                                                  set_count=e.set_count) for e in c.entries],
                                 shots=c.shots, seed=c.seed)
                for c in plan.chunks],
        circuits=[_payload(job, plan, i, cached=i in cached) for i in plan.circuit_indices],
        method=plan.method,
        memory_bytes=plan.memory_bytes,
        memory=job.memory,
        priority=order,
    )
    if job.noise_model:
        if noise_cached:
            a.noise_model_cached = True
        else:
            a.noise_model = job.noise_model
    return node_pb2.CoordinatorMessage(assign=a)


def _payload(job: Job, plan: ShardPlan, index: int, *, cached: bool) -> node_pb2.CircuitPayload:
    """The circuit's QPY (unless the node has it already) and the rows of parameter values the
    shard uses."""
    payload = node_pb2.CircuitPayload(circuit_index=index)
    if job.estimator:
        payload.observables.extend(job.observables[index])
    if cached:
        payload.cached = True
    else:
        payload.qpy = job.qpy[index]
    params = job.params[index]
    if params is not None:
        first, count = plan.set_range(index)
        row = 8 * len(params.names)
        payload.first_set = first
        payload.parameters.names.extend(params.names)
        payload.parameters.num_sets = count
        payload.parameters.values = params.values[first * row : (first + count) * row]
    return payload


def cancel(token: str, reason: str) -> node_pb2.CoordinatorMessage:
    return node_pb2.CoordinatorMessage(cancel=node_pb2.CancelAttempt(attempt_token=token, reason=reason))


def forget(job_id: str) -> node_pb2.CoordinatorMessage:
    return node_pb2.CoordinatorMessage(forget=node_pb2.ForgetJob(job_id=job_id))
