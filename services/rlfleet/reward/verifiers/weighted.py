"""Verifiers combined with weights: reward = Σ weight × score, e.g. a format check at 0.1
plus math-verify at 1.0. Each term's own score comes back beside the reward
(``score_with_terms``), so the step record shows every term's mean, not only the sum.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlfleet.reward.verifiers.base import Verifier, VerifierConfig


class Term(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verifier: str
    weight: float
    name: str = ""
    """The term's name in the metrics (default: its verifier)."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The verifier's own settings, e.g. {"pattern": ...} for regex."""

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class WeightedConfig(VerifierConfig):
    terms: list[Term] = Field(min_length=1)


class WeightedVerifier(Verifier):
    kind: ClassVar[str] = "weighted"
    config_model: ClassVar[type[VerifierConfig]] = WeightedConfig

    def __init__(self, config: dict[str, Any] | None = None):
        from rlfleet.reward.verifiers import setup_verifier

        super().__init__(config)
        self.terms: list[tuple[str, float, Verifier]] = []
        for i, term in enumerate(self.config.terms):
            if term.verifier == self.kind:
                raise ValueError(f"terms[{i}]: a weighted verifier cannot nest another")
            name = term.name or term.verifier
            if any(name == other for other, _, _ in self.terms):
                raise ValueError(f"terms[{i}]: a second term named {name!r}; give each a name")
            try:
                verifier = setup_verifier(term.verifier, term.settings)
            except ValueError as exc:
                raise ValueError(f"terms[{i}] ({name}): {exc}") from None
            self.terms.append((name, term.weight, verifier))

    def check_entry(self, entry: dict[str, Any]) -> None:
        for name, _, verifier in self.terms:
            try:
                verifier.check_entry(entry)
            except ValueError as exc:
                raise ValueError(f"for term {name!r} {exc}") from None

    def score_with_terms(
        self, completion_text: str, entry: dict[str, Any]
    ) -> tuple[float, dict[str, float]]:
        terms = {name: float(v.score(completion_text, entry)) for name, _, v in self.terms}
        return sum(weight * terms[name] for name, weight, _ in self.terms), terms

    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        return self.score_with_terms(completion_text, entry)[0]
