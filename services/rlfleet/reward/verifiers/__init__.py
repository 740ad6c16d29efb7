"""Verifiers: one small class per kind behind ``Verifier``; ``setup_verifier`` picks one."""

from __future__ import annotations

from typing import Any

from rlfleet.reward.verifiers.base import EOS_MARKER, Verifier, VerifierConfig, extract_answer
from rlfleet.reward.verifiers.code import CodeVerifier
from rlfleet.reward.verifiers.gym import ReasoningGymVerifier
from rlfleet.reward.verifiers.match import ExactVerifier, RegexVerifier
from rlfleet.reward.verifiers.mathverify import MathVerifier
from rlfleet.reward.verifiers.reward_model import RewardModelVerifier
from rlfleet.reward.verifiers.weighted import WeightedVerifier

VERIFIERS: dict[str, type[Verifier]] = {
    cls.kind: cls
    for cls in (
        ReasoningGymVerifier,
        MathVerifier,
        ExactVerifier,
        RegexVerifier,
        CodeVerifier,
        RewardModelVerifier,
        WeightedVerifier,
    )
}


def setup_verifier(kind: str, config: dict[str, Any] | None = None) -> Verifier:
    """The verifier named by ``kind`` with its settings.

    Raises ValueError on an unknown kind or a bad setting (pydantic's
    ValidationError is a ValueError).
    """
    cls = VERIFIERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown verifier {kind!r}; known: {', '.join(sorted(VERIFIERS))}")
    return cls(config)


__all__ = [
    "EOS_MARKER",
    "VERIFIERS",
    "Verifier",
    "VerifierConfig",
    "extract_answer",
    "setup_verifier",
]
