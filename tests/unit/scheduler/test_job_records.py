"""Job and step records survive a non-finite metric (a NaN loss must not make a job unreadable)."""

from rlfleet.scheduler.jobs import Job, StepRecord


def test_non_finite_metrics_are_dropped_from_records():
    rec = StepRecord(
        step=3,
        metrics={"loss": float("nan"), "grad_norm": float("inf"), "reward_mean": 0.5},
        finished_at=1.0,
    )
    again = StepRecord.model_validate_json(rec.model_dump_json())
    assert again.metrics == {"reward_mean": 0.5}
    job = Job(
        job_id="j",
        total_steps=4,
        spec_json="{}",
        created_at=0,
        updated_at=0,
        summary={"loss": float("-inf")},
    )
    assert Job.model_validate_json(job.model_dump_json()).summary == {}
