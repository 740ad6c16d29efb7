"""PPO as users run it: several optimizer updates per rollout batch (mini-batches ×
epochs) with θ_old from a pass of its own, so r ≠ 1 and the clip acts; the
learning-rate schedule with warmup."""

from __future__ import annotations

import copy

import pytest
import torch
from rlfleet.common.jobspec import AlgorithmSpec, JobSpec
from rlfleet.trainer.batching import TrainSample, micro_batches
from rlfleet.trainer.grpo import grpo_update, update_parts
from rlfleet.trainer.logprobs import response_logprobs
from rlfleet.trainer.schedule import learning_rate


def _samples(model) -> list[TrainSample]:
    """Two groups of four with mixed rewards; inference log-probs = the model's own (k = 1)."""
    g = torch.Generator().manual_seed(5)
    raw = []
    for i in range(8):
        prompt = tuple(torch.randint(1, 32, (3,), generator=g).tolist())
        completion = tuple(torch.randint(1, 32, (4,), generator=g).tolist())
        raw.append(TrainSample(f"s{i}", f"g{i // 4}", prompt, completion, (0.0,) * 4,
                               float(i % 2)))  # fmt: skip
    [mb] = micro_batches(raw, torch.zeros(8), size=8, pad_id=0)
    with torch.no_grad():
        logp = response_logprobs(model, mb, temperature=1.0).logp
    return [
        TrainSample(s.sample_id, s.group_id, s.prompt_ids, s.completion_ids,
                    tuple(logp[b, :4].tolist()), s.reward)
        for b, s in zip(range(8), [raw[r] for r in mb.rows], strict=True)
    ]  # fmt: skip


def _spec(**algorithm) -> JobSpec:
    return JobSpec.model_validate({"model": {"path": "unused"}, "steps": 10,
                                   "algorithm": {"group_size": 4, "prompts_per_step": 2,
                                                 **algorithm}})  # fmt: skip


def _update(model, spec: JobSpec) -> tuple[dict, torch.nn.Module]:
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=spec.algorithm.lr)
    out = grpo_update(m, opt, _samples(model), spec=spec, step=0,
                      device=torch.device("cpu"), pad_id=0)  # fmt: skip
    return out, m


def test_one_update_never_clips_and_several_do(model):
    one, _ = _update(model, _spec(lr=0.05))
    assert one["policy_updates"] == 1 and one["clip_fraction"] == 0.0
    many, _ = _update(model, _spec(lr=0.05, mini_batches=2, epochs=3, clip_eps=0.05))
    assert many["policy_updates"] == 6
    assert many["clip_fraction"] > 0.0  # later updates see r = π_θ / π_θold away from 1
    # θ_old is the rollout policy: with k = 1 nothing is masked, as in the one-update step.
    assert many["masked_below_alpha"] == one["masked_below_alpha"] == 0.0


def test_several_updates_at_a_vanishing_rate_equal_one_update(model):
    """With lr → 0, θ stays θ_old, so every update's loss is the one-pass loss of its part."""
    one, m1 = _update(model, _spec(lr=1e-12))
    many, m2 = _update(model, _spec(lr=1e-12, mini_batches=4))
    assert many["clip_fraction"] == 0.0
    assert many["loss"] == pytest.approx(one["loss"], abs=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-8)


def test_update_parts_cover_every_sample_once_per_epoch_and_repeat_for_a_redone_step():
    parts = update_parts(10, mini_batches=3, epochs=2, seed=7)
    assert len(parts) == 6 and [len(p) for p in parts] == [4, 3, 3, 4, 3, 3]
    assert sorted(sum(parts[:3], [])) == sorted(sum(parts[3:], [])) == list(range(10))
    assert parts == update_parts(10, mini_batches=3, epochs=2, seed=7)
    assert update_parts(5, mini_batches=1, epochs=1, seed=7) == [[0, 1, 2, 3, 4]]


def test_learning_rate_schedules_with_warmup():
    def lrs(**kw) -> list[float]:
        alg = AlgorithmSpec(lr=1.0, **kw)
        total = 10 * alg.mini_batches * alg.epochs
        return [learning_rate(alg, update=u, total_updates=total) for u in range(total)]

    assert lrs() == [1.0] * 10
    assert lrs(warmup_steps=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lrs(lr_schedule="linear", warmup_steps=2, min_lr_ratio=0.1)
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[-1] == pytest.approx(0.1 + 0.9 / 8)
    cosine = lrs(lr_schedule="cosine")
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item())
    )
    assert all(a >= b for a, b in zip(cosine, cosine[1:], strict=False))
    # Warmup and decay count optimizer updates: two per step with mini_batches = 2.
    assert lrs(warmup_steps=1, mini_batches=2)[:3] == [0.5, 1.0, 1.0]


def _lm(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def test_bf16_compute_over_fp32_masters_keeps_small_updates_that_bf16_masters_lose():
    """At lr 2e-6 an AdamW update is ~2e-6 per weight: below half a bf16 ulp of most
    weights, so bf16 masters do not move, while fp32 masters under bf16 compute do."""
    moved = {}
    for master in ("float32", "bfloat16"):
        model = _lm(getattr(torch, master))
        before = [p.detach().clone() for p in model.parameters()]
        spec = JobSpec.model_validate({
            "model": {"path": "unused", "dtype": "bfloat16", "master_dtype": master},
            "algorithm": {"group_size": 4, "prompts_per_step": 2, "lr": 2e-6}})  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=2e-6, weight_decay=0.0)
        out = grpo_update(model, opt, _samples(_lm(torch.float32)), spec=spec, step=0,
                          device=torch.device("cpu"), pad_id=0)  # fmt: skip
        assert out["grad_norm"] > 0
        changed = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before, strict=True))
        moved[master] = changed / sum(b.numel() for b in before)
        assert all(p.dtype == getattr(torch, master) for p in model.parameters())
    assert moved["float32"] > 0.9
    assert moved["bfloat16"] < 0.1
