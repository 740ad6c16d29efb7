"""Verifiers combined with weights: reward = Σ weight × score, e.g. a format check at 0.1
plus math-verify at 1.0. Each term's own score comes back beside the reward
(``score_with_terms``), so the step record shows every term's mean, not only the sum.

A term that is ``batched`` (a reward model) makes the whole combination batched: the
reward core then hands it every sample at once, the batched terms score them in one
call each and the other terms one sample after another (in that one worker thread).
A per-sample term that raises costs only its sample: its reward comes back NaN, which
the core scores 0 and counts, as it does for a sample that raises when unbatched.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlfleet.reward.verifiers.base import Verifier, VerifierConfig

logger = logging.getLogger(__name__)


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
        # Per instance: batched when any of its terms is.
        self.batched = any(verifier.batched for _, _, verifier in self.terms)

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

    def score_batch_with_terms(
        self, completion_texts: list[str], entries: list[dict[str, Any]]
    ) -> list[tuple[float, dict[str, float]]]:
        scores: dict[str, list[float]] = {}
        failed: set[int] = set()
        for name, _, verifier in self.terms:
            if verifier.batched:
                batch = verifier.score_batch_with_terms(completion_texts, entries)
                scores[name] = [float(reward) for reward, _ in batch]
                continue
            scores[name] = []
            for i, (text, entry) in enumerate(zip(completion_texts, entries, strict=True)):
                try:
                    scores[name].append(float(verifier.score(text, entry)))
                except Exception:  # noqa: BLE001 - one bad sample must not fail the batch
                    logger.warning(
                        "a weighted verifier's term raised; the sample scores 0",
                        exc_info=True,
                        extra={"term": name, "index": i},
                    )
                    scores[name].append(0.0)
                    failed.add(i)
        out: list[tuple[float, dict[str, float]]] = []
        for i in range(len(completion_texts)):
            terms = {name: scores[name][i] for name, _, _ in self.terms}
            reward = sum(weight * terms[name] for name, weight, _ in self.terms)
            out.append((math.nan, {}) if i in failed else (reward, terms))
        return out

    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        return self.score_with_terms(completion_text, entry)[0]
