from rlfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class OpenWeightGroupRequest(_message.Message):
    __slots__ = ("job_id", "world_size", "backend")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    world_size: int
    backend: str
    def __init__(self, job_id: _Optional[str] = ..., world_size: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class InitJobRequest(_message.Message):
    __slots__ = ("job_id", "spec_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec_json: str
    def __init__(self, job_id: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class InitJobResponse(_message.Message):
    __slots__ = ("version", "resumed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    version: int
    resumed: bool
    def __init__(self, version: _Optional[int] = ..., resumed: _Optional[bool] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("job_id", "step", "num_samples", "publish_in_background")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_IN_BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    num_samples: int
    publish_in_background: bool
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., num_samples: _Optional[int] = ..., publish_in_background: _Optional[bool] = ...) -> None: ...

class TrainStepResponse(_message.Message):
    __slots__ = ("version", "metrics", "samples_trained", "checkpoint_path")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    version: int
    metrics: _containers.ScalarMap[str, float]
    samples_trained: int
    checkpoint_path: str
    def __init__(self, version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., samples_trained: _Optional[int] = ..., checkpoint_path: _Optional[str] = ...) -> None: ...

class TrainerStatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("job_id", "version", "last_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    last_step: int
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., last_step: _Optional[int] = ...) -> None: ...
