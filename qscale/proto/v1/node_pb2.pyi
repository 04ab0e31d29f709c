from qscale.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeCapabilities(_message.Message):
    __slots__ = ("name", "hostname", "cores", "slots", "memory_budget_bytes", "methods", "max_statevector_qubits", "qpy_version", "qscale_version", "qiskit_version", "aer_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MAX_STATEVECTOR_QUBITS_FIELD_NUMBER: _ClassVar[int]
    QPY_VERSION_FIELD_NUMBER: _ClassVar[int]
    QSCALE_VERSION_FIELD_NUMBER: _ClassVar[int]
    QISKIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AER_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    hostname: str
    cores: int
    slots: int
    memory_budget_bytes: int
    methods: _containers.RepeatedScalarFieldContainer[str]
    max_statevector_qubits: int
    qpy_version: int
    qscale_version: str
    qiskit_version: str
    aer_version: str
    def __init__(self, name: _Optional[str] = ..., hostname: _Optional[str] = ..., cores: _Optional[int] = ..., slots: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., methods: _Optional[_Iterable[str]] = ..., max_statevector_qubits: _Optional[int] = ..., qpy_version: _Optional[int] = ..., qscale_version: _Optional[str] = ..., qiskit_version: _Optional[str] = ..., aer_version: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("capabilities", "previous_node_id", "attempts_in_hand")
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_IN_HAND_FIELD_NUMBER: _ClassVar[int]
    capabilities: NodeCapabilities
    previous_node_id: str
    attempts_in_hand: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, capabilities: _Optional[_Union[NodeCapabilities, _Mapping]] = ..., previous_node_id: _Optional[str] = ..., attempts_in_hand: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_s", "heartbeat_timeout_s", "adopted_attempts")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    adopted_attempts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ..., adopted_attempts: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardAssignment(_message.Message):
    __slots__ = ("job_id", "shard_index", "attempt_token", "chunks", "circuits", "method", "memory_bytes", "memory", "noise_model", "noise_model_cached", "priority")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CIRCUITS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    NOISE_MODEL_FIELD_NUMBER: _ClassVar[int]
    NOISE_MODEL_CACHED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    attempt_token: str
    chunks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Chunk]
    circuits: _containers.RepeatedCompositeFieldContainer[CircuitPayload]
    method: str
    memory_bytes: int
    memory: bool
    noise_model: str
    noise_model_cached: bool
    priority: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., attempt_token: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[_common_pb2.Chunk, _Mapping]]] = ..., circuits: _Optional[_Iterable[_Union[CircuitPayload, _Mapping]]] = ..., method: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., memory: _Optional[bool] = ..., noise_model: _Optional[str] = ..., noise_model_cached: _Optional[bool] = ..., priority: _Optional[int] = ...) -> None: ...

class CircuitPayload(_message.Message):
    __slots__ = ("circuit_index", "qpy", "parameters", "first_set", "cached", "observables")
    CIRCUIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    QPY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SET_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    OBSERVABLES_FIELD_NUMBER: _ClassVar[int]
    circuit_index: int
    qpy: bytes
    parameters: _common_pb2.ParameterValues
    first_set: int
    cached: bool
    observables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, circuit_index: _Optional[int] = ..., qpy: _Optional[bytes] = ..., parameters: _Optional[_Union[_common_pb2.ParameterValues, _Mapping]] = ..., first_set: _Optional[int] = ..., cached: _Optional[bool] = ..., observables: _Optional[_Iterable[str]] = ...) -> None: ...

class CancelAttempt(_message.Message):
    __slots__ = ("attempt_token", "reason")
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    attempt_token: str
    reason: str
    def __init__(self, attempt_token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ForgetJob(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("sequence", "known", "heartbeat_interval_s", "heartbeat_timeout_s")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    known: bool
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    def __init__(self, sequence: _Optional[int] = ..., known: _Optional[bool] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("assign", "cancel", "forget", "heartbeat_reply")
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_REPLY_FIELD_NUMBER: _ClassVar[int]
    assign: ShardAssignment
    cancel: CancelAttempt
    forget: ForgetJob
    heartbeat_reply: HeartbeatReply
    def __init__(self, assign: _Optional[_Union[ShardAssignment, _Mapping]] = ..., cancel: _Optional[_Union[CancelAttempt, _Mapping]] = ..., forget: _Optional[_Union[ForgetJob, _Mapping]] = ..., heartbeat_reply: _Optional[_Union[HeartbeatReply, _Mapping]] = ...) -> None: ...

class StreamHello(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class ChunkResult(_message.Message):
    __slots__ = ("attempt_token", "chunk_index", "counts", "seconds")
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    attempt_token: str
    chunk_index: int
    counts: _containers.RepeatedCompositeFieldContainer[_common_pb2.CircuitCounts]
    seconds: float
    def __init__(self, attempt_token: _Optional[str] = ..., chunk_index: _Optional[int] = ..., counts: _Optional[_Iterable[_Union[_common_pb2.CircuitCounts, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class ShardDone(_message.Message):
    __slots__ = ("attempt_token", "seconds")
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    attempt_token: str
    seconds: float
    def __init__(self, attempt_token: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class ShardFailed(_message.Message):
    __slots__ = ("attempt_token", "error", "refused")
    ATTEMPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    attempt_token: str
    error: str
    refused: bool
    def __init__(self, attempt_token: _Optional[str] = ..., error: _Optional[str] = ..., refused: _Optional[bool] = ...) -> None: ...

class Draining(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sequence", "attempts_in_hand", "free_slots")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_IN_HAND_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    attempts_in_hand: _containers.RepeatedScalarFieldContainer[str]
    free_slots: int
    def __init__(self, sequence: _Optional[int] = ..., attempts_in_hand: _Optional[_Iterable[str]] = ..., free_slots: _Optional[int] = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("hello", "chunk", "done", "failed", "draining", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: StreamHello
    chunk: ChunkResult
    done: ShardDone
    failed: ShardFailed
    draining: Draining
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[StreamHello, _Mapping]] = ..., chunk: _Optional[_Union[ChunkResult, _Mapping]] = ..., done: _Optional[_Union[ShardDone, _Mapping]] = ..., failed: _Optional[_Union[ShardFailed, _Mapping]] = ..., draining: _Optional[_Union[Draining, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...
