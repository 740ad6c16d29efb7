"""Keeps each collective job's weight group (``common/weight_group.py``) matched to the
replicas that serve it.

Before a TrainStep the scheduler makes sure the job's group holds the healthy replicas
it uses: when the set changed (a late joiner, a dropped replica) or the trainer reported
the last broadcast failed (``weights_broadcast`` = 0 in the step metrics), it asks the
trainer for a new group (``OpenWeightGroup``) and tells each replica its rank
(``JoinWeightGroup``). A replica left out or one whose join failed still gets every
version from weight-sync, so a group that cannot be formed costs speed, never a version.
"""

from __future__ import annotations

import logging

from rlfleet.common.errors import RlfleetError
from rlfleet.common.grpc_client import call
from rlfleet.common.jobspec import JobSpec
from rlfleet.scheduler.clients import ServiceClients
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.v1 import rollout_pb2

logger = logging.getLogger(__name__)


class WeightGroups:
    def __init__(self, pool: ReplicaPool, clients: ServiceClients, *, join_timeout_s: float = 10.0):
        self.pool = pool
        self.clients = clients
        self.join_timeout_s = join_timeout_s
        self._members: dict[str, tuple[str, ...]] = {}  # job -> replica addresses, rank order

    def ensure(self, job_id: str, spec: JobSpec) -> None:
        """The job's group holds its healthy replicas (a new group when they changed)."""
        if spec.weights.transport != "collective":
            return
        replicas = sorted(self.pool.healthy(limit=spec.resources.rollout_replicas),
                          key=lambda r: r.address)  # fmt: skip
        members = tuple(r.address for r in replicas)
        if not members or self._members.get(job_id) == members:
            return
        group = self.clients.open_weight_group(job_id, len(members) + 1)
        for rank, replica in enumerate(replicas, start=1):
            request = rollout_pb2.JoinWeightGroupRequest(job_id=job_id, group=group, rank=rank)
            try:
                call(replica.stub.JoinWeightGroup, request, timeout=self.join_timeout_s,
                     deadline=self.join_timeout_s)  # fmt: skip
            except RlfleetError as exc:  # it misses the group; weight-sync still serves it
                logger.warning("rollout replica %s did not join the weight group: %s",
                               replica, exc.message)  # fmt: skip
        self._members[job_id] = members
        logger.info("job %s: weight group %d of the trainer and %d replicas", job_id,
                    group.generation, len(members))  # fmt: skip

    def covers(self, job_id: str, spec: JobSpec) -> bool:
        """The job's group holds every healthy replica it uses: a broadcast reaches them all,
        so the trainer may publish to weight-sync in the background (TrainStep)."""
        members = self._members.get(job_id)
        healthy = self.pool.healthy(limit=spec.resources.rollout_replicas)
        return bool(members) and members == tuple(sorted(r.address for r in healthy))

    def after_step(self, job_id: str, metrics: dict[str, float]) -> None:
        """A broadcast that failed leaves the group: form a new one before the next step."""
        if metrics.get("weights_broadcast", 0.0) == 0.0:  # missing: a restarted trainer
            self._members.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        self._members.pop(job_id, None)
