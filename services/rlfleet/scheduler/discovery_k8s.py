"""Rollout replicas found through the Kubernetes API: the Ready pods that match a
label selector in one namespace, each reached at ``<pod IP>:<port>``.

Why the API and not the headless Service's DNS: an autoscaler changes the replica
count at any time, DNS answers are cached and include pods that are not Ready yet,
while the API says at once which pods exist and which pass their readiness probe
(the gRPC health service). The chart's Role lets the scheduler get/list/watch pods
in its own namespace and nothing else.

How: a background thread lists the pods (the whole picture plus a resourceVersion),
then watches from that version; every event updates a map pod name -> address, kept
only while the pod is Ready, has an IP and is not being deleted. The server ends a
watch after ``timeoutSeconds``; the thread watches again from the last version it
saw. A 410 Gone (that version was compacted away) or any error makes it list again,
after a growing pause on errors. ``addresses()`` only reads the map, so the step
loop never waits on the API once the first list is in.

The ``kubernetes`` package (the official client) is imported here only, so a
scheduler with static discovery never loads it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from rlfleet.scheduler.discovery import ReplicaDiscovery

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_HTTP_GONE = 410


def kubernetes_api_client(*, kubeconfig: str = "") -> Any:
    """An ApiClient for the cluster this process runs in, else for the kubeconfig.

    In a pod (``KUBERNETES_SERVICE_HOST`` set, no ``kubeconfig`` given): the pod's
    service account, whose token the client re-reads as Kubernetes rotates it.
    Elsewhere: ``kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig or None, client_configuration=configuration)
    return client.ApiClient(configuration)


def default_namespace() -> str:
    """The pod's own namespace (service account mount), else ``default``."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def pod_address(pod: dict, port: int) -> str | None:
    """``ip:port`` of a pod that may get work now, else None.

    A pod qualifies while its Ready condition is True, it has an IP and no deletion
    has started (a terminating pod can stay Ready for its grace period).
    """
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    ip = status.get("podIP")
    if not ready or not ip:
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _natural_key(name: str) -> list:
    # rollout-2 before rollout-10, so work spreads in StatefulSet ordinal order.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class KubernetesDiscovery(ReplicaDiscovery):
    """Follows the Ready pods matching ``selector`` in ``namespace``."""

    def __init__(
        self,
        *,
        namespace: str,
        selector: str,
        port: int,
        api_client: Any = None,
        watch_timeout_s: int = 300,
        initial_sync_timeout_s: float = 30.0,
        backoff_max_s: float = 30.0,
    ):
        if not selector.strip():
            raise ValueError(
                "kubernetes discovery needs a label selector of the rollout pods "
                "(rollout_selector); an empty one would match every pod of the namespace"
            )
        from kubernetes import client

        self.namespace = namespace or default_namespace()
        self.selector = selector
        self.port = port
        self.watch_timeout_s = watch_timeout_s
        self.initial_sync_timeout_s = initial_sync_timeout_s
        self.backoff_max_s = backoff_max_s
        self._api = client.CoreV1Api(api_client or kubernetes_api_client())
        self._pods: dict[str, str] = {}  # pod name -> address, Ready pods only
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._watch = None
        self._thread = threading.Thread(target=self._run, name="k8s-discovery", daemon=True)
        self._thread.start()

    # -- what the pool reads -------------------------------------------------

    def addresses(self) -> list[str]:
        if not self._synced.wait(self.initial_sync_timeout_s):
            logger.warning(
                "no pod list from the Kubernetes API yet (namespace %s, selector %s)",
                self.namespace,
                self.selector,
            )
        with self._lock:
            return [self._pods[name] for name in sorted(self._pods, key=_natural_key)]

    def wait_synced(self, timeout: float) -> bool:
        """True once the first list has been read."""
        return self._synced.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        # Watch.stop() shuts the watch's socket so a blocked read returns, but only once
        # the response has started: repeat it until the thread has noticed.
        for _ in range(50):
            watch = self._watch
            if watch is not None:
                watch.stop()
            self._thread.join(timeout=0.1)
            if not self._thread.is_alive():
                return

    # -- the background thread -----------------------------------------------

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        failures = 0
        while not self._stop.is_set():
            try:
                version = self._list()
                failures = 0
                while not self._stop.is_set():
                    version = self._watch_from(version)
            except ApiException as exc:
                if exc.status == _HTTP_GONE:
                    logger.info("pod watch expired (410 Gone); listing again")
                    continue
                failures += 1
                denied = exc.status in (401, 403)
                hint = " (does the scheduler's Role allow list/watch of pods?)" if denied else ""
                logger.warning(
                    "Kubernetes API error while following rollout pods: %s %s%s",
                    exc.status,
                    exc.reason,
                    hint,
                )
            except Exception as exc:  # connection refused, reset, read timeout, bad JSON
                if self._stop.is_set():
                    break
                failures += 1
                logger.warning("cannot follow rollout pods through the Kubernetes API: %s", exc)
            self._stop.wait(min(self.backoff_max_s, 0.5 * 2 ** min(failures, 10)))

    def _list(self) -> str:
        """Replaces the map with a fresh list; returns the list's resourceVersion."""
        resp = self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=(10, 60),
        )
        body = json.loads(resp.data)
        pods = {}
        for pod in body.get("items") or []:
            address = pod_address(pod, self.port)
            if address:
                pods[pod["metadata"]["name"]] = address
        with self._lock:
            old, self._pods = self._pods, pods
        self._log_change(old, pods)
        self._synced.set()
        return body["metadata"]["resourceVersion"]

    def _watch_from(self, version: str) -> str:
        """Applies watch events from ``version`` until the server ends the watch."""
        from kubernetes import watch

        w = watch.Watch()
        self._watch = w
        try:
            for event in w.stream(
                self._api.list_namespaced_pod,
                self.namespace,
                label_selector=self.selector,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout_s,
                # The server closes the watch at timeout_seconds; a read that waits much
                # longer than that means a dead connection.
                _request_timeout=(10, self.watch_timeout_s + 30),
            ):
                pod = event["raw_object"]
                version = (pod.get("metadata") or {}).get("resourceVersion") or version
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(event["type"], pod)
                if self._stop.is_set():
                    break
        finally:
            self._watch = None
        return version

    def _apply(self, kind: str, pod: dict) -> None:
        name = pod["metadata"]["name"]
        address = None if kind == "DELETED" else pod_address(pod, self.port)
        with self._lock:
            old = dict(self._pods)
            if address:
                self._pods[name] = address
            else:
                self._pods.pop(name, None)
            new = dict(self._pods)
        self._log_change(old, new)

    @staticmethod
    def _log_change(old: dict[str, str], new: dict[str, str]) -> None:
        added = sorted(f"{n} ({a})" for n, a in new.items() if old.get(n) != a)
        gone = sorted(n for n in old if n not in new)
        if added or gone:
            logger.info(
                "rollout replicas from Kubernetes: %d ready%s%s",
                len(new),
                f"; joined {', '.join(added)}" if added else "",
                f"; left {', '.join(gone)}" if gone else "",
            )
