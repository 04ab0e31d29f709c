"""Domain records -> protobuf replies. A result carries its outcomes packed, as the coordinator
holds them; a progress update (read by people) selects the outcomes it shows first and formats
only those as Qiskit bitstrings."""

from __future__ import annotations

from qscale.circuits import memory_width
from qscale.coordinator.jobs import DONE, Job
from qscale.coordinator.nodes import Node
from qscale.coordinator.retention import PrunedJob, pruned_message
from qscale.coordinator.scheduler import Usage
from qscale.coordinator.store import JobRow
from qscale.coordinator.users import User
from qscale.errors import NotFoundError
from qscale.proto.v1 import jobs_pb2

__all__ = ["job_status", "row_status", "job_progress", "job_result", "node_info", "user_info"]


def job_status(job: Job) -> jobs_pb2.JobStatus:
    """A job's status; a pruned job's (:class:`~qscale.coordinator.retention.PrunedJob`) from
    what its record keeps: no shards, its shots done when it is done."""
    why = job.explanation
    return jobs_pb2.JobStatus(
        job_id=job.job_id,
        state=job.state,
        error=job.error,
        shots_total=job.shots_total,
        shots_done=job.shots_done,
        shards_total=len(job.shards),
        shards_done=job.shards_done,
        shards_running=job.shards_running,
        num_circuits=job.num_circuits if isinstance(job, PrunedJob) else len(job.infos),
        created_at=job.created_at,
        finished_at=job.finished_at,
        user=job.user,
        priority=job.priority,
        pruned=job.pruned,
        plan=None if why is None else jobs_pb2.PlanInfo(
            shards=why.shards, estimated_cost_s=why.estimated_cost_s, shard_target_s=why.shard_target_s,
            limit=why.limit, shots_per_shard=why.shots_per_shard, splittable=why.splittable, explanation=why.text),
    )


def row_status(row: JobRow) -> jobs_pb2.JobStatus:
    """The status of a job known only from its row in the store (a job list, past the jobs in
    memory): no shard figures; its shots done are its shots when it is done."""
    return jobs_pb2.JobStatus(
        job_id=row.job_id, state=row.state, error=row.error, shots_total=row.shots_total,
        shots_done=row.shots_total if row.state == DONE else 0, num_circuits=row.num_circuits,
        created_at=row.created_at, finished_at=row.finished_at, user=row.user, priority=row.priority,
        pruned=row.pruned)


def job_progress(job: Job, include_counts: bool, max_outcomes: int) -> jobs_pb2.JobProgress:
    progress = jobs_pb2.JobProgress(status=job_status(job))
    if include_counts:
        for index, totals in enumerate(job.totals):
            info = job.infos[index]
            progress.counts.add(circuit_index=index,
                                counts=totals.top(max_outcomes).to_dict(info.num_clbits, info.creg_sizes),
                                shots=totals.progress_shots)
    return progress


def job_result(job: Job) -> jobs_pb2.JobResult:
    """A final job's result.

    Raises:
        NotFoundError: retention pruned its results (the message says when it finished and what
            the coordinator keeps).
    """
    if job.pruned:
        raise NotFoundError(pruned_message(job))
    result = jobs_pb2.JobResult(
        status=job_status(job),
        seed=job.seed,
        method=job.method,
        nodes_used=sorted(job.nodes_used),
        stale_results_dropped=job.stale_dropped,
        wall_time_s=(job.finished_at or job.created_at) - job.created_at,
    )
    for index, info in enumerate(job.infos):
        circuit = result.results.add(
            circuit_index=index,
            name=info.name,
            outcomes=job.circuit_outcomes(index) if not job.estimator else None,
            shots=sum(job.set_shots[index]),
            num_qubits=info.num_qubits,
            num_clbits=info.num_clbits,
            registers=[jobs_pb2.Register(name=name, size=size) for name, size in info.creg_sizes],
            memory_width=memory_width(info.num_clbits),
            register_clbits=[bit for reg in info.creg_clbits for bit in reg],
            method=", ".join(sorted(job.methods_run[index])) if job.methods_run else "",
        )
        if job.estimator:  # the values are per set already: no set entries
            circuit.observables.extend(job.observables[index])
            circuit.expectation_values = job.values[index].astype("<f8").tobytes()
            continue
        single = len(job.set_outcomes[index]) == 1  # its outcomes are the circuit's: not sent twice
        for set_index, outcomes in enumerate(job.set_outcomes[index]):
            circuit.sets.add(
                set_index=set_index,
                outcomes=None if single else outcomes.merged().to_proto(),
                shots=job.set_shots[index][set_index],
                memory=job.set_memory(index, set_index) if job.memory else b"",
            )
    for a in job.attempts:
        result.attempts.add(shard_index=a.shard_index, attempt_token=a.token, node_id=a.node_id,
                            started_at=a.started_at, ended_at=a.ended_at, outcome=a.outcome, error=a.error)
    return result


def node_info(node: Node, now: float) -> jobs_pb2.NodeInfo:
    return jobs_pb2.NodeInfo(
        node_id=node.node_id,
        capabilities=node.caps,
        state=node.status,
        running=len(node.running),
        last_heartbeat_age_s=max(0.0, now - node.last_heard),
        registered_at=node.registered_at,
        shards_done=node.shards_done,
    )


def user_info(user: User, usage: Usage | None, slot_seconds: float) -> jobs_pb2.UserInfo:
    """A user's policy and what they use now."""
    usage = usage or Usage()
    return jobs_pb2.UserInfo(
        name=user.name, weight=user.weight, admin=user.admin, jobs_unfinished=usage.jobs_unfinished,
        shots_queued=usage.shots_queued, slots_busy=usage.in_hand, slot_seconds=slot_seconds,
        max_jobs=user.max_jobs, max_queued_shots=user.max_queued_shots, max_slots=user.max_slots)
