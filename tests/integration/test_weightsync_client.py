"""``WeightSyncClient`` against the real weight-sync process: it finds the data
plane through GetDataPlane and moves versions over it, falls back to gRPC
streams where there is none or it cannot be reached, and both ways agree.
"""

from __future__ import annotations

import socket

import pytest
from rlfleet.common.errors import FailedPrecondition, NotFound
from rlfleet.common.weights import checksum_of
from rlfleet.common.weightsync_client import WeightSyncClient


def _payload(seed: int, n: int = 3 << 20) -> bytes:
    return (bytes([seed]) * 97 + bytes(range(256))) * (n // 353)


def _start(service_factory, *extra: str):
    return service_factory("weightsync", "rlfleet.weightsync", ["--chunk-bytes", "65536", *extra])


@pytest.mark.slow
def test_client_uses_the_data_plane_and_grpc_clients_see_the_same_versions(service_factory):
    proc = _start(service_factory)
    fast = WeightSyncClient(proc.address, timeout_s=30)
    grpc_only = WeightSyncClient(proc.address, timeout_s=30, use_data_plane=False)
    try:
        assert fast.data_plane() is not None and grpc_only.data_plane() is None
        a, b = _payload(1), _payload(2)
        assert fast.push(job_id="j", version=1, payload=a, checksum=checksum_of(a)) == checksum_of(
            a
        )
        assert fast.data_plane() is not None  # the push went over it (a failure turns it off)
        got = grpc_only.pull(job_id="j", version=0)
        assert (got.version, got.payload, got.checksum) == (1, a, checksum_of(a))
        grpc_only.push(job_id="j", version=2, payload=b, checksum=checksum_of(b))
        got = fast.pull(job_id="j", version=0, replica_id="r1")
        assert (got.version, bytes(got.payload)) == (2, b)
        assert not isinstance(got.payload, bytes)  # a data-plane buffer, not a gRPC stream's bytes
        with pytest.raises(FailedPrecondition, match="versions only move forward"):
            fast.push(job_id="j", version=2, payload=a, checksum=checksum_of(a))
        with pytest.raises(NotFound, match="not held"):
            fast.pull(job_id="j", version=9)
        # A released version's buffer receives the next pull (no fresh memory to touch).
        fast.release(got)
        again = fast.pull(job_id="j", version=2)
        assert again.payload is got.payload and bytes(again.payload) == b
    finally:
        fast.close()
        grpc_only.close()


@pytest.mark.slow
def test_client_falls_back_to_grpc_without_a_data_plane(service_factory):
    proc = _start(service_factory, "--data-port", "-1")
    with WeightSyncClient(proc.address, timeout_s=30) as client:
        assert client.data_plane() is None
        a = _payload(3)
        client.push(job_id="j", version=1, payload=a, checksum=checksum_of(a))
        assert client.pull(job_id="j", version=1).payload == a


@pytest.mark.slow
def test_client_uses_grpc_when_the_data_plane_is_unreachable(service_factory):
    proc = _start(service_factory)
    with WeightSyncClient(proc.address, timeout_s=30, deadline_s=30) as client:
        with socket.socket() as closed:  # a port nothing listens on: as if a firewall dropped it
            closed.bind(("127.0.0.1", 0))
            client._data_port = closed.getsockname()[1]
        a = _payload(4)
        client.push(job_id="j", version=1, payload=a, checksum=checksum_of(a))  # retried over gRPC
        assert client.data_plane() is None  # for a while, then it asks again
        assert client.pull(job_id="j", version=1).payload == a
