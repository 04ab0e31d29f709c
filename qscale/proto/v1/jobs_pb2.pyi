from qscale.proto.v1 import common_pb2 as _common_pb2
from qscale.proto.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CircuitSource(_message.Message):
    __slots__ = ("qpy", "qasm", "name", "parameters", "shots", "observables")
    QPY_FIELD_NUMBER: _ClassVar[int]
    QASM_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    OBSERVABLES_FIELD_NUMBER: _ClassVar[int]
    qpy: bytes
    qasm: str
    name: str
    parameters: _common_pb2.ParameterValues
    shots: int
    observables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, qpy: _Optional[bytes] = ..., qasm: _Optional[str] = ..., name: _Optional[str] = ..., parameters: _Optional[_Union[_common_pb2.ParameterValues, _Mapping]] = ..., shots: _Optional[int] = ..., observables: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("circuits", "shots", "seed", "method", "memory", "noise_model", "request_key", "shots_per_shard", "priority")
    CIRCUITS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    NOISE_MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_KEY_FIELD_NUMBER: _ClassVar[int]
    SHOTS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    circuits: _containers.RepeatedCompositeFieldContainer[CircuitSource]
    shots: int
    seed: int
    method: str
    memory: bool
    noise_model: str
    request_key: str
    shots_per_shard: int
    priority: _common_pb2.Priority
    def __init__(self, circuits: _Optional[_Iterable[_Union[CircuitSource, _Mapping]]] = ..., shots: _Optional[int] = ..., seed: _Optional[int] = ..., method: _Optional[str] = ..., memory: _Optional[bool] = ..., noise_model: _Optional[str] = ..., request_key: _Optional[str] = ..., shots_per_shard: _Optional[int] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("job_id", "seed")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seed: int
    def __init__(self, job_id: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "state", "error", "shots_total", "shots_done", "shards_total", "shards_done", "shards_running", "num_circuits", "created_at", "finished_at", "plan", "user", "priority", "pruned")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SHOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHOTS_DONE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHARDS_DONE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_CIRCUITS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: _common_pb2.JobState
    error: str
    shots_total: int
    shots_done: int
    shards_total: int
    shards_done: int
    shards_running: int
    num_circuits: int
    created_at: float
    finished_at: float
    plan: PlanInfo
    user: str
    priority: _common_pb2.Priority
    pruned: bool
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., error: _Optional[str] = ..., shots_total: _Optional[int] = ..., shots_done: _Optional[int] = ..., shards_total: _Optional[int] = ..., shards_done: _Optional[int] = ..., shards_running: _Optional[int] = ..., num_circuits: _Optional[int] = ..., created_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., plan: _Optional[_Union[PlanInfo, _Mapping]] = ..., user: _Optional[str] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., pruned: _Optional[bool] = ...) -> None: ...

class PlanInfo(_message.Message):
    __slots__ = ("shards", "estimated_cost_s", "shard_target_s", "limit", "shots_per_shard", "splittable", "explanation")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_S_FIELD_NUMBER: _ClassVar[int]
    SHARD_TARGET_S_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SHOTS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    SPLITTABLE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    shards: int
    estimated_cost_s: float
    shard_target_s: float
    limit: str
    shots_per_shard: int
    splittable: bool
    explanation: str
    def __init__(self, shards: _Optional[int] = ..., estimated_cost_s: _Optional[float] = ..., shard_target_s: _Optional[float] = ..., limit: _Optional[str] = ..., shots_per_shard: _Optional[int] = ..., splittable: _Optional[bool] = ..., explanation: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("job_id", "include_counts", "max_outcomes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    include_counts: bool
    max_outcomes: int
    def __init__(self, job_id: _Optional[str] = ..., include_counts: _Optional[bool] = ..., max_outcomes: _Optional[int] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("status", "counts")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    counts: _containers.RepeatedCompositeFieldContainer[CircuitCountsText]
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ..., counts: _Optional[_Iterable[_Union[CircuitCountsText, _Mapping]]] = ...) -> None: ...

class CircuitCountsText(_message.Message):
    __slots__ = ("circuit_index", "counts", "shots")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CIRCUIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    circuit_index: int
    counts: _containers.ScalarMap[str, int]
    shots: int
    def __init__(self, circuit_index: _Optional[int] = ..., counts: _Optional[_Mapping[str, int]] = ..., shots: _Optional[int] = ...) -> None: ...

class AttemptInfo(_message.Message):
    __slots__ = ("shard_index", "attempt_token", "node_id", "started_at", "ended_at", "outcome", "error")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    attempt_token: str
    node_id: str
    started_at: float
    ended_at: float
    outcome: str
    error: str
    def __init__(self, shard_index: _Optional[int] = ..., attempt_token: _Optional[str] = ..., node_id: _Optional[str] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ..., outcome: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("status", "results", "seed", "method", "nodes_used", "attempts", "stale_results_dropped", "wall_time_s")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NODES_USED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    STALE_RESULTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    results: _containers.RepeatedCompositeFieldContainer[CircuitResult]
    seed: int
    method: str
    nodes_used: _containers.RepeatedScalarFieldContainer[str]
    attempts: _containers.RepeatedCompositeFieldContainer[AttemptInfo]
    stale_results_dropped: int
    wall_time_s: float
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ..., results: _Optional[_Iterable[_Union[CircuitResult, _Mapping]]] = ..., seed: _Optional[int] = ..., method: _Optional[str] = ..., nodes_used: _Optional[_Iterable[str]] = ..., attempts: _Optional[_Iterable[_Union[AttemptInfo, _Mapping]]] = ..., stale_results_dropped: _Optional[int] = ..., wall_time_s: _Optional[float] = ...) -> None: ...

class CircuitResult(_message.Message):
    __slots__ = ("circuit_index", "name", "outcomes", "shots", "num_qubits", "num_clbits", "sets", "registers", "memory_width", "register_clbits", "observables", "expectation_values", "method")
    CIRCUIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUBITS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLBITS_FIELD_NUMBER: _ClassVar[int]
    SETS_FIELD_NUMBER: _ClassVar[int]
    REGISTERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WIDTH_FIELD_NUMBER: _ClassVar[int]
    REGISTER_CLBITS_FIELD_NUMBER: _ClassVar[int]
    OBSERVABLES_FIELD_NUMBER: _ClassVar[int]
    EXPECTATION_VALUES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    circuit_index: int
    name: str
    outcomes: _common_pb2.Outcomes
    shots: int
    num_qubits: int
    num_clbits: int
    sets: _containers.RepeatedCompositeFieldContainer[SetResult]
    registers: _containers.RepeatedCompositeFieldContainer[Register]
    memory_width: int
    register_clbits: _containers.RepeatedScalarFieldContainer[int]
    observables: _containers.RepeatedScalarFieldContainer[str]
    expectation_values: bytes
    method: str
    def __init__(self, circuit_index: _Optional[int] = ..., name: _Optional[str] = ..., outcomes: _Optional[_Union[_common_pb2.Outcomes, _Mapping]] = ..., shots: _Optional[int] = ..., num_qubits: _Optional[int] = ..., num_clbits: _Optional[int] = ..., sets: _Optional[_Iterable[_Union[SetResult, _Mapping]]] = ..., registers: _Optional[_Iterable[_Union[Register, _Mapping]]] = ..., memory_width: _Optional[int] = ..., register_clbits: _Optional[_Iterable[int]] = ..., observables: _Optional[_Iterable[str]] = ..., expectation_values: _Optional[bytes] = ..., method: _Optional[str] = ...) -> None: ...

class SetResult(_message.Message):
    __slots__ = ("set_index", "outcomes", "shots", "memory")
    SET_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    set_index: int
    outcomes: _common_pb2.Outcomes
    shots: int
    memory: bytes
    def __init__(self, set_index: _Optional[int] = ..., outcomes: _Optional[_Union[_common_pb2.Outcomes, _Mapping]] = ..., shots: _Optional[int] = ..., memory: _Optional[bytes] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit", "user")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    limit: int
    user: str
    def __init__(self, limit: _Optional[int] = ..., user: _Optional[str] = ...) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "capabilities", "state", "running", "last_heartbeat_age_s", "registered_at", "shards_done")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_DONE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    capabilities: _node_pb2.NodeCapabilities
    state: str
    running: int
    last_heartbeat_age_s: float
    registered_at: float
    shards_done: int
    def __init__(self, node_id: _Optional[str] = ..., capabilities: _Optional[_Union[_node_pb2.NodeCapabilities, _Mapping]] = ..., state: _Optional[str] = ..., running: _Optional[int] = ..., last_heartbeat_age_s: _Optional[float] = ..., registered_at: _Optional[float] = ..., shards_done: _Optional[int] = ...) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes", "stale_results_dropped")
    NODES_FIELD_NUMBER: _ClassVar[int]
    STALE_RESULTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    stale_results_dropped: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., stale_results_dropped: _Optional[int] = ...) -> None: ...

class ListUsersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UserInfo(_message.Message):
    __slots__ = ("name", "weight", "admin", "jobs_unfinished", "shots_queued", "slots_busy", "slot_seconds", "max_jobs", "max_queued_shots", "max_slots")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    JOBS_UNFINISHED_FIELD_NUMBER: _ClassVar[int]
    SHOTS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BUSY_FIELD_NUMBER: _ClassVar[int]
    SLOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_SHOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SLOTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    admin: bool
    jobs_unfinished: int
    shots_queued: int
    slots_busy: int
    slot_seconds: float
    max_jobs: int
    max_queued_shots: int
    max_slots: int
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., admin: _Optional[bool] = ..., jobs_unfinished: _Optional[int] = ..., shots_queued: _Optional[int] = ..., slots_busy: _Optional[int] = ..., slot_seconds: _Optional[float] = ..., max_jobs: _Optional[int] = ..., max_queued_shots: _Optional[int] = ..., max_slots: _Optional[int] = ...) -> None: ...

class ListUsersReply(_message.Message):
    __slots__ = ("users",)
    USERS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[UserInfo]
    def __init__(self, users: _Optional[_Iterable[_Union[UserInfo, _Mapping]]] = ...) -> None: ...
