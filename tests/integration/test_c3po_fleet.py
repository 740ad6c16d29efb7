"""C3PO++ on the real fleet: weight-sync, reward, trainer, two PyTorch rollout
replicas and the scheduler, each its own process, with a real Redis.

A model whose completions vary in length (some end after a few tokens, many run
to the limit) and a token budget far below a step's work make every step stop
with rollouts unfinished; they are carried into the next version and resumed
there. The test reads every sample the trainer trained on (from the experience
stream, as reward writes it) and checks each token's recorded version the hard
way: the log-prob that the recorded version's weights (pulled back from
weight-sync) give the token must equal the log-prob the replica recorded, and a
neighbouring version must give a different one.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_samples import logprobs_under_versions, run_tapped, varied_model  # noqa: E402

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 4


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    return varied_model(tiny_model_dir, tmp_path_factory.mktemp("varied-model"))


@pytest.fixture
def fleet(service_factory, redis_url, tmp_path):
    common = ["--redis-url", redis_url, "--log-format", "text"]

    def start(name: str, module: str, args: list[str]):
        return service_factory(name, module, common + args, env=ENV)

    torch_args = ["--torch-threads", "1", "--device", "cpu"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        ws_future = pool.submit(
            start, "weightsync", "rlfleet.weightsync", ["--keep-versions", str(STEPS + 2)]
        )
        reward_future = pool.submit(start, "reward", "rlfleet.reward", [])
        ws = ws_future.result()
        trainer_future = pool.submit(
            start,
            "trainer",
            "rlfleet.trainer",
            ["--weightsync-address", ws.address, "--checkpoint-dir", str(tmp_path / "ckpt")]
            + torch_args,
        )
        rollout_futures = [
            pool.submit(
                start,
                f"rollout-{i}",
                "rlfleet.rollout",
                ["--replica-id", f"rollout-{i}", "--weightsync-address", ws.address] + torch_args,
            )
            for i in range(2)
        ]
        reward, trainer = reward_future.result(), trainer_future.result()
        rollouts = [f.result() for f in rollout_futures]
    scheduler = start(
        "scheduler",
        "rlfleet.scheduler",
        [
            "--rollout-addresses", ",".join(r.address for r in rollouts),
            "--reward-address", reward.address,
            "--trainer-address", trainer.address,
            "--weightsync-address", ws.address,
            "--poll-interval-s", "0.2",
        ],
    )  # fmt: skip
    return {"scheduler": scheduler, "weightsync": ws}


def test_carried_rollouts_keep_the_versions_that_sampled_them(fleet, redis_url, varied_model_dir):
    spec = {
        "name": "c3po-fleet",
        "model": {"path": str(varied_model_dir)},
        "task": {
            "name": "basic_arithmetic",
            "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        },
        "sampling": {"temperature": 1.0, "max_new_tokens": 40},
        # A large learning rate makes consecutive versions clearly different models.
        "algorithm": {"group_size": 2, "prompts_per_step": 4, "lr": 1e-2},
        "scheduling": {
            "mode": "c3po",
            "token_budget": 60,
            "pool_capacity": 16,
            "retention_limit": 2,
            # Re-prefill under the new version: a resumed prefix's KV cache then comes
            # from that version too, so every token's log-prob is exactly one version's.
            "resume_kv": False,
        },
        "steps": STEPS,
        "seed": 3,
    }
    job, steps, samples = run_tapped(fleet["scheduler"].address, redis_url, spec)
    assert job.state == "succeeded", job.reason
    by_step: dict[int, list] = {}
    for s in samples:
        by_step.setdefault(s.step, []).append(s)
    assert sorted(by_step) == list(range(STEPS))
    for record in steps:
        m, got = record.metrics, by_step[record.step]
        assert m["samples_trained"] == len(got) == m["samples"]
        assert m["c3po_budget_used"] >= 60
        assert m["c3po_budget_used"] == sum(len(s.completion_token_ids) for s in got)
        assert m["version_max"] == max(max(s.token_versions) for s in got)
        assert m["version_min"] == min(min(s.token_versions) for s in got)
    assert sum(r.metrics["c3po_sequences_carried"] for r in steps) > 0
    assert len({s.sample_id for s in samples}) == len(samples)

    # A group entered P at most (its members' largest retention) iterations before it
    # completed (a member that finished early waited with retention 0), and it is
    # released in that step or, if it completed while the replicas stopped, the next.
    group_retention: dict[str, int] = {}
    for s in samples:
        group_retention[s.group_id] = max(group_retention.get(s.group_id, 0), s.retention)
    crossed = []
    for s in samples:
        versions = list(s.token_versions)
        assert len(versions) == len(s.completion_token_ids) == len(s.inference_logprobs)
        assert versions == sorted(versions)
        assert s.step - group_retention[s.group_id] - 1 <= versions[0] and versions[-1] <= s.step
        assert versions[-1] - versions[0] <= s.retention
        if versions[0] != versions[-1]:
            crossed.append(s)
    assert crossed, "no trained sample crossed a version boundary"

    # Each token's log-prob, recomputed under the version it is recorded with.
    recomputed = logprobs_under_versions(
        varied_model_dir, fleet["weightsync"].address, job.job_id, crossed
    )
    for s in crossed:
        versions = list(s.token_versions)
        for i, v in enumerate(versions):
            assert abs(recomputed[(s.sample_id, v)][i] - s.inference_logprobs[i]) < 1e-3, (
                f"{s.sample_id} token {i}: recorded version {v} does not explain its log-prob"
            )
        # The check can tell versions apart: the first version does not explain the rest.
        first = versions[0]
        later = [i for i, v in enumerate(versions) if v != first]
        assert any(
            abs(recomputed[(s.sample_id, first)][i] - s.inference_logprobs[i]) > 1e-3 for i in later
        )
