"""The weight data plane on real loopback sockets: a VersionStore served by
``DataPlane`` and reached with ``weight_transport`` — the same rules as over
gRPC (verify, forward only, idempotent repeat), clear errors, nothing stored
from a torn or corrupted push, and a server that survives bad peers.
"""

from __future__ import annotations

import socket
import struct

import pytest
from rlfleet.common import weight_transport as wt
from rlfleet.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from rlfleet.common.weights import (
    assemble_frames,
    checksum_of,
    decode_state_dict,
    encode_state_dict,
)
from rlfleet.weightsync.dataplane import DataPlane
from rlfleet.weightsync.store import RECEIVED_BYTES, VersionStore

JOB = "job-dp"


@pytest.fixture
def served(tmp_path):
    store = VersionStore(keep_versions=2, spool_dir=tmp_path / "spool", chunk_bytes=4096)
    plane = DataPlane(store, host="127.0.0.1", port=0, max_version_bytes=1 << 20).start()
    yield store, ("127.0.0.1", plane.port)
    plane.stop()


@pytest.fixture
def payloads(make_state_dict):
    return [encode_state_dict(make_state_dict(seed)) for seed in range(3)]


def _push(address, payload: bytes, version: int, checksum: str | None = None) -> dict:
    return wt.push(
        address,
        job_id=JOB,
        version=version,
        parts=[payload],
        checksum=checksum or checksum_of(payload),
        timeout=10,
    )


def test_push_then_pull_over_tcp_and_over_grpc_frames(served, payloads, make_state_dict):
    store, address = served
    reply = _push(address, payloads[0], 1)
    assert (reply["version"], reply["num_bytes"]) == (1, len(payloads[0]))
    got = wt.pull(address, job_id=JOB, version=0, replica_id="r0", timeout=10)
    assert (got.job_id, got.version, bytes(got.payload)) == (JOB, 1, payloads[0])
    assert got.checksum == checksum_of(payloads[0])
    state = decode_state_dict(got.payload)
    assert all((state[k] == v).all() for k, v in make_state_dict(0).items())
    # A gRPC puller of the same version gets it framed as it goes (4 KiB chunks here).
    assert assemble_frames(store.pull_frames(JOB, 1)) == (JOB, 1, payloads[0], got.checksum)


def test_sha256_checksums_are_accepted_too(served, payloads):
    _, address = served
    checksum = checksum_of(payloads[0], "sha256")
    assert _push(address, payloads[0], 1, checksum)["checksum"] == checksum
    assert wt.pull(address, job_id=JOB, version=1, replica_id="", timeout=10).checksum == checksum


def test_corrupted_push_is_refused_and_the_previous_version_stays(served, payloads):
    store, address = served
    _push(address, payloads[0], 1)
    with pytest.raises(DataLoss, match="checksum mismatch"):
        _push(address, payloads[1], 2, checksum_of(payloads[2]))
    assert store.current(JOB).version == 1


def test_stale_push_is_refused_before_its_payload_and_a_repeat_costs_nothing(served, payloads):
    store, address = served
    _push(address, payloads[0], 1)
    _push(address, payloads[1], 2)
    before = RECEIVED_BYTES._value.get()
    with pytest.raises(FailedPrecondition, match="already held with a different payload"):
        _push(address, payloads[2], 1)
    # The trainer retrying a push that did arrive: acknowledged, nothing sent again.
    assert _push(address, payloads[1], 2)["version"] == 2
    assert RECEIVED_BYTES._value.get() == before
    assert store.held_versions(JOB) == [1, 2]


@pytest.mark.parametrize(
    ("version", "checksum", "match"),
    [(-1, None, "version must be >= 0"), (1, "md5:abc", "is not one of")],
)
def test_invalid_push_headers_are_refused(served, payloads, version, checksum, match):
    _, address = served
    with pytest.raises(InvalidArgument, match=match):
        wt.push(address, job_id=JOB, version=version, parts=[payloads[0]],
                checksum=checksum or checksum_of(payloads[0]), timeout=10)  # fmt: skip


def test_oversized_push_is_refused_before_any_byte(served):
    _, address = served
    big = bytes(2 << 20)
    with pytest.raises(InvalidArgument, match="max_version_mb"):
        _push(address, big, 1)


def test_pull_of_an_unknown_job_is_not_found(served):
    _, address = served
    with pytest.raises(NotFound, match="has no policy version yet"):
        wt.pull(address, job_id="nope", version=0, replica_id="", timeout=10)


def _raw(address, data: bytes) -> dict:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        return wt.recv_header(sock)


def test_garbage_gets_a_sentence_and_the_server_keeps_serving(served, payloads):
    _, address = served
    reply = _raw(address, b"GET / HTTP/1.1\r\n\r\n")
    assert (reply["ok"], reply["code"]) == (False, "INVALID_ARGUMENT")
    assert "bad magic" in reply["message"]
    body = b'{"op": "delete"}'
    reply = _raw(address, wt.MAGIC + struct.pack(">I", len(body)) + body)
    assert "unknown op 'delete'" in reply["message"]
    body = b'{"op": "pull", "job_id": 7, "version": 0}'
    reply = _raw(address, wt.MAGIC + struct.pack(">I", len(body)) + body)
    assert "'job_id' must be a str" in reply["message"]
    assert _push(address, payloads[0], 1)["version"] == 1


def test_torn_push_stores_nothing(served, payloads):
    store, address = served
    header = {"op": "push", "job_id": JOB, "version": 1, "num_bytes": len(payloads[0]),
              "checksum": checksum_of(payloads[0])}  # fmt: skip
    with socket.create_connection(address, timeout=10) as sock:
        wt.send_header(sock, header)
        assert wt.recv_header(sock) == {"ok": True, "send": True}
        sock.sendall(payloads[0][:1000])  # then the trainer dies
    _push(address, payloads[1], 2)  # the server is fine, and version 1 never became current
    assert store.held_versions(JOB) == [2]


def test_a_data_plane_version_survives_a_restart_through_the_spool(tmp_path, payloads):
    store = VersionStore(keep_versions=2, spool_dir=tmp_path / "spool")
    plane = DataPlane(store, host="127.0.0.1", port=0, max_version_bytes=1 << 20).start()
    try:
        _push(("127.0.0.1", plane.port), payloads[0], 3)
    finally:
        plane.stop()
    (spooled,) = list((tmp_path / "spool").rglob("*.safetensors"))
    assert spooled.name.startswith("v00000000000000000003.xxh3-128-")
    again = VersionStore(keep_versions=2, spool_dir=tmp_path / "spool")
    info, payload = again.get(JOB, 0)
    assert (info.version, payload) == (3, payloads[0])


def test_an_evicted_version_lends_its_buffer_to_the_next_push(payloads):
    # Without a spool, versions are anonymous buffers. keep_versions counts the version
    # arriving (it used to be received beside keep_versions held ones, and a dropped
    # version's buffer served the push after next), so the version a push evicts before
    # it receives is the buffer it receives into. With a spool there are no buffers: see
    # test_spool_files.py (mapped files; a version being pulled is not evicted).
    store = VersionStore(keep_versions=2)
    plane = DataPlane(store, host="127.0.0.1", port=0, max_version_bytes=1 << 20).start()
    address = ("127.0.0.1", plane.port)
    try:
        _push(address, payloads[0], 1)  # the three payloads have the same size
        _push(address, payloads[1], 2)
        first = store._job(JOB).versions[1].buffer
        _push(address, payloads[2], 3)  # evicts 1 first, then lands in its buffer
        assert store._job(JOB).versions[3].buffer is first
        assert store.held_versions(JOB) == [2, 3]
        got = wt.pull(address, job_id=JOB, version=0, replica_id="", timeout=10)
        assert (got.version, bytes(got.payload)) == (3, payloads[2])
        older = wt.pull(address, job_id=JOB, version=2, replica_id="", timeout=10)
        assert bytes(older.payload) == payloads[1]
    finally:
        plane.stop()


def test_a_stalled_peer_is_dropped_and_others_are_served(tmp_path, payloads):
    store = VersionStore(keep_versions=2)
    plane = DataPlane(
        store, host="127.0.0.1", port=0, max_version_bytes=1 << 20, idle_timeout_s=0.5
    ).start()
    address = ("127.0.0.1", plane.port)
    try:
        with socket.create_connection(address, timeout=10) as stalled:
            stalled.sendall(wt.MAGIC[:3])  # half a header, then nothing
            assert _push(address, payloads[0], 1)["version"] == 1  # served meanwhile
            assert stalled.recv(1) == b""  # the server hung up on the stalled peer
    finally:
        plane.stop()
