"""Chat prompts (``task.prompt_format = "chat"``): the model's own chat template.

The task's formatted prompt becomes the user turn (after an optional system turn),
and the tokenizer's chat template, rendered by transformers exactly as at
inference time, gives the prompt token ids, generation prompt included. Those ids
travel in every request and sample, so the replicas, the reward service and the
trainer see the very same prompt tokens. Only chat jobs import transformers here;
the scheduler otherwise tokenises with ``tokenizers`` alone.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from rlfleet.common.errors import InvalidArgument


@functools.lru_cache(maxsize=8)
def _chat_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.chat_template:
        raise InvalidArgument(
            f"task.prompt_format is 'chat' but model {model_path!r} has no chat template "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja); use 'template'"
        )
    return tokenizer


def chat_messages(prompt: str | list[dict[str, str]], system_prompt: str) -> list[dict[str, str]]:
    """The conversation of a prompt: the user turn of a formatted text, or a dataset's
    messages; ``system_prompt`` goes first unless the messages bring their own."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def chat_tools(value: Any) -> list[dict] | None:
    """A dataset row's ``tools`` (JSON tool schemas for the template's ``tools=``): a list
    of objects, or a JSON string of one (a dataset file may hold either); None if none."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"task.dataset: a row's 'tools' is a string but not JSON ({exc.msg})"
            ) from None
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise InvalidArgument(
            "task.dataset: a row's 'tools' must be a list of JSON tool schemas (objects), "
            f"not {type(value).__name__} {str(value)[:60]!r}"
        )
    return value or None  # an empty list renders as no tools, as in an episode


def chat_prompt_ids(
    model_path: str,
    user_text: str | list[dict[str, str]],
    system_prompt: str = "",
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids of the conversation [system?, user] with the assistant's turn opened
    (and ``tools`` for the template, as an episode's prompt has them)."""
    tokenizer = _chat_tokenizer(model_path)
    encoded = tokenizer.apply_chat_template(
        chat_messages(user_text, system_prompt),
        tools=tools or None,
        add_generation_prompt=True,
        tokenize=True,
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def chat_completion_ids(
    model_path: str, user_text: str | list[dict[str, str]], completion: str, system_prompt: str = ""
) -> list[int]:
    """SFT: the tokens the chat template puts after the open assistant turn for the reply
    ``completion`` (the reply and the template's own end of turn)."""
    tokenizer = _chat_tokenizer(model_path)
    prompt = chat_prompt_ids(model_path, user_text, system_prompt)
    messages = [
        *chat_messages(user_text, system_prompt),
        {"role": "assistant", "content": completion},
    ]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True)
    full = [int(i) for i in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]
    if full[: len(prompt)] != prompt:
        raise InvalidArgument(
            f"the chat template of {model_path!r} renders a conversation whose start differs "
            "from its generation prompt, so the assistant's tokens cannot be told apart"
        )
    return full[len(prompt) :]


def chat_transcript_ids(
    model_path: str,
    prompt: list[dict[str, str]],
    transcript: list[dict[str, str]],
    system_prompt: str = "",
    tools: list[dict] | None = None,
) -> tuple[list[int], list[bool]]:
    """SFT on an agent's demonstration: the tokens the chat template renders for
    ``transcript`` after the prompt, and per token whether it is learned. Assistant turns
    (content and end of turn) are; the tool results, user turns and the headers that open
    each assistant turn are not, exactly as a multi-turn episode masks the environment's
    tokens (``scheduler/episodes.py``). Each piece is the text the template adds for it,
    tokenised on its own, as an episode's pieces are. Every rendering gets ``tools`` (the
    row's tool schemas), as the episode's prompt does, and messages keep their other keys
    (a tool result's ``name``), as the episode's replies do."""
    tokenizer = _chat_tokenizer(model_path)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    history = chat_messages(prompt, system_prompt)

    def render(messages, opened: bool) -> str:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=opened)  # fmt: skip

    ids: list[int] = []
    mask: list[bool] = []
    text = render(history, True)  # the prompt: its generation header opens the first turn
    opened = True

    def add(rendered: str, learned: bool) -> str:
        if not rendered.startswith(text):
            raise InvalidArgument(
                f"the chat template of {model_path!r} renders a conversation differently once "
                "messages follow it; transcripts need a template that only appends"
            )
        piece = encode(rendered[len(text) :])
        ids.extend(piece)
        mask.extend([learned] * len(piece))
        return rendered

    for message in transcript:
        learned = message["role"] == "assistant"
        if learned and not opened:  # the header that opens the turn: not learned
            text = add(render(history, True), False)
        history = [*history, message]
        text = add(render(history, False), learned)
        opened = False
    return ids, mask
