"""CPU seconds per step, per process: the other half of "where the time goes".

Wall time per phase says what a step waits on; on a 2-core machine shared with
other work, what a step costs in CPU matters as much, since every extra
CPU-second of one service is taken from the others (and from TRL's single
process when the machine is busy). Both systems are read from
``/proc/<pid>/stat`` (user + system time of all of a process's threads): each
rlfleet service and Redis, and this process for TRL.
"""

from __future__ import annotations

from _common import proc_cpu_seconds


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
