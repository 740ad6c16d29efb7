"""The mismatch IcePop corrects is visible: every step figure reaches the trainer's
``/metrics`` endpoint, for every correction kind.

A real trainer (gRPC server and Prometheus endpoint, in-process on free ports,
real Redis buffer) trains one step per kind on the same samples; the scrape of
``/metrics`` must show each step gauge with the value the TrainStep reply
carried (the reply is what the scheduler merges into the job's step history).
"""

from __future__ import annotations

import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from rlfleet.common.buffer import setup_buffer
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.grpc_server import start_server
from rlfleet.common.jobspec import JobSpec
from rlfleet.trainer.config import TrainerConfig
from rlfleet.trainer.core import TrainerCore
from rlfleet.trainer.losses import mismatch_metrics
from rlfleet.trainer.metrics import STEP_GAUGES
from rlfleet.trainer.publish import setup_publisher
from rlfleet.trainer.servicer import TrainerServicer
from rlfleet.trainer.state import TrainerStore
from rlfleet.v1 import trainer_pb2, trainer_pb2_grpc
from rlfleet.v1.common_pb2 import Sample

pytestmark = pytest.mark.slow

MISMATCH_KEYS = {
    "masked_below_alpha",
    "masked_above_beta",
    "masked_fraction",
    "train_infer_kl_k1",
    "train_infer_kl_k3",
    "max_abs_dp",
    "k_mean",
    "masked_entropy",
}


def test_every_mismatch_figure_has_a_gauge():
    empty = mismatch_metrics(logp_old=torch.zeros(0), logp_infer=torch.zeros(0), alpha=1, beta=2)
    assert set(empty) == MISMATCH_KEYS
    assert MISMATCH_KEYS | {"grad_norm", "loss", "clip_fraction"} <= set(STEP_GAUGES)


def _samples(model_dir, job_id: str) -> list[Sample]:
    """Two groups of two; per group one token pushed above β and one below α."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    out = []
    for g in range(2):
        prompt = torch.randint(3, 200, (4,), generator=gen).tolist()
        for m in range(2):
            completion = torch.randint(3, 200, (6,), generator=gen).tolist()
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            exact = logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            infer = exact + 0.05 * torch.randn(6, generator=gen)
            if m == 0:
                infer[1] = exact[1] - 4.0  # k = e^4 > β
                infer[3] = torch.log(torch.tensor(0.999))  # p_infer ≈ 1 ≫ p_train: k < α
            out.append(
                Sample(
                    job_id=job_id,
                    sample_id=f"g{g}-{m}",
                    group_id=f"g{g}",
                    prompt_token_ids=prompt,
                    completion_token_ids=completion,
                    inference_logprobs=infer.clamp(max=0.0).tolist(),
                    token_versions=[0] * 6,
                    reward=float(m),
                    finish_reason="length",
                )
            )
    return out


def _scrape(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, s.labels.get("job_id", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_step_figures_reach_the_trainer_metrics_endpoint(redis_url, tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    core = TrainerCore(
        buffer=setup_buffer("redis", redis_url),
        store=TrainerStore.from_url(redis_url),
        publisher=setup_publisher("none"),
        checkpoint_dir=tmp_path / "ckpt",
        read_timeout_s=10.0,
        device=torch.device("cpu"),
    )
    cfg = TrainerConfig(port=0, metrics_port=0, redis_url=redis_url)

    def register(server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(core), server)

    running = start_server(cfg, register, service_names=["rlfleet.v1.TrainerService"])
    buffer = setup_buffer("redis", redis_url)
    replies = {}
    try:
        with make_channel(running.address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            for kind in ("none", "tis", "icepop"):
                job = f"job-metrics-{kind}"
                spec = JobSpec.model_validate(
                    {
                        "model": {"path": str(tiny_model_dir)},
                        "algorithm": {"group_size": 2, "prompts_per_step": 2, "lr": 1e-3},
                        "correction": {"kind": kind},
                        "steps": 5,  # no checkpoint after step 0
                    }
                )
                stub.InitJob(
                    trainer_pb2.InitJobRequest(job_id=job, spec_json=spec.model_dump_json()),
                    timeout=120,
                )
                buffer.append(job, _samples(tiny_model_dir, job))
                replies[kind] = stub.TrainStep(
                    trainer_pb2.TrainStepRequest(job_id=job, step=0, num_samples=4), timeout=300
                )
        scraped = _scrape(running.metrics_port)
    finally:
        running.stop()
        core.close()

    for kind, reply in replies.items():
        job = f"job-metrics-{kind}"
        m = dict(reply.metrics)
        assert MISMATCH_KEYS | {"grad_norm"} <= set(m), kind
        # 24 response tokens, one above β and one below α in each group
        assert m["masked_above_beta"] == pytest.approx(2 / 24)
        assert m["masked_below_alpha"] == pytest.approx(2 / 24)
        assert m["masked_fraction"] == pytest.approx(4 / 24)
        assert m["train_infer_kl_k3"] > 0.0 and m["masked_entropy"] > 0.0
        for key in STEP_GAUGES:
            assert scraped[(f"rlfleet_trainer_{key}", job)] == pytest.approx(m[key]), (kind, key)
        assert scraped[("rlfleet_trainer_policy_version", job)] == 1.0
    # Same samples, same θ_old: the mismatch figures agree; the loss sees the correction.
    # Two separate steps' forward passes: equal up to float rounding (a kernel may sum in
    # another order), so within 1e-5; a masked count off by one token moves 1/24.
    for key in MISMATCH_KEYS:
        assert replies["none"].metrics[key] == pytest.approx(
            replies["icepop"].metrics[key], rel=1e-5, abs=1e-6
        ), key
    assert replies["none"].metrics["loss"] != pytest.approx(replies["icepop"].metrics["loss"])
