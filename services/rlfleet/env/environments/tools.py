"""``tools``: the model may call a calculator and a Python sandbox before it answers.

One episode: the system message explains the tools (and ``tools`` holds their
schemas for the chat template's ``tools=``), the user message is the row's prompt.
Each model turn either calls tools (``<tool_call>{...}</tool_call>``, Hermes/Qwen
format, see ``rlfleet.env.toolcalls``), and every call's result comes back as a
role "tool" message; or it has no tool call, and it is the final answer: the
episode ends and the verifier scores it against the row's answer (reward 1 or 0
for math/exact, given only then). A turn that still calls a tool when it is the
last one allowed (``max_turns``) ends the episode with reward 0, ``truncated``.

A failing tool (bad arguments, an unknown tool, a crash, a time-out, too much
output) is not the end: its error is the tool message, and the model goes on.

info keys: ``turn``, ``tool_calls`` / ``tool_errors`` (this turn),
``tool_calls_total`` / ``tool_errors_total``, ``truncated``, ``finish``
("answer", "max_turns" or null while running), ``score`` once answered.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from rlfleet.env.calculator import CalculatorError, calculate
from rlfleet.env.environments.common import (
    RowOptions,
    build_verifier,
    prompt_messages,
    score,
    with_system,
)
from rlfleet.env.protocol import Message, Observation, StepResult
from rlfleet.env.python_tool import PythonLimits, ToolOutcome, run_python
from rlfleet.env.toolcalls import ToolCall, final_text, parse_tool_calls
from rlfleet.reward.verifiers import Verifier

logger = logging.getLogger(__name__)

ToolName = Literal["calculator", "python"]

SCHEMAS: dict[str, dict[str, Any]] = {
    "calculator": {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": (
                "Evaluates an arithmetic expression exactly: numbers, + - * / ** and "
                "parentheses (no names or functions)."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "expression": {
                        "type": "string",
                        "description": "The expression, e.g. (12 + 7) * 3 / 2",
                    }
                },
                "required": ["expression"],
            },
        },
    },
    "python": {
        "type": "function",
        "function": {
            "name": "python",
            "description": (
                "Runs a Python 3 program (standard library only, no network, no files kept) "
                "and returns what it printed. Print the values you need."
            ),
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "The program to run."}},
                "required": ["code"],
            },
        },
    },
}


class ToolsOptions(RowOptions):
    max_turns: int = Field(default=4, ge=1, le=64)
    """Model turns an episode may take; the last one must answer without a tool call."""
    tools: list[ToolName] = Field(default=["calculator", "python"], min_length=1)
    """The tools this episode offers."""
    tool_prompt: Literal["brief", "full", "none"] = "brief"
    """What the system message says of the tools: brief (how to call them, one line
    each), full (also their JSON schemas, for templates that ignore ``tools=``), none
    (only system_prompt: the chat template renders ``tools`` itself)."""
    max_tool_calls_per_turn: int = Field(default=4, ge=1, le=16)
    """Calls beyond this in one turn are answered with an error and not run."""
    python_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """Wall-clock seconds one python call may take."""
    python_memory_mb: int = Field(default=256, ge=64, le=4096)
    """Address space of one python call, in MiB."""
    python_max_processes: int = Field(default=8, ge=1, le=64)
    """Processes one python call may have at once."""
    max_output_kb: int = Field(default=16, ge=1, le=256)
    """A tool's output shown to the model is cut at this many KB."""


@dataclass
class ToolsState:
    options: ToolsOptions
    verifier: Verifier
    entry: dict[str, Any]
    turn: int = 0
    tool_calls: int = 0
    tool_errors: int = 0


def _system_text(options: ToolsOptions) -> str:
    parts = [options.system_prompt] if options.system_prompt else []
    if options.tool_prompt != "none":
        lines = [
            "You can call tools before you answer. To call one, write",
            "<tool_call>",
            '{"name": "<tool name>", "arguments": {<its arguments as JSON>}}',
            "</tool_call>",
            "and wait for its result. Tools:",
        ]
        for name in options.tools:
            lines.append(f"- {name}: {SCHEMAS[name]['function']['description']}")
        if options.tool_prompt == "full":
            lines += ["<tools>", *(json.dumps(SCHEMAS[n]) for n in options.tools), "</tools>"]
        lines.append("When you know the answer, reply without a tool call and give the answer.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


class ToolsEnvironment:
    """Tool calling (calculator, python) with a verified final answer."""

    name: ClassVar[str] = "tools"

    def reset(self, row: dict[str, Any], options: dict[str, Any]) -> Observation:
        opts = ToolsOptions.model_validate(options)
        messages = with_system(prompt_messages(row, opts), _system_text(opts))
        verifier, entry = build_verifier(row, opts)
        return Observation(
            messages=messages,
            tools=[SCHEMAS[n] for n in opts.tools],
            state=ToolsState(options=opts, verifier=verifier, entry=entry),
        )

    def step(self, state: ToolsState, model_text: str) -> StepResult:
        opts = state.options
        turn = state.turn
        calls = parse_tool_calls(model_text)
        info: dict[str, Any] = {"turn": turn, "tool_calls": 0, "tool_errors": 0}
        if not calls:
            reward = score(state.verifier, final_text(model_text), state.entry)
            return self._end(state, info, reward=reward, finish="answer")
        if turn + 1 >= opts.max_turns:
            return self._end(state, info, reward=0.0, finish="max_turns", truncated=True)

        messages = []
        for i, call in enumerate(calls):
            if i >= opts.max_tool_calls_per_turn:
                outcome = ToolOutcome(
                    f"error: at most {opts.max_tool_calls_per_turn} tool calls per turn; "
                    "this one was not run",
                    error=True,
                )
            else:
                outcome = self._run(call, opts)
            info["tool_calls"] += 1
            info["tool_errors"] += outcome.error
            messages.append(Message(role="tool", content=outcome.content, name=call.name))
            if outcome.info.get("truncated"):
                info["output_truncated"] = True
        # State changes only once every tool has run: a step that raises (the sandbox
        # could not start) leaves the episode as it was, so the caller may retry it.
        state.turn += 1
        state.tool_calls += info["tool_calls"]
        state.tool_errors += info["tool_errors"]
        info.update(self._totals(state), truncated=False, finish=None)
        return StepResult(messages=messages, reward=0.0, done=False, info=info)

    @staticmethod
    def _totals(state: ToolsState) -> dict[str, int]:
        return {"tool_calls_total": state.tool_calls, "tool_errors_total": state.tool_errors}

    def _end(
        self, state: ToolsState, info: dict, *, reward: float, finish: str, truncated=False
    ) -> StepResult:
        state.turn += 1
        info.update(self._totals(state), truncated=truncated, finish=finish, score=reward)
        return StepResult(messages=[], reward=reward, done=True, info=info)

    @staticmethod
    def _run(call: ToolCall, opts: ToolsOptions) -> ToolOutcome:
        if call.error:
            return ToolOutcome(f"error: {call.error}", error=True)
        if call.name not in opts.tools:
            return ToolOutcome(
                f"error: there is no tool {call.name!r}; tools: {', '.join(opts.tools)}",
                error=True,
            )
        if call.name == "calculator":
            unknown = sorted(set(call.arguments) - {"expression"})
            if unknown or "expression" not in call.arguments:
                return ToolOutcome(
                    'error: calculator takes one argument, "expression" (a string)', error=True
                )
            try:
                return ToolOutcome(calculate(call.arguments["expression"]))
            except CalculatorError as exc:
                return ToolOutcome(f"error: {exc}", error=True)
        limits = PythonLimits(
            timeout_s=opts.python_timeout_s,
            memory_mb=opts.python_memory_mb,
            max_processes=opts.python_max_processes,
            max_output_bytes=opts.max_output_kb * 1024,
        )
        return run_python(call.arguments.get("code"), limits)
