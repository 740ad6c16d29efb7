"""The learning-rate schedule: linear warmup, then constant, linear or cosine decay.

Counted in optimizer updates u = step × U + k (U = mini_batches × epochs updates per
TrainStep, k the update within it), so a redone step after a restart gets the same
rates:

    warmup   lr(u) = lr · (u + 1) / W                                  for u < W
    constant lr(u) = lr
    linear   lr(u) = lr · (m + (1 − m)(1 − p))                         p = (u − W) / (N − W)
    cosine   lr(u) = lr · (m + (1 − m) · ½ (1 + cos π p))

with W = ``warmup_steps`` × U, N = ``steps`` × U, m = ``min_lr_ratio``.
"""

from __future__ import annotations

import math

from rlfleet.common.jobspec import AlgorithmSpec


def learning_rate(alg: AlgorithmSpec, *, update: int, total_updates: int) -> float:
    per_step = alg.mini_batches * alg.epochs
    warmup = alg.warmup_steps * per_step
    if update < warmup:
        return alg.lr * (update + 1) / warmup
    if alg.lr_schedule == "constant" or total_updates <= warmup:
        return alg.lr
    p = min(1.0, (update - warmup) / max(1, total_updates - warmup))
    m = alg.min_lr_ratio
    if alg.lr_schedule == "linear":
        return alg.lr * (m + (1 - m) * (1 - p))
    return alg.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))
