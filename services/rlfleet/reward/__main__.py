"""``python -m rlfleet.reward``: config first, then the verifiers and the server."""

from __future__ import annotations

import logging

from rlfleet.common.config import load_config
from rlfleet.common.logs import setup_logging
from rlfleet.reward.config import RewardConfig

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(RewardConfig, argv)
    setup_logging(cfg.service_name, level=cfg.log_level, fmt=cfg.log_format)

    # Pay the heavy imports (sympy via math-verify, reasoning-gym's registry) now,
    # not inside the first Score call and its deadline.
    import math_verify  # noqa: F401

    from rlfleet.common.buffer import setup_buffer
    from rlfleet.common.grpc_server import serve_forever, start_server
    from rlfleet.common.tasks import known_task_names
    from rlfleet.reward.core import RewardCore
    from rlfleet.reward.servicer import RewardServicer
    from rlfleet.v1 import reward_pb2, reward_pb2_grpc

    known_task_names()

    buffer = setup_buffer(cfg.buffer_kind, cfg.redis_url, max_len=cfg.buffer_max_len)
    core = RewardCore(
        buffer=buffer, max_workers=cfg.max_workers, score_timeout_s=cfg.score_timeout_s
    )
    running = start_server(
        cfg,
        lambda server: reward_pb2_grpc.add_RewardServiceServicer_to_server(
            RewardServicer(core), server
        ),
        service_names=[reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name],
        max_workers=cfg.grpc_workers,
    )
    serve_forever(running, on_stop=core.close)


if __name__ == "__main__":
    main()
