"""A real Prometheus (Debian's ``prometheus``) scrapes a running local fleet while a
short job trains the tiny model, and every PromQL query of every Grafana dashboard
(deploy/grafana/dashboards/*.json) must then return data — the panels a user opens
after their first job are not empty.

Queries run the way Grafana runs them: panels as range queries over the job's time
window (instant panels at its end), ``label_values(metric, label)`` variables through
the label-values API. Dashboard variables are resolved as a user picking the job would:
``$job_id`` = the job's id, every other variable = All (``.*``), ``$__rate_interval`` =
4 scrape intervals (Grafana's minimum), ``$__range`` = the window.

What one synchronous job cannot produce is in ``NO_DATA_EXPECTED`` with the reason.
The same Prometheus loads the alert rules, and each must evaluate without error.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
RULES = REPO / "deploy" / "prometheus" / "rules" / "rlfleet.rules.yml"
SCRAPE_S = 1
RATE_INTERVAL = f"{4 * SCRAPE_S}s"
# Deadlines of the waits below (all polled): they only bound a hang, since a loaded
# 2-core machine can take minutes where an idle one takes seconds.
WAIT_S = 180

# (dashboard file, panel title, legend of the query) -> why a healthy synchronous job
# leaves that query empty. Keep it short: everything else must show data.
NO_DATA_EXPECTED = {
    # Error counters get a series per (service, method, code) only once such an error
    # happened; a healthy run has none.
    ("rlfleet-overview.json", "gRPC errors per second", "{{service}} {{method}} {{code}}"): (
        "no RPC failed"
    ),
    (
        "rlfleet-buffer.json",
        "Buffer full: Score refused (RESOURCE_EXHAUSTED) per second",
        "refused",
    ): "the buffer never filled up",
    ("rlfleet-reward.json", "Verifier errors per second", "{{verifier}} {{reason}}"): (
        "no verifier raised or timed out"
    ),
    # Sequences are handed back unfinished only when C3PO++ stops replicas at the token
    # budget (or a job is cancelled); a sync job runs every sequence to its end.
    ("rlfleet-c3po.json", "Sequences handed back unfinished per second", "carried over"): (
        "C3PO++ carry-over; the job is synchronous"
    ),
    # Counters labelled by outcome / replica that only the C3PO++ strategy increments.
    ("rlfleet-c3po.json", "Sequences per second, by outcome", "{{outcome}}"): "C3PO++ only",
    ("rlfleet-c3po.json", "GRPO groups per second, by outcome", "{{outcome}}"): "C3PO++ only",
    ("rlfleet-c3po.json", "Replica idle time in the rollout phase", "{{replica}}"): "C3PO++ only",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, params: dict | None = None, timeout: float = 10.0) -> dict:
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # Prometheus says why in the body
        raise AssertionError(f"{exc}: {exc.read().decode(errors='replace')} ({url})") from None


def _queries(board: dict) -> list[tuple[str, dict]]:
    """(panel title, target) of every panel query; variables as pseudo-targets."""
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", {"expr": var["definition"], "variable": True}))
    return out


def _resolve(expr: str, *, job_id: str, window_s: int) -> str:
    values = {
        "job_id": job_id,  # ids are [a-z0-9-]: nothing to escape in a regex
        "__rate_interval": RATE_INTERVAL,
        "__interval": f"{SCRAPE_S}s",
        "__range": f"{window_s}s",
    }

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, ".*")  # any other variable: All

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


@pytest.fixture
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus not found: apt-get install prometheus")
    return path


@pytest.fixture
def fleet(tmp_path):
    from rlfleet.cli.fleet import Fleet, FleetOptions

    f = Fleet(FleetOptions(run_dir=tmp_path / "fleet", rollout_replicas=1, log_format="text"))
    f.start()
    yield f
    f.stop()


@pytest.fixture
def prometheus(prometheus_bin, fleet, tmp_path):
    """Prometheus scraping every service's /metrics as job="rlfleet-<service>", the job
    names of deploy/prometheus/prometheus.yml and the chart's ServiceMonitor."""
    targets: dict[str, list[str]] = {}
    for name, proc in fleet.procs.items():
        service = name.split("-")[0]  # rollout-0 -> rollout
        targets.setdefault(f"rlfleet-{service}", []).append(
            f"127.0.0.1:{proc.info['metrics_port']}"
        )
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        # The alert rules too, to see each of them evaluate against real series.
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": addrs}]}
            for job, addrs in sorted(targets.items())
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + WAIT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(
                        "prometheus did not start:\n" + (tmp_path / "prometheus.log").read_text()
                    ) from None
                time.sleep(0.2)
        yield url, sum(len(a) for a in targets.values())
    finally:
        proc.terminate()  # by PID: the one process we started
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _wait_targets_up(url: str, count: int) -> None:
    end = time.monotonic() + WAIT_S
    while True:
        active = _get(f"{url}/api/v1/targets")["data"]["activeTargets"]
        if len(active) == count and all(t["health"] == "up" for t in active):
            return
        assert time.monotonic() < end, f"not every target is up: {active}"
        time.sleep(0.3)


def _job_spec(model_dir: Path) -> dict:
    return {
        "name": "prometheus-scrape",
        "model": {"path": str(model_dir)},
        "task": {
            "name": "basic_arithmetic",
            "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        },
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
        "algorithm": {"group_size": 2, "prompts_per_step": 2, "lr": 1e-4},
        "checkpoint": {"every_steps": 1, "keep": 1},  # so the checkpoint panel has data
        "eval": {"prompts": 2, "pass_k": 2},  # so the eval panel has data
        "steps": 2,
    }


def _dashboard_queries_without_data(url: str, job_id: str, start: float):
    """(queries without data that should have some, queries checked, their keys), over the
    window from ``start`` to now, each query run the way Grafana runs it."""
    end = time.time()
    window_s = int(end - start) + 1
    empty, checked, seen = [], 0, set()
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for title, target in _queries(board):
            expr = _resolve(target["expr"], job_id=job_id, window_s=window_s)
            checked += 1
            if target.get("variable"):
                metric, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", expr).groups()
                data = _get(
                    f"{url}/api/v1/label/{label}/values",
                    {"match[]": metric, "start": start, "end": end},
                )["data"]
                found = bool(data) and (label != "job_id" or job_id in data)
            elif target.get("instant"):
                found = bool(
                    _get(f"{url}/api/v1/query", {"query": expr, "time": end})["data"]["result"]
                )
            else:
                params = {"query": expr, "start": start, "end": end, "step": f"{SCRAPE_S}s"}
                found = bool(_get(f"{url}/api/v1/query_range", params)["data"]["result"])
            key = (path.name, title, target.get("legendFormat", ""))
            seen.add(key)
            if not found and key not in NO_DATA_EXPECTED:
                empty.append(f"{path.name} / {title}: {expr}")
    return empty, checked, seen


def test_every_dashboard_query_returns_data(prometheus, fleet, tiny_model_dir):
    from rlfleet.common.grpc_client import call, make_channel
    from rlfleet.v1 import scheduler_pb2, scheduler_pb2_grpc

    url, n_targets = prometheus
    _wait_targets_up(url, n_targets)
    start = time.time() - 2 * SCRAPE_S
    channel = make_channel(fleet.scheduler_address)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    try:
        spec_json = json.dumps(_job_spec(tiny_model_dir))
        job = call(stub.SubmitJob, scheduler_pb2.SubmitJobRequest(spec_json=spec_json))
        end_wait = time.monotonic() + WAIT_S
        get = scheduler_pb2.GetJobRequest(job_id=job.job_id)
        while (state := call(stub.GetJob, get).state) in ("queued", "running"):
            assert time.monotonic() < end_wait, "the job did not finish in time"
            time.sleep(0.5)
    finally:
        channel.close()
    assert state == "succeeded", fleet.procs["scheduler"].log_tail()
    # Prometheus scrapes the final counters within a few intervals, or, on a loaded
    # machine, later: ask again (over a window up to now) until every query has data.
    deadline = time.monotonic() + WAIT_S
    while True:
        empty, checked, seen = _dashboard_queries_without_data(url, job.job_id, start)
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(SCRAPE_S)
    assert checked > 50
    assert set(NO_DATA_EXPECTED) <= seen, "NO_DATA_EXPECTED names queries no dashboard has"
    assert not empty, "dashboard queries without data after a job:\n" + "\n".join(empty)

    groups = _get(f"{url}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 9
    broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
    assert not broken, f"alert rules that fail to evaluate: {broken}"
