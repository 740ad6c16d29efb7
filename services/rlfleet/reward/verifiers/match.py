"""String verifiers: the extracted answer equals the gold answer, or matches a
pattern. Cheap and predictable; the baseline against which smarter verifiers
are compared.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import field_validator

from rlfleet.reward.verifiers.base import Verifier, VerifierConfig, require_answer


class ExactConfig(VerifierConfig):
    ignore_case: bool = False
    """Compare case-insensitively."""


class ExactVerifier(Verifier):
    kind: ClassVar[str] = "exact"
    config_model: ClassVar[type[VerifierConfig]] = ExactConfig

    def check_entry(self, entry: dict[str, Any]) -> None:
        require_answer(entry)

    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        got, want = self.answer(completion_text), str(entry["answer"]).strip()
        if self.config.ignore_case:
            got, want = got.casefold(), want.casefold()
        return 1.0 if got == want else 0.0


class RegexConfig(VerifierConfig):
    pattern: str
    """A correct answer fullmatches this Python regular expression."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"is not a valid regular expression: {exc}") from None
        return v


class RegexVerifier(Verifier):
    kind: ClassVar[str] = "regex"
    config_model: ClassVar[type[VerifierConfig]] = RegexConfig

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        self._pattern = re.compile(self.config.pattern)

    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        return 1.0 if self._pattern.fullmatch(self.answer(completion_text)) else 0.0
