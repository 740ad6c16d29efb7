"""Experiment tracking against the real backends in temporary directories: TensorBoard
event files read back record by record, MLflow runs read back through MlflowClient."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from rlfleet.common.tracking_spec import TrackingSpec
from rlfleet.scheduler.tracking import (
    JOB_ID_TAG,
    TensorBoardTracker,
    Tracker,
    _FanOut,
    mlflow_metric_key,
    open_trackers,
)

TB_ONLY = TrackingSpec(mlflow=False, wandb=False)
MLFLOW_ONLY = TrackingSpec(tensorboard=False, wandb=False)


def errors(backend: str) -> float:
    return REGISTRY.get_sample_value("rlfleet_tracking_errors_total", {"backend": backend}) or 0.0


def read_events(path: Path) -> list:
    """The events of one event file; TFRecord framing: u64 length, u32 masked crc of the
    length, data, u32 masked crc of the data."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    raw = path.read_bytes()
    events, pos = [], 0
    while pos < len(raw):
        header = raw[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack_from("<I", raw, pos + 8)
        data = raw[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", raw, pos + 12 + length)
        assert (header_crc, data_crc) == (masked_crc32c(header), masked_crc32c(data))
        events.append(event_pb2.Event.FromString(data))
        pos += 12 + length + 4
    return events


def event_files(logdir: Path) -> list[Path]:
    return sorted(logdir.glob("events.out.tfevents.*"))  # the order TensorBoard reads


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``logdir``, by tag, as (step, value)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(logdir):
        for event in read_events(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(root.resolve() / "mlruns").as_uri())


def job_runs(root: Path, job_id: str) -> list:
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("rlfleet")
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{JOB_ID_TAG} = '{job_id}'"
    )


def test_tensorboard_event_files_hold_the_steps(tmp_path):
    tracker = open_trackers(job_id="job-tb", job_name="arith", spec=TB_ONLY, root=tmp_path)
    tracker.log_step(0, {"reward_mean": 0.25, "loss": 1.5})
    tracker.log_step(1, {"reward_mean": 0.5, "loss": 1.25})
    tracker.close(outcome="succeeded")

    scalars = read_scalars(tmp_path / "tensorboard" / "job-tb")
    assert scalars == {"reward_mean": [(0, 0.25), (1, 0.5)], "loss": [(0, 1.5), (1, 1.25)]}
    assert not (tmp_path / "mlruns").exists()  # mlflow disabled: nothing written


def test_tensorboard_resumed_job_purges_the_redone_step(tmp_path):
    first = TensorBoardTracker(job_id="job-r", root=tmp_path)
    first.log_step(0, {"x": 1.0})
    first.log_step(1, {"x": 2.0})
    first.close()
    again = TensorBoardTracker(job_id="job-r", root=tmp_path)
    again.log_step(1, {"x": 3.0})
    again.close()
    from tensorboardX.proto import event_pb2

    files = event_files(tmp_path / "tensorboard" / "job-r")
    assert len(files) == 2
    # The second file starts a session at step 1: TensorBoard drops the first file's
    # step 1 and shows (0, 1.0), (1, 3.0).
    starts = [
        [(e.session_log.status, e.step) for e in read_events(f) if e.HasField("session_log")]
        for f in files
    ]
    assert starts == [[], [(event_pb2.SessionLog.START, 1)]]
    assert read_scalars(files[0].parent) == {"x": [(0, 1.0), (1, 2.0), (1, 3.0)]}


def test_tensorboard_tracker_does_not_import_torch(tmp_path):
    code = (
        "import sys; from pathlib import Path\n"
        "from rlfleet.scheduler.tracking import TensorBoardTracker\n"
        f"t = TensorBoardTracker(job_id='j', root=Path({str(tmp_path)!r}))\n"
        "t.log_step(0, {'a': 1.0}); t.close()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import importlib.util; assert importlib.util.find_spec('torch') is not None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mlflow_history_and_resume_continue_one_run(tmp_path):
    metrics = [{"reward_mean": 0.1, "train/loss": 2.0}, {"reward_mean": 0.3, "train/loss": 1.0}]
    tracker = open_trackers(job_id="job-ml", job_name="arith", spec=MLFLOW_ONLY, root=tmp_path)
    for step, m in enumerate(metrics):
        tracker.log_step(step, m)
    tracker.close()  # the scheduler stops; the job will resume

    (run,) = job_runs(tmp_path, "job-ml")
    assert run.info.run_name == "job-ml"
    assert run.data.tags["rlfleet_job_name"] == "arith"
    assert run.info.status == "RUNNING"

    resumed = open_trackers(job_id="job-ml", job_name="arith", spec=MLFLOW_ONLY, root=tmp_path)
    resumed.log_step(2, {"reward_mean": 0.7, "train/loss": 0.5})
    resumed.close(outcome="succeeded")

    (again,) = job_runs(tmp_path, "job-ml")  # the same run, no second one
    assert again.info.run_id == run.info.run_id
    assert again.info.status == "FINISHED"
    client = mlflow_client(tmp_path)
    for key, expected in (("reward_mean", [0.1, 0.3, 0.7]), ("train/loss", [2.0, 1.0, 0.5])):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == list(enumerate(expected))
    assert not (tmp_path / "tensorboard").exists()  # tensorboard disabled: nothing written


def test_mlflow_keys_are_sanitised_and_non_finite_values_dropped(tmp_path):
    tracker = open_trackers(job_id="job-k", job_name="", spec=MLFLOW_ONLY, root=tmp_path)
    tracker.log_step(
        0, {"pass@1 (math)": 0.5, "../up/./x": 1.0, "nan": float("nan"), "inf": float("inf")}
    )
    tracker.close(outcome="failed")
    (run,) = job_runs(tmp_path, "job-k")
    assert run.data.metrics == {"pass_1 _math_": 0.5, "up/x": 1.0}
    assert run.info.status == "FAILED"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("reward_mean", "reward_mean"),
        ("a:b", "a_b"),
        ("//a//b/", "a/b"),
        ("..", "_"),
        ("x" * 300, "x" * 250),
        ("ünï", "_n_"),
    ],
)
def test_mlflow_metric_key(key, expected):
    assert mlflow_metric_key(key) == expected


def test_failing_backend_is_counted_warned_once_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    spec = TrackingSpec(wandb=False)
    uri = "sqlite:///" + str(blocker / "db")
    before = errors("mlflow")
    with caplog.at_level(logging.WARNING, logger="rlfleet.scheduler.tracking"):
        tracker = open_trackers(
            job_id="job-f", job_name="", spec=spec, root=tmp_path, mlflow_uri=uri
        )
        tracker.log_step(0, {"a": 1.0})
        tracker.log_step(1, {"a": 2.0})
        tracker.close(outcome="succeeded")
    assert errors("mlflow") == before + 1
    warned = [r for r in caplog.records if "mlflow" in r.getMessage()]
    assert len(warned) == 1
    # TensorBoard went on without it.
    assert read_scalars(tmp_path / "tensorboard" / "job-f") == {"a": [(0, 1.0), (1, 2.0)]}


def test_log_failures_warn_once_and_count_each(caplog):
    class Broken(Tracker):
        name = "mlflow"

        def log_step(self, step: int, metrics: dict[str, float]) -> None:
            raise OSError("disk full")

        def close(self, *, outcome=None) -> None:
            pass

    before = errors("mlflow")
    with caplog.at_level(logging.WARNING, logger="rlfleet.scheduler.tracking"):
        tracker = _FanOut("job-l", [("mlflow", Broken)])
        for step in range(3):
            tracker.log_step(step, {"a": 1.0})
        tracker.close()
    assert errors("mlflow") == before + 3
    (warning,) = caplog.records
    assert "disk full" in warning.getMessage() and "job-l" in warning.getMessage()


def test_disabled_backends_write_nothing(tmp_path):
    spec = TrackingSpec(tensorboard=False, mlflow=False, wandb=False)
    tracker = open_trackers(job_id="job-n", job_name="", spec=spec, root=tmp_path)
    tracker.log_step(0, {"a": 1.0})
    tracker.close(outcome="succeeded")
    assert list(tmp_path.iterdir()) == []


def test_wandb_is_skipped_without_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    spec = TrackingSpec(tensorboard=False, mlflow=False, wandb=True)
    before = errors("wandb")
    tracker = open_trackers(job_id="job-w", job_name="", spec=spec, root=tmp_path)
    tracker.log_step(0, {"a": 1.0})
    tracker.close()
    assert errors("wandb") == before
    assert list(tmp_path.iterdir()) == []


def test_wandb_key_without_wandb_installed_is_a_counted_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    spec = TrackingSpec(tensorboard=False, mlflow=False, wandb=True)
    before = errors("wandb")
    with caplog.at_level(logging.WARNING, logger="rlfleet.scheduler.tracking"):
        tracker = open_trackers(job_id="job-w", job_name="", spec=spec, root=tmp_path)
        tracker.log_step(0, {"a": 1.0})
        tracker.close()
    assert errors("wandb") == before + 1
    assert "wandb is not installed" in caplog.text


def test_tracking_spec_forbids_unknown_fields():
    with pytest.raises(ValueError, match="extra"):
        TrackingSpec.model_validate({"tensorbaord": False})
    with pytest.raises(ValueError):
        TrackingSpec(mlflow_experiment="")
