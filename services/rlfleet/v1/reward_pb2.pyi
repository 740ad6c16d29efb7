from rlfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("job_id", "verifier", "verifier_config_json", "samples", "write_to_buffer")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WRITE_TO_BUFFER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    verifier: str
    verifier_config_json: str
    samples: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sample]
    write_to_buffer: bool
    def __init__(self, job_id: _Optional[str] = ..., verifier: _Optional[str] = ..., verifier_config_json: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[_common_pb2.Sample, _Mapping]]] = ..., write_to_buffer: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("rewards", "written", "terms")
    class TermsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TermScores
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TermScores, _Mapping]] = ...) -> None: ...
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    written: int
    terms: _containers.MessageMap[str, TermScores]
    def __init__(self, rewards: _Optional[_Iterable[float]] = ..., written: _Optional[int] = ..., terms: _Optional[_Mapping[str, TermScores]] = ...) -> None: ...

class TermScores(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("job_id", "samples")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    samples: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sample]
    def __init__(self, job_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[_common_pb2.Sample, _Mapping]]] = ...) -> None: ...

class WriteResponse(_message.Message):
    __slots__ = ("written",)
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    written: int
    def __init__(self, written: _Optional[int] = ...) -> None: ...
