"""What every verifier shares: the abstract base, its settings and answer extraction.

A verifier turns (completion text, task entry) into a reward in [0, 1]. It is
pure and thread-safe: the reward core calls ``score`` from a thread pool, many
samples at once, with one verifier instance per request. A ``batched`` verifier
(a reward model) is called once for the whole request instead
(``score_batch_with_terms``), and may give rewards outside [0, 1] when its
settings ask for raw scores.

Answer extraction
-----------------
Prompts end in ``"Answer:"`` (``TaskSpec.prompt_template``), so the completion
is the model's answer followed by whatever it produced next. By default
(``extract = "first_line"``) the answer is: the completion cut at the first
end-of-sequence marker ``</s>``, leading whitespace (newlines included) skipped,
then cut at the first newline and stripped. ``extract = "full"`` keeps every
line (cut at ``</s>`` and stripped), for models that reason over several lines
and end with e.g. ``\\boxed{...}``, which the math verifier finds anywhere.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

EOS_MARKER = "</s>"


def extract_answer(
    completion_text: str, *, mode: Literal["first_line", "full"] = "first_line"
) -> str:
    """The part of a completion a verifier compares (see the module docstring)."""
    text = completion_text.split(EOS_MARKER, 1)[0]
    if mode == "first_line":
        text = text.lstrip().split("\n", 1)[0]
    return text.strip()


class VerifierConfig(BaseModel):
    """Settings every verifier accepts (``ScoreRequest.verifier_config_json``)."""

    model_config = ConfigDict(extra="forbid")

    extract: Literal["first_line", "full"] = "first_line"
    """first_line: the answer ends at the first newline; full: the whole completion."""


class Verifier(abc.ABC):
    """Scores one completion against its task entry."""

    kind: ClassVar[str]
    config_model: ClassVar[type[VerifierConfig]] = VerifierConfig
    batched: ClassVar[bool] = False
    """True when one call over many samples is much cheaper than one call per sample (a
    model's forward pass): the reward core then calls ``score_batch_with_terms`` once per
    request instead of ``score_with_terms`` per sample in its thread pool."""

    def __init__(self, config: dict[str, Any] | None = None):
        # pydantic's ValidationError is a ValueError: a bad setting fails like an unknown kind.
        self.config = self.config_model.model_validate(config or {})

    def answer(self, completion_text: str) -> str:
        return extract_answer(completion_text, mode=self.config.extract)

    def check_entry(self, entry: dict[str, Any]) -> None:
        """Raises ValueError (naming what is missing) if ``entry`` cannot be scored.

        Called for every sample before any is scored, so a malformed request is
        refused as a whole instead of silently scoring 0. The default accepts
        any entry (e.g. regex needs none).
        """
        return None

    @abc.abstractmethod
    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        """Reward in [0, 1] for ``completion_text`` (the text after the prompt)."""

    def score_with_terms(
        self, completion_text: str, entry: dict[str, Any]
    ) -> tuple[float, dict[str, float]]:
        """The reward and, for a combined verifier, each term's own score (a plain
        verifier has no terms)."""
        return self.score(completion_text, entry), {}

    def score_batch_with_terms(
        self, completion_texts: list[str], entries: list[dict[str, Any]]
    ) -> list[tuple[float, dict[str, float]]]:
        """``score_with_terms`` for many samples, in order. The reward core calls it only
        for a ``batched`` verifier, which overrides it; this default scores one at a time."""
        return [
            self.score_with_terms(text, entry)
            for text, entry in zip(completion_texts, entries, strict=True)
        ]


def require_answer(entry: dict[str, Any]) -> None:
    """Shared ``check_entry`` of the verifiers that compare with ``entry["answer"]``."""
    answer = entry.get("answer")
    if answer is None or not isinstance(answer, str | int | float):
        raise ValueError('needs a string "answer" (the gold answer)')
