"""Hostile code in the python tool, through the real sandbox: each run ends with an
observation that says what happened, and the next run works.

Run against every isolation layer that works here, like tests/unit/reward/test_sandbox.py.
"""

from __future__ import annotations

import json
import os

import pytest
from rlfleet.common.errors import Unavailable
from rlfleet.env.core import EnvCore
from rlfleet.env.python_tool import DEFAULT_UID_BASE, PythonLimits, describe, run_python
from rlfleet.env.registry import discover
from rlfleet.reward.sandbox import Sandbox, SandboxResult, SandboxSettings, _namespaces_work

LIMITS = PythonLimits(timeout_s=2.0)
# Runs that end by themselves get room on a loaded machine (a 100 MB string takes a while).
ROOMY = PythonLimits(timeout_s=20.0)
LAYERS = [
    pytest.param(
        "namespaces",
        marks=pytest.mark.skipif(_namespaces_work() is None, reason="unshare does not work here"),
    ),
    "seccomp",
]

FORK_BOMB = (
    "import os, time\n"
    "while True:\n"
    "    try:\n"
    "        if os.fork() == 0:\n"
    "            os.setsid()\n"
    "    except OSError:\n"
    "        time.sleep(0.01)\n"
)


@pytest.fixture(scope="module", params=LAYERS)
def box(request) -> Sandbox:
    return Sandbox(SandboxSettings(isolation=request.param, uid_base=DEFAULT_UID_BASE, slots=2))


def _left_processes(box: Sandbox) -> list[int]:
    uids = range(box.settings.uid_base, box.settings.uid_base + box.settings.slots)
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid in uids:
                out.append(int(pid))
        except OSError:
            pass
    return out


def test_prints_come_back(box):
    out = run_python("print(6 * 7)\nprint('done')", ROOMY, box=box)
    assert (out.content, out.error) == ("42\ndone", False)


def test_an_exception_shows_its_traceback(box):
    out = run_python("def f():\n    return 1 / 0\nf()", ROOMY, box=box)
    assert out.error
    assert out.content.startswith("error: the code exited with status 1")
    assert 'File "main.py", line 2' in out.content
    assert "ZeroDivisionError" in out.content


def test_a_fork_bomb_runs_out_of_time_and_leaves_nothing(box):
    out = run_python(FORK_BOMB, LIMITS, box=box)
    assert out.error
    assert out.content.startswith("error: the tool ran out of time (2.0 s)")
    if box.is_root:
        assert _left_processes(box) == []
    assert run_python("print('alive')", ROOMY, box=box).content == "alive"


def test_an_infinite_loop_runs_out_of_time(box):
    out = run_python("while True:\n    pass\n", LIMITS, box=box)
    assert out.error
    assert out.content == "error: the tool ran out of time (2.0 s)"


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)\n",
        "print('x' * 100_000_000)\n",
    ],
    ids=["chunks", "one-print"],
)
def test_100_mb_of_output_is_cut(box, code):
    out = run_python(code, ROOMY, box=box)
    assert out.error
    assert out.content.startswith("error: the tool wrote more than 1 MB and was stopped")
    assert "[output truncated at 16 KB]" in out.content
    assert out.content.count("x") <= 16 * 1024 + 100
    assert len(out.content.encode()) < 16 * 1024 + 4096 + 200
    assert out.info["truncated"]


def test_long_output_under_the_file_limit_is_cut_too(box):
    out = run_python("print('y' * 100_000)", ROOMY, box=box)
    assert not out.error
    assert out.content.endswith("[output truncated at 16 KB]")
    assert out.content.count("y") == 16 * 1024


def test_a_memory_hog_gets_memory_error(box):
    out = run_python("x = bytearray(1 << 31)\nprint('allocated')", ROOMY, box=box)
    assert out.error and "MemoryError" in out.content and "allocated" not in out.content


def test_bad_arguments_are_tool_errors():
    assert run_python("", LIMITS).error
    assert run_python(None, LIMITS).error
    out = run_python("x" * 30_000, LIMITS)
    assert out.error and "longer than 20000" in out.content


def test_the_episode_goes_on_after_hostile_tool_calls():
    """Through the tools environment and the env service's own sandbox."""
    core = EnvCore(discover())
    core.reset(
        episode_id="h",
        env_name="tools",
        row_json=json.dumps({"question": "What is 6 * 7?", "answer": "42"}),
        options_json=json.dumps({"max_turns": 3, "python_timeout_s": 2.0}),
    )

    def call(code: str) -> str:
        return (
            "<tool_call>"
            + json.dumps({"name": "python", "arguments": {"code": code}})
            + "</tool_call>"
        )

    first = core.step(episode_id="h", turn=0, model_text=call(FORK_BOMB) + call("while True: pass"))
    assert not first.done
    assert [m.content for m in first.messages] == [
        "error: the tool ran out of time (2.0 s)",
        "error: the tool ran out of time (2.0 s)",
    ]
    info = json.loads(first.info_json)
    assert (info["tool_calls"], info["tool_errors"]) == (2, 2)
    flood = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)\n"
    second = core.step(episode_id="h", turn=1, model_text=call(flood))
    assert not second.done and "output truncated at 16 KB" in second.messages[0].content
    assert json.loads(second.info_json)["output_truncated"] is True
    last = core.step(episode_id="h", turn=2, model_text="42")
    assert (last.done, last.reward_so_far) == (True, 1.0)


def _result(returncode, stdout="", stderr="", timed_out=False) -> SandboxResult:
    return SandboxResult(returncode, stdout, stderr, timed_out, wall_seconds=0.1)


@pytest.mark.parametrize(
    ("result", "content"),
    [
        (_result(0, "hi\n"), "hi"),
        (_result(0), "(no output: print what you want to see)"),
        (_result(0, "", "a warning\n"), "a warning"),
        (_result(-24), "error: the tool was killed by SIGXCPU (its CPU time ran out)"),
        (_result(-11), "error: the tool was killed by SIGSEGV"),
        (
            # the namespaces layer: PID 1 killed at the hard CPU limit; unshare says so on
            # stderr and exits 1 (the line is sandbox plumbing, not the model's business)
            _result(1, "part", "unshare: sigprocmask unblock failed: Invalid argument\n"),
            "error: the tool was killed (it used up its CPU time or another limit)\npart",
        ),
        (
            _result(1, "", 'Traceback:\n  File "/tmp/rlfleet-sbx-1/work/main.py", line 1\nE\n'),
            'error: the code exited with status 1\nTraceback:\n  File "main.py", line 1\nE',
        ),
    ],
)
def test_describe(result, content):
    assert describe(result, LIMITS).content == content


def test_a_sandbox_that_cannot_start_is_unavailable_not_a_tool_error():
    class Broken:
        def run(self, code, *, limits):
            raise OSError(28, "No space left on device")

    with pytest.raises(Unavailable, match="could not run the python tool"):
        run_python("print(1)", LIMITS, box=Broken())
