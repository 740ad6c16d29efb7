"""Environments found by name through the entry-point group ``rlfleet.environments``."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pytest
from rlfleet.env import registry as registry_mod
from rlfleet.env.environments.retry import RetryEnvironment
from rlfleet.env.environments.tools import ToolsEnvironment
from rlfleet.env.protocol import Environment, Message, Observation, StepResult
from rlfleet.env.registry import BUILTINS, GROUP, discover


class EchoEnvironment:
    """A user's environment: a plain class, no rlfleet base class."""

    name = "echo"

    def reset(self, row: dict[str, Any], options: dict[str, Any]) -> Observation:
        return Observation(messages=[Message("user", row["prompt"])], state={"turns": 0})

    def step(self, state: dict, model_text: str) -> StepResult:
        state["turns"] += 1
        return StepResult([Message("user", model_text.upper())], 0.0, state["turns"] >= 2)


class NotAnEnvironment:
    name = "half"

    def reset(self, row, options):  # no step
        return Observation(messages=[])


def test_builtins_are_registered_in_the_installed_metadata():
    """pyproject.toml declares them (after `pip install -e .`), as a user's package would."""
    found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    assert {k: found.get(k) for k in BUILTINS} == BUILTINS
    assert found["tools"] == "rlfleet.env.environments.tools:ToolsEnvironment"
    assert entry_points(group=GROUP)["tools"].load() is ToolsEnvironment
    assert entry_points(group=GROUP)["retry"].load() is RetryEnvironment


def test_discover_finds_the_builtins():
    reg = discover()
    assert {"tools", "retry"} <= set(reg.names)
    assert isinstance(reg.get("tools"), ToolsEnvironment)
    assert isinstance(reg.get("retry"), Environment)  # meets the protocol


def test_builtins_stay_without_metadata(monkeypatch):
    """A source checkout never pip-installed still knows the built-ins."""
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: [])
    assert discover().names == ["retry", "tools"]


def _eps(*pairs: tuple[str, str]) -> list[EntryPoint]:
    return [EntryPoint(name=n, value=v, group=GROUP) for n, v in pairs]


def test_a_users_class_through_an_entry_point(monkeypatch):
    here = __name__
    monkeypatch.setattr(
        registry_mod, "entry_points", lambda group: _eps(("echo", f"{here}:EchoEnvironment"))
    )
    reg = discover()
    assert reg.names == ["echo", "retry", "tools"]
    env = reg.get("echo")
    assert isinstance(env, EchoEnvironment)
    obs = env.reset({"prompt": "hi"}, {})
    assert env.step(obs.state, "abc").messages == [Message("user", "ABC")]


def test_broken_entry_points_are_skipped_and_explained(monkeypatch):
    here = __name__
    monkeypatch.setattr(
        registry_mod,
        "entry_points",
        lambda group: _eps(
            ("gone", "no_such_module_xyz:Env"),
            ("half", f"{here}:NotAnEnvironment"),
            ("tools", f"{here}:EchoEnvironment"),  # may not replace a built-in
        ),
    )
    reg = discover()
    assert reg.names == ["retry", "tools"]
    assert isinstance(reg.get("tools"), ToolsEnvironment)
    with pytest.raises(KeyError, match="failed to load: ModuleNotFoundError"):
        reg.get("gone")
    with pytest.raises(KeyError, match="is not an Environment"):
        reg.get("half")
    with pytest.raises(KeyError, match="known environments: retry, tools"):
        reg.get("nope")
