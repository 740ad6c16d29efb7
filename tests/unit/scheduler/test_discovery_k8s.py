"""Kubernetes replica discovery, with the official ``kubernetes`` client, against an API
STAND-IN: no Kubernetes API server can be installed on the project's machines, so
``KubeApiStandIn`` below is a small HTTP server on 127.0.0.1 that speaks the few REST
endpoints the client calls — ``GET /api/v1/namespaces/<ns>/pods`` as a list (with
``labelSelector``) and as a watch (``watch=true``, ``resourceVersion``,
``timeoutSeconds``: a chunked stream of JSON event lines, and a 410 Gone ERROR event
for a compacted version) — with the pod JSON shapes of the real API. The client is
configured to it through a kubeconfig file, the way it would be outside a cluster.
What this cannot show: RBAC, TLS and the real server's timing; those need a cluster.

The tests follow replicas as they come and go (added, Ready, not Ready, deleted),
recover from a 410 and from an API outage, and drive the scheduler's replica pool and
a whole job over replicas found this way (scripted rollout servers, each on its own
loopback IP and the same port, as pods are), and check that the scheduler process, given
the settings the Helm chart renders, lists and watches the pods.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

pytest.importorskip("kubernetes", reason="pip install kubernetes")

from rlfleet.common.config import ServiceConfig  # noqa: E402
from rlfleet.common.grpc_server import start_server  # noqa: E402
from rlfleet.scheduler.discovery import setup_discovery  # noqa: E402
from rlfleet.scheduler.discovery_k8s import KubernetesDiscovery, kubernetes_api_client  # noqa: E402
from rlfleet.v1 import rollout_pb2_grpc  # noqa: E402

SELECTOR = "app.kubernetes.io/instance=rl,app.kubernetes.io/component=rollout"
LABELS = {"app.kubernetes.io/instance": "rl", "app.kubernetes.io/component": "rollout"}
TOKEN = "standin-token"


class KubeApiStandIn:
    """Pods of a pretend cluster, served over the Kubernetes REST API (see module doc)."""

    def __init__(self):
        self.pods: dict[tuple[str, str], dict] = {}
        self.events: list[tuple[int, str, dict]] = []  # (resourceVersion, type, pod)
        self.version = 100
        self.compacted = 0  # watches from an older version get 410 Gone
        self.fail_next = 0  # answer this many requests with 500
        self.requests: list[tuple[str, dict, str]] = []  # (path, query, Authorization)
        self.cond = threading.Condition()
        self.closing = False
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                standin._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- the cluster's side ---------------------------------------------------

    def _record(self, kind: str, pod: dict) -> None:
        with self.cond:
            self.version += 1
            pod["metadata"]["resourceVersion"] = str(self.version)
            self.events.append((self.version, kind, json.loads(json.dumps(pod))))
            self.cond.notify_all()

    def add_pod(self, name: str, ip: str, *, ready: bool = True, ns: str = "rl", labels=None):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels or LABELS)},
            "spec": {"containers": [{"name": "rollout", "image": "rlfleet:dev"}]},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
        with self.cond:
            self.pods[(ns, name)] = pod
            self._record("ADDED", pod)

    def set_ready(self, name: str, ready: bool, *, ns: str = "rl"):
        with self.cond:
            pod = self.pods[(ns, name)]
            pod["status"]["conditions"] = [{"type": "Ready", "status": str(ready)}]
            self._record("MODIFIED", pod)

    def delete_pod(self, name: str, *, ns: str = "rl"):
        with self.cond:
            self._record("DELETED", self.pods.pop((ns, name)))

    def compact(self):
        """Forgets history, as etcd compaction does: older watches get 410 Gone."""
        with self.cond:
            self.compacted = self.version
            self.events.clear()

    # -- the API server's side ----------------------------------------------

    @staticmethod
    def _matches(pod: dict, ns: str, selector: str) -> bool:
        if pod["metadata"]["namespace"] != ns:
            return False
        labels = pod["metadata"].get("labels", {})
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
        return True

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        with self.cond:
            self.requests.append((url.path, query, h.headers.get("Authorization", "")))
            failing = self.fail_next > 0
            self.fail_next -= failing
        if failing:
            return self._json(h, 500, {"kind": "Status", "code": 500, "message": "etcd is down"})
        if len(parts) != 5 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "pods":
            return self._json(h, 404, {"kind": "Status", "code": 404, "message": "not found"})
        ns, selector = parts[3], query.get("labelSelector", "")
        if query.get("watch") in ("true", "1"):
            return self._watch(h, ns, selector, query)
        with self.cond:
            items = [p for p in self.pods.values() if self._matches(p, ns, selector)]
            body = {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": str(self.version)},
                "items": items,
            }
        self._json(h, 200, body)

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _watch(self, h: BaseHTTPRequestHandler, ns: str, selector: str, query: dict) -> None:
        since = int(query.get("resourceVersion") or 0)
        end = time.monotonic() + float(query.get("timeoutSeconds") or 30)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(event: dict) -> None:
            line = (json.dumps(event) + "\n").encode()
            h.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            h.wfile.flush()

        try:
            if since < self.compacted:
                send(
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "message": f"too old resource version: {since}",
                            "reason": "Expired",
                            "code": 410,
                        },
                    }
                )
            else:
                while True:
                    with self.cond:
                        fresh = [e for e in self.events if e[0] > since]
                        if not fresh:
                            left = end - time.monotonic()
                            if left <= 0 or self.closing:
                                break
                            self.cond.wait(min(left, 0.5))
                            continue
                    for rv, kind, pod in fresh:
                        since = rv
                        if self._matches(pod, ns, selector):
                            send({"type": kind, "object": pod})
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:  # the client went away
            pass
        h.close_connection = True


@pytest.fixture
def api():
    standin = KubeApiStandIn()
    yield standin
    standin.close()


@pytest.fixture
def kubeconfig(api, tmp_path):
    """A kubeconfig pointing the client at the stand-in, with a bearer token."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "standin", "cluster": {"server": api.url}}],
                "users": [{"name": "scheduler", "user": {"token": TOKEN}}],
                "contexts": [
                    {"name": "standin", "context": {"cluster": "standin", "user": "scheduler"}}
                ],
                "current-context": "standin",
            }
        )
    )
    return str(path)


@pytest.fixture
def make_discovery(kubeconfig):
    made: list[KubernetesDiscovery] = []

    def make(**kwargs) -> KubernetesDiscovery:
        options = {
            "namespace": "rl",
            "selector": SELECTOR,
            "port": 50051,
            "api_client": kubernetes_api_client(kubeconfig=kubeconfig),
            "watch_timeout_s": 2,
            "backoff_max_s": 0.2,
        }
        d = setup_discovery("kubernetes", **{**options, **kwargs})
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def wait_for(fn, expected, timeout: float = 60.0):
    """Polls ``fn()`` until it returns ``expected``; returns the last value. The deadline
    only bounds a hang: on a loaded 2-core machine a watch event can take seconds."""
    end = time.monotonic() + timeout
    got = fn()
    while got != expected and time.monotonic() < end:
        time.sleep(0.05)
        got = fn()
    return got


def test_lists_ready_pods_matching_the_selector(api, make_discovery):
    api.add_pod("rollout-1", "10.0.0.2")
    api.add_pod("rollout-0", "10.0.0.1")
    api.add_pod("rollout-2", "10.0.0.3", ready=False)
    api.add_pod("reward-0", "10.0.0.9", labels={"app.kubernetes.io/component": "reward"})
    api.add_pod("rollout-x", "10.0.0.8", ns="other")
    d = make_discovery()
    # The first addresses() waits for the first list: no step starts with an empty pool.
    assert d.addresses() == ["10.0.0.1:50051", "10.0.0.2:50051"]
    path, query, auth = api.requests[0]
    assert path == "/api/v1/namespaces/rl/pods"
    assert query["labelSelector"] == SELECTOR
    assert auth == f"Bearer {TOKEN}"  # the kubeconfig's credentials reach the API


def test_follows_pods_as_they_come_and_go(api, make_discovery):
    api.add_pod("rollout-0", "10.0.0.1")
    d = make_discovery()
    assert d.addresses() == ["10.0.0.1:50051"]
    api.add_pod("rollout-1", "10.0.0.2", ready=False)  # scaled up, still starting
    api.add_pod("rollout-10", "10.0.0.11")
    assert wait_for(d.addresses, ["10.0.0.1:50051", "10.0.0.11:50051"]) == [
        "10.0.0.1:50051",
        "10.0.0.11:50051",
    ]
    api.set_ready("rollout-1", True)  # passes its readiness probe
    want = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.11:50051"]
    assert wait_for(d.addresses, want) == want
    api.set_ready("rollout-0", False)  # fails its probe
    api.delete_pod("rollout-10")  # scaled down
    assert wait_for(d.addresses, ["10.0.0.2:50051"]) == ["10.0.0.2:50051"]
    watches = [q for _, q, _ in api.requests if q.get("watch") == "true"]
    assert watches and all(q["labelSelector"] == SELECTOR for q in watches)


def test_keeps_watching_after_the_server_ends_a_watch(api, make_discovery):
    d = make_discovery(watch_timeout_s=1)
    assert d.addresses() == []
    watches = lambda: sum(q.get("watch") == "true" for _, q, _ in api.requests)  # noqa: E731
    assert wait_for(lambda: watches() >= 2, True)  # re-watched after the 1 s timeout
    lists = sum(q.get("watch") != "true" for _, q, _ in api.requests)
    assert lists == 1  # ... from the last version, without listing again
    api.add_pod("rollout-0", "10.0.0.1")
    assert wait_for(d.addresses, ["10.0.0.1:50051"]) == ["10.0.0.1:50051"]


def test_relists_after_410_gone(api, make_discovery):
    api.add_pod("rollout-0", "10.0.0.1")
    d = make_discovery(watch_timeout_s=1)
    assert d.addresses() == ["10.0.0.1:50051"]
    # Changes the watch never delivers, and history compacted past them (under the
    # stand-in's lock, so no watch sees them): only a new list shows them.
    with api.cond:
        api.pods.pop(("rl", "rollout-0"))
        api.add_pod("rollout-1", "10.0.0.2")
        api.compact()
    assert wait_for(d.addresses, ["10.0.0.2:50051"]) == ["10.0.0.2:50051"]
    assert sum(q.get("watch") != "true" for _, q, _ in api.requests) == 2  # listed again


def test_survives_an_api_outage(api, make_discovery):
    api.add_pod("rollout-0", "10.0.0.1")
    api.fail_next = 3  # the first list and two retries get 500
    d = make_discovery(initial_sync_timeout_s=0.1)
    assert d.addresses() in ([], ["10.0.0.1:50051"])  # does not block past the sync timeout
    assert d.wait_synced(60)
    assert d.addresses() == ["10.0.0.1:50051"]


def test_close_stops_the_watch_thread(api, make_discovery):
    d = make_discovery(watch_timeout_s=30)
    assert d.wait_synced(60)
    assert wait_for(lambda: any(q.get("watch") == "true" for _, q, _ in api.requests), True)
    d.close()  # does not wait for the 30 s watch to end
    assert not d._thread.is_alive()


# -- the pool and the step loop over discovered replicas --------------------------


def _free_port_on(*hosts: str) -> int:
    """A port free on every host (pods share one port, each on its own IP)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


@pytest.fixture
def pod_replicas(fleet):
    """Scripted rollout servers on 127.0.0.2 and 127.0.0.3, same port: two "pods"."""
    hosts = ["127.0.0.2", "127.0.0.3"]
    port = _free_port_on(*hosts)
    replicas = fleet.replicas  # scripted behaviour, served again on the pod addresses
    servers = []
    for host, replica in zip(hosts, replicas, strict=True):
        servers.append(
            start_server(
                ServiceConfig(host=host, port=port),
                lambda s, r=replica: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(r, s),
                service_names=["rlfleet.v1.RolloutService"],
                max_workers=8,
                metrics=False,
            )
        )
    yield hosts, port, replicas
    for server in servers:
        server.server.stop(0).wait()


def test_the_pool_follows_discovered_replicas(api, make_discovery, pod_replicas):
    from rlfleet.scheduler.pool import ReplicaPool

    hosts, port, _ = pod_replicas
    api.add_pod("rollout-0", hosts[0])
    pool = ReplicaPool(make_discovery(port=port), status_timeout_s=10.0)
    try:
        assert [r.replica_id for r in pool.refresh()] == ["r0"]
        api.add_pod("rollout-1", hosts[1])
        assert wait_for(lambda: [r.replica_id for r in pool.refresh()], ["r0", "r1"]) == [
            "r0",
            "r1",
        ]
        api.delete_pod("rollout-0")
        assert wait_for(lambda: [r.replica_id for r in pool.refresh()], ["r1"]) == ["r1"]
        assert [r.address for r in pool.replicas()] == [f"{hosts[1]}:{port}"]
    finally:
        pool.close()


def test_a_job_runs_on_replicas_found_through_the_api(
    api, make_discovery, pod_replicas, fleet, redis_url, spec_of
):
    from rlfleet.scheduler.clients import ServiceClients, Timeouts
    from rlfleet.scheduler.core import SchedulerCore
    from rlfleet.scheduler.jobs import JobState
    from rlfleet.scheduler.loop import JobRunner
    from rlfleet.scheduler.pool import ReplicaPool
    from rlfleet.scheduler.store import JobStore

    hosts, port, replicas = pod_replicas
    for i, host in enumerate(hosts):
        api.add_pod(f"rollout-{i}", host)
    store = JobStore.from_url(redis_url)
    pool = ReplicaPool(make_discovery(port=port), status_timeout_s=10.0, replica_retry_s=0.5)
    clients = ServiceClients(
        reward_address=fleet.reward_address,
        trainer_address=fleet.trainer_address,
        timeouts=Timeouts(init=60.0, score=60.0, train=120.0, retry_deadline=1.0),
    )
    core = SchedulerCore(
        store=store,
        runner=JobRunner(store=store, pool=pool, clients=clients, score_batch_size=4),
        poll_interval_s=0.05,
    )
    try:
        job = core.submit(spec_of(steps=2))
        assert core.run_once()  # runs the job to its end in this thread
        job = core.get(job.job_id)
        assert job.state == JobState.SUCCEEDED, job.reason
        assert all(r.generates for r in replicas)  # both discovered replicas got work
        assert all(r.version == 2 for r in replicas)
    finally:
        core.stop()
        pool.close()
        clients.close()
        store.r.close()


@pytest.mark.slow  # starts the scheduler process
def test_the_scheduler_process_follows_pods_with_the_charts_settings(
    api, kubeconfig, service_factory, redis_url
):
    """`python -m rlfleet.scheduler --discovery kubernetes` with the RLFLEET_SCHEDULER_ROLLOUT_*
    variables the chart renders, and KUBECONFIG pointing at the stand-in."""
    env = {
        "KUBECONFIG": kubeconfig,
        "KUBERNETES_SERVICE_HOST": "",  # not in a pod: use the kubeconfig
        "RLFLEET_SCHEDULER_ROLLOUT_NAMESPACE": "rl",
        "RLFLEET_SCHEDULER_ROLLOUT_SELECTOR": SELECTOR,
        "RLFLEET_SCHEDULER_ROLLOUT_PORT": "50051",
    }
    service_factory(
        "scheduler",
        "rlfleet.scheduler",
        [
            "--discovery", "kubernetes",
            "--reward-address", "127.0.0.1:1",
            "--trainer-address", "127.0.0.1:1",
            "--redis-url", redis_url,
            "--log-format", "text",
        ],
        env=env,
    )  # fmt: skip
    lists = lambda: [  # noqa: E731
        (path, q, auth) for path, q, auth in api.requests if q.get("watch") != "true"
    ]
    assert wait_for(lambda: bool(lists()), True, timeout=120)
    path, query, auth = lists()[0]
    assert (path, query["labelSelector"], auth) == (
        "/api/v1/namespaces/rl/pods",
        SELECTOR,
        f"Bearer {TOKEN}",
    )
    # ... and keeps watching from the list's version.
    assert wait_for(lambda: any(q.get("watch") == "true" for _, q, _ in api.requests), True)
