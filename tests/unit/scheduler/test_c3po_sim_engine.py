"""The simulated rollout engine (kind "sim") and its cost and length models."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from rlfleet.common.errors import FailedPrecondition, InvalidArgument
from rlfleet.rollout.engine import Sampling, SeqRequest, setup_engine
from rlfleet.rollout.sim_engine import (
    DecodeCostModel,
    LengthModel,
    SimEngine,
    SimEngineSettings,
)

FAST = SimEngineSettings(time_scale=1e-4, length_scale=0.005, seed=1)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 64, "eos_token_id": 2}))
    return tmp_path


@pytest.fixture
def engine(model_dir):
    e = SimEngine(settings=FAST)
    e.load_model(str(model_dir))
    yield e
    e.close()


def _generate(engine, seqs, sampling, abort=None):
    out = []
    engine.generate(seqs, sampling, abort=abort or threading.Event(), on_result=out.append)
    return {r.seq_id: r for r in out}


def _wait_until_every_row(engine, rows: int, done, what: str, timeout: float = 120.0) -> None:
    """Polls the engine's running rows until there are ``rows`` and ``done(row)`` holds for
    each: a fixed sleep could end before a loaded machine has sampled anything."""
    end = time.monotonic() + timeout
    while True:
        with engine._cv:
            running = list(engine._rows)
        if len(running) == rows and all(done(r) for r in running):
            return
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.005)


def test_lengths_follow_the_length_model_on_any_engine(engine, model_dir):
    seqs = [SeqRequest(f"g{g}-{m}", [5, 6, 7]) for g in range(5) for m in range(3)]
    got = _generate(engine, seqs, Sampling(max_new_tokens=10_000, seed=3))
    for seq_id, r in got.items():
        group, member = seq_id.rsplit("-", 1)
        want, capped = engine.lengths.output_length(1, group, int(member))
        assert len(r.token_ids) == want and r.finished
        assert r.finish_reason == ("length" if capped else "stop")
        assert (r.token_ids[-1] == 2) == (r.finish_reason == "stop")
        assert 2 not in r.token_ids[:-1]
        assert len(r.logprobs) == len(r.versions) == len(r.token_ids) and set(r.versions) == {0}
    other = SimEngine(settings=FAST)
    other.load_model(str(model_dir))
    try:
        again = _generate(other, seqs[:3], Sampling(max_new_tokens=10_000, seed=9))
    finally:
        other.close()
    assert {k: len(v.token_ids) for k, v in again.items()} == {
        k: len(got[k].token_ids) for k in again
    }


def test_max_new_tokens_counts_the_prefix(engine):
    got = _generate(
        engine,
        [SeqRequest("g0-0", [1], [7, 8, 9], [-1.0] * 3, [0] * 3)],
        Sampling(max_new_tokens=5, seed=1),
    )
    r = got["g0-0"]
    assert engine.lengths.output_length(1, "g0", 0)[0] > 5  # the limit is what ends it
    assert len(r.token_ids) == 5 and r.finish_reason == "length"
    assert r.token_ids[:3] == [7, 8, 9] and r.num_prefix_tokens == 3


def test_abort_hands_back_partials_and_resume_continues(model_dir):
    slow = SimEngine(settings=SimEngineSettings(time_scale=1e-3, length_scale=10.0, seed=1))
    slow.load_model(str(model_dir))
    try:
        abort, out = threading.Event(), []
        seqs = [SeqRequest("g0-0", [1, 2]), SeqRequest("g0-1", [1, 2])]
        call = threading.Thread(
            target=slow.generate,
            args=(seqs, Sampling(max_new_tokens=10**6, seed=1)),
            kwargs={"abort": abort, "on_result": out.append},
        )
        call.start()
        _wait_until_every_row(slow, 2, lambda r: r.versions, "each row has a version-0 token")
        slow.load_state_dict({}, 4)  # later tokens are sampled by version 4
        _wait_until_every_row(
            slow, 2, lambda r: r.versions[-1] == 4, "each row has a version-4 token"
        )
        abort.set()
        call.join(120)
        assert not call.is_alive() and len(out) == 2
        for r in out:
            assert not r.finished and r.finish_reason == "aborted" and r.token_ids
            assert r.versions[0] == 0 and r.versions[-1] == 4
            assert r.versions == sorted(r.versions)
        first = out[0]
        got = _generate(
            slow,
            [SeqRequest(first.seq_id, [1, 2], first.token_ids, first.logprobs, first.versions)],
            Sampling(max_new_tokens=len(first.token_ids) + 20, seed=2),
        )[first.seq_id]
        n = len(first.token_ids)
        assert got.token_ids[:n] == first.token_ids and got.versions[:n] == first.versions
        assert len(got.token_ids) == n + 20 and got.finish_reason == "length"
        assert set(got.versions[n:]) == {4} and got.num_prefix_tokens == n
    finally:
        slow.close()


def test_requests_are_checked(engine, tmp_path):
    with pytest.raises(InvalidArgument, match="outside the model's vocabulary"):
        _generate(engine, [SeqRequest("a", [99])], Sampling(max_new_tokens=3))
    with pytest.raises(InvalidArgument, match="appears twice"):
        _generate(engine, [SeqRequest("a", [1]), SeqRequest("a", [1])], Sampling(max_new_tokens=3))
    bare = SimEngine(settings=FAST)
    try:
        with pytest.raises(FailedPrecondition, match="no model is loaded"):
            _generate(bare, [SeqRequest("a", [1])], Sampling(max_new_tokens=3))
        with pytest.raises(InvalidArgument, match="no config.json"):
            bare.load_model(str(tmp_path / "nowhere"))
    finally:
        bare.close()


def test_setup_engine_knows_sim():
    engine = setup_engine("sim", device="cpu", dtype="auto", max_batch_seqs=8)
    try:
        assert engine.kind == "sim" and not engine.loaded and engine.max_batch_seqs == 8
    finally:
        engine.close()
    with pytest.raises(ValueError, match="available: .*'sim'"):
        setup_engine("vllm-tpu")


def test_cost_model_inverse_and_growth():
    cost = DecodeCostModel()
    for batch, ctx in ((1, 100), (64, 500_000), (256, 4_000_000)):
        for k in (0, 1, 7, 1000):
            t = cost.steps_seconds(k, batch, ctx)
            assert cost.steps_within(t, batch, ctx) == k
            assert cost.steps_within(t - 1e-9, batch, ctx) == max(k - 1, 0)
    # Bigger batches are slower per step but faster per token.
    assert cost.step_seconds(256, 0) > cost.step_seconds(1, 0)
    assert 256 / cost.step_seconds(256, 0) > 1 / cost.step_seconds(1, 0)


def test_length_model_is_long_tailed_and_capped():
    model = LengthModel()
    draws = [model.output_length(0, f"g{g}", m) for g in range(500) for m in range(8)]
    lengths = sorted(n for n, _ in draws)
    median = lengths[len(lengths) // 2]
    mean = sum(lengths) / len(lengths)
    assert 4000 < median < 8000 and mean > 1.3 * median  # heavy right tail
    capped = sum(c for _, c in draws) / len(draws)
    assert 0.002 < capped < 0.03 and lengths[-1] == model.cap
    assert math.isclose(model.mean(), 6000 * math.exp(0.5), rel_tol=1e-9)
