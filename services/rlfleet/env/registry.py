"""Finding environments by name: the entry-point group ``rlfleet.environments``.

A user adds an environment by installing a package that declares, in its
pyproject.toml::

    [project.entry-points."rlfleet.environments"]
    maze = "my_envs.maze:MazeEnvironment"

rlfleet declares its built-ins the same way (``tools``, ``retry``). They are also
known without the installed metadata (a source checkout that was never
``pip install``-ed), so the service never loses them; an installed entry point can
not replace a built-in (that would change what a name means under a running job).
An entry point that fails to load or does not make an ``Environment`` is skipped
with a warning, and a reset of its name says why.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from rlfleet.env.protocol import Environment

logger = logging.getLogger(__name__)

GROUP = "rlfleet.environments"

BUILTINS: dict[str, str] = {
    "tools": "rlfleet.env.environments.tools:ToolsEnvironment",
    "retry": "rlfleet.env.environments.retry:RetryEnvironment",
}
"""The built-ins by name, as their entry points name them (pyproject.toml)."""


def _load_target(target: str) -> Callable[[], object]:
    module, _, attr = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _make(name: str, factory: object) -> Environment:
    """Calls the entry point's target and checks the result is an Environment."""
    if not callable(factory):
        raise TypeError(f"{factory!r} is not a class or callable")
    env = factory()
    if not isinstance(env, Environment):
        raise TypeError(
            f"{type(env).__qualname__} is not an Environment (it needs name, reset and step)"
        )
    if env.name != name:
        logger.warning(
            "environment registered under another name",
            extra={"entry_point": name, "env_name": env.name},
        )
    return env


@dataclass
class Registry:
    """The environments of this process, made once each."""

    envs: dict[str, Environment] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    """Name -> why it could not be loaded."""

    @property
    def names(self) -> list[str]:
        return sorted(self.envs)

    def get(self, name: str) -> Environment:
        """The environment ``name``; KeyError with a sentence when there is none."""
        env = self.envs.get(name)
        if env is not None:
            return env
        if name in self.broken:
            raise KeyError(
                f"environment {name!r} is installed but failed to load: {self.broken[name]}"
            )
        raise KeyError(
            f"env_name {name!r} is unknown; known environments: {', '.join(self.names) or 'none'}"
        )


def discover(*, group: str = GROUP) -> Registry:
    """Every environment of the entry-point group, plus the built-ins."""
    registry = Registry()
    for name, target in BUILTINS.items():
        registry.envs[name] = _make(name, _load_target(target))
    for ep in entry_points(group=group):
        if ep.name in BUILTINS:
            if ep.value != BUILTINS[ep.name]:
                logger.warning(
                    "an installed environment may not replace a built-in; ignored",
                    extra={"env_name": ep.name, "entry_point": ep.value},
                )
            continue
        if ep.name in registry.envs or ep.name in registry.broken:
            logger.warning(
                "two installed environments share a name; the first is kept",
                extra={"env_name": ep.name, "entry_point": ep.value},
            )
            continue
        try:
            registry.envs[ep.name] = _make(ep.name, ep.load())
        except Exception as exc:  # noqa: BLE001 - one bad plugin must not stop the service
            registry.broken[ep.name] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "environment entry point failed to load; skipped",
                exc_info=True,
                extra={"env_name": ep.name, "entry_point": ep.value},
            )
    logger.info("environments found", extra={"environments": registry.names})
    return registry
