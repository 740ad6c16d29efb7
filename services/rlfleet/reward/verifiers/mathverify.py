"""Mathematical equivalence with math-verify: "1/2", "0.5" and "\\frac{1}{2}" all
match a gold answer of 1/2.

Threads: math-verify enforces its own timeouts with ``signal.alarm``, which
works only in the main thread (it raises ValueError anywhere else). The reward
core scores in a thread pool, so both timeouts are switched off
(``parsing_timeout=None``, ``timeout_seconds=None``) and the inputs that could
make sympy run away are bounded instead: an answer longer than
``max_answer_chars`` scores 0 without being parsed. The core's per-request
deadline (``score_timeout_s``) is the last line of defence.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from pydantic import Field

from rlfleet.reward.verifiers.base import Verifier, VerifierConfig, require_answer

logger = logging.getLogger(__name__)

# math-verify logs a warning on every call made with timeouts off; we chose that on purpose.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse(text: str) -> list:
    from math_verify import parse

    found = parse(text, parsing_timeout=None)
    if not found:
        # Bare LaTeX ("\\dfrac{1}{2}") without $ delimiters is missed by the
        # default extractors; read it once more as inline math.
        found = parse(f"${text}$", parsing_timeout=None)
    return found


class MathConfig(VerifierConfig):
    max_answer_chars: int = Field(default=512, ge=1, le=100_000)
    """Longer answers score 0 unparsed (the guard that replaces math-verify's timeouts)."""
    float_rounding: int = Field(default=6, ge=0, le=20)
    """Decimal places to which numbers are rounded before comparing."""


class MathVerifier(Verifier):
    kind: ClassVar[str] = "math"
    config_model: ClassVar[type[VerifierConfig]] = MathConfig

    def check_entry(self, entry: dict[str, Any]) -> None:
        require_answer(entry)

    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        from math_verify import verify

        answer = self.answer(completion_text)
        if not answer or len(answer) > self.config.max_answer_chars:
            return 0.0
        gold = _parse(str(entry["answer"]))
        pred = _parse(answer)
        if not gold or not pred:
            return 0.0
        ok = verify(gold, pred, float_rounding=self.config.float_rounding, timeout_seconds=None)
        return 1.0 if ok else 0.0
