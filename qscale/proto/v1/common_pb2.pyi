from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_DONE: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_DONE: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority

class ParameterValues(_message.Message):
    __slots__ = ("names", "num_sets", "values")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_SETS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    num_sets: int
    values: bytes
    def __init__(self, names: _Optional[_Iterable[str]] = ..., num_sets: _Optional[int] = ..., values: _Optional[bytes] = ...) -> None: ...

class ChunkEntry(_message.Message):
    __slots__ = ("circuit_index", "set_start", "set_count")
    CIRCUIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SET_START_FIELD_NUMBER: _ClassVar[int]
    SET_COUNT_FIELD_NUMBER: _ClassVar[int]
    circuit_index: int
    set_start: int
    set_count: int
    def __init__(self, circuit_index: _Optional[int] = ..., set_start: _Optional[int] = ..., set_count: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("entries", "shots", "seed")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ChunkEntry]
    shots: int
    seed: int
    def __init__(self, entries: _Optional[_Iterable[_Union[ChunkEntry, _Mapping]]] = ..., shots: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Outcomes(_message.Message):
    __slots__ = ("width", "values", "counts")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    width: int
    values: bytes
    counts: bytes
    def __init__(self, width: _Optional[int] = ..., values: _Optional[bytes] = ..., counts: _Optional[bytes] = ...) -> None: ...

class CircuitCounts(_message.Message):
    __slots__ = ("circuit_index", "set_index", "memory", "set_count", "expectation_values", "outcomes", "method")
    CIRCUIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SET_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SET_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXPECTATION_VALUES_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    circuit_index: int
    set_index: int
    memory: bytes
    set_count: int
    expectation_values: bytes
    outcomes: Outcomes
    method: str
    def __init__(self, circuit_index: _Optional[int] = ..., set_index: _Optional[int] = ..., memory: _Optional[bytes] = ..., set_count: _Optional[int] = ..., expectation_values: _Optional[bytes] = ..., outcomes: _Optional[_Union[Outcomes, _Mapping]] = ..., method: _Optional[str] = ...) -> None: ...

class ShardResult(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CircuitCounts]
    def __init__(self, results: _Optional[_Iterable[_Union[CircuitCounts, _Mapping]]] = ...) -> None: ...
