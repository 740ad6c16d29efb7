"""What an environment is: a small protocol any class can meet, no base class needed.

Why it is shaped this way
- One instance per environment and process serves every episode, from many gRPC
  threads at once; everything that belongs to one episode lives in the ``state``
  object its ``reset`` returns (``Observation.state``), which the env core keeps
  and hands back to ``step``. So an environment holds no per-episode fields and
  needs no locks of its own: the core never runs two steps of one episode at once.
- The core, not the environment, owns ids, turn order, idempotent retries, the
  episode store and the wire format; an environment only maps (state, model text)
  to the messages to append, the reward so far and whether the episode is done.
- ``reset`` raises ``ValueError`` (pydantic's ``ValidationError`` is one) for a row
  or options it cannot use; the service answers INVALID_ARGUMENT with its sentence.
  Anything ``step`` raises is a bug of the environment (INTERNAL, logged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    """One chat message, as a chat template takes it."""

    role: str
    """"system", "user", "assistant" or "tool"."""
    content: str
    name: str = ""
    """For role "tool": the tool that answered (templates that want it read it)."""

    def as_dict(self) -> dict[str, str]:
        out = {"role": self.role, "content": self.content}
        if self.name:
            out["name"] = self.name
        return out


@dataclass
class Observation:
    """What ``reset`` returns: the opening conversation and the episode's own state."""

    messages: list[Message]
    """The conversation the model's first turn follows (system, user prompt, ...)."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """Tool schemas in the JSON-schema "function" format (``tools=`` of a chat template)."""
    state: Any = None
    """The environment's per-episode state: kept by the core, passed to every ``step``."""


@dataclass
class StepResult:
    """What ``step`` returns for one model turn."""

    messages: list[Message]
    """To append after the model's turn: tool results (role "tool"), feedback ("user")."""
    reward: float
    """The episode's reward so far (final once ``done``)."""
    done: bool
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable details (tool calls, errors, why it ended)."""


@runtime_checkable
class Environment(Protocol):
    """A multi-turn environment, found by ``name`` through the entry-point group
    ``rlfleet.environments`` (see docs/ENVIRONMENTS.md).

    The entry point names a class (or any callable) that takes no arguments and
    returns the environment; the service makes one per process.
    """

    name: str
    """The name callers reset episodes with (``ResetRequest.env_name``)."""

    def reset(self, row: dict[str, Any], options: dict[str, Any]) -> Observation:
        """Starts an episode from a dataset row; raises ValueError on a row or options
        it cannot use (the message reaches the caller)."""
        ...

    def step(self, state: Any, model_text: str) -> StepResult:
        """Takes the model's next turn (called once per turn, in order, never twice).

        If it raises, it must leave ``state`` as it was: the caller may retry the turn."""
        ...
