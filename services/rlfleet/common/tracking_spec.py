"""Which experiment trackers a job's step metrics go to (``JobSpec.tracking``).

A module of its own so that the job spec can name it without importing the
scheduler's tracking code (rlfleet.scheduler.tracking), which imports this.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrackingSpec(BaseModel):
    """Experiment tracking of the job's step metrics; a backend that fails never fails the job."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tensorboard: bool = True
    """Write TensorBoard event files under <tracking_dir>/tensorboard/<job_id>/."""
    mlflow: bool = True
    """Log the metrics to one MLflow run per job (a resumed job continues its run), at the
    scheduler's ``mlflow_tracking_uri`` (set by the operator, not per job; default a local
    file store, file://<tracking_dir>/mlruns)."""
    mlflow_experiment: str = Field(default="rlfleet", min_length=1)
    """MLflow experiment the job's run belongs to (created if missing)."""
    wandb: bool = True
    """Log to Weights & Biases; used only when WANDB_API_KEY is set and the wandb package is
    installed (untested here: no network)."""
    wandb_project: str = Field(default="rlfleet", min_length=1)
    """W&B project of the job's run (run id = job id)."""
