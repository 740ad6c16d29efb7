"""The mismatch the IcePop bench injects is the documented one.

The torch rollout engine's ``logit_noise_std`` σ makes the engine sample from,
and record the log-prob of, log_softmax(logits + σ·ε) (T = 1), ε ~ N(0, 1) per
vocabulary entry and step, drawn from the sequence's own seeded stream. Checked
here: σ = 0 records the trainer's exact log-probs; σ > 0 records log-probs of a
different, still normalised policy, by the same amount whatever the batch; the
trainer then sees k = p_train / p_infer spread by about that amount.
"""

from __future__ import annotations

import threading

import pytest
import torch
from rlfleet.rollout.engine import Sampling, SeqRequest
from rlfleet.rollout.torch_engine import TorchEngine
from rlfleet.trainer.losses import mismatch_metrics

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _generate(model_dir, *, sigma: float, prompts=PROMPTS) -> dict[str, tuple[list, list]]:
    engine = TorchEngine(device="cpu", dtype="float32", logit_noise_std=sigma)
    try:
        engine.load_model(str(model_dir))
        seqs = [SeqRequest(seq_id=f"g{i}-0", prompt_token_ids=p) for i, p in enumerate(prompts)]
        results = []
        engine.generate(
            seqs,
            Sampling(max_new_tokens=12, temperature=1.0, seed=3),
            abort=threading.Event(),
            on_result=results.append,
        )
    finally:
        engine.close()
    return {r.seq_id: (r.token_ids, r.logprobs) for r in results}


def _train_logprobs(model, prompt, tokens) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_logit_noise_is_a_known_reproducible_train_inference_mismatch(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    exact = _generate(tiny_model_dir, sigma=0.0)
    noisy = _generate(tiny_model_dir, sigma=1.0)
    alone = _generate(tiny_model_dir, sigma=1.0, prompts=PROMPTS[:1])  # a different batch

    old, infer = [], []
    for i, prompt in enumerate(PROMPTS):
        tokens, logps = exact[f"g{i}-0"]
        train = _train_logprobs(model, prompt, tokens)
        torch.testing.assert_close(
            torch.tensor(logps, dtype=torch.float32), train, atol=1e-4, rtol=0
        )
        tokens, logps = noisy[f"g{i}-0"]
        old.append(_train_logprobs(model, prompt, tokens))
        infer.append(torch.tensor(logps, dtype=torch.float32))
    # The perturbation belongs to the sequence: the same tokens whatever the batch, and
    # the same log-probs up to float rounding (a kernel may reorder a reduction when the
    # batch shape changes, which moves the last bits).
    assert noisy["g0-0"][0] == alone["g0-0"][0]
    torch.testing.assert_close(
        torch.tensor(noisy["g0-0"][1]), torch.tensor(alone["g0-0"][1]), atol=1e-5, rtol=1e-5
    )

    m = mismatch_metrics(logp_old=torch.cat(old), logp_infer=torch.cat(infer), alpha=0.5, beta=5.0)
    # log k = Δ(σε at the token) − Δ(log-normaliser): of order σ = 1 per token.
    assert 0.05 < m["train_infer_kl_k3"] < 5.0
    assert m["masked_fraction"] > 0.0


def test_negative_noise_is_refused():
    with pytest.raises(ValueError, match="logit_noise_std"):
        TorchEngine(device="cpu", dtype="float32", logit_noise_std=-1.0).close()
