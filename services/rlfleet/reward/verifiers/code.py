"""Code verifier: run the completion's Python program against the task's tests.

The program is untrusted, so every run goes through the sandbox
(``rlfleet.reward.sandbox``): a child process with CPU, wall, memory, process
and file-size limits, no network, a clean environment and a throwaway
directory. The reward is the fraction of tests passed.

The task entry names its tests in one of two forms (both may be given):

- ``"tests": [{"input": "...", "output": "..."}, ...]`` — the program reads
  ``input`` on stdin; it passes when its stdout equals ``output`` up to
  trailing whitespace on each line and trailing blank lines;
- ``"test_code": "assert f(2) == 4\\n..."`` — appended to the program and run
  once; it passes when the run exits 0 (one test).

The program is the last fenced ```` ```python ```` block of the completion
(cut at ``</s>``), or the whole completion when it has no fence.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import Field

from rlfleet.reward.sandbox import SandboxLimits, default_sandbox
from rlfleet.reward.verifiers.base import EOS_MARKER, Verifier, VerifierConfig

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
MAX_TESTS = 64


def extract_program(completion_text: str) -> str:
    """The code to run: the last fenced block, else the whole completion (cut at ``</s>``)."""
    text = completion_text.split(EOS_MARKER, 1)[0]
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _normalise(out: str) -> list[str]:
    lines = [line.rstrip() for line in out.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


class CodeConfig(VerifierConfig):
    cpu_seconds: int = Field(default=5, ge=1, le=120)
    """CPU seconds one run may use."""
    wall_seconds: float = Field(default=10.0, gt=0, le=300)
    """Wall-clock seconds one run may take."""
    memory_mb: int = Field(default=256, ge=32, le=8192)
    """Address space of one run, in MiB."""
    max_processes: int = Field(default=16, ge=1, le=256)
    """Processes one run may have at once (fork bombs stop here)."""
    max_file_mb: int = Field(default=16, ge=1, le=1024)
    """Largest file (and captured output) one run may write, in MiB."""
    max_code_chars: int = Field(default=100_000, ge=1, le=10_000_000)
    """Longer programs score 0 without running."""


class CodeVerifier(Verifier):
    kind: ClassVar[str] = "code"
    config_model: ClassVar[type[VerifierConfig]] = CodeConfig

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        self.limits = SandboxLimits(
            cpu_seconds=c.cpu_seconds,
            wall_seconds=c.wall_seconds,
            memory_mb=c.memory_mb,
            max_processes=c.max_processes,
            max_file_mb=c.max_file_mb,
        )

    def check_entry(self, entry: dict[str, Any]) -> None:
        tests, test_code = entry.get("tests"), entry.get("test_code")
        if tests is None and test_code is None:
            raise ValueError('needs "tests" (stdin/stdout pairs) or "test_code" (asserts)')
        if test_code is not None and not isinstance(test_code, str):
            raise ValueError('has a "test_code" that is not a string')
        if tests is not None:
            if not isinstance(tests, list) or not tests or len(tests) > MAX_TESTS:
                raise ValueError(f'needs "tests" to be a list of 1 to {MAX_TESTS} test cases')
            for i, case in enumerate(tests):
                if not (
                    isinstance(case, dict)
                    and isinstance(case.get("input", ""), str)
                    and isinstance(case.get("output"), str)
                ):
                    raise ValueError(f'has tests[{i}] that is not {{"input": str, "output": str}}')

    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        program = extract_program(completion_text)
        if not program.strip() or len(program) > self.config.max_code_chars:
            return 0.0
        sandbox = default_sandbox()
        passed = total = 0
        for case in entry.get("tests") or []:
            total += 1
            run = sandbox.run(program, stdin=case.get("input", ""), limits=self.limits)
            passed += run.ok and _normalise(run.stdout) == _normalise(case["output"])
        if entry.get("test_code") is not None:
            total += 1
            run = sandbox.run(program + "\n\n" + entry["test_code"] + "\n", limits=self.limits)
            passed += run.ok
        return passed / total if total else 0.0
