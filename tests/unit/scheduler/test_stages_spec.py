"""Stages: SFT samples built from the dataset's (prompt, completion) rows, and the spec
rules around them: ``model.from_job`` resolved to a finished job's final checkpoint (a
real Redis), SFT needing a dataset and the sync loop, ``eval`` needing an eval part."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import redis
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.core import validate_spec
from rlfleet.scheduler.jobs import JobState
from rlfleet.scheduler.samples import load_codec
from rlfleet.scheduler.sft import SftStrategy
from rlfleet.scheduler.store import JobStore
from rlfleet.scheduler.strategy import StepContext
from rlfleet.trainer.state import StepResult, TrainerStore
from tokenizers import Tokenizer

ROWS = [{"q": f"{i} + 1 =", "a": str(i + 1), "worked": f" {i} + 1 = {i + 1}"} for i in range(20)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def sft_spec(model_dir, jsonl, **extra) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "task": {"kind": "dataset", "dataset": {"path": str(jsonl), "prompt_column": "q",
                 "answer_column": "a", "completion_column": "worked", "shuffle": False}},
        "algorithm": {"kind": "sft", "prompts_per_step": 4},
        "sampling": {"max_new_tokens": 64},
        **extra,
    }  # fmt: skip


def test_sft_samples_are_the_prompt_then_the_completion_and_its_eos(tiny_model_dir, jsonl):
    spec = JobSpec.model_validate(sft_spec(tiny_model_dir, jsonl))
    codec = load_codec(str(tiny_model_dir))
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    ctx = StepContext("job-1", spec, 1, 1, codec, PromptSource(spec.task), threading.Event())
    result = SftStrategy(pool=None).rollout(ctx)
    assert [s.sample_id for s in result.samples] == ["g4-0", "g5-0", "g6-0", "g7-0"]
    eos = min(codec.eos_ids)
    for s, row in zip(result.samples, ROWS[4:8], strict=True):
        assert list(s.prompt_token_ids) == raw.encode(row["q"] + " Answer:").ids
        assert list(s.completion_token_ids) == [*raw.encode(row["worked"]).ids, eos]
        assert list(s.inference_logprobs) == [0.0] * len(s.completion_token_ids)
        assert s.completion_text == row["worked"] and json.loads(s.task_json)["answer"] == row["a"]
    assert result.metrics["tokens_demonstrated"] == sum(
        len(s.completion_token_ids) for s in result.samples
    )
    # Completions longer than sampling.max_new_tokens are cut there.
    short = JobSpec.model_validate(sft_spec(tiny_model_dir, jsonl, sampling={"max_new_tokens": 2}))
    ctx = StepContext("job-1", short, 0, 0, codec, PromptSource(short.task), threading.Event())
    assert {len(s.completion_token_ids) for s in SftStrategy(pool=None).rollout(ctx).samples} == {2}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": {"name": "basic_arithmetic"}}, "set task.kind = 'dataset'"),
        ({"scheduling": {"mode": "c3po"}}, "scheduling.mode must be 'sync'"),
        ({"eval": {"prompts": 4}, "reward": {"verifier": "math"}}, "eval needs an eval part"),
        ({"model": {}}, "model.path or model.from_job must name the model"),
    ],
)
def test_stage_specs_that_cannot_run_are_refused(tiny_model_dir, jsonl, change, message):
    spec = {**sft_spec(tiny_model_dir, jsonl), **change}
    with pytest.raises(InvalidArgument) as err:
        validate_spec(json.dumps(spec))
    assert message in err.value.message


def test_eval_cannot_share_replicas_with_overlapped_rollouts(tiny_model_dir):
    spec = {"model": {"path": str(tiny_model_dir)}, "eval": {},
            "scheduling": {"mode": "c3po", "overlap": True}}  # fmt: skip
    with pytest.raises(InvalidArgument, match="scheduling.overlap keeps them generating"):
        validate_spec(json.dumps(spec))


def test_from_job_resolves_to_the_final_checkpoint_of_a_succeeded_job(
    redis_url, tiny_model_dir, jsonl
):
    store = JobStore(redis.Redis.from_url(redis_url))
    first, _ = store.create(spec_json="{}", total_steps=3)

    def submit(**model) -> JobSpec:
        spec = {**sft_spec(tiny_model_dir, jsonl), "model": model}
        return validate_spec(json.dumps(spec), store=store)

    for model, message in [
        ({"from_job": "job-nope"}, "model.from_job 'job-nope' is not a known job"),
        ({"from_job": first.job_id}, f"model.from_job {first.job_id!r} is queued"),
        ({"from_job": first.job_id, "path": str(tiny_model_dir)}, "not both"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            submit(**model)
    store.transition(first.job_id, JobState.RUNNING)
    store.transition(first.job_id, JobState.SUCCEEDED)
    with pytest.raises(InvalidArgument, match="has no final checkpoint recorded"):
        submit(from_job=first.job_id)
    TrainerStore(store.r).put_result(
        first.job_id,
        StepResult(step=2, version=3, metrics={}, samples_trained=1,
                   checkpoint_path=str(tiny_model_dir)),
    )  # fmt: skip
    spec = submit(from_job=first.job_id)
    assert spec.model.path == str(tiny_model_dir) and spec.model.from_job == first.job_id


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_a_conversation_column_gives_the_chat_prompt_and_its_last_assistant_turn(
    tiny_model_dir, tmp_path
):
    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))  # fmt: skip
    rows = tmp_path / "chats.jsonl"
    rows.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"{i} + 1?"},
        {"role": "assistant", "content": str(i + 1)}]}) + "\n" for i in range(6)))  # fmt: skip
    spec = validate_spec(json.dumps({
        "model": {"path": str(model)}, "algorithm": {"kind": "sft", "prompts_per_step": 2},
        "task": {"kind": "dataset", "prompt_format": "chat", "dataset": {
            "path": str(rows), "messages_column": "messages", "shuffle": False}}}))  # fmt: skip
    codec = load_codec(str(model))
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    ctx = StepContext("job-1", spec, 0, 0, codec, PromptSource(spec.task), threading.Event())
    first = SftStrategy(pool=None).rollout(ctx).samples[0]
    prompt = "[system] Be brief.\n[user] 0 + 1?\n[assistant]"
    assert list(first.prompt_token_ids) == raw.encode(prompt).ids
    whole = raw.encode(prompt + " 1\n").ids
    assert list(first.prompt_token_ids) + list(first.completion_token_ids) == whole
    assert json.loads(first.task_json)["question"] == "0 + 1?"
    # Conversations need chat prompts; a row that is not a conversation is named.
    with pytest.raises(InvalidArgument, match="set task.prompt_format = 'chat'"):
        validate_spec(json.dumps({**json.loads(spec.model_dump_json()), "task": {
            **json.loads(spec.task.model_dump_json()), "prompt_format": "template"}}))  # fmt: skip
    rows.write_text(json.dumps({"messages": "hi"}) + "\n")
    with pytest.raises(InvalidArgument, match="is not a list of chat messages"):
        validate_spec(spec.model_dump_json())


def test_a_reward_model_that_is_not_a_sequence_classifier_is_refused(tiny_model_dir, tmp_path):
    def submit(reward: dict) -> None:
        validate_spec(json.dumps({"model": {"path": str(tiny_model_dir)}, "reward": reward}))

    with pytest.raises(InvalidArgument) as err:  # a causal LM, named by its architecture
        submit({"verifier": "reward_model", "reward_model": {"path": str(tiny_model_dir)}})
    assert "reward.reward_model.path" in err.value.message
    assert "holds a LlamaForCausalLM model, not a sequence classifier" in err.value.message
    with pytest.raises(InvalidArgument, match=r"reward.terms\[1\].settings.path .*no config.json"):
        submit({"verifier": "weighted", "terms": [
            {"verifier": "math", "weight": 1.0},
            {"verifier": "reward_model", "weight": 0.5, "settings": {"path": str(tmp_path)}}]})  # fmt: skip


def test_an_agent_transcript_learns_every_assistant_turn_and_masks_the_tools(
    tiny_model_dir, tmp_path
):
    """SFT on a tool-use demonstration (warm-starting a multi-turn job): the prompt ends
    before the first assistant turn; both assistant turns are learned, the tool result
    and the header that opens the second turn are masked, as an episode masks them."""
    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))  # fmt: skip
    rows = tmp_path / "transcripts.jsonl"
    rows.write_text(json.dumps({"messages": [
        {"role": "user", "content": "3 + 4?"},
        {"role": "assistant", "content": "calc(3 + 4)"},
        {"role": "tool", "content": "7"},
        {"role": "assistant", "content": "7"}]}) + "\n")  # fmt: skip
    spec = validate_spec(json.dumps({
        "model": {"path": str(model)}, "algorithm": {"kind": "sft", "prompts_per_step": 1},
        "task": {"kind": "dataset", "prompt_format": "chat", "dataset": {
            "path": str(rows), "messages_column": "messages", "shuffle": False}}}))  # fmt: skip
    ctx = StepContext("job-1", spec, 0, 0, load_codec(str(model)), PromptSource(spec.task),
                      threading.Event())  # fmt: skip
    [sample] = SftStrategy(pool=None).rollout(ctx).samples
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert list(sample.prompt_token_ids) == raw.encode("[user] 3 + 4?\n[assistant]").ids
    pieces = [(" calc(3 + 4)\n", True), ("[tool] 7\n", False), ("[assistant]", False),
              (" 7\n", True)]  # fmt: skip
    want_ids = [t for text, _ in pieces for t in raw.encode(text).ids]
    want_mask = [m for text, m in pieces for _ in raw.encode(text).ids]
    assert list(sample.completion_token_ids) == want_ids
    assert list(sample.loss_mask) == want_mask
