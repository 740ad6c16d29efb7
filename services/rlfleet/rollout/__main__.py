"""Process entry: ``python -m rlfleet.rollout --port 0 --model-path DIR ...``.

Config is parsed and logging set up before torch is imported, so ``--help`` and
bad flags answer at once. The model (when --model-path is given) is loaded
before the server starts, so the ready file means "ready to generate".
"""

from __future__ import annotations

import logging
import os
import socket

from rlfleet.common.config import load_config
from rlfleet.common.logs import setup_logging
from rlfleet.rollout.config import RolloutConfig

logger = logging.getLogger("rlfleet.rollout")


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(RolloutConfig, argv)
    setup_logging(cfg.service_name, level=cfg.log_level, fmt=cfg.log_format)

    import torch  # heavy: only once the config is known to be good

    from rlfleet.common.grpc_server import serve_forever, start_server
    from rlfleet.rollout.core import RolloutCore
    from rlfleet.rollout.engine import setup_engine
    from rlfleet.rollout.servicer import SERVICE_NAME, RolloutServicer
    from rlfleet.v1 import rollout_pb2_grpc

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    # A torch-engine benchmark knob other engines lack: passed only when asked for.
    noise = {}
    if cfg.logit_noise_std:
        if cfg.engine != "torch":
            raise SystemExit(
                f"error: --logit-noise-std works with --engine torch, not {cfg.engine}"
            )
        noise = {"logit_noise_std": cfg.logit_noise_std}
    if cfg.engine == "vllm":
        engine = setup_engine(
            "vllm",
            dtype=cfg.dtype,
            max_batch_seqs=cfg.max_batch_seqs,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            kv_cache_gib=cfg.kv_cache_gib,
            enforce_eager=cfg.enforce_eager,
        )
    else:
        engine = setup_engine(
            cfg.engine,
            device=cfg.device,
            dtype=cfg.dtype,
            max_batch_seqs=cfg.max_batch_seqs,
            max_prefill_tokens=cfg.max_prefill_tokens,
            **noise,
        )
    if cfg.model_path:
        engine.load_model(cfg.model_path)
    core = RolloutCore(
        engine,
        replica_id=cfg.replica_id or f"{socket.gethostname()}-{os.getpid()}",
        weightsync_address=cfg.weightsync_address,
        pull_timeout_s=cfg.pull_timeout_s,
        abort_wait_s=cfg.abort_wait_s,
        max_message_mb=cfg.max_message_mb,
    )
    running = start_server(
        cfg,
        lambda server: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(
            RolloutServicer(core), server
        ),
        service_names=[SERVICE_NAME],
        max_workers=cfg.grpc_workers,
    )
    core.set_address(cfg.advertise_address or f"{cfg.host}:{running.port}")
    logger.info(
        "rollout replica up",
        extra={"replica_id": core.replica_id, "engine": cfg.engine, "model_path": cfg.model_path},
    )
    serve_forever(running, on_stop=core.close)


if __name__ == "__main__":
    main()
