"""The trainer's math: GRPO advantages and the PPO loss with IcePop, as in Ring-1T.

One function per formula, each commented with the equation it implements, so
this file can be checked against the paper line by line ("Every Step Evolves",
arXiv 2510.18855, IcePop section). Notation:

- ``logp_infer``: log-prob the inference engine recorded for the sampled token.
- ``logp_old``: training-engine log-prob of the same token at the rollout
  weights θ_old, computed without gradient.
- ``logp``: training-engine log-prob at the weights θ being optimised.
- ``valid``: 1 for a response (completion) token, 0 for padding; |y_i| is its
  row sum, so tokens IcePop masks out still count in the denominator.

Token tensors are ``[B, T]`` (samples × response positions); per-sample
tensors are ``[B]``. Every function here is pure; nothing reads a model.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

CorrectionKind = Literal["icepop", "tis", "none"]


# --------------------------------------------------------------------------- GRPO
def group_advantages(
    rewards: Sequence[float] | Tensor,
    group_ids: Sequence[Hashable],
    *,
    scale: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO group-normalised advantage of every sample.

    A_i = (r_i − mean_g(r)) / (std_g(r) + eps)   with g the group of sample i
    A_i = r_i − mean_g(r)                        when ``scale`` is False

    std is the Bessel-corrected sample standard deviation (as ``torch.std``),
    taken over the group members present in this step. A group with a single
    member, or whose rewards are all equal, carries no learning signal and gets
    A = 0 exactly (not a rounding residue divided by a tiny std).
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if r.numel() != len(group_ids):
        raise ValueError(f"{r.numel()} rewards but {len(group_ids)} group ids")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    adv = torch.zeros_like(r)
    for idx in members.values():
        group = r[idx]
        if group.numel() < 2 or bool((group == group[0]).all()):
            continue  # no contrast inside the group: advantage 0
        centred = group - group.mean()
        adv[idx] = centred / (group.std() + eps) if scale else centred
    return adv.to(torch.float32)


# --------------------------------------------------------------------------- IcePop
def train_inference_ratio(logp_old: Tensor, logp_infer: Tensor) -> Tensor:
    """k = p_train(y_t; θ_old) / p_infer(y_t; θ_old) = exp(logp_train_old − logp_infer)."""
    return torch.exp(logp_old.detach() - logp_infer.detach())


def icepop_band(k: Tensor, *, alpha: float, beta: float) -> Tensor:
    """The tokens IcePop keeps: α ≤ k ≤ β, both boundaries included.

    The loss and the step metrics both decide with this function on the same
    ``k`` (same dtype), so the reported masked fraction is exactly the share of
    tokens the loss weighted 0, even for a k that rounds onto α or β.
    """
    return (k >= alpha) & (k <= beta)


def icepop_weight(k: Tensor, *, alpha: float, beta: float) -> Tensor:
    """IcePop's masking function, detached from the graph.

    M(k) = k   if α ≤ k ≤ β   (both boundaries kept)
         = 0   otherwise
    """
    k = k.detach()
    return torch.where(icepop_band(k, alpha=alpha, beta=beta), k, 0.0)


def tis_weight(k: Tensor, *, cap: float) -> Tensor:
    """Truncated importance sampling, the comparison setting: w = min(k, C), detached."""
    return torch.clamp(k.detach(), max=cap)


def correction_weight(
    k: Tensor, *, kind: CorrectionKind, alpha: float, beta: float, cap: float
) -> Tensor:
    """The per-token weight w_it that multiplies the PPO objective.

    icepop: w = M(k);  tis: w = min(k, C);  none: w = 1.
    """
    if kind == "icepop":
        return icepop_weight(k, alpha=alpha, beta=beta)
    if kind == "tis":
        return tis_weight(k, cap=cap)
    if kind == "none":
        return torch.ones_like(k)
    raise ValueError(f"unknown correction kind {kind!r}; known: icepop, tis, none")


# --------------------------------------------------------------------------- PPO
def policy_ratio(logp: Tensor, logp_old: Tensor) -> Tensor:
    """r = π_θ(y_t) / π_θold(y_t) = exp(logp_θ − logp_train_old); the gradient flows through logp."""
    return torch.exp(logp - logp_old.detach())


def clipped_objective(ratio: Tensor, advantages: Tensor, *, clip_eps: float) -> Tensor:
    """PPO's per-token surrogate: min(r·A, clip(r, 1−ε, 1+ε)·A)."""
    adv = advantages if advantages.dim() == ratio.dim() else advantages.unsqueeze(-1)
    return torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)


def clipped_mask(ratio: Tensor, advantages: Tensor, *, clip_eps: float) -> Tensor:
    """Tokens whose surrogate is the clipped one (their gradient through r is 0).

    (r > 1+ε and A > 0) or (r < 1−ε and A < 0)
    """
    adv = advantages if advantages.dim() == ratio.dim() else advantages.unsqueeze(-1)
    return ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))


def sequence_mean_sum(values: Tensor, valid: Tensor) -> Tensor:
    """Σ_i (1/|y_i|) Σ_t values_it over the rows of a batch.

    |y_i| = Σ_t valid_it counts every response token, masked by IcePop or not.
    An empty response (|y_i| = 0) contributes 0, not 0/0.
    """
    valid = valid.to(values.dtype)
    lengths = valid.sum(dim=-1)
    per_sample = (values * valid).sum(dim=-1) / lengths.clamp(min=1.0)
    return per_sample.sum()


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref), the γ·KL regulariser (GRPO's form).

    k3 = exp(logp_ref − logp) − (logp_ref − logp) − 1   (≥ 0)
    """
    log_ratio = logp_ref.detach() - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


@dataclass
class LossParts:
    """One micro-batch's share of the step loss and what the metrics need from it."""

    loss: Tensor
    """Policy term + γ·KL term of this micro-batch, already divided by G (the step's samples)."""
    policy_loss: Tensor
    """The PPO/IcePop term alone (detached)."""
    kl: Tensor
    """The KL-to-reference term before γ (detached; 0 without a reference)."""
    clipped_tokens: Tensor
    """Response tokens whose surrogate was clipped."""


def icepop_ppo_loss(
    *,
    logp: Tensor,
    logp_old: Tensor,
    logp_infer: Tensor,
    advantages: Tensor,
    valid: Tensor,
    num_samples: int,
    clip_eps: float,
    kind: CorrectionKind = "icepop",
    alpha: float = 0.5,
    beta: float = 5.0,
    cap: float = 2.0,
    kl_coef: float = 0.0,
    logp_ref: Tensor | None = None,
) -> LossParts:
    """The Ring-1T training objective for a (micro-)batch:

    L = −(1/G) Σ_i (1/|y_i|) Σ_t w_it · min(r_it·A_i, clip(r_it, 1−ε, 1+ε)·A_i) + γ·KL
    KL = (1/G) Σ_i (1/|y_i|) Σ_t k3(π_θ, π_ref)_it

    with w = M(k) for IcePop. ``num_samples`` is G for the whole step, so the
    losses of a step's micro-batches add up to the loss of the step and so do
    their gradients (exact gradient accumulation).
    """
    if num_samples < 1:
        raise ValueError("num_samples (G) must be at least 1")
    k = train_inference_ratio(logp_old, logp_infer)
    w = correction_weight(k, kind=kind, alpha=alpha, beta=beta, cap=cap)
    ratio = policy_ratio(logp, logp_old)
    surrogate = clipped_objective(ratio, advantages, clip_eps=clip_eps)
    policy = -sequence_mean_sum(w * surrogate, valid) / num_samples
    if kl_coef > 0.0 and logp_ref is not None:
        kl = sequence_mean_sum(kl_k3(logp, logp_ref), valid) / num_samples
    else:
        kl = torch.zeros((), dtype=policy.dtype, device=policy.device)
    clipped = (clipped_mask(ratio.detach(), advantages, clip_eps=clip_eps) & valid.bool()).sum()
    return LossParts(
        loss=policy + kl_coef * kl,
        policy_loss=policy.detach(),
        kl=kl.detach(),
        clipped_tokens=clipped,
    )


# --------------------------------------------------------------------------- step metrics
def token_entropy(logp_all: Tensor) -> Tensor:
    """H(π)_t = −Σ_v π(v) log π(v), from the log-probs over the vocabulary (last dim)."""
    return -(logp_all.exp() * logp_all).sum(dim=-1)


def mismatch_metrics(
    *,
    logp_old: Tensor,
    logp_infer: Tensor,
    entropy: Tensor | None = None,
    alpha: float,
    beta: float,
) -> dict[str, float]:
    """Train–inference mismatch figures of one step, over its response tokens.

    Inputs are 1-D, one entry per response token of the step (padding removed).
    The tokens were sampled from π_infer, so with k = p_train / p_infer:

    - masked_below_alpha = #{k < α} / N;  masked_above_beta = #{k > β} / N
      (the tokens IcePop drops; reported for every correction kind)
    - train_infer_kl_k1 = (1/N) Σ (logp_infer − logp_train_old) = (1/N) Σ −log k
    - train_infer_kl_k3 = (1/N) Σ (k − 1 − log k)
      both estimate KL(π_infer ‖ π_train) (Schulman's k1/k3: k1 unbiased, may be
      negative on few tokens; k3 unbiased and never negative)
    - max_abs_dp = max |p_train_old − p_infer|, in probability space
    - k_mean = (1/N) Σ k
    - masked_entropy = mean of H(π_train) at the tokens outside [α, β]; 0 when none
    """
    # Which tokens are out of the band is decided on k in the caller's dtype,
    # exactly as the loss computes it; the averages below are taken in float64.
    k_native = train_inference_ratio(logp_old, logp_infer).flatten()
    logp_old = logp_old.detach().double().flatten()
    logp_infer = logp_infer.detach().double().flatten()
    n = logp_old.numel()
    if n == 0:
        return {
            "masked_below_alpha": 0.0,
            "masked_above_beta": 0.0,
            "masked_fraction": 0.0,
            "train_infer_kl_k1": 0.0,
            "train_infer_kl_k3": 0.0,
            "max_abs_dp": 0.0,
            "k_mean": 0.0,
            "masked_entropy": 0.0,
        }
    log_k = logp_old - logp_infer
    k = log_k.exp()
    below = k_native < alpha
    above = k_native > beta
    masked = ~icepop_band(k_native, alpha=alpha, beta=beta)
    if entropy is not None and bool(masked.any()):
        masked_entropy = float(entropy.detach().double().flatten()[masked].mean())
    else:
        masked_entropy = 0.0
    return {
        "masked_below_alpha": float(below.sum()) / n,
        "masked_above_beta": float(above.sum()) / n,
        "masked_fraction": float(masked.sum()) / n,
        "train_infer_kl_k1": float((-log_k).mean()),
        "train_infer_kl_k3": float((k - 1.0 - log_k).mean()),
        "max_abs_dp": float((logp_old.exp() - logp_infer.exp()).abs().max()),
        "k_mean": float(k.mean()),
        "masked_entropy": masked_entropy,
    }


# --------------------------------------------------------------------------- SFT
def sft_nll_sum(logp: Tensor, valid: Tensor) -> Tensor:
    """Σ_i Σ_t −log π(y_i,t | x_i, y_i,<t) over the completion tokens of a micro-batch.

    Divided by the step's completion-token count by the caller (a token mean over the
    whole step), so gradients accumulated over micro-batches equal the step's.
    """
    return -(logp * valid).sum()
