"""Keeps each collective job's weight group (``common/weight_group.py``) matched to the
replicas that serve it.

Before a TrainStep the scheduler makes sure the job's group holds the healthy replicas
it uses: when the set changed (a late joiner, a dropped replica) or the trainer reported
the last broadcast failed (``weights_broadcast`` = 0 in the step metrics), it asks the
trainer for a new group (``OpenWeightGroup``, with the job's ``weights.group_backend``)
and tells each replica its rank (``JoinWeightGroup``). A group is formed of those that
join: when one refuses (a replica without a GPU asked into an nccl group) or cannot be
reached, the group is opened again without it, once; when none can join, the trainer's
group is closed. A replica left out still gets every version from weight-sync, so a
group that cannot be formed costs speed, never a version.
"""

from __future__ import annotations

import contextlib
import logging

from rlfleet.common.errors import RlfleetError
from rlfleet.common.grpc_client import call
from rlfleet.common.jobspec import JobSpec
from rlfleet.scheduler.clients import ServiceClients
from rlfleet.scheduler.pool import Replica, ReplicaPool
from rlfleet.v1 import rollout_pb2

logger = logging.getLogger(__name__)


class WeightGroups:
    def __init__(self, pool: ReplicaPool, clients: ServiceClients, *, join_timeout_s: float = 10.0):
        self.pool = pool
        self.clients = clients
        self.join_timeout_s = join_timeout_s
        self._members: dict[str, tuple[str, ...]] = {}  # job -> replicas it was formed for
        self._joined: dict[str, tuple[str, ...]] = {}  # job -> replicas in its group, rank order

    def ensure(self, job_id: str, spec: JobSpec) -> None:
        """The job's group holds its healthy replicas that can join (a new group when the
        healthy set changed)."""
        if spec.weights.transport != "collective":
            return
        replicas = sorted(self.pool.healthy(limit=spec.resources.rollout_replicas),
                          key=lambda r: r.address)  # fmt: skip
        members = tuple(r.address for r in replicas)
        if not members or self._members.get(job_id) == members:
            return
        backend = spec.weights.group_backend
        try:
            joined = self._form(job_id, replicas, backend)
            if 0 < len(joined) < len(replicas):  # again without those that could not join
                again = self._form(job_id, joined, backend)
                joined = again if len(again) == len(joined) else []
        except RlfleetError as exc:  # tried again before the next step
            logger.warning("job %s: the trainer opened no weight group (%s); the replicas get "
                           "this version from weight-sync", job_id, exc.message)  # fmt: skip
            self._members.pop(job_id, None)
            self._joined.pop(job_id, None)
            return
        if not joined:  # the trainer stops broadcasting until the replicas change
            with contextlib.suppress(RlfleetError):  # a restarted trainer has no group
                self.clients.open_weight_group(job_id, 0)
        self._members[job_id] = members
        self._joined[job_id] = tuple(r.address for r in joined)

    def _form(self, job_id: str, replicas: list[Replica], backend: str) -> list[Replica]:
        """Opens a group for the trainer and ``replicas``; those whose join succeeded."""
        group = self.clients.open_weight_group(job_id, len(replicas) + 1, backend)
        joined = []
        for rank, replica in enumerate(replicas, start=1):
            request = rollout_pb2.JoinWeightGroupRequest(job_id=job_id, group=group, rank=rank)
            try:
                call(replica.stub.JoinWeightGroup, request, timeout=self.join_timeout_s,
                     deadline=self.join_timeout_s)  # fmt: skip
                joined.append(replica)
            except RlfleetError as exc:  # it misses the group; weight-sync still serves it
                logger.warning("rollout replica %s did not join the weight group: %s",
                               replica, exc.message)  # fmt: skip
        logger.info("job %s: weight group %d (%s) of the trainer and %d of %d replicas", job_id,
                    group.generation, group.backend, len(joined), len(replicas))  # fmt: skip
        return joined

    def covers(self, job_id: str, spec: JobSpec) -> bool:
        """The job's group holds every healthy replica it uses: a broadcast reaches them all,
        so the trainer may publish to weight-sync in the background (TrainStep)."""
        joined = self._joined.get(job_id)
        healthy = self.pool.healthy(limit=spec.resources.rollout_replicas)
        return bool(joined) and joined == tuple(sorted(r.address for r in healthy))

    def after_step(self, job_id: str, metrics: dict[str, float]) -> None:
        """A broadcast that failed leaves the group: form a new one before the next step."""
        failed = metrics.get("weights_broadcast", 0.0) == 0.0  # missing: a restarted trainer
        if failed and self._joined.get(job_id):
            self._members.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        self._members.pop(job_id, None)
        self._joined.pop(job_id, None)
