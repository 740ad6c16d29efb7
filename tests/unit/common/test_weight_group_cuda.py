"""The weight group's GPU paths (common/weight_group.py); scripts/gpu_check.sh runs them,
and without CUDA they skip, which CI expects of `gpu` tests.

- one GPU: members that stage through a bucket on the GPU (the nccl path's staging)
  over gloo, which broadcasts CUDA tensors too: the bytes arrive exactly, in chunks that
  straddle ranges, beside a member that moves them in place on the CPU;
- two GPUs or more: a real nccl group, the trainer on cuda:0 and a replica on cuda:1,
  receives versions exactly; a replica killed (-9) mid-version makes the sender's next
  broadcast fail (blocking wait: an exception, not the end of the trainer's process);
  the trainer killed mid-version leaves the replica out of the group, holding nothing.
  NCCL refuses two ranks on one GPU, so one GPU skips these;
- a rollout replica whose torch engine is on the GPU joins an nccl group on its device.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from rlfleet.common.procs import free_port
from rlfleet.common.weight_group import GroupAddress, WeightReceiver, WeightSender
from rlfleet.common.weights import checksum_of
from test_weight_group import _send, _wait_for  # the CPU tests' helpers, same protocol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available(),
    reason="an nccl group needs two GPUs (NCCL refuses two ranks on one device)",
)


def _address(world: int, backend: str) -> GroupAddress:
    return GroupAddress("127.0.0.1", free_port(), world, time.time_ns(), backend)


def _receiver(address: GroupAddress, rank: int, **kw) -> WeightReceiver:
    return WeightReceiver(address, rank, job_id="j", alloc=bytearray, release=lambda _: None,
                          idle_timeout_s=60, **kw)  # fmt: skip


def test_gpu_staged_members_over_gloo_receive_exact_bytes():
    address = _address(3, "gloo")
    on_gpu = _receiver(address, 1, device="cuda:0")
    in_place = _receiver(address, 2)
    sender = WeightSender(address, timeout_s=60, device="cuda:0", chunk_bytes=1 << 20)
    for version in (1, 2):
        payload = bytearray(os.urandom((5 << 20) + 12345 * version))
        assert _send(sender, version, payload, cut=5), sender.broken
        for r in (on_gpu, in_place):
            got = _wait_for(r, version)
            assert got is not None and bytes(got.payload) == bytes(payload), r.broken


@two_gpus
def test_an_nccl_group_across_two_gpus_receives_each_version_exactly():
    address = _address(2, "nccl")
    replica = _receiver(address, 1, device="cuda:1")
    sender = WeightSender(address, timeout_s=60, device="cuda:0", chunk_bytes=4 << 20)
    for version in (1, 2, 3):
        payload = bytearray(os.urandom((64 << 20) + version))
        assert _send(sender, version, payload, cut=5), sender.broken
        got = _wait_for(replica, version)
        assert got is not None and bytes(got.payload) == bytes(payload), replica.broken


_VICTIM = """
import sys, time
from rlfleet.common.weight_group import GroupAddress, WeightReceiver
address = GroupAddress("127.0.0.1", int(sys.argv[1]), 2, int(sys.argv[2]), "nccl")
WeightReceiver(address, 1, job_id="j", alloc=bytearray, release=lambda _: None,
               device="cuda:1")
time.sleep(600)
"""


@two_gpus
def test_an_nccl_member_killed_mid_version_breaks_the_group_not_the_process():
    address = _address(2, "nccl")
    victim = subprocess.Popen([sys.executable, "-c", _VICTIM, str(address.port),
                               str(address.generation)])  # fmt: skip
    try:
        sender = WeightSender(address, timeout_s=20, device="cuda:0", chunk_bytes=1 << 20)
        payload = bytearray(os.urandom(8 << 20))
        assert _send(sender, 1, payload), sender.broken
        assert sender.begin(2, len(payload)) and sender.send(payload, 0, 1 << 20)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        ok = sender.send(payload, 1 << 20, len(payload)) and sender.end(checksum_of(payload))
        assert not ok and sender.broken  # an exception here; this process lives on
    finally:
        victim.kill()


_TRAINER = """
import sys, time
from rlfleet.common.weight_group import GroupAddress, WeightSender
address = GroupAddress("127.0.0.1", int(sys.argv[1]), 2, int(sys.argv[2]), "nccl")
sender = WeightSender(address, timeout_s=60, device="cuda:0", chunk_bytes=1 << 20)
payload = bytearray(8 << 20)
sender.begin(1, len(payload))
sender.send(payload, 0, 1 << 20)
print("sent", flush=True)
time.sleep(600)
"""


@two_gpus
def test_the_trainer_killed_mid_version_over_nccl_leaves_no_half_version():
    address = _address(2, "nccl")
    replica = _receiver(address, 1, device="cuda:1")
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, str(address.port),
                                str(address.generation)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert trainer.stdout.readline().strip() == "sent"
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        end = time.monotonic() + 60  # the control group's connection closes with it
        while not replica.broken and time.monotonic() < end:
            time.sleep(0.05)
        assert replica.broken and replica.take("j", 1) is None
    finally:
        trainer.kill()


def test_a_replica_on_the_gpu_joins_an_nccl_group_on_its_device(monkeypatch):
    from rlfleet.rollout.core import RolloutCore
    from rlfleet.rollout.torch_engine import TorchEngine

    engine = TorchEngine(device="cuda", dtype="float32")
    assert engine.weights_device == f"cuda:{torch.cuda.current_device()}"
    core = RolloutCore(engine, replica_id="r")
    joined = {}
    monkeypatch.setattr("rlfleet.common.weight_group.WeightReceiver",
                        lambda *a, **kw: joined.update(kw) or _Closable())  # fmt: skip
    core.join_weight_group("j", _address(2, "nccl"), 1)
    assert joined["device"] == engine.weights_device


class _Closable:
    def close(self) -> None:
        pass
