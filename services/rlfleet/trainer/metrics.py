"""Prometheus metrics of the trainer (``rlfleet_trainer_*``), labelled by job.

Every figure a TrainStep reports (loss, grad norm, the IcePop mismatch figures)
is also a gauge here, so Grafana can chart a job without the scheduler.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEP_SECONDS = Histogram(
    "rlfleet_trainer_step_seconds",
    "Wall time of one training step (read, forward/backward, optimizer, publish).",
    ["job_id"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
CHECKPOINT_SECONDS = Histogram(
    "rlfleet_trainer_checkpoint_seconds",
    "Wall time of writing one checkpoint.",
    ["job_id"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900),
)
BACKGROUND_PUBLISH_SECONDS = Histogram(
    "rlfleet_trainer_background_publish_seconds",
    "Pushing a broadcast version to weight-sync off the step's path, per version",
    ["job_id"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TOKENS_TRAINED = Counter(
    "rlfleet_trainer_tokens_trained_total", "Response tokens trained on.", ["job_id"]
)
SAMPLES_TRAINED = Counter(
    "rlfleet_trainer_samples_trained_total", "Samples trained on.", ["job_id"]
)
POLICY_VERSION = Gauge(
    "rlfleet_trainer_policy_version", "Policy version the trainer holds.", ["job_id"]
)

# One gauge per step metric; keys are those of TrainStepResponse.metrics.
_STEP_GAUGES = {
    "loss": "Step loss (policy term + kl_coef * KL).",
    "policy_loss": "PPO/IcePop term of the step loss.",
    "kl_ref": "KL(pi_theta || pi_ref) estimate (k3) of the step; 0 without kl_coef.",
    "grad_norm": "Gradient norm before clipping.",
    "clip_fraction": "Fraction of response tokens whose PPO surrogate was clipped.",
    "reward_mean": "Mean reward of the step's samples.",
    "reward_std": "Standard deviation of the step's rewards.",
    "response_length_mean": "Mean completion length in tokens.",
    "zero_advantage_fraction": "Fraction of samples with advantage 0 (groups without contrast).",
    "masked_below_alpha": "Fraction of response tokens with k < alpha (IcePop drops them).",
    "masked_above_beta": "Fraction of response tokens with k > beta (IcePop drops them).",
    "masked_fraction": "Fraction of response tokens outside [alpha, beta].",
    "train_infer_kl_k1": "k1 estimate of KL(pi_infer || pi_train) over response tokens.",
    "train_infer_kl_k3": "k3 estimate of KL(pi_infer || pi_train) over response tokens.",
    "max_abs_dp": "Largest |p_train - p_infer| over response tokens.",
    "k_mean": "Mean of k = p_train / p_infer over response tokens.",
    "masked_entropy": "Mean training-policy entropy at the tokens outside [alpha, beta].",
}
STEP_GAUGES = {
    key: Gauge(f"rlfleet_trainer_{key}", doc, ["job_id"]) for key, doc in _STEP_GAUGES.items()
}


def record_step(job_id: str, metrics: dict[str, float]) -> None:
    for key, gauge in STEP_GAUGES.items():
        if key in metrics:
            gauge.labels(job_id).set(metrics[key])
