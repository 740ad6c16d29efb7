"""SFT transcripts with tools: a row's tool schemas reach the chat template (``tools=``)
and a tool result keeps its ``name``, so a demonstration is tokenised exactly as a
multi-turn episode of the same conversation is (``scheduler/episodes.py``
ChatRenderer: its prompt gets the environment's tools, its replies their names)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.chat import chat_prompt_ids, chat_tools, chat_transcript_ids
from rlfleet.scheduler.core import validate_spec
from rlfleet.scheduler.episodes import ChatRenderer
from rlfleet.scheduler.samples import load_codec
from rlfleet.scheduler.sft import SftStrategy
from rlfleet.scheduler.strategy import StepContext

# Renders the tools' names before the conversation and a message's name in its header,
# as Qwen-style templates render both; "</s>" (the tokenizer's EOS) ends each turn and
# nothing follows it (text after it, such as a newline, a transcript learns with the turn
# while an episode masks it, which these tests are not about).
TEMPLATE = (
    "{% if tools %}[tools]{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "{{ '\\n' }}{% endif %}"  # (a newline right after a block tag would be trimmed)
    "{% for m in messages %}[{{ m['role'] }}{% if m['name'] %}:{{ m['name'] }}{% endif %}] "
    "{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluates arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}]  # fmt: skip
PROMPT = [{"role": "user", "content": "3 + 4?"}]
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "3 + 4"}}</tool_call>'


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tools-chat-model") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return str(out)


def episode(model: str, transcript: list[dict]) -> tuple[list[int], list[int], list[bool]]:
    """(prompt, tokens, mask) of an episode that plays ``transcript``: the model writes
    each assistant turn and its EOS, the environment replies with the other messages."""
    codec = load_codec(model)
    renderer = ChatRenderer(model, codec)
    tokens: list[int] = []
    mask: list[bool] = []
    replies: list[dict] = []
    for message in transcript:
        if message["role"] != "assistant":
            replies.append(message)
            continue
        if replies:
            ids = renderer.reply_ids(replies)
            tokens, mask, replies = tokens + ids, mask + [False] * len(ids), []
        ids = codec.encode(" " + message["content"]) + [min(codec.eos_ids)]
        tokens, mask = tokens + ids, mask + [True] * len(ids)
    return renderer.prompt_ids(PROMPT, TOOLS), tokens, mask


def test_a_transcript_with_tools_is_tokenised_as_an_episode(model):
    transcript = [
        {"role": "assistant", "content": CALL},
        {"role": "tool", "name": "calculator", "content": "7"},
        {"role": "assistant", "content": "7"},
    ]
    prompt, tokens, mask = episode(model, transcript)
    decode = load_codec(model).tokenizer.decode
    # (the template really renders both, so the comparison below covers them)
    assert decode(prompt).startswith("[tools] calculator\n[user] 3 + 4?")
    assert "[tool:calculator] 7" in decode(tokens)
    assert chat_prompt_ids(model, PROMPT, tools=TOOLS) == prompt
    assert chat_transcript_ids(model, PROMPT, transcript, tools=TOOLS) == (tokens, mask)


@pytest.mark.parametrize("as_json_text", [False, True])
def test_an_sft_sample_of_a_transcript_row_has_the_episodes_prompt(model, tmp_path, as_json_text):
    rows = tmp_path / "transcripts.jsonl"
    rows.write_text(json.dumps({
        "messages": [*PROMPT, {"role": "assistant", "content": CALL},
                     {"role": "tool", "content": "7"}, {"role": "assistant", "content": "7"}],
        "tools": json.dumps(TOOLS) if as_json_text else TOOLS}) + "\n")  # fmt: skip
    spec = validate_spec(json.dumps({
        "model": {"path": model}, "algorithm": {"kind": "sft", "prompts_per_step": 1},
        "sampling": {"max_new_tokens": 256},
        "task": {"kind": "dataset", "prompt_format": "chat", "dataset": {
            "path": str(rows), "messages_column": "messages", "shuffle": False}}}))  # fmt: skip
    ctx = StepContext("job-1", spec, 0, 0, load_codec(model), PromptSource(spec.task),
                      threading.Event())  # fmt: skip
    [sample] = SftStrategy(pool=None).rollout(ctx).samples
    prompt, tokens, mask = episode(model, json.loads(rows.read_text())["messages"][1:])
    assert list(sample.prompt_token_ids) == prompt
    assert (list(sample.completion_token_ids), list(sample.loss_mask)) == (tokens, mask)


@pytest.mark.parametrize(
    "value, message",
    [
        ("[{oops", "a row's 'tools' is a string but not JSON"),
        ({"name": "calculator"}, "a row's 'tools' must be a list of JSON tool schemas"),
        (["calculator"], "a row's 'tools' must be a list of JSON tool schemas"),
    ],
)
def test_tools_that_are_not_a_list_of_schemas_are_refused_with_a_sentence(value, message):
    with pytest.raises(InvalidArgument, match=message):
        chat_tools(value)
    assert chat_tools(None) is None and chat_tools("") is None and chat_tools([]) is None
    assert chat_tools(json.dumps(TOOLS)) == TOOLS == chat_tools(TOOLS)
