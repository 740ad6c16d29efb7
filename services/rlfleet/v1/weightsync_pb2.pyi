from rlfleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WeightChunk(_message.Message):
    __slots__ = ("job_id", "version", "offset", "data", "last", "checksum", "total_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    offset: int
    data: bytes
    last: bool
    checksum: str
    total_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., checksum: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class PullVersionRequest(_message.Message):
    __slots__ = ("job_id", "version", "replica_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    replica_id: str
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., replica_id: _Optional[str] = ...) -> None: ...

class GetCurrentRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ReportHeldRequest(_message.Message):
    __slots__ = ("replica_id", "job_id", "version", "address")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    job_id: str
    version: int
    address: str
    def __init__(self, replica_id: _Optional[str] = ..., job_id: _Optional[str] = ..., version: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class ReportHeldResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListReplicasRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ReplicaVersion(_message.Message):
    __slots__ = ("replica_id", "job_id", "version", "address", "reported_at")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    job_id: str
    version: int
    address: str
    reported_at: float
    def __init__(self, replica_id: _Optional[str] = ..., job_id: _Optional[str] = ..., version: _Optional[int] = ..., address: _Optional[str] = ..., reported_at: _Optional[float] = ...) -> None: ...

class ListReplicasResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaVersion]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaVersion, _Mapping]]] = ...) -> None: ...

class GetDataPlaneRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DataPlane(_message.Message):
    __slots__ = ("port",)
    PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    def __init__(self, port: _Optional[int] = ...) -> None: ...
