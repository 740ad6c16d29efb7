"""The behaviour every RolloutEngine must show, checked against plain transformers.

A test module runs the suite for one engine by defining a ``make_engine`` fixture
(returns a new, unloaded engine) and star-importing this module, e.g.::

    from engine_suite import *  # noqa: F403

    @pytest.fixture
    def make_engine():
        return lambda: TorchEngine(device="cpu", dtype="float32")

The ground truth is ``reference_model``: the same model directory loaded with
``AutoModelForCausalLM`` in float32 on CPU, run as a full forward pass over the
whole sequence at every step (no cache, no padding, no batching).

Tolerance: log-probs must match the reference within ``LOGPROB_ATOL`` = 1e-4
(absolute, in nats). Batched, left-padded, cached float32 attention differs from
one full forward pass only by summation order, ~1e-6 on this model; 1e-4 leaves
room for other kernels (an engine in bf16 would need its own, looser bound).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from rlfleet.common.errors import FailedPrecondition, InvalidArgument
from rlfleet.rollout.engine import Sampling, SeqRequest, SeqResult

__all__ = [
    "JOIN_S",
    "LOGPROB_ATOL",
    "engine",
    "test_abort_before_start_hands_back_prefixes",
    "test_abort_hands_back_partials",
    "test_batch_of_different_lengths_equals_each_alone",
    "test_call_arriving_during_generation_is_batched_in",
    "test_concurrent_calls",
    "test_generate_before_load_is_refused",
    "test_greedy_matches_stepwise_argmax",
    "test_invalid_requests_are_refused",
    "test_load_state_dict_changes_outputs_and_version",
    "test_load_state_dict_refuses_mismatched_weights",
    "test_logprobs_match_full_forward",
    "test_max_new_tokens_counts_the_prefix",
    "test_resume_from_prefix_continues_like_uninterrupted_run",
    "test_seeded_sampling_is_reproducible",
    "test_top_p_samples_only_from_the_nucleus",
]

LOGPROB_ATOL = 1e-4
# How long a test waits for a generate call in another thread: joins return as soon as
# it ends, and vLLM on a loaded 2-core machine can take far longer than on an idle one.
JOIN_S = 300

PROMPTS = [
    [3, 40, 100],
    [10, 47, 103, 200, 7, 9],
    [17],
    [24, 54, 109, 300, 301, 302, 303, 304, 305, 306, 307],
    [31, 61, 124],
    [38, 68, 127, 128, 129],
]


@pytest.fixture
def engine(make_engine, suite_model_dir):
    eng = make_engine()
    eng.load_model(str(suite_model_dir))
    yield eng
    eng.close()


# -- reference computations (plain transformers, full forward passes) ----------------------


def eos_id(model) -> int:
    return int(model.config.eos_token_id)


@torch.no_grad()
def ref_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by argmax of a full forward pass at every step."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok == eos_id(model):
            break
    return out


@torch.no_grad()
def ref_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Logits that predicted each completion token, shape (len(completion), vocab)."""
    ids = torch.tensor([prompt + completion])
    return model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()


def ref_logprobs(model, prompt, completion, temperature: float) -> list[float]:
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(ref_logits(model, prompt, completion) / t, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def run(engine, seqs, sampling, *, abort=None) -> dict[str, SeqResult]:
    """Generates and returns results by seq_id, checking each sequence came back once."""
    results: list[SeqResult] = []
    engine.generate(seqs, sampling, abort=abort or threading.Event(), on_result=results.append)
    by_id = {r.seq_id: r for r in results}
    assert len(results) == len(seqs) == len(by_id)
    for r in results:
        assert len(r.token_ids) == len(r.logprobs) == len(r.versions)
    return by_id


def requests(prompts) -> list[SeqRequest]:
    return [SeqRequest(f"s{i}", list(p)) for i, p in enumerate(prompts)]


def greedy(n: int) -> Sampling:
    return Sampling(max_new_tokens=n, temperature=0.0)


def assert_close(actual, expected, atol=LOGPROB_ATOL):
    assert len(actual) == len(expected)
    diff = max((abs(a - b) for a, b in zip(actual, expected, strict=True)), default=0.0)
    assert diff <= atol, f"log-probs differ by {diff:.2e} > {atol:.0e}"


def long_prompts(model, n_tokens: int, count: int) -> list[list[int]]:
    """Prompts whose greedy continuation does not reach EOS within ``n_tokens``."""
    found = []
    for start in range(3, 500, 7):
        prompt = [start, (start * 13) % 500 + 3]
        if eos_id(model) not in ref_greedy(model, prompt, n_tokens):
            found.append(prompt)
            if len(found) == count:
                return found
    raise AssertionError("no prompt runs long enough on the test model")


# -- the suite -----------------------------------------------------------------------------


def test_greedy_matches_stepwise_argmax(engine, reference_model):
    out = run(engine, requests(PROMPTS), greedy(24))
    reasons = set()
    for i, prompt in enumerate(PROMPTS):
        r = out[f"s{i}"]
        assert r.token_ids == ref_greedy(reference_model, prompt, 24)
        assert r.finished
        stopped = r.token_ids[-1] == eos_id(reference_model)
        # EOS ends a sequence as "stop" and is itself part of the completion.
        assert r.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(r.token_ids) == 24
        assert r.versions == [engine.version] * len(r.token_ids)
        reasons.add(r.finish_reason)
    assert reasons == {"stop", "length"}, "the test model should produce both endings"


@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_logprobs_match_full_forward(engine, reference_model, temperature, top_p):
    sampling = Sampling(max_new_tokens=16, temperature=temperature, top_p=top_p, seed=7)
    out = run(engine, requests(PROMPTS), sampling)
    for i, prompt in enumerate(PROMPTS):
        r = out[f"s{i}"]
        # log_softmax(logits / T)[token], T = 1 when greedy; top-p is not reflected.
        assert_close(r.logprobs, ref_logprobs(reference_model, prompt, r.token_ids, temperature))


def test_top_p_samples_only_from_the_nucleus(engine, reference_model):
    top_p, temperature = 0.3, 1.0
    out = run(engine, requests(PROMPTS), Sampling(max_new_tokens=16, top_p=top_p, seed=3))
    for i, prompt in enumerate(PROMPTS):
        r = out[f"s{i}"]
        probs = torch.softmax(ref_logits(reference_model, prompt, r.token_ids) / temperature, -1)
        for step, tok in enumerate(r.token_ids):
            row = probs[step]
            mass_before = row[row > row[tok]].sum().item()  # mass of more likely tokens
            assert mass_before < top_p + 1e-5


def test_batch_of_different_lengths_equals_each_alone(engine):
    together = run(engine, requests(PROMPTS), greedy(20))
    for i, prompt in enumerate(PROMPTS):
        alone = run(engine, [SeqRequest("solo", prompt)], greedy(20))["solo"]
        assert alone.token_ids == together[f"s{i}"].token_ids
        assert_close(alone.logprobs, together[f"s{i}"].logprobs)


def test_resume_from_prefix_continues_like_uninterrupted_run(engine, reference_model):
    prompt = long_prompts(reference_model, 20, 1)[0]
    full = run(engine, [SeqRequest("a", prompt)], greedy(20))["a"]
    assert len(full.token_ids) == 20
    for k in (1, 7, 19):
        old_versions = [41 + j % 2 for j in range(k)]  # sampled under older policies
        req = SeqRequest(
            "a",
            prompt,
            prefix_token_ids=full.token_ids[:k],
            prefix_logprobs=full.logprobs[:k],
            prefix_versions=old_versions,
        )
        resumed = run(engine, [req], greedy(20))["a"]
        assert resumed.token_ids == full.token_ids
        assert resumed.finish_reason == "length"
        assert resumed.logprobs[:k] == full.logprobs[:k]  # the prefix is handed back verbatim
        assert_close(resumed.logprobs[k:], full.logprobs[k:])
        assert resumed.versions == old_versions + [engine.version] * (20 - k)
        assert resumed.num_prefix_tokens == k


def test_max_new_tokens_counts_the_prefix(engine):
    req = SeqRequest(
        "a", [5, 6], prefix_token_ids=[7, 8, 9], prefix_logprobs=[-1.0] * 3, prefix_versions=[0] * 3
    )
    r = run(engine, [req], greedy(3))["a"]
    assert (r.token_ids, r.finished, r.finish_reason) == ([7, 8, 9], True, "length")
    r = run(engine, [req], greedy(5))["a"]
    assert len(r.token_ids) <= 5 and r.token_ids[:3] == [7, 8, 9]


def test_a_sequences_own_limit_overrides_the_calls(engine, reference_model):
    """``SequenceRequest.max_new_tokens``: a multi-turn episode caps each turn at its
    prefix plus one turn, whatever its batch-mates may take."""
    prompt = PROMPTS[0]
    want = ref_greedy(reference_model, prompt, 6)
    capped = SeqRequest("capped", list(prompt), prefix_token_ids=want[:2],
                        prefix_logprobs=[-1.0] * 2, prefix_versions=[0] * 2, max_new_tokens=4)  # fmt: skip
    out = run(engine, [capped, SeqRequest("free", list(prompt))], greedy(6))
    assert out["capped"].token_ids == want[:4]
    assert (out["capped"].finished, out["capped"].finish_reason) == (True, "length")
    assert out["free"].token_ids == want


def test_abort_hands_back_partials(engine, reference_model):
    limit = 60
    longs = long_prompts(reference_model, limit, 2)
    # "short" is one token from its limit, so it is the first to finish; its result sets abort.
    short = SeqRequest(
        "short",
        [5, 6],
        prefix_token_ids=[9] * (limit - 1),
        prefix_logprobs=[-2.0] * (limit - 1),
        prefix_versions=[0] * (limit - 1),
    )
    abort = threading.Event()
    results: list[SeqResult] = []

    def on_result(r: SeqResult) -> None:
        results.append(r)
        if r.seq_id == "short":
            abort.set()

    seqs = [short] + [SeqRequest(f"long{i}", p) for i, p in enumerate(longs)]
    engine.generate(seqs, greedy(limit), abort=abort, on_result=on_result)
    by_id = {r.seq_id: r for r in results}
    assert len(results) == len(by_id) == 3
    assert by_id["short"].finished and len(by_id["short"].token_ids) == limit
    for i, prompt in enumerate(longs):
        r = by_id[f"long{i}"]
        assert not r.finished and r.finish_reason == "aborted"
        assert 0 < len(r.token_ids) < limit
        assert len(r.logprobs) == len(r.versions) == len(r.token_ids)
        # The partial is a true prefix of the uninterrupted greedy run.
        assert r.token_ids == ref_greedy(reference_model, prompt, len(r.token_ids))


def test_abort_before_start_hands_back_prefixes(engine):
    abort = threading.Event()
    abort.set()
    req = SeqRequest("a", [5], prefix_token_ids=[6, 7], prefix_logprobs=[-1.0, -2.0],
                     prefix_versions=[3, 4])  # fmt: skip
    r = run(engine, [req, SeqRequest("b", [8])], greedy(10), abort=abort)
    assert not r["a"].finished and r["a"].finish_reason == "aborted"
    assert (r["a"].token_ids, r["a"].logprobs, r["a"].versions) == ([6, 7], [-1.0, -2.0], [3, 4])
    assert r["b"].token_ids == [] and r["b"].finish_reason == "aborted"


def test_concurrent_calls(engine):
    alone = run(engine, requests(PROMPTS), greedy(16))
    outs: dict[int, dict[str, SeqResult]] = {}

    def worker(k: int) -> None:
        outs[k] = run(engine, requests(PROMPTS[k::2]), greedy(16))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), "a concurrent call did not end"
    for k in range(2):
        for j, prompt in enumerate(PROMPTS[k::2]):
            assert outs[k][f"s{j}"].token_ids == alone[f"s{PROMPTS.index(prompt)}"].token_ids


def test_call_arriving_during_generation_is_batched_in(engine, reference_model):
    limit = 30
    first, second = long_prompts(reference_model, limit, 2)
    short = SeqRequest("short", [5], prefix_token_ids=[9] * (limit - 1),
                       prefix_logprobs=[-2.0] * (limit - 1), prefix_versions=[0] * (limit - 1))  # fmt: skip
    late: dict[str, SeqResult] = {}
    threads = []

    def on_result(r: SeqResult) -> None:
        if r.seq_id == "short":  # the first call is still decoding "first" now
            t = threading.Thread(
                target=lambda: late.update(
                    run(engine, [SeqRequest("second", second)], greedy(limit))
                )
            )
            t.start()
            threads.append(t)

    results: list[SeqResult] = []
    engine.generate(
        [short, SeqRequest("first", first)],
        greedy(limit),
        abort=threading.Event(),
        on_result=lambda r: (results.append(r), on_result(r)),
    )
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), "the late call did not end"
    by_id = {r.seq_id: r for r in results}
    assert by_id["first"].token_ids == ref_greedy(reference_model, first, limit)
    assert late["second"].token_ids == ref_greedy(reference_model, second, limit)
    assert_close(
        late["second"].logprobs, ref_logprobs(reference_model, second, late["second"].token_ids, 0)
    )


def test_seeded_sampling_is_reproducible(engine):
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=11)
    a = run(engine, requests(PROMPTS), sampling)
    b = run(engine, requests(PROMPTS), sampling)
    assert {k: v.token_ids for k, v in a.items()} == {k: v.token_ids for k, v in b.items()}
    # A sequence's draws do not depend on which others share its batch.
    solo = run(engine, [SeqRequest("s1", PROMPTS[1])], sampling)["s1"]
    assert solo.token_ids == a["s1"].token_ids
    other = run(engine, requests(PROMPTS), Sampling(max_new_tokens=12, temperature=1.0, seed=12))
    assert {k: v.token_ids for k, v in other.items()} != {k: v.token_ids for k, v in a.items()}


def _perturbed(model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen)).clone()
        for k, v in model.state_dict().items()
    }


def test_load_state_dict_changes_outputs_and_version(engine, reference_model):
    before = run(engine, requests(PROMPTS), greedy(12))
    state = _perturbed(reference_model, seed=5)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied in this model
    new_model = copy.deepcopy(reference_model)
    new_model.load_state_dict(state)
    state.pop("lm_head.weight")  # a tied tensor may be left out of a version
    engine.load_state_dict(state, version=5)
    assert engine.version == 5
    after = run(engine, requests(PROMPTS), greedy(12))
    assert any(after[k].token_ids != before[k].token_ids for k in after)
    for i, prompt in enumerate(PROMPTS):
        r = after[f"s{i}"]
        assert r.token_ids == ref_greedy(new_model, prompt, 12)
        assert_close(r.logprobs, ref_logprobs(new_model, prompt, r.token_ids, 0))
        assert r.versions == [5] * len(r.token_ids)


def test_load_state_dict_refuses_mismatched_weights(engine, reference_model):
    before = run(engine, requests(PROMPTS[:2]), greedy(8))
    good = _perturbed(reference_model, seed=6)
    bad_cases = [
        {**good, "model.not_a_layer.weight": torch.zeros(2)},
        {**good, "model.norm.weight": torch.zeros(3)},
        {k: v for k, v in good.items() if k != "model.norm.weight"},
    ]
    for bad in bad_cases:
        with pytest.raises(FailedPrecondition):
            engine.load_state_dict(bad, version=9)
        assert engine.version == 0
    after = run(engine, requests(PROMPTS[:2]), greedy(8))
    assert {k: v.token_ids for k, v in after.items()} == {k: v.token_ids for k, v in before.items()}


def test_generate_before_load_is_refused(make_engine):
    eng = make_engine()
    try:
        assert not eng.loaded
        with pytest.raises(FailedPrecondition):
            eng.generate([SeqRequest("a", [1])], greedy(2), abort=threading.Event(),
                         on_result=lambda r: None)  # fmt: skip
    finally:
        eng.close()


@pytest.mark.parametrize(
    ("seq", "sampling", "field"),
    [
        (SeqRequest("a", []), greedy(4), "prompt_token_ids"),
        (SeqRequest("a", [1, 10**6]), greedy(4), "prompt_token_ids"),
        (SeqRequest("a", [1, -1]), greedy(4), "prompt_token_ids"),
        (SeqRequest("a", [1], [10**6], [0.0], [0]), greedy(4), "prefix_token_ids"),
        (SeqRequest("a", [1]), Sampling(max_new_tokens=4, temperature=-0.5), "temperature"),
        (SeqRequest("a", [1]), Sampling(max_new_tokens=4, top_p=1.5), "top_p"),
        (SeqRequest("a", [1]), Sampling(max_new_tokens=4, top_p=-0.1), "top_p"),
        (SeqRequest("a", [1]), greedy(0), "max_new_tokens"),
        (SeqRequest("a", [1], max_new_tokens=-1), greedy(4), "max_new_tokens"),
        (SeqRequest("a", [1], [2, 3], [0.0], [0, 0]), greedy(4), "prefix_logprobs"),
        (SeqRequest("", [1]), greedy(4), "seq_id"),
    ],
)
def test_invalid_requests_are_refused(engine, seq, sampling, field):
    with pytest.raises(InvalidArgument, match=field):
        engine.generate([seq], sampling, abort=threading.Event(), on_result=lambda r: None)
