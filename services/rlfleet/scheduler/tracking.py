"""Experiment tracking: each finished step's metrics go to TensorBoard, MLflow and W&B.

The job store keeps a job's steps only as long as Redis does, and shows them one job
at a time; experiment trackers keep the curves, compare jobs and outlive the fleet.
``JobSpec.tracking`` (a TrackingSpec) picks the backends; ``root`` is the scheduler's
``tracking_dir``.

- TensorBoard: event files under ``<root>/tensorboard/<job_id>/``; view them with
  ``tensorboard --logdir <root>/tensorboard`` (``pip install tensorboard``).
- MLflow: one run per job in the experiment ``mlflow_experiment``, named by the job id
  and tagged ``rlfleet_job_id`` and ``rlfleet_job_name``; a job resumed after a
  scheduler restart finds its run by that tag and continues it. The default store is
  the file store ``file://<root>/mlruns``. MLflow 3 keeps that store in maintenance
  mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``, which this module sets
  for a file URI; the alternative, ``sqlite:///...``, needs SQLAlchemy and Alembic
  (about 33 MB more), which mlflow-skinny leaves out. View the runs with
  ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file://<root>/mlruns``
  (the UI comes with the full ``mlflow`` package). MLflow's usage telemetry is off
  unless ``MLFLOW_DISABLE_TELEMETRY`` says otherwise.
- W&B: only when ``WANDB_API_KEY`` is set and ``wandb`` is installed; the run id is the
  job id, resumed with ``resume="allow"``. Untested here: no network.

Tracking never fails or holds up a job. Steps reach the backends through one worker
thread per job, so an unreachable tracking server (MLflow retries HTTP calls for
minutes) does not stall the step loop; a backend that cannot open or log is warned
about once, counted in ``rlfleet_tracking_errors_total{backend}``, and the others go
on. Values that are not finite numbers are dropped. tensorboardX and mlflow are
imported when a job's trackers open, not with the scheduler.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

from prometheus_client import Counter

from rlfleet.common.tracking_spec import TrackingSpec

logger = logging.getLogger(__name__)

Outcome = Literal["succeeded", "failed", "cancelled"]
BACKENDS = ("tensorboard", "mlflow", "wandb")
JOB_ID_TAG = "rlfleet_job_id"
JOB_NAME_TAG = "rlfleet_job_name"

TRACKING_ERRORS = Counter(
    "rlfleet_tracking_errors_total",
    "Experiment tracking calls (open, log a step, close) that failed, by backend.",
    ["backend"],
)
for _backend in BACKENDS:
    TRACKING_ERRORS.labels(_backend)


class Tracker(abc.ABC):
    """Where one job's step metrics go."""

    name: ClassVar[str] = "tracker"

    @abc.abstractmethod
    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Records the metrics of one finished step."""

    @abc.abstractmethod
    def close(self, *, outcome: Outcome | None = None) -> None:
        """Flushes and lets go; ``outcome`` None: the job is not over (the scheduler
        stops and will resume it)."""


class TensorBoardTracker(Tracker):
    """Scalars in event files under ``<root>/tensorboard/<job_id>/``."""

    name = "tensorboard"

    def __init__(self, *, job_id: str, root: Path):
        self.logdir = root / "tensorboard" / _path_segment(job_id)
        self._resumed = any(self.logdir.glob("events.out.tfevents.*"))
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer_cls = _summary_writer_class()
        self._writer = None

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if self._writer is None:
            # A resumed job redoes the step it was in: purge_step has TensorBoard drop
            # what the earlier process logged from that step on.
            # The file name holds the time in seconds and the host; the suffix keeps
            # two writers of one second from sharing (overwriting) a file, and keeps
            # the files in time order, the order TensorBoard reads them in.
            self._writer = self._writer_cls(
                logdir=str(self.logdir),
                purge_step=step if self._resumed else None,
                filename_suffix=f".{time.time_ns()}",
            )
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self, *, outcome: Outcome | None = None) -> None:
        if self._writer is not None:
            self._writer.close()


_IMPORT_LOCK = threading.Lock()


def _summary_writer_class() -> type:
    """tensorboardX.SummaryWriter, imported with torch hidden: tensorboardX imports torch,
    where it is installed, only to recognise tensors, which would cost the scheduler
    1.5 s and about 180 MB."""
    with _IMPORT_LOCK:
        if "torch" in sys.modules or "tensorboardX" in sys.modules:
            from tensorboardX import SummaryWriter

            return SummaryWriter
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` fails
        try:
            from tensorboardX import SummaryWriter
        finally:
            if "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
        return SummaryWriter


class MlflowTracker(Tracker):
    """One MLflow run per job (run name = job id), found again by its job id tag."""

    name = "mlflow"
    _STATUS: ClassVar[dict[str, str]] = {
        "succeeded": "FINISHED",
        "failed": "FAILED",
        "cancelled": "KILLED",
    }

    def __init__(self, *, job_id: str, job_name: str, tracking_uri: str, experiment: str):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = self._experiment_id(experiment)
        self.run_id = self._find_run(experiment_id, job_id)
        if self.run_id is None:
            run = self.client.create_run(
                experiment_id, run_name=job_id, tags={JOB_ID_TAG: job_id, JOB_NAME_TAG: job_name}
            )
            self.run_id = run.info.run_id

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name)
            except Exception:  # another scheduler created it first
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment {name!r} is deleted; restore or rename it")
        return found.experiment_id

    def _find_run(self, experiment_id: str, job_id: str) -> str | None:
        quote = '"' if "'" in job_id else "'"
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.{JOB_ID_TAG} = {quote}{job_id}{quote}",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if not runs:
            return None
        run = runs[0]
        if run.info.status != "RUNNING":  # closed by an earlier scheduler; running again
            self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        now_ms = int(time.time() * 1000)
        by_key = {mlflow_metric_key(k): v for k, v in metrics.items()}
        batch = [self._metric(k, v, now_ms, step) for k, v in by_key.items()]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self, *, outcome: Outcome | None = None) -> None:
        if outcome is not None:
            self.client.set_terminated(self.run_id, status=self._STATUS[outcome])


_MLFLOW_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_metric_key(key: str) -> str:
    """``key`` as a valid MLflow metric name: ASCII letters, digits, ``_-. /`` (others
    become ``_``), no empty, ``.`` or ``..`` path segment, at most 250 characters."""
    cleaned = _MLFLOW_BAD_CHARS.sub("_", key)[:250]
    return "/".join(p for p in cleaned.split("/") if p not in ("", ".", "..")) or "_"


class WandbTracker(Tracker):
    """A W&B run per job, id = job id (resumed by a restarted scheduler). Untested here."""

    name = "wandb"

    def __init__(self, *, job_id: str, job_name: str, project: str, root: Path):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("WANDB_API_KEY is set but wandb is not installed") from None
        wandb_dir = root / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            id=job_id,
            name=job_name or job_id,
            resume="allow",
            dir=str(wandb_dir),
            config={JOB_ID_TAG: job_id, JOB_NAME_TAG: job_name},
        )

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, *, outcome: Outcome | None = None) -> None:
        self.run.finish(exit_code=1 if outcome == "failed" else 0)


class _FanOut(Tracker):
    """Every enabled backend, fed by one worker thread; failures are warned about once
    per backend and counted, never raised."""

    name = "all"
    _STOP = object()

    def __init__(self, job_id: str, openers: list[tuple[str, Callable[[], Tracker]]]):
        self.job_id = job_id
        self.backends: list[Tracker] = []
        self._openers = openers
        self._warned: set[str] = set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._outcome: Outcome | None = None
        self._thread: threading.Thread | None = None
        if openers:
            self._thread = threading.Thread(
                target=self._work, name=f"tracking-{job_id}", daemon=True
            )
            self._thread.start()

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if self._thread is not None:
            self._queue.put((step, _finite(metrics)))

    def close(self, *, outcome: Outcome | None = None, timeout_s: float = 60.0) -> None:
        """Waits (at most ``timeout_s``) for the queued steps to be logged, then closes
        every backend."""
        if self._thread is None:
            return
        self._outcome = outcome
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning(
                "tracking of job %s did not finish within %.0fs; it goes on in the background",
                self.job_id,
                timeout_s,
            )

    def _work(self) -> None:
        for name, opener in self._openers:
            try:
                self.backends.append(opener())
            except Exception as exc:
                self._failed(name, "open", exc)
        while (item := self._queue.get()) is not self._STOP:
            step, metrics = item
            for backend in self.backends:
                try:
                    backend.log_step(step, metrics)
                except Exception as exc:
                    self._failed(backend.name, f"log step {step} to", exc)
        for backend in self.backends:
            try:
                backend.close(outcome=self._outcome)
            except Exception as exc:
                self._failed(backend.name, "close", exc)

    def _failed(self, backend: str, action: str, exc: Exception) -> None:
        TRACKING_ERRORS.labels(backend).inc()
        if backend not in self._warned:
            self._warned.add(backend)
            logger.warning(
                "tracking: could not %s %s for job %s (%s: %s); the job goes on without "
                "it (further errors of this backend are only counted)",
                action,
                backend,
                self.job_id,
                type(exc).__name__,
                exc,
                extra={"job_id": self.job_id},
            )
        logger.debug("tracking error of %s", backend, exc_info=exc)


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    kept: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            kept[str(key)] = number
    return kept


def _path_segment(job_id: str) -> str:
    if not job_id or job_id in (".", "..") or "/" in job_id or "\\" in job_id:
        raise ValueError(f"job id {job_id!r} cannot name a directory")
    return job_id


def open_trackers(
    *, job_id: str, job_name: str, spec: TrackingSpec, root: Path | str, mlflow_uri: str = ""
) -> Tracker:
    """A tracker that sends each step to every backend ``spec`` enables; it opens them in
    the background and never raises for a backend's sake."""
    root = Path(root).resolve()
    openers: list[tuple[str, Callable[[], Tracker]]] = []
    if spec.tensorboard:
        openers.append(("tensorboard", lambda: TensorBoardTracker(job_id=job_id, root=root)))
    if spec.mlflow:
        uri = mlflow_uri or (root / "mlruns").as_uri()
        openers.append(
            (
                "mlflow",
                lambda: MlflowTracker(
                    job_id=job_id,
                    job_name=job_name,
                    tracking_uri=uri,
                    experiment=spec.mlflow_experiment,
                ),
            )
        )
    if spec.wandb and os.environ.get("WANDB_API_KEY"):
        openers.append(
            (
                "wandb",
                lambda: WandbTracker(
                    job_id=job_id, job_name=job_name, project=spec.wandb_project, root=root
                ),
            )
        )
    return _FanOut(job_id, openers)
