"""The cores both systems get, and the CPU-seconds per step each spends.

Same cores: this process pins itself to one CPU set (``os.sched_setaffinity``) before it starts
anything, so every rlfleet service and Redis (started by it, which inherit the affinity) and
TRL (in this process) run on exactly the same CPUs; ``check_pinned`` reads each child's
affinity back. TRL runs on one torch thread and on as many as the set has CPUs (vs_trl.py
says which runs use which); rlfleet's services run one torch thread each, as the local fleet
does, several of them computing at once (two rollout replicas during generation).

CPU per step: wall time per phase says what a step waits on; on a 2-core machine shared with
other work, what a step costs in CPU matters as much, since every extra CPU-second of one
service is taken from the others (and from TRL's process when the machine is busy). Both
systems are read from ``/proc/<pid>/stat`` (user + system time of all of a process's
threads): each rlfleet service and Redis, and this process for TRL. Threads that spin while
waiting for work (OpenMP's barrier) count too: they are a cost the machine pays.
"""

from __future__ import annotations

import os

from _common import proc_cpu_seconds


def pin(cpus: list[int] | None) -> list[int]:
    """Pins this process (and so every process it starts after) to ``cpus``; None: the CPUs
    it may already use. Returns the set, sorted."""
    wanted = set(cpus) if cpus else os.sched_getaffinity(0)
    os.sched_setaffinity(0, wanted)
    return sorted(os.sched_getaffinity(0))


def check_pinned(pids: dict[str, int], cpus: list[int]) -> None:
    """Raises if a process runs on other CPUs than ``cpus`` (one that set its own affinity)."""
    off = {n: sorted(os.sched_getaffinity(p)) for n, p in pids.items()}
    off = {n: s for n, s in off.items() if s != cpus}
    if off:
        raise RuntimeError(f"processes not on CPUs {cpus}: {off}; the comparison would be unfair")


class StepCpuMeter:
    """CPU per step between the first snapshot taken at step ≥ 1 and the last one.

    The first step (start-up, warm-up) is left out, as in the step times. Call
    ``sample(steps_done)`` while the job runs and once after it ends; snapshots
    land mid-step, so the window's ends are off by up to one poll interval.
    """

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.first: tuple[int, dict[str, float]] | None = None
        self.last: tuple[int, dict[str, float]] | None = None

    def sample(self, steps_done: int) -> None:
        if steps_done < 1:
            return
        snap = {name: proc_cpu_seconds(pid) for name, pid in self.pids.items()}
        if self.first is None:
            self.first = (steps_done, snap)
        self.last = (steps_done, snap)

    def per_step(self) -> dict[str, float]:
        """CPU seconds per step by process, plus ``total``; empty if too few snapshots."""
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return {}
        steps = self.last[0] - self.first[0]
        out = {n: (self.last[1][n] - self.first[1][n]) / steps for n in self.pids}
        out["total"] = sum(out.values())
        return out


def mean_per_step(runs: list[dict[str, float]]) -> dict[str, float]:
    """The mean over runs (seeds) of CPU seconds per step, per process and total."""
    runs = [r for r in runs if r]
    if not runs:
        return {}
    return {n: sum(r.get(n, 0.0) for r in runs) / len(runs) for n in runs[0]}
