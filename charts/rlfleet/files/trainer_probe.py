"""Probe of a trainer spread over several pods (the rlfleet chart's `trainer.replicas` > 1).

    python trainer_probe.py PORT SERVICE TIMEOUT_S

Only global rank 0, on pod 0, serves gRPC; the ranks on the other pods serve nothing and
follow rank 0. One pod template serves every ordinal, so a native gRPC probe would fail on
all pods but the first. This checks the standard gRPC health service on pod 0 (NODE_RANK 0),
as the native probe does when there is one pod, and passes on the others: their torchrun
exits, and the container restarts, when one of their ranks fails, and a rank that hangs
shows as a step that does not finish on rank 0 (its metrics and alerts), not here.
Exit status 0: healthy; 1: not serving or not answering.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    port, service, timeout_s = argv[1], argv[2], float(argv[3])
    if os.environ.get("NODE_RANK", "0") != "0":
        return 0
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # Below the probe's own timeout, so a slow answer is a failed check, not a killed one.
    deadline = max(0.5, timeout_s * 0.8)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=deadline
            )
        except grpc.RpcError as exc:
            print(f"trainer rank 0: gRPC health check failed: {exc.code().name}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"trainer rank 0: {service or 'server'} is {name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
