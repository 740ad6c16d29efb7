"""One error mapping: domain errors become their status codes, anything else a
generic INTERNAL without a traceback, and context.abort() keeps its own code."""

from __future__ import annotations

import socket

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rlfleet.common.config import ServiceConfig
from rlfleet.common.errors import InvalidArgument, NotFound, Unavailable
from rlfleet.common.grpc_client import call, make_channel, wait_healthy
from rlfleet.common.grpc_server import start_server
from rlfleet.v1 import common_pb2, weightsync_pb2, weightsync_pb2_grpc


class Servicer(weightsync_pb2_grpc.WeightSyncServiceServicer):
    def GetCurrent(self, request, context):
        if request.job_id == "bad":
            raise InvalidArgument("job_id 'bad' is not allowed")
        if request.job_id == "abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        if request.job_id == "boom":
            raise RuntimeError("secret internals")
        if request.job_id == "redis-down":  # a real client against a port nothing serves
            with socket.socket() as closed:
                closed.bind(("127.0.0.1", 0))
                port = closed.getsockname()[1]
            redis.Redis(port=port, socket_connect_timeout=1).get("k")
        return common_pb2.PolicyVersion(version=7)


@pytest.fixture
def stub():
    running = start_server(
        ServiceConfig(),
        lambda s: weightsync_pb2_grpc.add_WeightSyncServiceServicer_to_server(Servicer(), s),
        service_names=["rlfleet.v1.WeightSyncService"],
        metrics=False,
    )
    wait_healthy(running.address)
    with make_channel(running.address) as channel:
        yield weightsync_pb2_grpc.WeightSyncServiceStub(channel), channel
    running.stop(0)


def _code(stub, job_id):
    # Every case answers at once; the timeout only bounds a hang on a loaded machine.
    with pytest.raises(grpc.RpcError) as info:
        stub.GetCurrent(weightsync_pb2.GetCurrentRequest(job_id=job_id), timeout=30)
    return info.value.code(), info.value.details()


def test_error_mapping(stub):
    stub, channel = stub
    assert stub.GetCurrent(weightsync_pb2.GetCurrentRequest(job_id="ok"), timeout=30).version == 7
    assert _code(stub, "bad") == (grpc.StatusCode.INVALID_ARGUMENT, "job_id 'bad' is not allowed")
    assert _code(stub, "abort") == (grpc.StatusCode.PERMISSION_DENIED, "no")
    code, details = _code(stub, "boom")
    assert (
        code == grpc.StatusCode.INTERNAL and "secret" not in details and "Traceback" not in details
    )
    # Redis restarting is transient: UNAVAILABLE, which callers retry, with a sentence.
    code, details = _code(stub, "redis-down")
    assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("Redis is unreachable")
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="rlfleet.v1.WeightSyncService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_client_maps_codes_back_and_does_not_retry_non_retryable(stub):
    stub, _ = stub
    with pytest.raises(InvalidArgument, match="not allowed"):
        call(stub.GetCurrent, weightsync_pb2.GetCurrentRequest(job_id="bad"), deadline=30)


def test_client_gives_up_on_an_unreachable_server_after_its_deadline():
    with make_channel("127.0.0.1:1") as channel:
        stub = weightsync_pb2_grpc.WeightSyncServiceStub(channel)
        with pytest.raises(Unavailable):
            call(stub.GetCurrent, weightsync_pb2.GetCurrentRequest(), timeout=0.2, deadline=1.0)


def test_not_found_round_trip():
    assert NotFound("x").grpc_code == grpc.StatusCode.NOT_FOUND
