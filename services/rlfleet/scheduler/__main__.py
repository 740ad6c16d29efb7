"""``python -m rlfleet.scheduler``: the scheduler process.

Light on purpose: no torch, no transformers; prompts are tokenised with
``tokenizers`` alone.
"""

from __future__ import annotations

import logging
import threading

from rlfleet.common.config import load_config
from rlfleet.common.logs import setup_logging

logger = logging.getLogger("rlfleet.scheduler")


def main(argv: list[str] | None = None) -> None:
    from rlfleet.scheduler.config import SchedulerConfig

    cfg = load_config(SchedulerConfig, argv)
    setup_logging(cfg.service_name, level=cfg.log_level, fmt=cfg.log_format)

    from rlfleet.common.buffer_metrics import register_buffer_metrics
    from rlfleet.common.grpc_server import serve_forever, start_server
    from rlfleet.common.tasks import known_task_names
    from rlfleet.scheduler.api import ApiSettings, build_app
    from rlfleet.scheduler.api.server import HttpServer
    from rlfleet.scheduler.clients import ServiceClients, Timeouts
    from rlfleet.scheduler.core import SchedulerCore
    from rlfleet.scheduler.discovery import setup_discovery
    from rlfleet.scheduler.jobs import JobState
    from rlfleet.scheduler.loop import JobRunner
    from rlfleet.scheduler.pool import ReplicaPool
    from rlfleet.scheduler.servicer import SchedulerServicer
    from rlfleet.scheduler.store import JobStore
    from rlfleet.v1 import scheduler_pb2_grpc

    store = JobStore.from_url(cfg.redis_url)
    # Per running job: the experience stream's length, pending entries and ages, read
    # from Redis at scrape time (the scheduler is the one process that knows which
    # jobs run, and its scrapes never wait behind a training step).
    register_buffer_metrics(
        redis_url=cfg.redis_url, job_ids=lambda: store.ids_in_state(JobState.RUNNING)
    )
    pool = ReplicaPool(
        setup_discovery(
            cfg.discovery,
            addresses=cfg.rollout_list,
            namespace=cfg.rollout_namespace,
            selector=cfg.rollout_selector,
            port=cfg.rollout_port,
        ),
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
        env_address=cfg.env_address,
    )
    runner = JobRunner(
        store=store,
        pool=pool,
        clients=clients,
        score_batch_size=cfg.score_batch_size,
        tracking_dir=cfg.tracking_dir,
        mlflow_tracking_uri=cfg.mlflow_tracking_uri,
    )
    core = SchedulerCore(store=store, runner=runner, poll_interval_s=cfg.poll_interval_s)

    def register(server) -> None:
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(core), server)

    # The REST API (jobs for users, the CLI and the SDK) runs in this process, over the same core.
    try:
        api_settings = ApiSettings.from_config(cfg)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if cfg.auth == "local" and not _loopback(cfg.host):
        logger.warning(
            "the REST API listens on %s with auth = local: anyone who reaches it may submit "
            "and cancel jobs; use --auth token outside a single machine",
            cfg.host,
        )
    http = HttpServer(
        build_app(core, api_settings),
        host=cfg.host,
        port=cfg.http_port,
        tls_cert_file=cfg.tls_cert_file,
        tls_key_file=cfg.tls_key_file,
        tls_ca_file=cfg.tls_ca_file,
        tls_client_auth=cfg.tls_client_auth,
    ).start()
    running = start_server(
        cfg,
        register,
        service_names=["rlfleet.v1.SchedulerService"],
        ready_info={"http_port": http.port, "url": http.url},
    )
    core.start()
    # reasoning-gym takes seconds to import; load it now so the first submit does not wait.
    threading.Thread(target=known_task_names, name="warm-tasks", daemon=True).start()

    def on_stop() -> None:
        http.stop()
        core.stop()
        pool.close()
        pool.discovery.close()
        clients.close()

    serve_forever(running, on_stop=on_stop)


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


if __name__ == "__main__":
    main()
