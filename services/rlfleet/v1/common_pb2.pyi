from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Sample(_message.Message):
    __slots__ = ("job_id", "sample_id", "group_id", "step", "prompt_token_ids", "completion_token_ids", "inference_logprobs", "token_versions", "reward", "finish_reason", "completion_text", "task_json", "retention", "loss_mask")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TEXT_FIELD_NUMBER: _ClassVar[int]
    TASK_JSON_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sample_id: str
    group_id: str
    step: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    completion_token_ids: _containers.RepeatedScalarFieldContainer[int]
    inference_logprobs: _containers.RepeatedScalarFieldContainer[float]
    token_versions: _containers.RepeatedScalarFieldContainer[int]
    reward: float
    finish_reason: str
    completion_text: str
    task_json: str
    retention: int
    loss_mask: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, job_id: _Optional[str] = ..., sample_id: _Optional[str] = ..., group_id: _Optional[str] = ..., step: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., completion_token_ids: _Optional[_Iterable[int]] = ..., inference_logprobs: _Optional[_Iterable[float]] = ..., token_versions: _Optional[_Iterable[int]] = ..., reward: _Optional[float] = ..., finish_reason: _Optional[str] = ..., completion_text: _Optional[str] = ..., task_json: _Optional[str] = ..., retention: _Optional[int] = ..., loss_mask: _Optional[_Iterable[bool]] = ...) -> None: ...

class PolicyVersion(_message.Message):
    __slots__ = ("version", "checksum", "num_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    checksum: str
    num_bytes: int
    def __init__(self, version: _Optional[int] = ..., checksum: _Optional[str] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class WeightGroupAddress(_message.Message):
    __slots__ = ("host", "port", "world_size", "generation", "backend")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    world_size: int
    generation: int
    backend: str
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., world_size: _Optional[int] = ..., generation: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...
