"""VersionStore: verified pushes, forward-only versions, pulls, eviction and the spool."""

from __future__ import annotations

import pytest
import torch
from rlfleet.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from rlfleet.common.weights import (
    assemble,
    checksum_of,
    decode_state_dict,
    encode_state_dict,
    iter_chunks,
)
from rlfleet.weightsync.store import VersionStore

CHUNK = 1024  # small, so every payload travels as many chunks


def _chunks(payload: bytes, *, version: int, job_id: str = "job-a"):
    return list(iter_chunks(payload, job_id=job_id, version=version, chunk_bytes=CHUNK))


def _push(store: VersionStore, payload: bytes, version: int, job_id: str = "job-a"):
    return store.push(iter(_chunks(payload, version=version, job_id=job_id)))


@pytest.fixture
def payloads(make_state_dict) -> list[bytes]:
    return [encode_state_dict(make_state_dict(seed)) for seed in range(5)]


@pytest.fixture
def store() -> VersionStore:
    return VersionStore(keep_versions=3, chunk_bytes=CHUNK)


def test_push_pull_round_trip_of_a_state_dict(store, make_state_dict):
    state = make_state_dict(0)
    payload = encode_state_dict(state)
    info = _push(store, payload, 0)
    assert (info.version, info.checksum, info.num_bytes) == (0, checksum_of(payload), len(payload))

    pulled = list(store.pull("job-a", 0))
    assert len(pulled) > 1 and all(len(c.data) <= CHUNK for c in pulled)
    job_id, version, got, digest = assemble(pulled)  # what a replica does
    assert (job_id, version, digest) == ("job-a", 0, info.checksum)
    restored = decode_state_dict(got)
    assert restored.keys() == state.keys()
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor)


def test_corrupted_checksum_is_refused_and_previous_stays_current(store, payloads):
    _push(store, payloads[0], 0)
    chunks = _chunks(payloads[1], version=1)
    chunks[1].data = bytes([chunks[1].data[0] ^ 0xFF]) + chunks[1].data[1:]
    with pytest.raises(DataLoss, match="checksum"):
        store.push(iter(chunks))
    assert store.current("job-a").version == 0
    assert store.held_versions("job-a") == [0]


def test_torn_stream_is_refused_and_previous_stays_current(store, payloads):
    _push(store, payloads[0], 0)
    chunks = _chunks(payloads[1], version=1)
    with pytest.raises(DataLoss, match="torn"):
        store.push(iter(chunks[:-1]))  # the sender died before the last chunk
    with pytest.raises(DataLoss):
        store.push(iter([]))
    assert store.current("job-a").version == 0


def test_malformed_streams_are_invalid_argument(store, payloads):
    chunks = _chunks(payloads[0], version=1)
    with pytest.raises(InvalidArgument, match="offset"):
        store.push(iter([chunks[1], chunks[0], *chunks[2:]]))
    mixed = _chunks(payloads[0], version=1)
    mixed[1].version = 2
    with pytest.raises(InvalidArgument, match="mixed"):
        store.push(iter(mixed))
    with pytest.raises(InvalidArgument, match="job_id"):
        _push(store, payloads[0], 0, job_id="")
    with pytest.raises(InvalidArgument, match="version"):
        _push(store, payloads[0], -1)
    with pytest.raises(NotFound):
        store.current("job-a")


def test_versions_only_move_forward(store, payloads):
    _push(store, payloads[0], 0)
    _push(store, payloads[2], 2)
    with pytest.raises(FailedPrecondition, match="not newer"):
        _push(store, payloads[1], 1)
    with pytest.raises(FailedPrecondition, match="already held with a different payload"):
        _push(store, payloads[3], 2)
    assert store.current("job-a").version == 2


def test_identical_repush_is_idempotent(store, payloads):
    first = _push(store, payloads[0], 0)
    _push(store, payloads[1], 1)
    assert _push(store, payloads[1], 1) == store.current("job-a")  # retry of the current one
    assert _push(store, payloads[0], 0) == first  # retry of an older one still held
    assert store.current("job-a").version == 1


def test_late_joiner_gets_the_current_version(store, payloads):
    for v in range(3):
        _push(store, payloads[v], v)
    _, version, payload, _ = assemble(store.pull("job-a", 0))
    assert (version, payload) == (2, payloads[2])
    _, version, payload, _ = assemble(store.pull("job-a", 1))  # an explicit older one
    assert (version, payload) == (1, payloads[1])


def test_unknown_job_and_version_are_not_found(store, payloads):
    with pytest.raises(NotFound):
        store.pull("nobody", 0)
    _push(store, payloads[0], 0)
    with pytest.raises(NotFound, match="version 7"):
        store.pull("job-a", 7)
    with pytest.raises(InvalidArgument):
        store.pull("job-a", -1)


def test_only_the_newest_versions_are_kept(store, payloads):
    for v in range(5):
        _push(store, payloads[v], v)
    assert store.held_versions("job-a") == [2, 3, 4]
    with pytest.raises(NotFound):
        store.get("job-a", 1)


def test_jobs_are_independent(store, payloads):
    _push(store, payloads[0], 3, job_id="job-a")
    _push(store, payloads[1], 1, job_id="job-b")
    assert store.current("job-a").version == 3
    assert store.current("job-b").version == 1
    assert sorted(store.jobs()) == ["job-a", "job-b"]


def test_restart_with_a_spool_serves_the_same_version(tmp_path, payloads):
    spool = tmp_path / "spool"
    before = VersionStore(keep_versions=2, spool_dir=spool, chunk_bytes=CHUNK)
    for v in range(4):
        _push(before, payloads[v], v)
    _push(before, payloads[0], 0, job_id="job.b_2")
    # A job id that could leave the spool, or that no filesystem takes, is refused.
    for bad in ("odd/../job id", "x" * 300):
        with pytest.raises(InvalidArgument, match="is not valid"):
            _push(before, payloads[0], 0, job_id=bad)
    # fsyncs run in the background; a stopping weight-sync lets them finish (a crash before
    # they do is test_spool_files.py's business).
    before.close()
    files = sorted(p.name for p in spool.rglob("*") if p.is_file())
    assert len(files) == 3  # 2 kept for job-a, 1 for job.b_2

    # A crash mid-write leaves a temporary file; it is never served.
    (next(spool.glob("job-job-a")) / ".tmp-deadbeef").write_bytes(b"half a version")

    after = VersionStore(keep_versions=2, spool_dir=spool, chunk_bytes=CHUNK)
    assert after.current("job-a") == before.current("job-a")
    assert after.held_versions("job-a") == [2, 3]
    _, version, payload, _ = assemble(after.pull("job-a", 0))
    assert (version, payload) == (3, payloads[3])
    assert after.get("job-a", 2)[1] == payloads[2]  # read lazily from disk
    assert after.current("job.b_2").version == 0
    assert not list(spool.rglob(".tmp-*"))
    with pytest.raises(FailedPrecondition):
        _push(after, payloads[4], 3)
    _push(after, payloads[4], 4)


def test_a_damaged_spool_file_is_never_served(tmp_path, payloads):
    spool = tmp_path / "spool"
    before = VersionStore(keep_versions=3, spool_dir=spool, chunk_bytes=CHUNK)
    _push(before, payloads[0], 0)
    _push(before, payloads[1], 1)
    before.close()  # the fsyncs (in the background) are done: final names
    newest = max(spool.rglob("v*.safetensors"))
    newest.write_bytes(newest.read_bytes()[:-10])  # bit rot / a disk that lied about fsync

    after = VersionStore(keep_versions=3, spool_dir=spool, chunk_bytes=CHUNK)
    assert after.current("job-a").version == 0
    assert not newest.exists()
    _push(after, payloads[1], 1)  # the trainer can push it again
    assert after.current("job-a").version == 1
