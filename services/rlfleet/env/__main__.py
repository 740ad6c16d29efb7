"""``python -m rlfleet.env``: config first, then the environments and the server."""

from __future__ import annotations

import logging

from rlfleet.common.config import load_config
from rlfleet.common.logs import setup_logging
from rlfleet.env.config import EnvConfig

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(EnvConfig, argv)
    setup_logging(cfg.service_name, level=cfg.log_level, fmt=cfg.log_format)

    if cfg.preload:
        # Pay math-verify's import (sympy) now, not inside the first Step's deadline.
        import math_verify  # noqa: F401

    from rlfleet.common.grpc_server import serve_forever, start_server
    from rlfleet.env import python_tool
    from rlfleet.env.core import EnvCore
    from rlfleet.env.registry import discover
    from rlfleet.env.servicer import EnvServicer
    from rlfleet.reward.sandbox import SandboxSettings
    from rlfleet.v1 import env_pb2, env_pb2_grpc

    python_tool.configure(SandboxSettings(uid_base=cfg.sandbox_uid_base, slots=cfg.sandbox_slots))
    python_tool.sandbox()  # probe the isolation layer once, before serving
    core = EnvCore(
        discover(),
        max_episodes=cfg.max_episodes,
        episode_ttl_s=cfg.episode_ttl_s,
        max_turns=cfg.max_turns,
        max_model_text_chars=cfg.max_model_text_chars,
    )
    running = start_server(
        cfg,
        lambda server: env_pb2_grpc.add_EnvServiceServicer_to_server(EnvServicer(core), server),
        service_names=[env_pb2.DESCRIPTOR.services_by_name["EnvService"].full_name],
        max_workers=cfg.grpc_workers,
    )
    serve_forever(running)


if __name__ == "__main__":
    main()
