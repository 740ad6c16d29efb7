"""``python -m rlfleet.weightsync``: config first, then the store and the server."""

from __future__ import annotations

import logging

from rlfleet.common.config import load_config
from rlfleet.common.logs import setup_logging
from rlfleet.weightsync.config import WeightSyncConfig

logger = logging.getLogger(__name__)

STOP_FSYNC_WAIT_S = 5.0


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(WeightSyncConfig, argv)
    setup_logging(cfg.service_name, level=cfg.log_level, fmt=cfg.log_format)

    # The weight codec imports torch; only now that the config is known to be good.
    from prometheus_client import REGISTRY

    from rlfleet.common.grpc_server import serve_forever, start_server
    from rlfleet.common.security import tls_of
    from rlfleet.v1 import weightsync_pb2
    from rlfleet.weightsync.dataplane import DataPlane
    from rlfleet.weightsync.metrics import ReplicaCollector
    from rlfleet.weightsync.replicas import setup_replica_registry
    from rlfleet.weightsync.servicer import WeightSyncServicer, add_to_server
    from rlfleet.weightsync.store import VersionStore

    store = VersionStore(
        keep_versions=cfg.keep_versions,
        spool_dir=cfg.spool_dir or None,
        chunk_bytes=cfg.chunk_bytes,
        evict_wait_s=cfg.evict_wait_s,
        memory_limit_bytes=cfg.memory_limit_mb << 20,
        memory_overhead_bytes=cfg.memory_overhead_mb << 20,
    )
    registry = setup_replica_registry(cfg.replica_registry, redis_url=cfg.redis_url)
    REGISTRY.register(ReplicaCollector(store, registry))
    data_plane = None
    if cfg.data_port == -1:
        logger.info("weight data plane is off (data_port = -1); clients use gRPC streams")
    elif tls_of(cfg).serves_tls:
        logger.warning("weight data plane is off: TLS is on and the data plane does not encrypt")
    else:
        data_plane = DataPlane(
            store, host=cfg.host, port=cfg.data_port, max_version_bytes=cfg.max_version_mb << 20
        ).start()
    servicer = WeightSyncServicer(store, registry, data_port=data_plane.port if data_plane else 0)
    running = start_server(
        cfg,
        lambda server: add_to_server(servicer, server),
        service_names=[weightsync_pb2.DESCRIPTOR.services_by_name["WeightSyncService"].full_name],
        ready_info={"data_port": servicer.data_port},
        max_workers=cfg.grpc_workers,
    )
    # Versions whose fsync is still running get a moment to become durable; any left are
    # checked against their checksums at the next start.
    serve_forever(running, on_stop=lambda: store.close(timeout=STOP_FSYNC_WAIT_S))


if __name__ == "__main__":
    main()
