"""``retry``: a verifier that talks back. A wrong answer gets a feedback turn.

The model answers the row's prompt; the verifier checks the answer (reasoning and
end markers stripped, see ``rlfleet.env.toolcalls.final_text``). Correct (score at
least ``success_score``): the episode ends with reward ``discount ** t`` for an answer
at model turn t (0-based; ``discount = 1`` by default, so any correct turn earns 1,
and 0.5 makes a first-try answer worth 1, a second-try 0.5, ...). Wrong: the model
reads ``feedback`` as a user message and tries again, up to ``max_turns`` turns; a
wrong last turn ends the episode with reward 0.

info keys: ``turn``, ``score`` (the verifier's, this turn), ``correct``,
``finish`` ("answer", "max_turns", or null while the model may retry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from rlfleet.env.environments.common import (
    RowOptions,
    build_verifier,
    prompt_messages,
    score,
    with_system,
)
from rlfleet.env.protocol import Message, Observation, StepResult
from rlfleet.env.toolcalls import final_text
from rlfleet.reward.verifiers import Verifier


class RetryOptions(RowOptions):
    discount: float = Field(default=1.0, ge=0.0, le=1.0)
    """A correct answer at turn t earns discount ** t."""
    feedback: str = Field(default="That is not correct; try again.", min_length=1)
    """The user message after a wrong answer."""
    success_score: float = Field(default=1.0, ge=0.0, le=1.0)
    """Lowest verifier score that counts as correct (below 1 for partial-credit verifiers)."""


@dataclass
class RetryState:
    options: RetryOptions
    verifier: Verifier
    entry: dict[str, Any]
    turn: int = 0


class RetryEnvironment:
    """Answer, get "not correct" feedback, retry up to max_turns times."""

    name: ClassVar[str] = "retry"

    def reset(self, row: dict[str, Any], options: dict[str, Any]) -> Observation:
        opts = RetryOptions.model_validate(options)
        messages = with_system(prompt_messages(row, opts), opts.system_prompt or "")
        verifier, entry = build_verifier(row, opts)
        return Observation(
            messages=messages, state=RetryState(options=opts, verifier=verifier, entry=entry)
        )

    def step(self, state: RetryState, model_text: str) -> StepResult:
        opts = state.options
        turn = state.turn
        got = score(state.verifier, final_text(model_text), state.entry)
        state.turn += 1
        correct = got >= opts.success_score
        info: dict[str, Any] = {"turn": turn, "score": got, "correct": correct}
        if correct:
            info["finish"] = "answer"
            return StepResult(messages=[], reward=opts.discount**turn, done=True, info=info)
        if state.turn >= opts.max_turns:
            info["finish"] = "max_turns"
            return StepResult(messages=[], reward=0.0, done=True, info=info)
        info["finish"] = None
        return StepResult(
            messages=[Message(role="user", content=opts.feedback)],
            reward=0.0,
            done=False,
            info=info,
        )
