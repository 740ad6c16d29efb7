"""What the built-in environments share: reading a dataset row, and the verifier.

A row is a JSON object. Its prompt is, in this order: ``options.prompt_key`` if
set; else a ``messages`` list (a chat row); else ``prompt`` (text, or a list of
messages as in conversational datasets); else ``question``. Its gold answer is
``row[options.answer_key]`` (default ``answer``). The answer is checked by a
verifier of the reward service (``rlfleet.reward.verifiers``; default ``math``,
math-verify, reading the whole final turn), so an environment scores exactly as
a single-turn job with the same verifier would.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rlfleet.env.protocol import Message
from rlfleet.reward.verifiers import VERIFIERS, Verifier, setup_verifier

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


class RowOptions(BaseModel):
    """Options every built-in takes (``ResetRequest.options_json``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_turns: int = Field(default=3, ge=1, le=64)
    """Model turns an episode may take; the last one must answer."""
    system_prompt: str | None = None
    """Text of a system message put first (before any tool instructions)."""
    prompt_key: str | None = None
    """Row field holding the prompt (text or messages); default: messages, prompt, question."""
    answer_key: str = "answer"
    """Row field holding the gold answer."""
    verifier: str = "math"
    """A reward-service verifier: math, exact, regex, reasoning_gym, ..."""
    verifier_config: dict[str, Any] = Field(default_factory=lambda: {"extract": "full"})
    """The verifier's settings (as ``ScoreRequest.verifier_config_json``)."""


def _as_messages(value: list, where: str) -> list[Message]:
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
            raise ValueError(f'{where}[{i}] is not a {{"role": ..., "content": "..."}} message')
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}[{i}] has role {m.get('role')!r}; roles: {', '.join(ROLES)}")
        out.append(Message(role=m["role"], content=m["content"]))
    if not out:
        raise ValueError(f"{where} is an empty list of messages")
    return out


def prompt_messages(row: dict[str, Any], options: RowOptions) -> list[Message]:
    """The row's prompt as chat messages (see the module docstring)."""
    if options.prompt_key is not None:
        keys = [options.prompt_key]
    else:
        keys = [k for k in ("messages", "prompt", "question") if k in row][:1]
    if not keys or keys[0] not in row:
        wanted = (
            repr(options.prompt_key) if options.prompt_key else "'messages', 'prompt' or 'question'"
        )
        raise ValueError(
            f"row_json has no {wanted} field (its fields: {', '.join(sorted(row)) or 'none'})"
        )
    key = keys[0]
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"row_json field {key!r} is empty")
        return [Message(role="user", content=value)]
    if isinstance(value, list):
        return _as_messages(value, f"row_json field {key!r}")
    raise ValueError(f"row_json field {key!r} must be a string or a list of messages")


def with_system(messages: list[Message], system_text: str) -> list[Message]:
    """``messages`` with ``system_text`` in the system message (merged with the row's own)."""
    if not system_text:
        return messages
    if messages and messages[0].role == "system":
        merged = messages[0].content.rstrip() + "\n\n" + system_text
        return [Message(role="system", content=merged), *messages[1:]]
    return [Message(role="system", content=system_text), *messages]


def build_verifier(row: dict[str, Any], options: RowOptions) -> tuple[Verifier, dict[str, Any]]:
    """The verifier and the entry it scores against; ValueError if the row cannot be scored."""
    if options.verifier not in VERIFIERS:
        raise ValueError(
            f"options verifier {options.verifier!r} is unknown; "
            f"known verifiers: {', '.join(sorted(VERIFIERS))}"
        )
    cls = VERIFIERS[options.verifier]
    config = dict(options.verifier_config)
    if "extract" in config and "extract" not in cls.config_model.model_fields:
        config.pop("extract")
    try:
        verifier = setup_verifier(options.verifier, config)
    except ValueError as exc:
        raise ValueError(
            f"options verifier_config for {options.verifier!r} is invalid: {exc}"
        ) from None
    if options.answer_key not in row:
        raise ValueError(
            f"row_json has no {options.answer_key!r} field (the gold answer); "
            f"its fields: {', '.join(sorted(row)) or 'none'}"
        )
    entry = {**row, "answer": row[options.answer_key]}
    try:
        verifier.check_entry(entry)
    except ValueError as exc:
        raise ValueError(f"row_json cannot be scored by {options.verifier!r}: it {exc}") from None
    return verifier, entry


def score(verifier: Verifier, answer: str, entry: dict[str, Any]) -> float:
    """The verifier's reward for ``answer``; 0 when it raises (logged) or is not finite."""
    try:
        value = float(verifier.score(answer, entry))
    except Exception:  # noqa: BLE001 - one odd answer costs its reward, not the episode
        logger.warning("verifier raised; the answer scores 0", exc_info=True)
        return 0.0
    return value if value == value and abs(value) != float("inf") else 0.0
