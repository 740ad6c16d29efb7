"""Fixtures of the end-to-end tests: the whole fleet as processes, started by `rlfleet up`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

RLFLEET = [sys.executable, "-m", "rlfleet.cli.main"]


@pytest.fixture
def fleet(tmp_path):
    run_dir = tmp_path / "fleet"
    proc = subprocess.Popen(
        [*RLFLEET, "--run-dir", str(run_dir), "up", "--rollout-replicas", "2", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fleet_file = run_dir / "fleet.json"
    end = time.monotonic() + 180
    while not fleet_file.exists():
        if proc.poll() is not None or time.monotonic() > end:
            out = proc.stdout.read().decode() if proc.poll() is not None else ""
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"rlfleet up did not come up:\n{out}")
        time.sleep(0.2)
    info = json.loads(fleet_file.read_text())
    yield run_dir, info
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user would stop it
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    for name, pid in info["pids"].items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # every service is gone after Ctrl-C
        assert name
