"""How the scheduler forms a collective job's weight group (scheduler/weight_groups.py)
with the replicas that can join it, on real rollout servers (sim engines) over gRPC.

The trainer is a stand-in that opens a real ``WeightSender`` (gloo, loopback) for each
OpenWeightGroup, as ``TrainerJob.open_weight_group`` does, and records the calls; the
replicas' joins are the real JoinWeightGroup. One replica claims a GPU
(``weights_device``) so that an nccl group has a member that accepts: no GPU here, so
its receiver never connects, which this test does not need.

- gloo: every replica joins, the group forms (the sender is usable), it covers them;
- nccl: replicas without a GPU refuse with a sentence, the group is opened again with
  the one that accepted, and does not cover the fleet (so the trainer publishes in the
  foreground); when none accepts, the trainer's group is closed (world size 0) and the
  scheduler does not try again until the replicas change;
- a trainer that refuses to open a group (nccl on a CPU trainer, a restart) costs the
  step its broadcast, not the job: the scheduler tries again before the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from rlfleet.common.config import ServiceConfig
from rlfleet.common.errors import FailedPrecondition
from rlfleet.common.grpc_server import start_server
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.procs import free_port
from rlfleet.common.weight_group import GroupAddress, WeightSender
from rlfleet.rollout.core import RolloutCore
from rlfleet.rollout.servicer import RolloutServicer
from rlfleet.rollout.sim_engine import SimEngine
from rlfleet.scheduler.discovery import StaticDiscovery
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.scheduler.weight_groups import WeightGroups
from rlfleet.v1 import common_pb2, rollout_pb2_grpc


class _GpuSimEngine(SimEngine):
    """A sim engine that says its weights live on a GPU (a stand-in: none here)."""

    @property
    def weights_device(self) -> str:
        return "cuda:0"


@dataclass
class _Trainer:
    """OpenWeightGroup as the trainer serves it: a real sender per group, the last kept."""

    opened: list[tuple[int, str]] = field(default_factory=list)
    sender: WeightSender | None = None

    refuse: str = ""  # a sentence: the trainer refuses to open a group

    def open_weight_group(self, job_id: str, world_size: int, backend: str = ""):
        self.opened.append((world_size, backend))
        if self.refuse:
            raise FailedPrecondition(self.refuse)
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        if world_size == 0:
            return common_pb2.WeightGroupAddress()
        address = GroupAddress("127.0.0.1", free_port(), world_size, time.time_ns() // 1000,
                               backend or "gloo")  # fmt: skip
        self.sender = WeightSender(address, timeout_s=20)
        return common_pb2.WeightGroupAddress(host=address.host, port=address.port,
                                             world_size=world_size,
                                             generation=address.generation,
                                             backend=address.backend)  # fmt: skip


@pytest.fixture
def fleet():
    """Two replicas on the CPU and one that claims a GPU, each a real gRPC server."""
    cores, servers = [], []
    for i, engine in enumerate([SimEngine(), SimEngine(), _GpuSimEngine()]):
        core = RolloutCore(engine, replica_id=f"r{i}")
        server = start_server(
            ServiceConfig(host="127.0.0.1", port=0),
            lambda s, c=core: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(
                RolloutServicer(c), s
            ),
            service_names=["rlfleet.v1.RolloutService"], max_workers=4, metrics=False,
        )  # fmt: skip
        cores.append(core)
        servers.append(server)
    yield [f"127.0.0.1:{s.port}" for s in servers]
    for core, server in zip(cores, servers, strict=True):
        server.stop()
        core.close()


def _groups(addresses: list[str]) -> tuple[WeightGroups, _Trainer, ReplicaPool]:
    pool = ReplicaPool(StaticDiscovery(addresses))
    assert len(pool.refresh()) == len(addresses)
    trainer = _Trainer()
    return WeightGroups(pool, trainer, join_timeout_s=5), trainer, pool


def _spec(backend: str) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"path": "/nonexistent"}, "task": {"name": "basic_arithmetic"},
        "weights": {"transport": "collective", "group_backend": backend},
    })  # fmt: skip


def test_a_gloo_group_holds_every_replica(fleet):
    groups, trainer, _ = _groups(fleet[:2])
    spec = _spec("gloo")
    groups.ensure("j", spec)
    assert trainer.opened == [(3, "gloo")]
    assert trainer.sender.usable, trainer.sender.broken  # both replicas really joined
    assert groups.covers("j", spec)
    groups.ensure("j", spec)  # nothing changed: no new group
    assert len(trainer.opened) == 1
    groups.after_step("j", {"weights_broadcast": 0.0})  # a failed broadcast: form anew
    groups.ensure("j", spec)
    assert len(trainer.opened) == 2 and trainer.sender.usable


def test_replicas_without_a_gpu_stay_out_of_an_nccl_group(fleet, caplog):
    groups, trainer, pool = _groups(fleet)
    spec = _spec("nccl")
    groups.ensure("j", spec)
    # All three asked; the two CPU replicas refused; the group opened again with the one
    # that claims a GPU (rank 1 of 2).
    assert trainer.opened == [(4, "nccl"), (2, "nccl")]
    assert "engine runs on cpu; an nccl weight group needs its GPU" in caplog.text
    assert not groups.covers("j", spec)  # the others get versions from weight-sync


def test_an_nccl_group_nobody_can_join_is_closed_and_not_retried(fleet):
    groups, trainer, _ = _groups(fleet[:2])
    spec = _spec("nccl")
    groups.ensure("j", spec)
    assert trainer.opened == [(3, "nccl"), (0, "")]  # refused by both: closed
    assert trainer.sender is None and not groups.covers("j", spec)
    groups.after_step("j", {"weights_broadcast": 0.0})  # no group to re-form
    groups.ensure("j", spec)
    assert len(trainer.opened) == 2


def test_a_trainer_that_opens_no_group_is_asked_again_next_step(fleet, caplog):
    groups, trainer, _ = _groups(fleet[:2])
    spec = _spec("nccl")
    trainer.refuse = "this trainer trains on cpu; an nccl weight group needs a GPU"
    groups.ensure("j", spec)  # does not raise: the step goes on through weight-sync
    assert "the trainer opened no weight group (this trainer trains on cpu" in caplog.text
    assert not groups.covers("j", spec)
    groups.ensure("j", spec)
    assert trainer.opened == [(3, "nccl"), (3, "nccl")]  # asked again
