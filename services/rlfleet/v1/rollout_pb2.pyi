from rlfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinWeightGroupRequest(_message.Message):
    __slots__ = ("job_id", "group", "rank")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    group: _common_pb2.WeightGroupAddress
    rank: int
    def __init__(self, job_id: _Optional[str] = ..., group: _Optional[_Union[_common_pb2.WeightGroupAddress, _Mapping]] = ..., rank: _Optional[int] = ...) -> None: ...

class JoinWeightGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_new_tokens", "seed", "resume_kv")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RESUME_KV_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    resume_kv: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., resume_kv: _Optional[bool] = ...) -> None: ...

class SequenceRequest(_message.Message):
    __slots__ = ("seq_id", "prompt_token_ids", "prefix_token_ids", "prefix_logprobs", "prefix_versions", "max_new_tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefix_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefix_logprobs: _containers.RepeatedScalarFieldContainer[float]
    prefix_versions: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    def __init__(self, seq_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., prefix_token_ids: _Optional[_Iterable[int]] = ..., prefix_logprobs: _Optional[_Iterable[float]] = ..., prefix_versions: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("sequences", "sampling")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceRequest]
    sampling: SamplingParams
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceRequest, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("seq_id", "token_ids", "logprobs", "versions", "finished", "finish_reason")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    versions: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., versions: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: int
    def __init__(self, aborted: _Optional[int] = ...) -> None: ...

class LoadVersionRequest(_message.Message):
    __slots__ = ("job_id", "version", "model_path", "weightsync_address")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTSYNC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    model_path: str
    weightsync_address: str
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., model_path: _Optional[str] = ..., weightsync_address: _Optional[str] = ...) -> None: ...

class LoadVersionResponse(_message.Message):
    __slots__ = ("version", "load_seconds", "via")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    version: int
    load_seconds: float
    via: str
    def __init__(self, version: _Optional[int] = ..., load_seconds: _Optional[float] = ..., via: _Optional[str] = ...) -> None: ...

class RolloutStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("replica_id", "version", "engine", "running_sequences", "model_path", "job_id")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    version: int
    engine: str
    running_sequences: int
    model_path: str
    job_id: str
    def __init__(self, replica_id: _Optional[str] = ..., version: _Optional[int] = ..., engine: _Optional[str] = ..., running_sequences: _Optional[int] = ..., model_path: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...
