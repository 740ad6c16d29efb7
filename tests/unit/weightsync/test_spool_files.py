"""Versions in mapped spool files (issue #16, item 2): structural properties, on 8 MB payloads.

- A version is received straight into a spool file and served from a MAP_SHARED mapping
  of it (page cache), over the data plane and over gRPC.
- At most keep_versions files per job are in the spool, the one arriving counted; the
  oldest version no replica is pulling is evicted first; when all are being pulled the
  push waits, then is refused with UNAVAILABLE (retryable).
- A version is current (served) before its fsync completes; a restart trusts only
  versions whose fsync completed (one that had not is read back against its checksum
  and fsynced first, or removed when it is torn).
- The spool disk and, without a spool, the memory a job needs are checked from the
  push's size, with a sentence naming the setting.

No timing is asserted: a slow fsync is a gate the test opens.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
from collections import namedtuple
from pathlib import Path

import pytest
from rlfleet.common import weight_transport as wt
from rlfleet.common.errors import FailedPrecondition, Unavailable
from rlfleet.common.weights import assemble, checksum_of, encode_frames
from rlfleet.weightsync import budget as budget_mod
from rlfleet.weightsync.config import WeightSyncConfig
from rlfleet.weightsync.dataplane import DataPlane
from rlfleet.weightsync.spool import UNSYNCED, Spool
from rlfleet.weightsync.store import RECEIVED_BYTES, VersionStore

JOB = "job-sp"
SIZE = 8 << 20
CHUNK = 1 << 20


@pytest.fixture(scope="module")
def payloads() -> list[bytes]:
    return [os.urandom(SIZE) for _ in range(6)]


def _spool_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.rglob("*") if p.is_file())


@pytest.fixture
def serve(tmp_path):
    planes = []

    def start(**kwargs) -> tuple[VersionStore, tuple[str, int]]:
        kwargs.setdefault("spool_dir", tmp_path / "spool")
        store = VersionStore(chunk_bytes=CHUNK, **kwargs)
        plane = DataPlane(store, host="127.0.0.1", port=0, max_version_bytes=1 << 30).start()
        planes.append((store, plane))
        return store, ("127.0.0.1", plane.port)

    yield start
    for store, plane in planes:
        plane.stop()
        store.close(timeout=10)


def _push(address, payload: bytes, version: int) -> dict:
    return wt.push(address, job_id=JOB, version=version, parts=[payload],
                   checksum=checksum_of(payload), timeout=30)  # fmt: skip


def _pull(address, version: int = 0) -> wt.Pulled:
    return wt.pull(address, job_id=JOB, version=version, replica_id="r", timeout=30)


def _frames(payload: bytes, version: int):
    return encode_frames(payload, job_id=JOB, version=version, chunk_bytes=CHUNK)


@pytest.fixture
def fsync_gate(monkeypatch, tmp_path):
    """fsync made slow: the background fsync thread of the store ``serve`` starts waits
    until the test opens the gate (other spools, e.g. restarts on copies, are not held)."""
    gate = threading.Event()
    gate.set()
    real_file, real_dir = Spool.sync_file, Spool.sync_dir
    held_root = tmp_path / "spool"

    def held(real):
        def call(self, arg):
            if threading.current_thread().name == "weightsync-fsync" and self.root == held_root:
                assert gate.wait(60), "the test never opened the fsync gate"
            return real(self, arg)

        return call

    monkeypatch.setattr(Spool, "sync_file", held(real_file))
    monkeypatch.setattr(Spool, "sync_dir", held(real_dir))
    yield gate
    gate.set()


def test_the_default_keeps_two_versions_counting_the_one_arriving():
    assert WeightSyncConfig().keep_versions == 2
    assert VersionStore().keep_versions == 2


def test_a_version_is_served_from_a_shared_mapping_of_its_spool_file(serve, payloads):
    store, address = serve(keep_versions=2)
    _push(address, payloads[0], 1)  # the data plane
    store.push_frames(_frames(payloads[1], 2))  # gRPC
    maps = Path("/proc/self/maps").read_text().splitlines()
    for version, payload in ((1, payloads[0]), (2, payloads[1])):
        held = store._job(JOB).versions[version]
        assert held.frames is None  # nothing kept in memory beside the file
        name = f"v{version:020d}."  # before or after the fsync renamed it
        lines = [line for line in maps if name in line and str(store.spool.root) in line]
        assert lines, f"version {version} is not mapped from its file"
        assert all(line.split()[1].endswith("s") for line in lines)  # MAP_SHARED
        assert bytes(_pull(address, version).payload) == payload
        assert assemble(store.pull(JOB, version))[2] == payload  # gRPC pullers too


def test_never_more_than_keep_versions_files_the_arriving_one_counted(serve, payloads, tmp_path):
    store, address = serve(keep_versions=2)
    spool = tmp_path / "spool"
    during = []
    for version, payload in enumerate(payloads[:4], start=1):
        header = {"op": "push", "job_id": JOB, "version": version, "num_bytes": SIZE,
                  "checksum": checksum_of(payload)}  # fmt: skip
        with socket.create_connection(address, timeout=30) as sock:
            wt.send_header(sock, header)
            assert wt.recv_header(sock) == {"ok": True, "send": True}
            sock.sendall(payload[: SIZE // 2])
            during.append(_spool_files(spool))  # half of it has arrived
            sock.sendall(payload[SIZE // 2 :])
            assert wt.recv_header(sock)["version"] == version
        assert len(_spool_files(spool)) == min(version, 2)
    assert [len(files) for files in during] == [1, 2, 2, 2]
    assert all(any(name.startswith(".tmp-") for name in files) for files in during)
    assert store.held_versions(JOB) == [3, 4]

    def counting(payload: bytes, version: int):  # a gRPC push, counted mid-stream
        for i, frame in enumerate(_frames(payload, version)):
            if i == 4:
                during.append(_spool_files(spool))
            yield frame

    store.push_frames(counting(payloads[4], 5))
    assert len(during[-1]) == 2 and store.held_versions(JOB) == [4, 5]
    store.flush(timeout=30)
    assert len(_spool_files(spool)) == 2


def test_a_version_is_current_before_its_fsync_completes(serve, payloads, fsync_gate, tmp_path):
    store, address = serve(keep_versions=2)
    fsync_gate.clear()  # fsync takes until the gate opens
    assert _push(address, payloads[0], 1)["version"] == 1  # the reply did not wait for it
    assert store.current(JOB).version == 1
    assert not store.durable(JOB, 1)
    (unsynced,) = _spool_files(tmp_path / "spool")
    assert unsynced.endswith(UNSYNCED)
    assert bytes(_pull(address).payload) == payloads[0]  # served meanwhile
    store.push_frames(_frames(payloads[1], 2))  # over gRPC as well
    assert store.current(JOB).version == 2 and not store.durable(JOB, 2)

    fsync_gate.set()
    assert store.flush(timeout=30)
    assert store.durable(JOB, 1) and store.durable(JOB, 2)
    files = _spool_files(tmp_path / "spool")
    assert len(files) == 2 and not any(name.endswith(UNSYNCED) for name in files)
    assert bytes(_pull(address).payload) == payloads[1]  # the mapping outlived the rename


def test_a_restart_trusts_only_fsynced_versions(serve, payloads, fsync_gate, tmp_path):
    store, address = serve(keep_versions=3)
    _push(address, payloads[0], 1)
    assert store.flush(timeout=30) and store.durable(JOB, 1)
    fsync_gate.clear()
    _push(address, payloads[1], 2)  # current, its fsync not done
    assert not store.durable(JOB, 2)
    spool = tmp_path / "spool"
    machine_crash, process_crash = tmp_path / "machine-crash", tmp_path / "process-crash"
    shutil.copytree(spool, machine_crash)
    shutil.copytree(spool, process_crash)

    # A crash of the machine loses pages that were never fsynced: version 2's file is torn.
    (torn,) = machine_crash.rglob("*" + UNSYNCED)
    with open(torn, "r+b") as fh:
        fh.seek(SIZE // 2)
        fh.write(bytes(SIZE // 2))
    after = VersionStore(keep_versions=3, spool_dir=machine_crash, chunk_bytes=CHUNK)
    try:
        assert after.current(JOB).version == 1  # the fsynced version, not the torn one
        assert after.held_versions(JOB) == [1]
        assert not list(machine_crash.rglob("*" + UNSYNCED))
        after.push_frames(_frames(payloads[1], 2))  # the trainer can push it again
        assert after.get(JOB, 2)[1] == payloads[1]
    finally:
        after.close(timeout=30)

    # A crash of the process leaves the page cache whole: version 2 is read back against
    # its checksum and fsynced before it is trusted again.
    after = VersionStore(keep_versions=3, spool_dir=process_crash, chunk_bytes=CHUNK)
    try:
        assert after.current(JOB).version == 2 and after.durable(JOB, 2)
        assert after.get(JOB, 2)[1] == payloads[1]
        assert not list(process_crash.rglob("*" + UNSYNCED))
    finally:
        after.close(timeout=30)


def test_the_oldest_version_nobody_pulls_is_evicted(serve, payloads):
    store, address = serve(keep_versions=3)
    for version in (1, 2, 3):
        _push(address, payloads[version], version)
    with store.reading_views(JOB, 1):  # a lagging replica pulls version 1
        _push(address, payloads[4], 4)
        assert store.held_versions(JOB) == [1, 3, 4]  # 2 went, not 1
    assert store.flush(timeout=30)
    assert len(_spool_files(store.spool.root)) == 3


def test_a_push_waits_for_a_pull_to_end_when_every_candidate_is_pulled(serve, payloads):
    store, address = serve(keep_versions=2)
    _push(address, payloads[0], 1)
    _push(address, payloads[1], 2)
    done = []
    with store.reading_views(JOB, 1) as (_, views):
        # 2 is current, 1 is being pulled: no room for 3 until the pull ends.
        pusher = threading.Thread(target=lambda: done.append(_push(address, payloads[2], 3)))
        pusher.start()
        pusher.join(0.5)
        assert pusher.is_alive() and not done
        assert store.held_versions(JOB) == [1, 2]
        assert bytes(views[0]) == payloads[0]  # the puller reads on, undisturbed
    pusher.join(30)
    assert done and done[0]["version"] == 3
    assert store.held_versions(JOB) == [2, 3]


def test_a_push_is_refused_retryably_when_no_pull_ends_in_time(serve, payloads):
    store, address = serve(keep_versions=2, evict_wait_s=0.2)
    _push(address, payloads[0], 1)
    _push(address, payloads[1], 2)
    with store.reading_views(JOB, 1):
        with pytest.raises(Unavailable, match=r"keep_versions 2 .* evict_wait_s 0.2 s"):
            _push(address, payloads[2], 3)
        with pytest.raises(Unavailable, match="retry the push"):
            store.push_frames(_frames(payloads[2], 3))
    assert store.held_versions(JOB) == [1, 2]
    assert _push(address, payloads[2], 3)["version"] == 3  # the retry, once the pull ended


def test_evicting_the_only_durable_version_waits_for_the_newer_fsync(serve, payloads, fsync_gate):
    store, address = serve(keep_versions=2)
    _push(address, payloads[0], 1)
    assert store.flush(timeout=30)
    fsync_gate.clear()
    _push(address, payloads[1], 2)  # served at once, not durable yet
    done = []
    pusher = threading.Thread(target=lambda: done.append(_push(address, payloads[2], 3)))
    pusher.start()
    pusher.join(0.5)
    # Evicting 1 now would leave no durable version if the machine crashed.
    assert pusher.is_alive() and store.held_versions(JOB) == [1, 2]
    fsync_gate.set()
    pusher.join(30)
    assert done and store.held_versions(JOB) == [2, 3] and store.durable(JOB, 2)


Usage = namedtuple("Usage", "total used free")


def test_a_job_that_does_not_fit_the_spool_disk_is_refused_before_any_byte(
    serve, payloads, monkeypatch, tmp_path
):
    store, address = serve(keep_versions=2)
    monkeypatch.setattr(budget_mod.shutil, "disk_usage", lambda path: Usage(1e12, 0, 12_000_000))
    before = RECEIVED_BYTES._value.get()
    with pytest.raises(FailedPrecondition) as info:
        _push(address, payloads[0], 1)
    assert info.value.message == (
        f"job {JOB}: a version of 8.4 MB × keep_versions 2 needs 16.8 MB of spool disk; "
        f"{tmp_path / 'spool'} (spool_dir) has 12.0 MB free. "
        "Lower keep_versions or give the spool more room."
    )
    assert RECEIVED_BYTES._value.get() == before  # refused before the payload was sent
    # gRPC: checked once the stream has arrived (its size comes last), when its file is
    # already written: it counts as free room again.
    monkeypatch.setattr(
        budget_mod.shutil, "disk_usage", lambda path: Usage(1e12, 0, 12_000_000 - SIZE)
    )
    with pytest.raises(FailedPrecondition) as again:
        store.push_frames(_frames(payloads[0], 1))
    assert again.value.message == info.value.message
    assert _spool_files(tmp_path / "spool") == [] and store.held_versions(JOB) == []

    # The job's own files count as room: they are replaced as versions move on.
    monkeypatch.setattr(budget_mod.shutil, "disk_usage", lambda path: Usage(1e12, 0, 20_000_000))
    _push(address, payloads[0], 1)
    monkeypatch.setattr(budget_mod.shutil, "disk_usage", lambda path: Usage(1e12, 0, 1_000_000))
    with pytest.raises(FailedPrecondition, match=r"has 1.0 MB free besides the 8.4 MB this job"):
        _push(address, payloads[1], 2)
    monkeypatch.setattr(budget_mod.shutil, "disk_usage", lambda path: Usage(1e12, 0, 9_000_000))
    _push(address, payloads[1], 2)  # 9 MB free + 8.4 MB of version 1 >= 16.8 MB
    assert store.held_versions(JOB) == [1, 2]


def test_without_a_spool_a_job_must_fit_the_memory_limit(payloads, tmp_path):
    cgroup = tmp_path / "memory.max"
    cgroup.write_text("20000000\n")  # 20 MB, as a container's cgroup would say
    store = VersionStore(keep_versions=3, memory_overhead_bytes=0, cgroup_memory_max=cgroup,
                         chunk_bytes=CHUNK)  # fmt: skip
    with pytest.raises(FailedPrecondition) as info:
        store.push_frames(_frames(payloads[0], 1))
    assert info.value.message.startswith(
        f"job {JOB}: a version of 8.4 MB × keep_versions 3 + memory_overhead_mb (0 bytes) "
        f"needs 25.2 MB of memory; weight-sync's memory limit is 20.0 MB (the cgroup limit in "
        f"{cgroup}). Set spool_dir"
    )
    assert store.held_versions(JOB) == []

    # No cgroup limit ("max"): memory_limit_mb is the limit; other jobs' versions count.
    cgroup.write_text("max\n")
    store = VersionStore(keep_versions=2, memory_overhead_bytes=0, cgroup_memory_max=cgroup,
                         memory_limit_bytes=20_000_000, chunk_bytes=CHUNK)  # fmt: skip
    store.push_frames(_frames(payloads[0], 1))
    other = encode_frames(payloads[1], job_id="other", version=1, chunk_bytes=CHUNK)
    with pytest.raises(
        FailedPrecondition, match=r"\+ 8.4 MB that other jobs hold.*memory_limit_mb"
    ):
        store.push_frames(other)


class _FullDisk:
    """``os`` as the spool's code sees it, on a disk that is full."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def _full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    posix_fallocate = write = _full


def test_a_full_spool_disk_is_a_sentence_and_leaves_no_file(serve, payloads, monkeypatch, tmp_path):
    from rlfleet.weightsync import spool as spool_mod
    from rlfleet.weightsync import store as store_mod

    store, address = serve(keep_versions=2)
    _push(address, payloads[0], 1)
    monkeypatch.setattr(spool_mod, "os", _FullDisk())  # fallocate, before the data plane receives
    monkeypatch.setattr(store_mod, "os", _FullDisk())  # write, as a gRPC push's chunks arrive
    with pytest.raises(FailedPrecondition, match=r"spool disk is full.*\(spool_dir\)"):
        _push(address, payloads[1], 2)
    with pytest.raises(FailedPrecondition, match=r"spool disk is full.*keep_versions"):
        store.push_frames(_frames(payloads[1], 2))
    monkeypatch.undo()
    assert store.current(JOB).version == 1
    assert not [name for name in _spool_files(tmp_path / "spool") if name.startswith(".tmp-")]
    assert _push(address, payloads[1], 2)["version"] == 2
