"""Where a step's wall time goes, for rlfleet and for TRL, in the same phases.

rlfleet's phases come from what the scheduler already records per step (the
step history, ``GetSteps`` / ``GET /v1/jobs/{id}/steps``): the step loop times
rollout, reward, train and sync (``scheduler/loop.py``), and the trainer adds
its own ``trainer_step_seconds`` to the TrainStep metrics. TRL's come from
timers wrapped around ``GRPOTrainer``'s own methods in this process. Both are
split per step against the same interval the headline uses (end of one step to
the end of the next), so the phases of a step add up to its wall time and
``other`` is what no phase accounts for.

Phases:
- ``generation``: rlfleet's rollout phase (prompt groups out, replicas' streams
  back); TRL's ``_generate`` (tokenise + HF ``generate``).
- ``reward``: rlfleet's Score calls (verify + write to the Redis buffer); TRL's
  ``_calculate_rewards``.
- ``train``: rlfleet's trainer step (buffer read, advantages, loss
  forward/backward, AdamW); TRL's ``training_step`` minus generation and
  reward, plus clipping and the optimizer step.
- ``publish`` (rlfleet only): the TrainStep call minus the trainer's own step:
  pushing the version to weight-sync, storing the result, acknowledging, gRPC.
- ``replica_load`` (rlfleet only): every replica pulling and loading the new version.
- ``other``: the remainder. rlfleet: the scheduler's pre-step replica check,
  recording the step, its state checks. TRL: data loading, logging, callbacks.
"""

from __future__ import annotations

import functools
import statistics
import time

PHASES = ("generation", "reward", "train", "publish", "replica_load", "other")


def rlfleet_phases(records, intervals: list[float]) -> list[dict[str, float]]:
    """Per-step phases from the scheduler's step records (``intervals[i]`` is step i's wall time)."""
    out = []
    for record, interval in zip(records, intervals, strict=True):
        m = record.metrics
        own = m.get("trainer_step_seconds", m.get("train_seconds", 0.0))
        step = {
            "generation": m.get("rollout_seconds", 0.0),
            "reward": m.get("reward_seconds", 0.0),
            "train": own,
            "publish": max(0.0, m.get("train_seconds", 0.0) - own),
            "replica_load": m.get("sync_seconds", 0.0),
        }
        step["other"] = interval - sum(step.values())
        out.append(step)
    return out


class TrlTimers:
    """Times GRPOTrainer's phases by wrapping its bound methods and hooking its callbacks.

    ``install(trainer)`` replaces ``_generate``, ``_calculate_rewards`` and
    ``training_step`` on the instance (the trainer calls them through ``self``);
    the callback marks the optimizer window (end of ``training_step`` to
    ``on_step_end``: gradient clipping, AdamW, zero_grad, the LR scheduler).
    """

    def __init__(self):
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []  # raw seconds per step, in order
        self._train_end = 0.0

    def _timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start
                if name == "training_step":
                    self._train_end = time.perf_counter()

        return wrapper

    def install(self, trainer) -> None:
        for attr, name in (
            ("_generate", "generate"),
            ("_calculate_rewards", "reward"),
            ("training_step", "training_step"),
        ):
            setattr(trainer, attr, self._timed(name, getattr(trainer, attr)))

    def step_end(self) -> None:
        """Called from the callback's ``on_step_end``."""
        self.current["optimizer"] = time.perf_counter() - self._train_end
        self.steps.append(self.current)
        self.current = {}

    def phases(self, intervals: list[float]) -> list[dict[str, float]]:
        out = []
        for raw, interval in zip(self.steps, intervals, strict=True):
            gen, rew = raw.get("generate", 0.0), raw.get("reward", 0.0)
            step = {
                "generation": gen,
                "reward": rew,
                "train": raw.get("training_step", 0.0) - gen - rew + raw.get("optimizer", 0.0),
                "publish": 0.0,
                "replica_load": 0.0,
            }
            step["other"] = interval - sum(step.values())
            out.append(step)
        return out


def summarise(per_step: list[dict[str, float]], *, skip_first: bool = True) -> dict:
    """Median seconds per phase and each phase's share of the total, first step left out
    (``skip_first=False``: the caller pooled steady steps of several runs already)."""
    steady = per_step[1:] if skip_first and len(per_step) > 1 else per_step
    totals = {p: sum(s[p] for s in steady) for p in PHASES}
    grand = sum(totals.values()) or 1.0
    return {
        "median_s": {p: statistics.median(s[p] for s in steady) for p in PHASES},
        "share": {p: totals[p] / grand for p in PHASES},
        "mean_step_s": grand / len(steady),
    }


def table(breakdown: dict[str, dict]) -> str:
    """Systems side by side: median seconds per step and share of the step, per phase."""
    names = list(breakdown)
    head = f"  {'phase':<13}" + "".join(f"{n:>22}" for n in names)
    lines = [
        "  where the time goes (median s per step, share of all steady steps' time):",
        head,
    ]
    for phase in PHASES:
        cells = []
        for n in names:
            b = breakdown[n]
            if phase in ("publish", "replica_load") and n.startswith("trl"):
                cells.append(f"{'(in process)':>22}")
            else:
                cells.append(f"{b['median_s'][phase]:>13.3f}s {b['share'][phase]:>6.0%}")
        lines.append(f"  {phase:<13}" + "".join(cells))
    lines.append(
        f"  {'mean step':<13}"
        + "".join(f"{breakdown[n]['mean_step_s']:>13.3f}s {'':>7}" for n in names)
    )
    return "\n".join(lines)
