"""The PyTorch engine: the shared engine suite plus checks of its own batching and sampler."""

from __future__ import annotations

import threading

import pytest
import torch
from engine_suite import *  # noqa: F403 - the shared engine suite runs on this engine
from engine_suite import PROMPTS, long_prompts, ref_greedy, run
from rlfleet.common.errors import InvalidArgument
from rlfleet.rollout.engine import Sampling, SeqRequest, setup_engine
from rlfleet.rollout.kvbatch import KVBatch, Row
from rlfleet.rollout.sampling import row_rng, sample_next
from rlfleet.rollout.torch_engine import TorchEngine


@pytest.fixture
def make_engine():
    return lambda: TorchEngine(device="cpu", dtype="float32")


def test_setup_engine_builds_torch_and_refuses_unknown_kinds():
    eng = setup_engine("torch", device="cpu", dtype="float32")
    try:
        assert isinstance(eng, TorchEngine) and eng.kind == "torch"
    finally:
        eng.close()
    with pytest.raises(ValueError, match="unknown rollout engine kind"):
        setup_engine("tensorrt")


def test_load_model_refuses_a_directory_without_config(tmp_path):
    eng = TorchEngine(device="cpu", dtype="float32")
    try:
        with pytest.raises(InvalidArgument, match="config.json"):
            eng.load_model(str(tmp_path))
        assert not eng.loaded
    finally:
        eng.close()


def test_prompt_longer_than_the_context_is_refused(engine):
    with pytest.raises(InvalidArgument, match="context"):
        engine.generate(
            [SeqRequest("a", [5] * 600)],
            Sampling(max_new_tokens=2, temperature=0),
            abort=threading.Event(),
            on_result=lambda r: None,
        )


def _row(prompt: list[int]) -> Row:
    return Row(None, SeqRequest("x", prompt), [], [], [], 100, row_rng(0, "x", 0), temperature=0.0)


@torch.no_grad()
def test_finished_rows_leave_the_batch_and_padding_is_trimmed(reference_model):
    rows = [_row([5] * 9), _row([6, 7]), _row([8, 9, 10])]
    batch = KVBatch.prefill(reference_model, rows, device=torch.device("cpu"), version=0)
    assert batch.mask.shape == (3, 9)
    batch.decode(reference_model, version=0)
    batch = batch.select([1, 2])  # the 9-token row finished
    # Only the longest live row's columns remain: 3 prompt tokens + 1 decoded.
    assert batch.mask.shape == (2, 4)
    assert batch.cache.layers[0].keys.shape[0] == 2
    assert batch.cache.get_seq_length() == 4
    for _ in range(5):
        batch.decode(reference_model, version=0)
    for row in batch.rows:
        assert row.tokens == ref_greedy(reference_model, row.req.prompt_token_ids, 7)


@torch.no_grad()
def test_merged_rows_decode_like_fresh_ones(reference_model):
    cpu = torch.device("cpu")
    a = KVBatch.prefill(reference_model, [_row(PROMPTS[3])], device=cpu, version=0)
    for _ in range(3):
        a.decode(reference_model, version=0)
    b = KVBatch.prefill(
        reference_model, [_row(PROMPTS[0]), _row(PROMPTS[2])], device=cpu, version=0
    )
    batch = a.merge(b)
    assert len(batch.rows) == 3 and batch.cache.layers[0].keys.shape[0] == 3
    for _ in range(6):
        batch.decode(reference_model, version=0)
    for row in batch.rows:
        n = len(row.tokens)
        assert row.tokens == ref_greedy(reference_model, row.req.prompt_token_ids, n)


def test_sampler_greedy_rows_take_the_argmax_and_log_softmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    tokens, logprobs = sample_next(
        logits, temperatures=torch.zeros(2), top_ps=torch.ones(2), uniforms=None
    )
    assert tokens.tolist() == [1, 0]
    expected = torch.log_softmax(logits, -1)[[0, 1], [1, 0]]
    assert torch.allclose(logprobs, expected)


def test_sampler_draws_follow_the_distribution_and_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 2000
    logits = probs.log().expand(n, -1)
    uniforms = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # an even grid of draws
    tokens, logprobs = sample_next(
        logits, temperatures=torch.ones(n), top_ps=torch.ones(n), uniforms=uniforms
    )
    counts = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(counts, probs, atol=2 / n)
    assert torch.allclose(logprobs, probs.log()[tokens])
    # top_p = 0.7 keeps {0, 1} (mass before token 2 is 0.8); draws are renormalised over them.
    tokens, logprobs = sample_next(
        logits, temperatures=torch.ones(n), top_ps=torch.full((n,), 0.7), uniforms=uniforms
    )
    counts = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=2 / n)
    assert torch.allclose(logprobs, probs.log()[tokens])  # truncation not in the log-prob


def test_row_streams_depend_on_seed_id_and_prefix():
    draw = lambda *key: row_rng(*key).random()  # noqa: E731
    assert draw(1, "a", 0) == draw(1, "a", 0)
    assert len({draw(1, "a", 0), draw(2, "a", 0), draw(1, "b", 0), draw(1, "a", 3)}) == 4


def _counter(counter) -> float:
    return counter._value.get()


def _abort_midway(engine, reference_model, *, resume_kv: bool, limit: int = 40):
    """Three long rows stopped by an Abort once a fourth, nearly done, finishes."""
    longs = long_prompts(reference_model, limit, 3)
    short = SeqRequest(
        "short", [5, 6], prefix_token_ids=[9] * (limit - 2),
        prefix_logprobs=[-2.0] * (limit - 2), prefix_versions=[0] * (limit - 2),
    )  # fmt: skip
    abort = threading.Event()
    results: dict[str, object] = {}

    def on_result(r) -> None:
        results[r.seq_id] = r
        if r.seq_id == "short":
            abort.set()

    sampling = Sampling(max_new_tokens=limit, temperature=0.0, resume_kv=resume_kv)
    seqs = [short] + [SeqRequest(f"long{i}", p) for i, p in enumerate(longs)]
    engine.generate(seqs, sampling, abort=abort, on_result=on_result)
    partials = [results[f"long{i}"] for i in range(3)]
    assert all(r.finish_reason == "aborted" and 0 < len(r.token_ids) < limit for r in partials)
    return longs, partials, sampling


def _resume(engine, prompts, partials, sampling, *, drop_last: int = 0):
    reqs = [
        SeqRequest(
            f"long{i}", prompt,
            prefix_token_ids=p.token_ids[: len(p.token_ids) - drop_last],
            prefix_logprobs=p.logprobs[: len(p.logprobs) - drop_last],
            prefix_versions=p.versions[: len(p.versions) - drop_last],
        )
        for i, (prompt, p) in enumerate(zip(prompts, partials, strict=True))
    ]  # fmt: skip
    return run(engine, reqs, sampling)


def test_an_aborted_batch_resumes_from_its_kv_cache(engine, reference_model):
    from rlfleet.rollout import metrics

    prompts, partials, sampling = _abort_midway(engine, reference_model, resume_kv=True)
    prefills, resumed0 = (
        _counter(metrics.ENGINE_PASSES.labels("prefill")),
        _counter(metrics.KV_RESUMED),
    )
    done = _resume(engine, prompts, partials, sampling)
    # No forward pass re-read the prompts: the rows decoded on from the kept cache.
    assert _counter(metrics.KV_RESUMED) - resumed0 == 3
    assert _counter(metrics.ENGINE_PASSES.labels("prefill")) == prefills
    for i, prompt in enumerate(prompts):
        r = done[f"long{i}"]
        assert r.finish_reason == "length" and len(r.token_ids) == sampling.max_new_tokens
        assert r.token_ids == ref_greedy(reference_model, prompt, sampling.max_new_tokens)
        assert r.logprobs[: len(partials[i].logprobs)] == partials[i].logprobs
    # The cache is used once: resuming the same prefixes again prefills them.
    _resume(engine, prompts, partials, sampling)
    assert _counter(metrics.KV_RESUMED) - resumed0 == 3


@pytest.mark.parametrize("resume_kv, drop_last", [(False, 0), (True, 1)])
def test_a_batch_is_re_prefilled_unless_kept_and_resumed_exactly(
    engine, reference_model, resume_kv, drop_last
):
    """Without resume_kv nothing is kept; a prefix that is not exactly the stopped row's
    (here one token short) is prefilled, and still continues like an uninterrupted run."""
    from rlfleet.rollout import metrics

    prompts, partials, sampling = _abort_midway(engine, reference_model, resume_kv=resume_kv)
    prefills, resumed0 = (
        _counter(metrics.ENGINE_PASSES.labels("prefill")),
        _counter(metrics.KV_RESUMED),
    )
    done = _resume(engine, prompts, partials, sampling, drop_last=drop_last)
    assert _counter(metrics.KV_RESUMED) == resumed0
    assert _counter(metrics.ENGINE_PASSES.labels("prefill")) > prefills
    for i, prompt in enumerate(prompts):
        assert done[f"long{i}"].token_ids == ref_greedy(
            reference_model, prompt, sampling.max_new_tokens
        )


def test_dropping_the_kept_cache_makes_a_resume_prefill(engine, reference_model):
    from rlfleet.rollout import metrics

    prompts, partials, sampling = _abort_midway(engine, reference_model, resume_kv=True)
    engine.drop_kept_kv()
    resumed0 = _counter(metrics.KV_RESUMED)
    done = _resume(engine, prompts, partials, sampling)
    assert _counter(metrics.KV_RESUMED) == resumed0
    assert done["long0"].token_ids == ref_greedy(reference_model, prompts[0], 40)
