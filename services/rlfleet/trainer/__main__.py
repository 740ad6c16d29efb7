"""``python -m rlfleet.trainer``: config first, torch only after (``--help`` stays light)."""

from __future__ import annotations

import logging
import os
import sys

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
    from rlfleet.trainer.engine import RankMirror, pick_device
    from rlfleet.trainer.publish import setup_publisher
    from rlfleet.trainer.servicer import TrainerServicer
    from rlfleet.trainer.state import TrainerStore
    from rlfleet.v1 import trainer_pb2_grpc

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    workers = _join_ranks(cfg.ranks, argv)
    device = pick_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cpu" and not cfg.torch_threads:
        # Ranks on one machine share its cores: torch's default (all of them, per rank)
        # would oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mirror = RankMirror(device=device)
    if mirror.here.rank != 0:  # a worker rank: run what rank 0 runs, until it stops
        mirror.serve()
        return
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
        device=device,
        mirror=mirror,
        gather_bucket_bytes=cfg.gather_bucket_mb * 1024 * 1024,
        weight_group_host=cfg.weight_group_host,
    )

    def register(server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(core), server)

    running = start_server(cfg, register, service_names=["rlfleet.v1.TrainerService"])
    try:
        serve_forever(running, on_stop=core.close)
    finally:
        for proc in workers:
            proc.wait(timeout=30)


def _join_ranks(ranks: int, argv: list[str] | None) -> list:
    """Joins the trainer's process group when there are several ranks; returns the worker
    processes this one started (``--ranks N`` without a launcher: ranks 1..N-1 are
    this same command, told their rank through the environment)."""
    import subprocess

    from rlfleet.common.procs import free_port
    from rlfleet.trainer.distributed import init_process_group

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun, or started by rank 0 below
        init_process_group()
        return []
    if ranks == 1:
        return []
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks)}
    args = sys.argv[1:] if argv is None else argv
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "rlfleet.trainer", *args],
            env={**os.environ, **group, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            preexec_fn=_die_with_parent,
        )
        for rank in range(1, ranks)
    ]
    os.environ.update({**group, "RANK": "0", "LOCAL_RANK": "0"})
    init_process_group()
    logger.info("trainer ranks joined", extra={"ranks": ranks})
    return workers


def _die_with_parent() -> None:
    """A worker rank ends when rank 0 does, even on kill -9 (Linux PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


if __name__ == "__main__":
    main()
