"""The SFT update: the token-mean negative log-likelihood of the completion tokens only,
accumulated exactly over micro-batches, and a step that lowers it."""

from __future__ import annotations

import copy
import dataclasses

import torch
from rlfleet.common.jobspec import JobSpec
from rlfleet.trainer.batching import TrainSample
from rlfleet.trainer.sft import sft_update


def _samples() -> list[TrainSample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(6):
        prompt = torch.randint(1, 32, (3 + i % 3,), generator=g).tolist()
        completion = torch.randint(1, 32, (2 + i % 4,), generator=g).tolist()
        out.append(TrainSample(f"s{i}", f"g{i}", tuple(prompt), tuple(completion),
                               (0.0,) * len(completion), 0.0))  # fmt: skip
    return out


def _spec(**algorithm) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"path": "unused"}, "steps": 100,
        "task": {"kind": "dataset", "dataset": {"path": "unused.jsonl"}},
        "algorithm": {"kind": "sft", **algorithm}})  # fmt: skip


def _reference_nll(model, samples) -> float:
    """−(1/N) Σ log p(learned completion token) with prompt positions and masked tokens
    ignored, one sample at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = ids[0, 1:].clone()
            targets[: len(s.prompt_ids) - 1] = -100  # prompt tokens carry no loss
            mask = s.loss_mask or (True,) * len(s.completion_ids)
            for i, learned in enumerate(mask):
                if not learned:  # a transcript's tool result: in the sequence, no loss
                    targets[len(s.prompt_ids) - 1 + i] = -100
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += sum(mask)
    return total / count


def test_sft_loss_is_the_completion_token_mean_nll_whatever_the_micro_batches(model):
    samples = _samples()
    want = _reference_nll(model, samples)
    grads = []
    for size in (1, 4, 64):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        spec = _spec(micro_batch_size=size, max_grad_norm=1e9)
        out = sft_update(m, opt, samples, spec=spec, step=0, device=torch.device("cpu"), pad_id=0)
        assert abs(out["sft_loss"] - want) < 1e-5
        assert out["tokens"] == sum(len(s.completion_ids) for s in samples)
        # lr 0 leaves the weights; the gradients are what accumulation produced.
        m.zero_grad()
        grads.append(out["grad_norm"])
    assert max(grads) - min(grads) < 1e-4


def test_masked_transcript_tokens_neither_carry_loss_nor_count_in_n(model):
    """A tool transcript: the tool's tokens are in the sequence but not learned; the loss
    is the mean over the learned tokens only (dividing by all tokens would shrink it)."""
    samples = [
        dataclasses.replace(s, loss_mask=tuple(i % 3 != 1 for i in range(len(s.completion_ids))))
        for s in _samples()
    ]
    m = copy.deepcopy(model)
    out = sft_update(m, torch.optim.SGD(m.parameters(), lr=0.0), samples,
                     spec=_spec(micro_batch_size=4), step=0, device=torch.device("cpu"), pad_id=0)  # fmt: skip
    assert (
        out["tokens"]
        == sum(sum(s.loss_mask) for s in samples)
        < sum(len(s.completion_ids) for s in samples)
    )
    assert abs(out["sft_loss"] - _reference_nll(model, samples)) < 1e-5


def test_sft_steps_lower_the_loss(model):
    m = copy.deepcopy(model)
    samples = _samples()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    spec = _spec(micro_batch_size=4, lr=1e-2)
    cpu = torch.device("cpu")
    losses = [
        sft_update(m, opt, samples, spec=spec, step=i, device=cpu, pad_id=0)["sft_loss"]
        for i in range(15)
    ]
    assert losses[-1] < 0.7 * losses[0]
