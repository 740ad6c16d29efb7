"""The demo's base model: it builds offline, loads through the ordinary Hugging
Face classes, is cached by its settings, and matches the demo job's spec."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from rlfleet.cli.demo_model import (
    BUILD_SETTINGS,
    DEMO_PROMPT_TEMPLATE,
    DEMO_TASK_NAME,
    DEMO_TASK_PARAMS,
    MODEL_INFO_FILE,
    prepare_demo_model,
    settings_key,
)
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource

REPO_ROOT = Path(__file__).resolve().parents[3]
DEMO_TOML = REPO_ROOT / "examples" / "demo_arithmetic.toml"

# The real recipe, shrunk so a build takes a second or two.
QUICK = dict(BUILD_SETTINGS, corpus_size=300, sft_pool_size=256, sft_steps=20, sft_batch_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory) -> Path:
    return prepare_demo_model(tmp_path_factory.mktemp("cache"), settings=QUICK)


def _greedy_completions(model_dir: Path, prompts: list[str], *, max_new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            seq = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        out.append(tok.decode(seq[0, ids.shape[1] :]))
    return out


def test_build_loads_with_transformers(quick_model: Path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", MODEL_INFO_FILE):
        assert (quick_model / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(quick_model)
    tok = AutoTokenizer.from_pretrained(quick_model)
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert model.config.pad_token_id == tok.pad_token_id
    # The scheduler tokenises prompts with `tokenizers` alone: no BOS, same ids.
    prompt = DEMO_PROMPT_TEMPLATE.format(question="Calculate 7 - 9.")
    plain = Tokenizer.from_file(str(quick_model / "tokenizer.json")).encode(prompt).ids
    assert plain == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(plain) == prompt
    (completion,) = _greedy_completions(quick_model, [prompt], max_new_tokens=4)
    assert isinstance(completion, str)


def test_second_call_hits_the_cache(quick_model: Path):
    cache_dir = quick_model.parent
    weights = quick_model / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    messages: list[str] = []
    again = prepare_demo_model(cache_dir, settings=QUICK, progress=messages.append)
    assert again == quick_model
    assert weights.stat().st_mtime_ns == mtime
    assert messages == [f"cached base model found ({quick_model.name})"]
    # The build left no temporary directory behind.
    assert [p.name for p in cache_dir.iterdir()] == [quick_model.name]


def test_cache_entry_is_named_by_the_settings(quick_model: Path):
    assert quick_model.name == f"demo-model-{settings_key(QUICK)}"
    assert settings_key(dict(QUICK, sft_steps=21)) != settings_key(QUICK)
    assert settings_key(BUILD_SETTINGS) != settings_key(QUICK)


def test_build_is_deterministic(quick_model: Path, tmp_path: Path):
    other = prepare_demo_model(tmp_path, settings=QUICK)
    assert other != quick_model
    for name in ("model.safetensors", "tokenizer.json"):
        assert (other / name).read_bytes() == (quick_model / name).read_bytes(), name


def test_demo_job_spec_validates_and_matches_the_model():
    raw = tomllib.loads(DEMO_TOML.read_text())
    raw["model"]["path"] = "/models/demo"
    spec = JobSpec.model_validate(raw)
    assert spec.model.path == "/models/demo"
    # The warm start trained on exactly the distribution the job samples from.
    assert spec.task.name == DEMO_TASK_NAME
    assert spec.task.params == DEMO_TASK_PARAMS
    assert spec.task.prompt_template == DEMO_PROMPT_TEMPLATE
    assert spec.reward.verifier == "reasoning_gym"
    prompt, entry = PromptSource(spec.task).get(0)
    assert prompt.startswith("Calculate ") and prompt.endswith(". Answer:")
    assert int(entry["answer"]) == eval(entry["metadata"]["expression"])


@pytest.mark.slow
def test_real_model_is_partly_right(tmp_path: Path):
    """The shipped recipe leaves room for RL: some credit, far from full marks."""
    from rlfleet.reward.verifiers.gym import ReasoningGymVerifier

    model_dir = prepare_demo_model(tmp_path)
    spec = tomllib.loads(DEMO_TOML.read_text())
    spec["model"]["path"] = str(model_dir)
    job = JobSpec.model_validate(spec)
    source = PromptSource(job.task)
    # Prompts from the end of the job's dataset; the job starts at the front.
    pairs = [source.get(len(source) - 1 - i) for i in range(48)]
    completions = _greedy_completions(
        model_dir, [p for p, _ in pairs], max_new_tokens=job.sampling.max_new_tokens
    )
    verifier = ReasoningGymVerifier()
    rewards = [verifier.score(c, entry) for c, (_, entry) in zip(completions, pairs, strict=True)]
    mean = sum(rewards) / len(rewards)
    assert 0.0 < mean < 0.9, (mean, completions[:8])
    # The answers are arithmetic, in either of the two styles the warm start taught.
    assert all(c.startswith(" ") for c in completions), completions[:8]
