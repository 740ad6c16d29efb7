"""gRPC adapter over ``VersionStore`` and the replica registry; no logic of its own."""

from __future__ import annotations

import logging

from rlfleet.v1 import common_pb2, weightsync_pb2, weightsync_pb2_grpc
from rlfleet.weightsync.replicas import ReplicaRegistry
from rlfleet.weightsync.store import VersionInfo, VersionStore

logger = logging.getLogger(__name__)


def _policy_version(info: VersionInfo) -> common_pb2.PolicyVersion:
    return common_pb2.PolicyVersion(
        version=info.version, sha256=info.sha256, num_bytes=info.num_bytes
    )


class WeightSyncServicer(weightsync_pb2_grpc.WeightSyncServiceServicer):
    def __init__(self, store: VersionStore, registry: ReplicaRegistry):
        self.store = store
        self.registry = registry

    def PushVersion(self, request_iterator, context) -> common_pb2.PolicyVersion:
        return _policy_version(self.store.push(request_iterator))

    def PullVersion(self, request: weightsync_pb2.PullVersionRequest, context):
        stream = self.store.pull(request.job_id, request.version)
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
