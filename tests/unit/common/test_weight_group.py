"""The weight group (common/weight_group.py): a trainer broadcasting versions range by
range to replicas over a real gloo process group of their own, on loopback.

- every member receives exactly the payload bytes, verified, for version after version;
- a version abandoned midway, or whose checksum does not match, is never handed over;
- a replica killed (-9) mid-broadcast: the trainer's send fails and the group is
  marked broken (the caller falls back to weight-sync), the other replica hands over
  no half version;
- the trainer killed (-9) mid-broadcast: the replicas hand over no half version;
- members that stage their bytes through a small bucket on their device (the nccl
  path's code, here on the CPU) receive the same bytes, whoever else stages or not;
- a backend other than gloo and nccl, or nccl where torch has none, is a clear error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from rlfleet.common.procs import free_port
from rlfleet.common.weight_group import GroupAddress, WeightReceiver, WeightSender
from rlfleet.common.weights import checksum_of


def _address(world: int) -> GroupAddress:
    return GroupAddress("127.0.0.1", free_port(), world, generation=time.time_ns())


def _receiver(address: GroupAddress, rank: int, **staging) -> WeightReceiver:
    return WeightReceiver(address, rank, job_id="j", alloc=bytearray, release=lambda _: None,
                          **staging)  # fmt: skip


def _wait_for(receiver: WeightReceiver, version: int, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = receiver.take("j", version)
        if got is not None:
            return got
        time.sleep(0.01)
    return None


def _send(sender: WeightSender, version: int, payload: bytearray, cut: int = 3) -> bool:
    """Sends ``payload`` in ``cut`` ranges, as the trainer does bucket by bucket."""
    ok = sender.begin(version, len(payload))
    bounds = [len(payload) * i // cut for i in range(cut + 1)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        ok = ok and sender.send(payload, start, end)
    return ok and sender.end(checksum_of(payload))


def test_every_replica_receives_each_version_exactly():
    address = _address(3)
    receivers = [_receiver(address, rank) for rank in (1, 2)]
    sender = WeightSender(address, timeout_s=30)
    for version in (1, 2, 3):
        payload = bytearray(os.urandom(300_000 + version))
        assert _send(sender, version, payload)
        for r in receivers:
            got = _wait_for(r, version)
            assert got is not None and bytes(got.payload) == bytes(payload)
            assert got.checksum == checksum_of(payload)
    assert not sender.broken


def test_members_staging_through_a_bucket_receive_the_same_bytes():
    """The path of an nccl group (host → device bucket → broadcast → bucket → host), run
    on the CPU with a 4099-byte bucket: ranges straddle buckets, a range is shorter than
    one, and a receiver that moves bytes in place sits in the same group."""
    address = _address(3)
    staged = _receiver(address, 1, staged=True)
    in_place = _receiver(address, 2)
    sender = WeightSender(address, timeout_s=30, staged=True, chunk_bytes=4099)
    for version, size in ((1, 100_003), (2, 17)):
        payload = bytearray(os.urandom(size))
        assert _send(sender, version, payload, cut=7)
        for r in (staged, in_place):
            got = _wait_for(r, version)
            assert got is not None and bytes(got.payload) == bytes(payload)
    assert not sender.broken and not staged.broken


@pytest.mark.parametrize(
    ("backend", "message"),
    [("mpi", "backend 'mpi' is not supported; use one of gloo, nccl"),
     pytest.param("nccl", "this torch build has no NCCL", marks=pytest.mark.skipif(
         __import__("torch").distributed.is_nccl_available(), reason="torch has NCCL here"))],
)  # fmt: skip
def test_a_backend_the_group_cannot_use_is_a_clear_error(backend, message):
    address = GroupAddress("127.0.0.1", free_port(), 2, time.time_ns(), backend=backend)
    sender = WeightSender(address, timeout_s=5)
    assert not sender.usable and message in sender.broken


def test_an_abandoned_or_corrupt_version_is_never_handed_over():
    address = _address(2)
    receiver = _receiver(address, 1)
    sender = WeightSender(address, timeout_s=30)
    payload = bytearray(os.urandom(10_000))
    assert sender.begin(1, len(payload)) and sender.send(payload, 0, 5000)
    sender.abandon()  # the trainer gave version 1 up midway
    assert _send(sender, 2, payload)
    assert _wait_for(receiver, 2) is not None
    assert receiver.take("j", 1) is None
    # A checksum that does not match the bytes: dropped, and the replica leaves.
    assert sender.begin(3, len(payload)) and sender.send(payload, 0, len(payload))
    sender.end(checksum_of(b"something else"))
    assert _wait_for(receiver, 3, timeout=2.0) is None
    end = time.monotonic() + 10
    while not receiver.broken and time.monotonic() < end:
        time.sleep(0.05)
    assert "checksum mismatch" in receiver.broken


_MEMBER = textwrap.dedent(
    """
    import os, sys, time
    from rlfleet.common.weight_group import GroupAddress, WeightReceiver, WeightSender
    role, port, world, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    address = GroupAddress("127.0.0.1", port, world, gen)
    if role == "receiver":
        WeightReceiver(address, 2, job_id="j", alloc=bytearray, release=lambda _: None)
        time.sleep(600)
    else:  # a trainer that dies midway through a 64 MB version
        sender = WeightSender(address, timeout_s=30)
        payload = bytearray(64 << 20)
        sender.begin(1, len(payload))
        sender.send(payload, 0, 1 << 20)
        print("sent", flush=True)
        time.sleep(600)
    """
)


def _member(role: str, address: GroupAddress) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _MEMBER, role, str(address.port), str(address.world_size),
         str(address.generation)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_replica_killed_mid_broadcast_breaks_the_group_and_no_half_version_is_served():
    address = _address(3)
    survivor = _receiver(address, 1)
    victim = _member("receiver", address)  # rank 2, in a process of its own
    sender = WeightSender(address, timeout_s=20)
    try:
        payload = bytearray(os.urandom(200_000))
        assert _send(sender, 1, payload)
        assert _wait_for(survivor, 1) is not None
        assert sender.begin(2, len(payload)) and sender.send(payload, 0, 1000)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        ok = sender.send(payload, 1000, len(payload)) and sender.end(checksum_of(payload))
        assert not ok and sender.broken  # the trainer moves on without the group
        assert _wait_for(survivor, 2, timeout=2.0) is None
    finally:
        victim.kill()


def test_the_trainer_killed_mid_broadcast_leaves_no_half_version():
    address = _address(2)
    receiver = _receiver(address, 1)
    trainer = _member("sender", address)  # rank 0, in a process of its own
    try:
        assert trainer.stdout.readline().strip() == "sent"
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        end = time.monotonic() + 30
        while not receiver.broken and time.monotonic() < end:
            time.sleep(0.05)
        assert receiver.broken  # the group is gone: LoadVersion pulls from weight-sync
        assert receiver.take("j", 1) is None
    finally:
        trainer.kill()


@pytest.mark.parametrize("rank", [0, 2])
def test_join_refuses_a_rank_outside_the_replicas(rank, tmp_path):
    from rlfleet.common.errors import InvalidArgument
    from rlfleet.rollout.core import RolloutCore
    from rlfleet.rollout.sim_engine import SimEngine

    core = RolloutCore(SimEngine(), replica_id="r")
    with pytest.raises(InvalidArgument, match=r"rank .* outside the replicas' ranks 1\.\.1"):
        core.join_weight_group("j", _address(2), rank)
