"""gRPC adapter over ``VersionStore`` and the replica registry; no logic of its own.

PushVersion and PullVersion carry policy versions, gigabytes per call: they
are registered with pass-through (de)serialisers and move serialised
WeightChunk frames (``rlfleet.common.weights``), so the service neither parses
nor re-serialises the data. On the wire nothing changes; clients may use the
generated stubs or the frame helpers of ``rlfleet.common.weights``.
"""

from __future__ import annotations

import logging

import grpc

from rlfleet.v1 import common_pb2, weightsync_pb2, weightsync_pb2_grpc
from rlfleet.weightsync.replicas import ReplicaRegistry
from rlfleet.weightsync.store import VersionInfo, VersionStore

logger = logging.getLogger(__name__)


def _policy_version(info: VersionInfo) -> common_pb2.PolicyVersion:
    return common_pb2.PolicyVersion(
        version=info.version, checksum=info.checksum, num_bytes=info.num_bytes
    )


class WeightSyncServicer(weightsync_pb2_grpc.WeightSyncServiceServicer):
    def __init__(self, store: VersionStore, registry: ReplicaRegistry, *, data_port: int = 0):
        self.store = store
        self.registry = registry
        self.data_port = data_port  # 0: no data plane

    def PushVersion(self, request_iterator, context) -> common_pb2.PolicyVersion:
        # request_iterator yields serialised WeightChunks (see add_to_server).
        return _policy_version(self.store.push_frames(request_iterator))

    def PullVersion(self, request: weightsync_pb2.PullVersionRequest, context):
        # Yields serialised WeightChunks (see add_to_server).
        stream = self.store.pull_frames(request.job_id, request.version)
        logger.debug(
            "serving a version",
            extra={
                "job_id": request.job_id,
                "version": request.version,
                "replica_id": request.replica_id,
            },
        )
        yield from stream

    def GetCurrent(self, request: weightsync_pb2.GetCurrentRequest, context):
        return _policy_version(self.store.current(request.job_id))

    def ReportHeld(self, request: weightsync_pb2.ReportHeldRequest, context):
        self.registry.report(
            replica_id=request.replica_id,
            job_id=request.job_id,
            version=request.version,
            address=request.address,
        )
        return weightsync_pb2.ReportHeldResponse()

    def GetDataPlane(self, request: weightsync_pb2.GetDataPlaneRequest, context):
        return weightsync_pb2.DataPlane(port=self.data_port)

    def ListReplicas(self, request: weightsync_pb2.ListReplicasRequest, context):
        return weightsync_pb2.ListReplicasResponse(
            replicas=[
                weightsync_pb2.ReplicaVersion(
                    replica_id=r.replica_id,
                    job_id=r.job_id,
                    version=r.version,
                    address=r.address,
                    reported_at=r.reported_at,
                )
                for r in self.registry.list(request.job_id)
            ]
        )


SERVICE = "rlfleet.v1.WeightSyncService"


def add_to_server(servicer: WeightSyncServicer, server: grpc.Server) -> None:
    """The generated ``add_WeightSyncServiceServicer_to_server``, with frames for the two
    streaming methods: no deserialiser on PushVersion's requests and no serialiser
    on PullVersion's responses (the servicer takes and yields bytes)."""
    ws = weightsync_pb2
    handlers = {
        "PushVersion": grpc.stream_unary_rpc_method_handler(
            servicer.PushVersion,
            request_deserializer=None,
            response_serializer=common_pb2.PolicyVersion.SerializeToString,
        ),
        "PullVersion": grpc.unary_stream_rpc_method_handler(
            servicer.PullVersion,
            request_deserializer=ws.PullVersionRequest.FromString,
            response_serializer=None,
        ),
        "GetCurrent": grpc.unary_unary_rpc_method_handler(
            servicer.GetCurrent,
            request_deserializer=ws.GetCurrentRequest.FromString,
            response_serializer=common_pb2.PolicyVersion.SerializeToString,
        ),
        "ReportHeld": grpc.unary_unary_rpc_method_handler(
            servicer.ReportHeld,
            request_deserializer=ws.ReportHeldRequest.FromString,
            response_serializer=ws.ReportHeldResponse.SerializeToString,
        ),
        "ListReplicas": grpc.unary_unary_rpc_method_handler(
            servicer.ListReplicas,
            request_deserializer=ws.ListReplicasRequest.FromString,
            response_serializer=ws.ListReplicasResponse.SerializeToString,
        ),
        "GetDataPlane": grpc.unary_unary_rpc_method_handler(
            servicer.GetDataPlane,
            request_deserializer=ws.GetDataPlaneRequest.FromString,
            response_serializer=ws.DataPlane.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
