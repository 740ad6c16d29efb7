"""How the scheduler finds rollout replicas.

Behind a small base class so that a deployment can swap the static list (local
runs, docker-compose) for the Kubernetes API (Helm) without touching the pool.
"""

from __future__ import annotations

import abc


class ReplicaDiscovery(abc.ABC):
    """A source of rollout replica addresses (``host:port``)."""

    @abc.abstractmethod
    def addresses(self) -> list[str]:
        """The replicas that exist right now; called before every step."""


class StaticDiscovery(ReplicaDiscovery):
    """A fixed list from configuration."""

    def __init__(self, addresses: list[str]):
        # Order is kept (and duplicates dropped) so work spreads deterministically.
        self._addresses = list(dict.fromkeys(a.strip() for a in addresses if a.strip()))

    def addresses(self) -> list[str]:
        return list(self._addresses)


def parse_addresses(value: str) -> list[str]:
    """``"a:1, b:2"`` -> ``["a:1", "b:2"]``."""
    return [part.strip() for part in value.split(",") if part.strip()]


def setup_discovery(kind: str, *, addresses: list[str] | None = None) -> ReplicaDiscovery:
    """Factory: the discovery named by ``kind``."""
    if kind == "static":
        return StaticDiscovery(addresses or [])
    if kind == "kubernetes":
        raise ValueError("replica discovery 'kubernetes' is not implemented yet; use 'static'")
    raise ValueError(f"unknown replica discovery {kind!r}; known: static")
