"""``python -m rlfleet.trainer``: config first, torch only after (``--help`` stays light)."""

from __future__ import annotations

import logging

from rlfleet.common.config import load_config
from rlfleet.common.logs import setup_logging
from rlfleet.trainer.config import TrainerConfig

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(TrainerConfig, argv)
    setup_logging(cfg.service_name, level=cfg.log_level, fmt=cfg.log_format)

    import torch

    from rlfleet.common.buffer import setup_buffer
    from rlfleet.common.grpc_server import serve_forever, start_server
    from rlfleet.trainer.core import TrainerCore
    from rlfleet.trainer.job import pick_device
    from rlfleet.trainer.publish import setup_publisher
    from rlfleet.trainer.servicer import TrainerServicer
    from rlfleet.trainer.state import TrainerStore
    from rlfleet.v1 import trainer_pb2_grpc

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    if cfg.weightsync_address:
        publisher = setup_publisher(
            "grpc",
            address=cfg.weightsync_address,
            timeout_s=cfg.push_timeout_s,
            max_message_mb=cfg.max_message_mb,
        )
    else:
        logger.warning("no --weightsync-address: new policy versions will not be published")
        publisher = setup_publisher("none")
    core = TrainerCore(
        buffer=setup_buffer("redis", cfg.redis_url),
        store=TrainerStore.from_url(cfg.redis_url),
        publisher=publisher,
        checkpoint_dir=cfg.checkpoint_dir,
        consumer=cfg.consumer,
        read_timeout_s=cfg.read_timeout_s,
        reclaim_idle_s=cfg.reclaim_idle_s,
        device=pick_device(cfg.device),
    )

    def register(server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(core), server)

    running = start_server(cfg, register, service_names=["rlfleet.v1.TrainerService"])
    serve_forever(running, on_stop=core.close)


if __name__ == "__main__":
    main()
