"""The trainer's math against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from rlfleet.trainer.losses import (
    clipped_mask,
    clipped_objective,
    correction_weight,
    group_advantages,
    icepop_ppo_loss,
    icepop_weight,
    kl_k3,
    mismatch_metrics,
    policy_ratio,
    sequence_mean_sum,
    tis_weight,
    token_entropy,
    train_inference_ratio,
)

ALPHA, BETA = 0.5, 5.0


def _logps_for_k(ks: list[float], *, p_infer: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_old, logp_infer) rows whose k = exp(logp_old − logp_infer) are ``ks``."""
    logp_infer = torch.full((1, len(ks)), math.log(p_infer), dtype=torch.float64)
    logp_old = logp_infer + torch.log(torch.tensor([ks], dtype=torch.float64))
    return logp_old, logp_infer


# ----------------------------------------------------------------- advantages
def test_group_advantages_normalise_within_each_group():
    # group a: mean 0.5, Bessel std sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    adv = group_advantages([1.0, 0.0, 0.5, 3.0, 2.0, 2.0], ["a", "a", "a", "b", "c", "c"])
    expected = torch.tensor([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_group_advantages_only_centred_without_scaling():
    adv = group_advantages([1.0, 0.0, 0.5, 4.0, 2.0], ["a", "a", "a", "b", "b"], scale=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 1.0, -1.0]))


def test_single_member_and_zero_std_groups_get_exactly_zero():
    adv = group_advantages([0.1, 0.1, 0.1, 7.0], ["g", "g", "g", "solo"])
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_advantages_need_one_group_id_per_reward():
    with pytest.raises(ValueError):
        group_advantages([1.0, 2.0], ["a"])


# ----------------------------------------------------------------- IcePop weight
def test_k_is_the_train_over_inference_probability_ratio():
    k = train_inference_ratio(torch.log(torch.tensor([0.3])), torch.log(torch.tensor([0.6])))
    torch.testing.assert_close(k, torch.tensor([0.5]))


def test_icepop_keeps_k_exactly_at_both_boundaries():
    k = torch.tensor([ALPHA, 1.0, BETA])
    assert icepop_weight(k, alpha=ALPHA, beta=BETA).tolist() == [ALPHA, 1.0, BETA]


def test_icepop_masks_k_just_outside_the_band():
    below = torch.nextafter(torch.tensor(ALPHA), torch.tensor(0.0))
    above = torch.nextafter(torch.tensor(BETA), torch.tensor(10.0))
    k = torch.stack([below, above, torch.tensor(0.0), torch.tensor(math.inf)])
    assert icepop_weight(k, alpha=ALPHA, beta=BETA).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_icepop_weight_is_detached():
    k = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not icepop_weight(k * 1.0, alpha=ALPHA, beta=BETA).requires_grad


def test_tis_caps_k_at_c_and_none_is_one():
    k = torch.tensor([0.3, 1.5, 2.0, 3.0, 40.0])
    assert tis_weight(k, cap=2.0).tolist() == pytest.approx([0.3, 1.5, 2.0, 2.0, 2.0])
    w = correction_weight(k, kind="tis", alpha=ALPHA, beta=BETA, cap=2.0)
    assert w.tolist() == pytest.approx([0.3, 1.5, 2.0, 2.0, 2.0])
    none = correction_weight(k, kind="none", alpha=ALPHA, beta=BETA, cap=2.0)
    assert none.tolist() == [1.0] * 5
    with pytest.raises(ValueError):
        correction_weight(k, kind="bogus", alpha=ALPHA, beta=BETA, cap=2.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------- PPO pieces
def test_clipped_objective_by_hand():
    r = torch.tensor([[1.5, 0.5, 0.5, 1.1]])
    a = torch.tensor([[1.0, -1.0, 1.0, -2.0]])
    # min(1.5, 1.2) = 1.2; min(-0.5, -0.8) = -0.8; min(0.5, 0.8) = 0.5; min(-2.2, -2.2) = -2.2
    torch.testing.assert_close(
        clipped_objective(r, a, clip_eps=0.2), torch.tensor([[1.2, -0.8, 0.5, -2.2]])
    )
    assert clipped_mask(r, a, clip_eps=0.2).tolist() == [[True, True, False, False]]


def test_policy_ratio_is_one_at_old_weights():
    logp = torch.log(torch.tensor([0.2, 0.7]))
    torch.testing.assert_close(policy_ratio(logp, logp.clone()), torch.ones(2))


def test_sequence_mean_sum_divides_by_response_length_and_skips_empty_rows():
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 0.0], [9.0, 9.0, 9.0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    # (1 + 2 + 3) / 3 + (5 + 7) / 2 + 0
    assert float(sequence_mean_sum(values, valid)) == pytest.approx(2.0 + 6.0)


# ----------------------------------------------------------------- the loss
def _loss(ks, *, adv=1.0, kind="icepop", valid=None, num_samples=1, **kw):
    logp_old, logp_infer = _logps_for_k(ks)
    logp = logp_old.clone().requires_grad_(True)
    valid = torch.ones_like(logp_old, dtype=torch.bool) if valid is None else valid
    parts = icepop_ppo_loss(
        logp=logp,
        logp_old=logp_old,
        logp_infer=logp_infer,
        advantages=torch.tensor([adv], dtype=torch.float64),
        valid=valid,
        num_samples=num_samples,
        clip_eps=0.2,
        kind=kind,
        alpha=ALPHA,
        beta=BETA,
        cap=2.0,
        **kw,
    )
    return parts, logp


def test_loss_by_hand_with_a_masked_token_in_the_denominator():
    # r = 1 at θ = θ_old, A = 1: tokens weigh M(k) = 1, 2, 0 (k = 10 is above β).
    # L = −(1/1) · (1/3) · (1·1 + 2·1 + 0) = −1
    parts, _ = _loss([1.0, 2.0, 10.0])
    assert parts.loss.item() == pytest.approx(-1.0)
    assert float(parts.policy_loss) == pytest.approx(-1.0)


def test_loss_with_tis_and_no_correction_by_hand():
    # TIS: weights min(k, 2) = 1, 2, 2 -> −(1 + 2 + 2) / 3; none: −(1 + 1 + 1) / 3
    tis, _ = _loss([1.0, 2.0, 10.0], kind="tis")
    none, _ = _loss([1.0, 2.0, 10.0], kind="none")
    assert tis.loss.item() == pytest.approx(-5.0 / 3.0)
    assert none.loss.item() == pytest.approx(-1.0)


def test_every_token_masked_gives_zero_policy_loss_and_zero_gradient():
    parts, logp = _loss([0.1, 0.2, 6.0, 100.0], adv=3.0)
    assert parts.loss.item() == 0.0
    parts.loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad.abs().sum() == 0.0


def test_empty_response_contributes_zero_not_nan():
    logp_old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64))
    logp = logp_old.clone().requires_grad_(True)
    valid = torch.tensor([[True, True], [False, False]])  # the second response is empty
    parts = icepop_ppo_loss(
        logp=logp,
        logp_old=logp_old,
        logp_infer=logp_old,
        advantages=torch.tensor([2.0, -5.0], dtype=torch.float64),
        valid=valid,
        num_samples=2,
        clip_eps=0.2,
    )
    # −(1/2) · ((1/2)(2 + 2) + 0) = −1
    assert parts.loss.item() == pytest.approx(-1.0)
    parts.loss.backward()
    assert logp.grad[1].abs().sum() == 0.0
    assert torch.isfinite(logp.grad).all()


def test_masked_tokens_contribute_exactly_zero_gradient():
    # k = 0.3 (below α) and 7.0 (above β) are masked; 1.0 and 4.0 are kept.
    parts, logp = _loss([1.0, 0.3, 4.0, 7.0], adv=2.0, num_samples=2)
    parts.loss.backward()
    g = logp.grad[0]
    assert g[1] == 0.0 and g[3] == 0.0
    # d/dlogp of −(1/G)(1/|y|) M(k) r A with r = exp(logp − logp_old) = 1: −M(k) A / (G |y|)
    assert float(g[0]) == pytest.approx(-1.0 * 2.0 / (2 * 4))
    assert float(g[2]) == pytest.approx(-4.0 * 2.0 / (2 * 4))


def test_micro_batches_add_up_to_the_whole_step():
    torch.manual_seed(0)
    logp_old = torch.log(torch.rand(4, 5, dtype=torch.float64) * 0.9 + 0.05)
    logp_infer = logp_old + 0.5 * torch.randn(4, 5, dtype=torch.float64)
    theta = (logp_old + 0.1 * torch.randn(4, 5, dtype=torch.float64)).requires_grad_(True)
    valid = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    ).bool()
    adv = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)

    def loss(rows):
        return icepop_ppo_loss(
            logp=theta[rows],
            logp_old=logp_old[rows],
            logp_infer=logp_infer[rows],
            advantages=adv[rows],
            valid=valid[rows],
            num_samples=4,
            clip_eps=0.2,
        ).loss

    whole = loss([0, 1, 2, 3])
    (g_whole,) = torch.autograd.grad(whole, theta)
    parts = loss([0, 1]) + loss([2, 3])
    (g_parts,) = torch.autograd.grad(parts, theta)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(g_parts, g_whole)


def test_kl_term_uses_k3_and_gamma():
    # log_ratio = log(0.25/0.5) = −ln 2: k3 = 0.5 + ln 2 − 1
    k3 = kl_k3(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    assert float(k3) == pytest.approx(0.5 + math.log(2) - 1)
    logp_ref = torch.log(torch.full((1, 3), 0.25, dtype=torch.float64))
    parts, _ = _loss([1.0, 1.0, 1.0], adv=0.0, kl_coef=0.1, logp_ref=logp_ref)
    # policy term 0 (A = 0); KL = k3 at logp = log 0.5, so loss = 0.1 · (0.5 + ln 2 − 1)
    assert float(parts.kl) == pytest.approx(0.5 + math.log(2) - 1)
    assert parts.loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1))


# ----------------------------------------------------------------- step metrics
def test_mismatch_metrics_by_hand():
    p_infer = torch.tensor([0.8, 0.5, 0.25, 0.1], dtype=torch.float64)
    k = torch.tensor([0.25, 1.0, 2.0, 8.0], dtype=torch.float64)
    p_old = k * p_infer  # 0.2, 0.5, 0.5, 0.8
    entropy = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = mismatch_metrics(
        logp_old=p_old.log(), logp_infer=p_infer.log(), entropy=entropy, alpha=ALPHA, beta=BETA
    )
    ln2 = math.log(2)
    assert m["masked_below_alpha"] == 0.25
    assert m["masked_above_beta"] == 0.25
    assert m["masked_fraction"] == 0.5
    # k1 = mean(−log k) = −(−2 ln2 + 0 + ln2 + 3 ln2) / 4
    assert m["train_infer_kl_k1"] == pytest.approx(-ln2 / 2)
    # k3 = mean(k − 1 − log k)
    k3 = ((0.25 - 1 + 2 * ln2) + 0 + (2 - 1 - ln2) + (8 - 1 - 3 * ln2)) / 4
    assert m["train_infer_kl_k3"] == pytest.approx(k3)
    assert m["max_abs_dp"] == pytest.approx(0.7)  # |0.8 − 0.1|
    assert m["k_mean"] == pytest.approx(11.25 / 4)
    assert m["masked_entropy"] == pytest.approx((1.0 + 4.0) / 2)  # tokens 0 and 3


def test_mismatch_metrics_without_masked_tokens_or_tokens_at_all():
    same = torch.log(torch.tensor([0.3, 0.6]))
    m = mismatch_metrics(
        logp_old=same, logp_infer=same, entropy=torch.tensor([1.0, 1.0]), alpha=ALPHA, beta=BETA
    )
    assert m["masked_entropy"] == 0.0 and m["masked_fraction"] == 0.0
    assert m["train_infer_kl_k1"] == 0.0 and m["train_infer_kl_k3"] == 0.0
    assert m["k_mean"] == pytest.approx(1.0) and m["max_abs_dp"] == 0.0
    empty = mismatch_metrics(
        logp_old=torch.zeros(0), logp_infer=torch.zeros(0), alpha=ALPHA, beta=BETA
    )
    assert all(v == 0.0 for v in empty.values())


def test_token_entropy_by_hand():
    uniform = torch.log(torch.full((1, 4), 0.25))
    assert float(token_entropy(uniform)) == pytest.approx(math.log(4))
    one_hot = torch.log(torch.tensor([[1.0, 0.0]]).clamp(min=1e-45))
    assert float(token_entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)
