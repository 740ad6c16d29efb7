"""How the scheduler finds rollout replicas.

Behind a small base class so that a deployment can swap the static list (local
runs, docker-compose) for the Kubernetes API (Helm, ``discovery_k8s``) without
touching the pool: the pool asks ``addresses()`` before every step and follows
whatever it returns (new addresses join, missing ones are dropped).
"""

from __future__ import annotations

import abc

KINDS = ("static", "kubernetes")


class ReplicaDiscovery(abc.ABC):
    """A source of rollout replica addresses (``host:port``)."""

    @abc.abstractmethod
    def addresses(self) -> list[str]:
        """The replicas that exist right now; called before every step."""

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Stops whatever the source runs in the background."""


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


def setup_discovery(
    kind: str,
    *,
    addresses: list[str] | None = None,
    namespace: str = "",
    selector: str = "",
    port: int = 50051,
    api_client=None,
    **kubernetes_options,
) -> ReplicaDiscovery:
    """Factory: the discovery named by ``kind``.

    static: ``addresses``. kubernetes: the Ready pods matching the label
    ``selector`` in ``namespace`` (empty: the pod's own), at ``<pod IP>:port``;
    ``api_client`` defaults to in-cluster config, else the kubeconfig.
    """
    if kind == "static":
        return StaticDiscovery(addresses or [])
    if kind == "kubernetes":
        from rlfleet.scheduler.discovery_k8s import KubernetesDiscovery

        return KubernetesDiscovery(
            namespace=namespace,
            selector=selector,
            port=port,
            api_client=api_client,
            **kubernetes_options,
        )
    raise ValueError(f"unknown replica discovery {kind!r}; known: {', '.join(KINDS)}")
