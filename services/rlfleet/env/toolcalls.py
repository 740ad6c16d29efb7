"""Reading tool calls out of a model's turn, in the Hermes / Qwen format.

Qwen2.5 and Qwen3 chat templates (and Hermes-style templates) tell the model to
call a tool by writing, anywhere in its turn::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2 + 3"}}
    </tool_call>

possibly several times. What this module accepts beyond the strict form, because
sampled models write it:

- raw newlines and tabs inside JSON strings (``json.loads(strict=False)``), as in
  a python tool's multi-line ``code``;
- ``arguments`` given as a JSON string that holds the object (OpenAI's wire form);
- a last ``<tool_call>`` never closed (the turn hit its token limit): it is a call,
  which fails to parse unless its JSON is whole.

Reasoning in ``<think>...</think>`` is not part of the answer: tool calls inside it
are ignored, and ``final_text`` drops it (and everything before a lone ``</think>``,
which Qwen3 writes when the template opened the think block itself).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; ``error`` says why it could not be read (name and arguments empty)."""

    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    raw: str = ""


def strip_reasoning(text: str) -> str:
    """``text`` without ``<think>`` blocks and without what precedes a lone ``</think>``."""
    if "</think>" in text and "<think>" not in text.split("</think>", 1)[0]:
        text = text.split("</think>", 1)[1]
    text = _THINK.sub("", text)
    for marker in _END_MARKERS:
        text = text.split(marker, 1)[0]
    return text


def _parse_one(body: str) -> ToolCall:
    raw = body.strip()
    try:
        obj = json.loads(raw, strict=False)
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" ("Unterminated string starting at"): the
        # position follows them, so that "at" must not come twice.
        what = exc.msg.removesuffix(" at")
        return ToolCall(
            error=f"the tool call is not valid JSON ({what} at char {exc.pos})", raw=raw
        )
    if not isinstance(obj, dict):
        return ToolCall(
            error='the tool call must be a JSON object {"name": ..., "arguments": {...}}', raw=raw
        )
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(error='the tool call has no "name"', raw=raw)
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args, strict=False) if args.strip() else {}
        except json.JSONDecodeError as exc:
            return ToolCall(
                name=name, error=f'"arguments" is a string but not JSON ({exc.msg})', raw=raw
            )
    if not isinstance(args, dict):
        return ToolCall(name=name, error='"arguments" must be a JSON object', raw=raw)
    return ToolCall(name=name, arguments=args, raw=raw)


def parse_tool_calls(model_text: str) -> list[ToolCall]:
    """Every ``<tool_call>`` of the turn (outside reasoning), in order."""
    return [_parse_one(m.group(1)) for m in _CALL.finditer(strip_reasoning(model_text))]


def final_text(model_text: str) -> str:
    """The turn as an answer: reasoning and tool calls removed, stripped."""
    return _CALL.sub("", strip_reasoning(model_text)).strip()
