"""The ``python`` tool: the model's code, run in the reward service's sandbox.

The containment is ``rlfleet.reward.sandbox`` (namespaces or seccomp, rlimits, a
wall deadline, a clean environment, a throwaway directory): this module adds only
what a *conversation* needs on top of it.

- A sandbox of the env service's own (``sandbox()``), whose unprivileged uids
  (``uid_base``, root only) differ from the reward service's: RLIMIT_NPROC counts
  per uid, so a fork bomb in one service's run must not use up the other's process
  count on a shared host, and the after-run sweep kills by uid.
- The wall deadline comes first: the CPU limit is set a second above it, so a
  busy loop ends on the deadline and the model reads "ran out of time (2.0 s)".
  (In the namespaces layer the code is PID 1 of its namespace, which ignores the
  soft CPU signal; only the hard limit's SIGKILL or the deadline stop it, and
  unshare then reports exit 1 with an "unshare: ..." line. Those lines are dropped
  and read as "killed".)
- Output: the sandbox caps what a run may write through RLIMIT_FSIZE (1 MiB
  here: Python then fails its next write with "File too large"); the observation
  keeps the first ``max_output_bytes`` (16 KB) of stdout and the last 4 KB of
  stderr, and says so when it cut.
- The run's path in tracebacks is shown as ``main.py`` whatever the layer.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from rlfleet.common.errors import Unavailable
from rlfleet.reward.sandbox import Sandbox, SandboxLimits, SandboxResult, SandboxSettings

logger = logging.getLogger(__name__)

FILE_LIMIT_MB = 1
"""RLIMIT_FSIZE of a run: what it may write to stdout/stderr (and any file) in MiB."""
STDERR_TAIL_BYTES = 4096
_PATH = re.compile(r'File "[^"]*main\.py"')

DEFAULT_UID_BASE = 61000
"""Env-service sandbox uids (root only); the reward service's default is 60000."""

_sandbox: Sandbox | None = None
_settings: SandboxSettings | None = None
_lock = threading.Lock()


def configure(settings: SandboxSettings) -> None:
    """Sets the settings the process-wide sandbox is built with (before its first use)."""
    global _settings
    with _lock:
        _settings = settings


def sandbox() -> Sandbox:
    """The env service's sandbox (built on first use; ``RLFLEET_SANDBOX_*`` apply)."""
    global _sandbox
    with _lock:
        if _sandbox is None:
            _sandbox = Sandbox(_settings or SandboxSettings(uid_base=DEFAULT_UID_BASE))
        return _sandbox


@dataclass(frozen=True)
class ToolOutcome:
    """A tool's answer as the model will read it."""

    content: str
    error: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PythonLimits:
    timeout_s: float = 5.0
    memory_mb: int = 256
    max_processes: int = 8
    max_output_bytes: int = 16 * 1024
    max_code_chars: int = 20_000

    def sandbox_limits(self) -> SandboxLimits:
        return SandboxLimits(
            cpu_seconds=math.ceil(self.timeout_s) + 1,
            wall_seconds=self.timeout_s,
            memory_mb=self.memory_mb,
            max_processes=self.max_processes,
            max_file_mb=FILE_LIMIT_MB,
        )


def _kb(n: int) -> str:
    return f"{n // 1024} KB" if n % 1024 == 0 else f"{n} bytes"


def _head(text: str, limit: int) -> tuple[str, bool]:
    raw = text.encode()
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode(errors="ignore"), True


def _tail(text: str, limit: int) -> str:
    raw = text.encode()
    return text if len(raw) <= limit else raw[-limit:].decode(errors="ignore")


def describe(result: SandboxResult, limits: PythonLimits) -> ToolOutcome:
    """Turns a sandbox run into the observation the model reads."""
    lines = result.stderr.splitlines()
    killed_in_namespace = any(line.startswith("unshare: ") for line in lines)
    stderr = "\n".join(line for line in lines if not line.startswith("unshare: "))
    stderr = _PATH.sub('File "main.py"', stderr).strip()
    file_limit = FILE_LIMIT_MB * 1024 * 1024
    hit_file_limit = (
        len(result.stdout.encode()) >= file_limit
        or len(result.stderr.encode()) >= file_limit
        or "File too large" in stderr
    )
    stdout, cut = _head(result.stdout, limits.max_output_bytes)
    info: dict[str, Any] = {"exit_code": result.returncode, "timed_out": result.timed_out}

    head = ""
    if result.timed_out:
        head = f"error: the tool ran out of time ({limits.timeout_s:.1f} s)"
    elif result.returncode is not None and result.returncode < 0:
        sig = -result.returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = " (its CPU time ran out)" if sig in (signal.SIGXCPU, signal.SIGKILL) else ""
        head = f"error: the tool was killed by {name}{why}"
    elif killed_in_namespace:
        head = "error: the tool was killed (it used up its CPU time or another limit)"
    elif hit_file_limit:
        head = f"error: the tool wrote more than {FILE_LIMIT_MB} MB and was stopped"
    elif result.returncode != 0:
        head = f"error: the code exited with status {result.returncode}"

    parts = [head] if head else []
    if stdout:
        parts.append(stdout.rstrip("\n"))
    if cut or hit_file_limit:
        parts.append(f"[output truncated at {_kb(limits.max_output_bytes)}]")
        info["truncated"] = True
    if stderr and (head or not stdout):
        parts.append(_tail(stderr, STDERR_TAIL_BYTES))
    content = "\n".join(parts) or "(no output: print what you want to see)"
    return ToolOutcome(content=content, error=bool(head), info=info)


def run_python(code: Any, limits: PythonLimits, *, box: Sandbox | None = None) -> ToolOutcome:
    """Runs ``code`` in the sandbox; the outcome never raises for what the code does.

    Raises Unavailable when the sandbox itself cannot start a run (a broken host, not
    the model's fault), so the caller retries instead of training on a bogus answer.
    """
    if not isinstance(code, str) or not code.strip():
        return ToolOutcome('error: the python tool needs "code", a non-empty string', error=True)
    if len(code) > limits.max_code_chars:
        return ToolOutcome(
            f"error: the code is longer than {limits.max_code_chars} characters", error=True
        )
    try:
        result = (box or sandbox()).run(code, limits=limits.sandbox_limits())
    except (OSError, RuntimeError) as exc:
        logger.exception("the sandbox could not run the python tool")
        raise Unavailable(f"the sandbox could not run the python tool: {exc}") from None
    return describe(result, limits)
