"""The weight-sync service as the real process over gRPC: push, pull, refuse,
track replicas, and serve the same version after a restart (spool on disk).
"""

from __future__ import annotations

import urllib.request

import grpc
import pytest
import torch
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.weights import assemble, decode_state_dict, encode_state_dict, iter_chunks
from rlfleet.v1 import weightsync_pb2, weightsync_pb2_grpc

CHUNK = 64 * 1024


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(256, 64), torch.nn.Linear(64, 64)).state_dict()


def _start(service_factory, spool, redis_url):
    proc = service_factory(
        "weightsync",
        "rlfleet.weightsync",
        [
            "--spool-dir", str(spool),
            "--chunk-bytes", str(CHUNK),
            "--keep-versions", "2",
            "--replica-registry", "redis",
            "--redis-url", redis_url,
        ],
    )  # fmt: skip
    return proc


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert "Traceback" not in (info.value.details() or "")
    return info.value.code()


@pytest.mark.slow
def test_weightsync_over_grpc(service_factory, tmp_path, redis_url):
    torch.set_num_threads(1)
    spool = tmp_path / "spool"
    proc = _start(service_factory, spool, redis_url)
    payloads = [encode_state_dict(_state(seed)) for seed in range(3)]

    with make_channel(proc.address) as channel:
        stub = weightsync_pb2_grpc.WeightSyncServiceStub(channel)

        def push(payload: bytes, version: int, *, mangle=None):
            chunks = list(iter_chunks(payload, job_id="job-w", version=version, chunk_bytes=CHUNK))
            if mangle:
                chunks = mangle(chunks)
            return stub.PushVersion(iter(chunks), timeout=60)

        def pull(version: int):
            return assemble(
                stub.PullVersion(
                    weightsync_pb2.PullVersionRequest(
                        job_id="job-w", version=version, replica_id="r0"
                    ),
                    timeout=60,
                )
            )

        get_current = weightsync_pb2.GetCurrentRequest(job_id="job-w")
        assert _code(lambda: stub.GetCurrent(get_current)) == grpc.StatusCode.NOT_FOUND
        assert push(payloads[0], 0).version == 0
        reply = push(payloads[1], 1)
        assert reply.version == 1 and reply.num_bytes == len(payloads[1])

        def corrupt(chunks):
            chunks[0].data = b"\x00" + chunks[0].data[1:]
            return chunks

        assert _code(lambda: push(payloads[2], 2, mangle=corrupt)) == grpc.StatusCode.DATA_LOSS
        assert _code(lambda: push(payloads[2], 2, mangle=lambda c: c[:-1])) == (
            grpc.StatusCode.DATA_LOSS
        )
        assert _code(lambda: push(payloads[2], 0)) == grpc.StatusCode.FAILED_PRECONDITION
        assert push(payloads[1], 1).version == 1  # a retried push is fine
        assert _code(lambda: pull(9)) == grpc.StatusCode.NOT_FOUND

        current = stub.GetCurrent(weightsync_pb2.GetCurrentRequest(job_id="job-w"), timeout=10)
        assert current.version == 1
        job_id, version, payload, digest = pull(0)  # a late joiner
        assert (version, digest) == (1, current.checksum)
        restored = decode_state_dict(payload)
        for name, tensor in _state(1).items():
            assert torch.equal(restored[name], tensor)

        stub.ReportHeld(
            weightsync_pb2.ReportHeldRequest(
                replica_id="r0", job_id="job-w", version=1, address="127.0.0.1:9"
            ),
            timeout=10,
        )
        stub.ReportHeld(
            weightsync_pb2.ReportHeldRequest(replica_id="r1", job_id="job-w", version=0),
            timeout=10,
        )
        assert (
            _code(
                lambda: stub.ReportHeld(
                    weightsync_pb2.ReportHeldRequest(job_id="job-w"), timeout=10
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        metrics = (
            urllib.request.urlopen(
                f"http://127.0.0.1:{proc.info['metrics_port']}/metrics", timeout=10
            )
            .read()
            .decode()
        )
        assert 'rlfleet_weightsync_current_version{job_id="job-w"} 1.0' in metrics
        assert 'rlfleet_weightsync_replicas_behind{job_id="job-w"} 1.0' in metrics

    proc.stop()
    proc = _start(service_factory, spool, redis_url)
    with make_channel(proc.address) as channel:
        stub = weightsync_pb2_grpc.WeightSyncServiceStub(channel)
        again = stub.GetCurrent(weightsync_pb2.GetCurrentRequest(job_id="job-w"), timeout=10)
        assert again == current
        chunks = stub.PullVersion(weightsync_pb2.PullVersionRequest(job_id="job-w"), timeout=60)
        assert assemble(chunks)[2] == payloads[1]
        replicas = stub.ListReplicas(
            weightsync_pb2.ListReplicasRequest(job_id="job-w"), timeout=10
        ).replicas
        assert [(r.replica_id, r.version, r.address) for r in replicas] == [
            ("r0", 1, "127.0.0.1:9"),
            ("r1", 0, ""),
        ]
