"""``python -m rlfleet.scheduler``: the scheduler process.

Light on purpose: no torch, no transformers; prompts are tokenised with
``tokenizers`` alone.
"""

from __future__ import annotations

import logging

from rlfleet.common.config import load_config
from rlfleet.common.logs import setup_logging

logger = logging.getLogger("rlfleet.scheduler")


def main(argv: list[str] | None = None) -> None:
    from rlfleet.scheduler.config import SchedulerConfig

    cfg = load_config(SchedulerConfig, argv)
    setup_logging(cfg.service_name, level=cfg.log_level, fmt=cfg.log_format)

    from rlfleet.common.grpc_server import serve_forever, start_server
    from rlfleet.scheduler.clients import ServiceClients, Timeouts
    from rlfleet.scheduler.core import SchedulerCore
    from rlfleet.scheduler.discovery import setup_discovery
    from rlfleet.scheduler.loop import JobRunner
    from rlfleet.scheduler.pool import ReplicaPool
    from rlfleet.scheduler.servicer import SchedulerServicer
    from rlfleet.scheduler.store import JobStore
    from rlfleet.v1 import scheduler_pb2_grpc

    store = JobStore.from_url(cfg.redis_url)
    pool = ReplicaPool(
        setup_discovery(cfg.discovery, addresses=cfg.rollout_list),
        weightsync_address=cfg.weightsync_address,
        status_timeout_s=cfg.status_timeout_s,
        load_timeout_s=cfg.load_timeout_s,
        generate_timeout_s=cfg.generate_timeout_s,
        replica_retry_s=cfg.replica_retry_s,
        max_message_mb=cfg.max_message_mb,
    )
    clients = ServiceClients(
        reward_address=cfg.reward_address,
        trainer_address=cfg.trainer_address,
        timeouts=Timeouts(
            init=cfg.init_timeout_s,
            score=cfg.score_timeout_s,
            train=cfg.train_timeout_s,
            retry_deadline=cfg.retry_deadline_s,
        ),
        max_message_mb=cfg.max_message_mb,
    )
    runner = JobRunner(
        store=store, pool=pool, clients=clients, score_batch_size=cfg.score_batch_size
    )
    core = SchedulerCore(store=store, runner=runner, poll_interval_s=cfg.poll_interval_s)

    def register(server) -> None:
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(core), server)

    running = start_server(cfg, register, service_names=["rlfleet.v1.SchedulerService"])
    core.start()

    def on_stop() -> None:
        core.stop()
        pool.close()
        clients.close()

    serve_forever(running, on_stop=on_stop)


if __name__ == "__main__":
    main()
