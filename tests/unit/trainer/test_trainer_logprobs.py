"""The chunked log-prob pass (trainer/logprobs.py) gives the full-logits numbers and
gradients; micro-batches bounded by a token budget keep the step's gradient exact."""

from __future__ import annotations

import copy

import pytest
import torch
from rlfleet.common.errors import InvalidArgument
from rlfleet.trainer.batching import TrainSample, micro_batches
from rlfleet.trainer.logprobs import _full_logits_logprobs, chunkable, response_logprobs


def _samples(n: int = 5) -> list[TrainSample]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 32, (2 + i,), generator=g).tolist()
        completion = torch.randint(1, 32, (1 + 2 * i,), generator=g).tolist()
        out.append(TrainSample(f"s{i}", f"g{i}", tuple(prompt), tuple(completion),
                               (0.0,) * len(completion), 0.0))  # fmt: skip
    return out


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_logprobs_and_gradients_equal_the_full_logits(model, chunk):
    assert chunkable(model)
    [mb] = micro_batches(_samples(), torch.zeros(5), size=8, pad_id=0)
    weights = torch.linspace(-1.0, 1.0, mb.valid.numel()).reshape(mb.valid.shape)
    full = _full_logits_logprobs(model, mb, temperature=0.7)
    chunked = response_logprobs(model, mb, temperature=0.7, chunk_tokens=chunk)
    assert torch.allclose(chunked.logp, full.logp, atol=1e-5)
    assert (chunked.logp[~mb.valid] == 0).all()
    want = _grads(model, (full.logp * weights).sum())
    got = _grads(model, (response_logprobs(model, mb, temperature=0.7,
                                            chunk_tokens=chunk).logp * weights).sum())  # fmt: skip
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5), name
    # The entropy at the tokens outside a band, from whole distributions there only.
    band = (0.9, 1.1)
    full = _full_logits_logprobs(model, mb, temperature=0.7, entropy_band=band)
    chunked = response_logprobs(model, mb, temperature=0.7, chunk_tokens=chunk, entropy_band=band)
    assert bool((full.entropy > 0).any())
    assert torch.allclose(chunked.entropy, full.entropy, atol=1e-5)


def test_a_head_that_is_not_a_plain_projection_takes_the_full_logits_path(model):
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0
    assert not chunkable(capped)
    [mb] = micro_batches(_samples(2), torch.zeros(2), size=8, pad_id=0)
    full = _full_logits_logprobs(capped, mb, temperature=1.0)
    assert torch.equal(response_logprobs(capped, mb, temperature=1.0).logp, full.logp)


def test_a_token_budget_bounds_each_micro_batch_and_the_gradient_stays_the_steps(model):
    samples = _samples(6)
    lengths = {s.sample_id: len(s.prompt_ids) + len(s.completion_ids) for s in samples}
    batches = micro_batches(samples, torch.zeros(6), size=64, pad_id=0, max_tokens=20)
    assert len(batches) > 1
    for mb in batches:
        assert mb.input_ids.numel() <= 20  # rows × the widest row
    assert sorted(r for mb in batches for r in mb.rows) == list(range(6))

    def step_grads(split) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for mb in split:
            (response_logprobs(model, mb, temperature=1.0).logp.sum() / 6).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    whole = step_grads(micro_batches(samples, torch.zeros(6), size=64, pad_id=0))
    split = step_grads(batches)
    for name in whole:
        assert torch.allclose(split[name], whole[name], atol=1e-5), name

    longest = max(lengths.values())
    with pytest.raises(InvalidArgument, match=rf"\({longest - 1}\) is shorter than sample s5"):
        micro_batches(samples, torch.zeros(6), size=64, pad_id=0, max_tokens=longest - 1)


def test_packed_micro_batches_give_the_padded_log_probs_and_gradients(model):
    """Padding-free packing: one row, position ids restarting at each sequence; the
    token budget then counts real tokens, so fewer micro-batches carry the same step."""
    samples = _samples(6)
    padded = micro_batches(samples, torch.zeros(6), size=64, pad_id=0, max_tokens=40)
    packed = micro_batches(samples, torch.zeros(6), size=64, pad_id=0, max_tokens=40,
                           packed=True)  # fmt: skip
    assert all(mb.input_ids.size(0) == 1 and mb.input_ids.numel() <= 40 for mb in packed)
    assert len(packed) < len(padded)
    real = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    assert sum(mb.input_ids.numel() for mb in packed) == real  # not one pad token

    def scored(split):
        model.zero_grad(set_to_none=True)
        logp = {}
        for mb in split:
            out = response_logprobs(model, mb, temperature=0.8, chunk_tokens=4).logp
            (out.sum() / 6).backward()
            for b, row in enumerate(mb.rows):
                logp[row] = out[b, : len(samples[row].completion_ids)].detach()
        return logp, {n: p.grad.clone() for n, p in model.named_parameters()}

    want_logp, want_grads = scored(padded)
    got_logp, got_grads = scored(packed)
    for row, value in want_logp.items():
        assert torch.allclose(got_logp[row], value, atol=1e-5), row
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], atol=1e-5), name


def test_activation_checkpointing_gives_the_same_gradients(model):
    from rlfleet.trainer.checkpointing import enable_activation_checkpointing

    [mb] = micro_batches(_samples(), torch.zeros(5), size=8, pad_id=0)
    plain = copy.deepcopy(model)
    recomputed = copy.deepcopy(model)
    assert enable_activation_checkpointing(recomputed) == model.config.num_hidden_layers
    calls = []
    recomputed.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    want = _grads(plain, response_logprobs(plain, mb, temperature=1.0).logp.sum())
    got = _grads(recomputed, response_logprobs(recomputed, mb, temperature=1.0).logp.sum())
    assert len(calls) == 2  # the layer ran again in the backward pass
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    with torch.no_grad():  # no gradients: the layers run as they are
        assert torch.equal(response_logprobs(recomputed, mb, temperature=1.0).logp,
                           response_logprobs(plain, mb, temperature=1.0).logp)  # fmt: skip
