"""The reward_model verifier on real tiny sequence classifiers (built here with
transformers), through the verifier API, the weighted verifier and RewardCore; and the
demo reward model, built offline, prefers what it was trained to prefer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import reasoning_gym
import torch
from prometheus_client import REGISTRY
from rlfleet.cli.demo_model import DEMO_TASK_NAME, DEMO_TASK_PARAMS
from rlfleet.cli.demo_reward_model import (
    DEMO_RM_TEMPLATE,
    RM_INFO_FILE,
    prepare_demo_reward_model,
)
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.jobspec import RewardSpec
from rlfleet.common.tasks import entry_to_json
from rlfleet.reward.core import RewardCore, parse_verifier_config
from rlfleet.reward.verifiers import setup_verifier
from rlfleet.reward.verifiers.reward_model import RewardModelVerifier, check_path
from rlfleet.v1.common_pb2 import Sample


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build_classifier(out: Path, tokenizer_dir: Path, *, num_labels: int, pad: bool) -> Path:
    """A randomly initialised LlamaForSequenceClassification with the tokenizer of
    ``tokenizer_dir`` (without a pad token when ``pad`` is False)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not pad:
        tok.pad_token = None
    tok.save_pretrained(out)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_labels=num_labels,
    )
    LlamaForSequenceClassification(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return _build_classifier(tmp_path_factory.mktemp("rm"), tiny_model_dir, num_labels=1, pad=True)


@pytest.fixture(scope="module")
def rm3_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Three labels and a tokenizer without a pad token (pads with eos)."""
    return _build_classifier(
        tmp_path_factory.mktemp("rm3"), tiny_model_dir, num_labels=3, pad=False
    )


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    ds = reasoning_gym.create_dataset(DEMO_TASK_NAME, size=10, seed=5, **DEMO_TASK_PARAMS)
    return [json.loads(entry_to_json(ds[i])) for i in range(10)]


def _completions(entries: list[dict]) -> list[str]:
    """Right, wordy, wrong and long completions of different lengths (padding matters)."""
    styles = [" {a}</s>", " The answer is {a}.</s>", " {a}1</s>", " {a}\nand then some more"]
    return [styles[i % 4].format(a=e["answer"]) for i, e in enumerate(entries)]


@pytest.fixture
def core():
    core = RewardCore(buffer=None, max_workers=2)
    yield core
    core.close()


def _samples(entries: list[dict], completions: list[str]) -> list[Sample]:
    return [
        Sample(sample_id=f"s{i}", completion_text=c, task_json=entry_to_json(e))
        for i, (e, c) in enumerate(zip(entries, completions, strict=True))
    ]


def _raw_logits(model_dir: Path, texts: list[str], *, label: int = 0) -> list[float]:
    """The classifier's logits computed here, one text at a time, without the verifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0, label].item())
    return out


# -- check_path and settings ----------------------------------------------------------


def test_check_path_refuses_what_is_not_a_sequence_classifier(tmp_path, tiny_model_dir, rm_dir):
    with pytest.raises(ValueError, match=r"is not a Hugging Face model directory \(no config"):
        check_path(str(tmp_path))
    with pytest.raises(ValueError) as e:
        check_path(str(tiny_model_dir))
    assert str(e.value) == (
        f"reward.reward_model.path {str(tiny_model_dir)!r} holds a LlamaForCausalLM model, "
        "not a sequence classifier (AutoModelForSequenceClassification)"
    )
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no named architecture"):
        check_path(str(tmp_path), field="reward.terms[1].settings.path")
    check_path(str(rm_dir))  # a sequence classifier passes
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        setup_verifier("reward_model", {"path": str(tiny_model_dir)})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"template": "{question} only"}, "must contain the placeholder {completion}"),
        ({"normalize": "standard", "std": 0.0}, "std"),
        ({"std": -1.0}, "std"),
        ({"batch_size": 0}, "batch_size"),
        ({"normalize": "tanh"}, "normalize"),
        ({"path": " "}, "must name a model directory"),
        ({"label_index": 1}, "label_index 1 is out of range"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_settings_are_refused(rm_dir, settings, message):
    with pytest.raises(ValueError, match=message):
        setup_verifier("reward_model", {"path": str(rm_dir), **settings})


def test_the_text_it_reads(rm_dir):
    verifier = setup_verifier("reward_model", {"path": str(rm_dir), "template": DEMO_RM_TEMPLATE})
    entry = {"question": "Calculate 5 + 7.", "answer": "12"}
    assert verifier.text(" 12</s>junk", entry) == "Calculate 5 + 7. Answer: 12"
    assert verifier.text(" 12\nmore \n", entry) == "Calculate 5 + 7. Answer: 12\nmore"
    first = setup_verifier("reward_model", {"path": str(rm_dir), "extract": "first_line"})
    assert first.text(" 12\nmore", entry) == "Calculate 5 + 7.\n12"
    # A question that holds a placeholder is not filled in again.
    assert verifier.text(" 1", {"question": "{completion}?"}) == "{completion}? Answer: 1"
    with pytest.raises(ValueError, match='"question"'):
        verifier.check_entry({"answer": "1"})
    no_question = setup_verifier("reward_model", {"path": str(rm_dir), "template": "{completion}"})
    no_question.check_entry({})  # a template without {question} needs nothing


# -- scoring ----------------------------------------------------------------------------


def test_batched_scores_equal_one_at_a_time(rm_dir, entries):
    completions = _completions(entries)
    verifier = setup_verifier("reward_model", {"path": str(rm_dir), "batch_size": 3})
    assert verifier.batched
    batched = verifier.score_batch_with_terms(completions, entries)
    assert [terms for _, terms in batched] == [{}] * len(entries)
    single = [verifier.score(c, e) for c, e in zip(completions, entries, strict=True)]
    assert [r for r, _ in batched] == pytest.approx(single, abs=1e-5)
    assert len(set(single)) > 1  # different texts, different scores


def test_normalisations(rm_dir, entries):
    completions = _completions(entries)
    path = str(rm_dir)
    raw = setup_verifier("reward_model", {"path": path, "normalize": "none"})
    texts = [raw.text(c, e) for c, e in zip(completions, entries, strict=True)]
    logits = [r for r, _ in raw.score_batch_with_terms(completions, entries)]
    assert logits == pytest.approx(_raw_logits(rm_dir, texts), abs=1e-5)

    sigmoid = setup_verifier("reward_model", {"path": path})
    probs = [r for r, _ in sigmoid.score_batch_with_terms(completions, entries)]
    assert all(0.0 < p < 1.0 for p in probs)
    assert probs == pytest.approx([1 / (1 + math.exp(-x)) for x in logits], abs=1e-6)

    standard = setup_verifier(
        "reward_model", {"path": path, "normalize": "standard", "mean": 0.5, "std": 2.0}
    )
    scaled = [r for r, _ in standard.score_batch_with_terms(completions, entries)]
    assert scaled == pytest.approx([(x - 0.5) / 2.0 for x in logits], abs=1e-6)


def test_label_index_and_a_tokenizer_without_pad(rm3_dir, entries):
    completions = _completions(entries)
    settings = {"path": str(rm3_dir), "normalize": "none", "label_index": 2, "batch_size": 4}
    verifier = setup_verifier("reward_model", settings)
    assert verifier.model.tokenizer.pad_token == verifier.model.tokenizer.eos_token
    batched = [r for r, _ in verifier.score_batch_with_terms(completions, entries)]
    texts = [verifier.text(c, e) for c, e in zip(completions, entries, strict=True)]
    assert batched == pytest.approx(_raw_logits(rm3_dir, texts, label=2), abs=1e-5)


def test_reward_core_scores_a_reward_model_in_request_order(core, rm_dir, entries):
    completions = _completions(entries)
    spec = RewardSpec(verifier="reward_model", reward_model={"path": str(rm_dir), "batch_size": 4})
    config = parse_verifier_config(spec.model_dump_json())
    result = core.score(
        job_id="job-1",
        verifier="reward_model",
        verifier_config=config,
        samples=_samples(entries, completions),
        write_to_buffer=False,
    )
    verifier = setup_verifier("reward_model", {"path": str(rm_dir)})
    expected = [verifier.score(c, e) for c, e in zip(completions, entries, strict=True)]
    assert result.rewards == pytest.approx(expected, abs=1e-5)
    assert result.terms == {}


def test_reward_core_refuses_bad_reward_model_requests(core, rm_dir, tiny_model_dir, entries):
    samples = _samples(entries[:2], _completions(entries[:2]))

    def score(config, samples=samples):
        return core.score(
            job_id="j",
            verifier="reward_model",
            verifier_config=config,
            samples=samples,
            write_to_buffer=False,
        )

    with pytest.raises(InvalidArgument, match="LlamaForCausalLM"):
        score({"path": str(tiny_model_dir)})
    with pytest.raises(InvalidArgument, match="reward_model must be a JSON object"):
        score({"verifier": "reward_model", "reward_model": "nope"})
    with pytest.raises(InvalidArgument, match="bogus"):
        score({"verifier": "reward_model", "reward_model": {"path": str(rm_dir)}, "bogus": 1})
    samples[1].task_json = json.dumps({"answer": "3"})
    with pytest.raises(InvalidArgument, match=r"samples\[1\].*\"question\""):
        score({"path": str(rm_dir)})


def _errors(reason: str) -> float:
    labels = {"verifier": "reward_model", "reason": reason}
    return REGISTRY.get_sample_value("rlfleet_reward_verifier_errors_total", labels) or 0.0


def test_a_reward_model_that_raises_scores_0_for_the_batch(core, rm_dir, entries, monkeypatch):
    def broken(self, completion_texts, entries):
        raise RuntimeError("CUDA out of memory (as if)")

    monkeypatch.setattr(RewardModelVerifier, "score_batch_with_terms", broken)
    before = _errors("exception")
    result = core.score(
        job_id="j",
        verifier="reward_model",
        verifier_config={"path": str(rm_dir)},
        samples=_samples(entries, _completions(entries)),
        write_to_buffer=False,
    )
    assert result.rewards == [0.0] * len(entries)
    assert _errors("exception") == before + len(entries)


def test_a_non_finite_reward_costs_only_its_sample(core, rm_dir, entries, monkeypatch):
    def some_nan(self, completion_texts, entries):
        return [(math.nan if i == 1 else 0.25, {}) for i in range(len(entries))]

    monkeypatch.setattr(RewardModelVerifier, "score_batch_with_terms", some_nan)
    result = core.score(
        job_id="j",
        verifier="reward_model",
        verifier_config={"path": str(rm_dir)},
        samples=_samples(entries[:3], _completions(entries[:3])),
        write_to_buffer=False,
    )
    assert result.rewards == [0.25, 0.0, 0.25]


def test_weighted_with_a_reward_model_term(core, rm_dir, entries):
    completions = _completions(entries)
    spec = RewardSpec.model_validate(
        {
            "verifier": "weighted",
            "terms": [
                {
                    "verifier": "reward_model",
                    "weight": 0.5,
                    "name": "rm",
                    "settings": {"path": str(rm_dir), "batch_size": 4},
                },
                {"verifier": "exact", "weight": 1.0},
            ],
        }
    )
    config = json.loads(spec.model_dump_json())
    assert setup_verifier("weighted", {"terms": config["terms"]}).batched
    assert not setup_verifier("weighted", {"terms": config["terms"][1:]}).batched
    result = core.score(
        job_id="j",
        verifier="weighted",
        verifier_config=config,
        samples=_samples(entries, completions),
        write_to_buffer=False,
    )
    rm = setup_verifier("reward_model", {"path": str(rm_dir)})
    rm_scores = [rm.score(c, e) for c, e in zip(completions, entries, strict=True)]
    # Right on its first line: the terse answers and the ones that go on after a newline.
    exact = [1.0 if i % 4 in (0, 3) else 0.0 for i in range(len(entries))]
    assert result.terms["exact"] == exact
    assert result.terms["rm"] == pytest.approx(rm_scores, abs=1e-5)
    expected = [0.5 * r + x for r, x in zip(rm_scores, exact, strict=True)]
    assert result.rewards == pytest.approx(expected, abs=1e-5)


def test_weighted_batch_costs_only_the_sample_whose_term_raised(core, rm_dir, entries):
    completions = _completions(entries[:3])
    samples = _samples(entries[:3], completions)
    # reasoning_gym's scorer raises on an entry without its metadata fields.
    broken = dict(entries[1], metadata={"source_dataset": "word_sorting"})
    samples[1].task_json = json.dumps(broken)
    terms = [
        {"verifier": "reward_model", "weight": 1.0, "settings": {"path": str(rm_dir)}},
        {"verifier": "reasoning_gym", "weight": 1.0},
    ]
    result = core.score(
        job_id="j",
        verifier="weighted",
        verifier_config={"terms": terms},
        samples=samples,
        write_to_buffer=False,
    )
    rm, gym = setup_verifier("reward_model", {"path": str(rm_dir)}), setup_verifier("reasoning_gym")
    for i in (0, 2):
        expected = rm.score(completions[i], entries[i]) + gym.score(completions[i], entries[i])
        assert result.rewards[i] == pytest.approx(expected, abs=1e-5)
    assert result.rewards[1] == 0.0
    assert result.terms["reasoning_gym"][1] == 0.0 and result.terms["reward_model"][1] == 0.0


def test_reward_spec_needs_a_path_for_a_reward_model():
    with pytest.raises(ValueError, match=r"reward\.reward_model\.path is required"):
        RewardSpec(verifier="reward_model")
    with pytest.raises(ValueError, match=r"reward\.reward_model\.path"):
        RewardSpec(verifier="reward_model", reward_model={"path": " "})
    spec = RewardSpec(verifier="reward_model", reward_model={"path": "/models/rm"})
    assert spec.reward_model == {"path": "/models/rm"}
    # Other verifiers ignore the (empty) field when the spec travels as their config.
    assert RewardSpec(verifier="math").reward_model == {}


def test_other_verifiers_drop_the_reward_model_field(core, entries):
    config = parse_verifier_config(RewardSpec(verifier="exact").model_dump_json())
    assert "reward_model" in config
    right = [f" {e['answer']}" for e in entries[:2]]
    result = core.score(
        job_id="j",
        verifier="exact",
        verifier_config=config,
        samples=_samples(entries[:2], right),
        write_to_buffer=False,
    )
    assert result.rewards == [1.0, 1.0]


# -- the demo reward model --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_rm(tmp_path_factory, tiny_model_dir) -> Path:
    return prepare_demo_reward_model(
        tmp_path_factory.mktemp("rm-cache"), base_model_dir=tiny_model_dir
    )


@pytest.mark.slow
def test_demo_reward_model_prefers_terse_right_answers(demo_rm, tiny_model_dir, entries):
    info = json.loads((demo_rm / RM_INFO_FILE).read_text())
    # Measured with this tokenizer: held-out wordy 1.00, wrong 0.88; training
    # questions wrong 0.95. Other seeds gave 0.60-0.88 held out, so the bar is low.
    assert info["heldout_accuracy"]["wordy"] >= 0.9, info
    assert info["heldout_accuracy"]["wrong"] >= 0.6, info
    assert info["train_accuracy"]["wrong"] >= 0.8, info
    assert info["template"] == DEMO_RM_TEMPLATE
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (demo_rm / name).is_file(), name
    assert (demo_rm / "tokenizer.json").read_bytes() == (
        tiny_model_dir / "tokenizer.json"
    ).read_bytes()
    check_path(str(demo_rm))

    # The verifier reads what the builder trained on: terse beats wordy through it too.
    verifier = setup_verifier("reward_model", {"path": str(demo_rm), "template": DEMO_RM_TEMPLATE})
    terse = [f" {e['answer']}</s>" for e in entries]
    wordy = [f" The answer is {e['answer']}.</s>" for e in entries]
    scores = [r for r, _ in verifier.score_batch_with_terms(terse + wordy, entries + entries)]
    n = len(entries)
    assert all(t > w for t, w in zip(scores[:n], scores[n:], strict=True)), scores


@pytest.mark.slow
def test_demo_reward_model_is_cached(demo_rm, tiny_model_dir, tmp_path):
    messages: list[str] = []
    again = prepare_demo_reward_model(
        demo_rm.parent, base_model_dir=tiny_model_dir, progress=messages.append
    )
    assert again == demo_rm
    assert messages == [f"cached reward model found ({demo_rm.name})"]
    assert [p.name for p in demo_rm.parent.iterdir()] == [demo_rm.name]
    with pytest.raises(ValueError, match="no tokenizer files"):
        prepare_demo_reward_model(demo_rm.parent, base_model_dir=tmp_path)
