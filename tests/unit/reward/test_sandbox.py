"""The code sandbox against hostile snippets: each is contained and leaves nothing behind.

Run against every isolation layer that works on this machine ("namespaces"
needs `unshare`, "seccomp" a known architecture), so the fallback a
container without CAP_SYS_ADMIN would use is tested too.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from rlfleet.reward.sandbox import Sandbox, SandboxLimits, SandboxSettings, _namespaces_work

# The wall limit only bounds a run that would hang; every run under LIMITS ends by
# itself (or on its CPU limit) well before it, but Python starting in a sandbox on a
# loaded 2-core machine can take seconds of wall time.
LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=30, memory_mb=128, max_processes=8)
SECRET = "s3cr3t-token-7f1c2b"

LAYERS = [
    pytest.param(
        "namespaces",
        marks=pytest.mark.skipif(_namespaces_work() is None, reason="unshare does not work here"),
    ),
    "seccomp",
]


@pytest.fixture(scope="module", params=LAYERS)
def sandbox(request) -> Sandbox:
    return Sandbox(SandboxSettings(isolation=request.param, slots=4))


def _processes_of(uids: range) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid in uids:
                out.append(int(pid))
        except OSError:
            pass
    return out


def _sandbox_uids(sandbox: Sandbox) -> range:
    base = sandbox.settings.uid_base
    return range(base, base + sandbox.settings.slots)


def test_runs_a_program_with_stdin_and_a_clean_environment(sandbox):
    result = sandbox.run(
        "import os, sys\nprint(sys.stdin.read().upper(), end='')\nprint(sorted(os.environ))",
        stdin="hello\n",
        limits=LIMITS,
    )
    assert result.ok, result.stderr
    first, env = result.stdout.split("\n", 1)
    assert first == "HELLO"
    assert env.strip() == "['HOME', 'LANG', 'PATH']"


def test_infinite_loop_is_stopped(sandbox):
    result = sandbox.run("while True:\n    pass\n", limits=LIMITS)
    assert not result.ok
    assert result.timed_out or result.returncode != 0


def test_a_busy_loop_ends_on_the_soft_cpu_limit_in_every_layer(sandbox):
    # In a PID namespace the code must not be PID 1, which ignores SIGXCPU: it would
    # run on to the hard limit (SIGKILL, reported by unshare as exit 1).
    result = sandbox.run("while True:\n    pass\n", limits=LIMITS)
    assert (result.returncode, result.timed_out, result.stderr) == (-signal.SIGXCPU, False, "")


def test_exit_status_and_signals_come_back_as_they_were(sandbox):
    assert sandbox.run("raise SystemExit(3)", limits=LIMITS).returncode == 3
    result = sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
                         limits=LIMITS)  # fmt: skip
    assert result.returncode == -signal.SIGTERM


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped


@pytest.mark.parametrize("layer", ["seccomp", "rlimits"])
def test_a_child_that_leaves_the_session_is_killed_after_the_run(layer):
    # As a service that is not root (no uid of the run's own to sweep by; a PID
    # namespace would kill it with the rest, and the pid printed would be its own).
    box = Sandbox(SandboxSettings(isolation=layer, slots=1))
    box.is_root = False
    code = (
        "import os, time\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.setsid()\n"  # out of the run's process group and session
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
    )
    result = box.run(code, limits=LIMITS)
    assert result.ok, result.stderr
    pid = int(result.stdout)
    try:
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the setsid() child outlived its run"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sleeping_forever_hits_the_wall_deadline(sandbox):
    result = sandbox.run(
        "import time\ntime.sleep(600)\n",
        limits=SandboxLimits(cpu_seconds=1, wall_seconds=1.0),
    )
    assert result.timed_out and result.returncode is None


def test_fork_bomb_is_contained_and_cleaned_up(sandbox):
    code = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"  # leave the process group, as an escape attempt
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    result = sandbox.run(code, limits=SandboxLimits(cpu_seconds=1, wall_seconds=2))
    assert not result.ok
    if sandbox.is_root:  # its processes ran under the slot uids: none may be left
        assert _processes_of(_sandbox_uids(sandbox)) == []
    # and the sandbox still works afterwards
    assert sandbox.run("print(1)", limits=LIMITS).stdout == "1\n"


def test_memory_hog_gets_memory_error(sandbox):
    result = sandbox.run("x = bytearray(1 << 30)\nprint('allocated')\n", limits=LIMITS)
    assert not result.ok
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


def test_no_network_even_to_loopback(sandbox):
    accepted: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(5)

        def accept() -> None:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        result = sandbox.run(
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'exfiltrated')\nprint('connected')\n",
            limits=LIMITS,
        )
        server.close()
        thread.join(6)
    assert not result.ok
    assert "connected" not in result.stdout
    assert accepted == []


def test_cannot_write_outside_its_directory(sandbox, tmp_path: Path):
    target = tmp_path / "escaped.txt"
    result = sandbox.run(
        "import os\n"
        "open('inside.txt', 'w').write('fine')\n"  # its own directory is writable
        "print(os.path.exists('inside.txt'))\n"
        f"open({str(target)!r}, 'w').write('escaped')\n",
        limits=LIMITS,
    )
    assert result.stdout.startswith("True")
    assert result.returncode != 0
    assert not target.exists()


def test_file_size_and_output_are_capped(sandbox):
    result = sandbox.run(
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
        limits=SandboxLimits(cpu_seconds=2, wall_seconds=5, max_file_mb=1),
    )
    assert not result.ok
    assert len(result.stdout) <= 1024 * 1024


def test_secrets_in_the_services_environment_do_not_reach_the_code(sandbox, monkeypatch):
    monkeypatch.setenv("RLFLEET_TEST_SECRET", SECRET)
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        try:\n"
        "            print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "        except OSError as exc:\n"
        "            print(pid, type(exc).__name__)\n"
    )
    result = sandbox.run(code, limits=LIMITS)
    assert result.ok, result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_concurrent_runs_each_get_their_own_slot(sandbox):
    results = [None] * 6

    def run(i: int) -> None:
        results[i] = sandbox.run(f"print({i} * 2)", limits=LIMITS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(6)]


def test_unknown_isolation_layer_is_refused_at_settings():
    with pytest.raises(ValueError):
        SandboxSettings(isolation="chroot")
