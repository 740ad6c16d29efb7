"""Vectorised next-token sampling with per-sequence random streams.

Each sequence draws from its own ``random.Random`` seeded from (seed, seq_id,
prefix length), one uniform number per token, and the token is picked by
inverting the (optionally nucleus-truncated) CDF on the device. A sequence's
samples therefore do not depend on which other sequences share its batch or
when they finish, which keeps seeded runs reproducible under continuous
batching, at the cost of one scalar per row per step (no per-row kernels).

The recorded log-prob is ``log_softmax(logits / T)[token]`` with T the sampling
temperature (T = 1 for greedy). Top-p truncation is deliberately not reflected
in it: the trainer recomputes log-probs with exactly this convention.
"""

from __future__ import annotations

import hashlib
import random

import torch


def row_rng(seed: int | None, seq_id: str, num_prefix_tokens: int) -> random.Random:
    """The random stream of one sequence; a resumed sequence gets a fresh, distinct stream."""
    if seed is None:
        return random.Random()  # seeded from the OS
    key = f"{seed}\x00{seq_id}\x00{num_prefix_tokens}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def sample_next(
    logits: torch.Tensor,
    *,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    uniforms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks one token per row; returns (token ids, their log-probs), both shape (B,).

    ``temperatures`` (B,): 0 means greedy. ``top_ps`` (B,): 1 disables nucleus
    sampling. ``uniforms`` (B,) in [0, 1), may be None when every row is greedy.
    """
    logits = logits.float()
    greedy = temperatures <= 0
    scale = torch.where(greedy, torch.ones_like(temperatures), temperatures)
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)
    argmax = logits.argmax(dim=-1)
    if uniforms is None or bool(greedy.all()):
        tokens = argmax
    else:
        tokens = torch.where(greedy, argmax, _inverse_cdf(logp.exp(), top_ps, uniforms))
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _inverse_cdf(probs: torch.Tensor, top_ps: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    vocab = probs.shape[-1]
    if bool((top_ps < 1.0).any()):
        # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches
        # top_p (a token is kept when the mass before it is still below top_p).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        limit = torch.where(top_ps < 1.0, top_ps, torch.full_like(top_ps, float("inf")))
        keep = before < limit[:, None]
        keep[:, 0] = True
        sorted_probs = sorted_probs * keep
        cdf = sorted_probs.cumsum(dim=-1)
        target = uniforms[:, None] * cdf[:, -1:]
        idx = torch.searchsorted(cdf, target, right=True)
        idx = torch.minimum(idx, keep.sum(dim=-1, keepdim=True) - 1)
        return order.gather(-1, idx).squeeze(-1)
    cdf = probs.cumsum(dim=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp(max=vocab - 1)
    tokens = idx.squeeze(-1)
    # Rounding can land the draw on a token whose probability underflowed to 0;
    # fall back to the mode then rather than emit an impossible token.
    impossible = probs.gather(-1, tokens[:, None]).squeeze(-1) <= 0
    return torch.where(impossible, probs.argmax(dim=-1), tokens)
