"""Multi-turn episodes (``task.environment``) through real services: an env service and a
rollout replica (each its own process), the scheduler's episode strategy between them,
and then a whole job through the fleet (weight-sync, reward, trainer, scheduler).

- Token by token, a sample of a `retry` episode (answer, "not correct" feedback, answer
  again) is the model's turn, the environment's reply and the model's next turn: the
  reply's tokens are exactly what the chat template renders for the feedback message,
  masked from the loss (``loss_mask`` false), with log-prob 0 and version -1; the model's
  tokens are unmasked and carry the version that sampled them.
- A job with a `retry` environment trains through the fleet: the trainer's log-probs at
  θ_old equal the replica's on the model's tokens (the environment's are left out of
  IcePop's k, or the mismatch would be huge), and the step records the episodes' turns
  and its eval on episodes.
- The job's eval plays its eval rows as episodes (greedy, then pass@k sampled), each in
  the env service and closed after, and scores them by the environment's own reward.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.clients import ServiceClients
from rlfleet.scheduler.discovery import StaticDiscovery
from rlfleet.scheduler.episodes import ENV_VERSION, EpisodeStrategy, _renderer
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.scheduler.samples import load_codec
from rlfleet.scheduler.strategy import RolloutResult, StepContext
from rlfleet.v1 import scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# A chat template whose assistant turn ends with the end-of-sequence token, as real ones do.
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
FEEDBACK = "Wrong, once more."


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("episode-model") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


def _spec(model, **extra) -> dict:
    return {
        "name": "episodes",
        "model": {"path": str(model)},
        "task": {"name": "basic_arithmetic", "size": 64,
                 "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
                 "environment": {"name": "retry", "max_turns": 3,
                                 "options": {"max_turns": 3, "feedback": FEEDBACK}}},
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
        "algorithm": {"group_size": 2, "prompts_per_step": 2, "lr": 1e-4},
        **extra,
    }  # fmt: skip


def _play_one_step(replica: str, clients: ServiceClients, model) -> RolloutResult:
    """Step 0's episodes through the scheduler's episode strategy, on one replica that
    loaded the base model (version 0) at start."""
    pool = ReplicaPool(StaticDiscovery([replica]))
    try:
        [held] = pool.refresh()
        held.job_id, held.version = "job-e", 0
        spec = JobSpec.model_validate(_spec(model))
        ctx = StepContext("job-e", spec, 0, 0, load_codec(str(model)), PromptSource(spec.task),
                          threading.Event())  # fmt: skip
        return EpisodeStrategy(pool, clients).rollout(ctx)
    finally:
        clients.close()
        pool.close()


def test_an_episode_sample_masks_the_environments_tokens(service_factory, redis_url, chat_model):
    common = ["--redis-url", redis_url, "--log-format", "text"]
    env = service_factory("env", "rlfleet.env", common, env=ENV)
    replica = service_factory("rollout-0", "rlfleet.rollout",
                              common + ["--replica-id", "r0", "--model-path", str(chat_model),
                                        "--device", "cpu", "--torch-threads", "1"], env=ENV)  # fmt: skip
    clients = ServiceClients(reward_address="127.0.0.1:1", trainer_address="127.0.0.1:1",
                             env_address=env.address)  # fmt: skip
    result = _play_one_step(replica.address, clients, chat_model)
    codec = load_codec(str(chat_model))
    samples = result.samples
    assert len(samples) == 4
    reply = _renderer(str(chat_model), codec).reply_ids([{"role": "user", "content": FEEDBACK}])
    retried = [s for s in samples if not all(s.loss_mask)]
    assert retried, [
        (s.finish_reason, s.reward, s.completion_text) for s in samples
    ]  # none retried
    for s in retried:
        mask = list(s.loss_mask)
        assert len(mask) == len(s.completion_token_ids) == len(s.token_versions)
        first_env = mask.index(False)
        end = first_env + mask[first_env:].index(True) if True in mask[first_env:] else len(mask)
        span = list(s.completion_token_ids[first_env:end])
        # The model's turn ends with its end-of-turn token, sampled, or (cut off at its cap)
        # inserted with the reply; then the model's next turn.
        if s.completion_token_ids[first_env - 1] in codec.eos_ids:
            assert span[: len(reply)] == reply
        else:
            assert span[0] in codec.eos_ids and span[1 : 1 + len(reply)] == reply
        assert all(mask[end : end + 1])
        for tok, m, lp, v in zip(s.completion_token_ids, mask, s.inference_logprobs,
                                 s.token_versions, strict=True):  # fmt: skip
            if m:
                assert lp < 0 and v == 0, (tok, lp, v)
            else:
                assert lp == 0 and v == ENV_VERSION
        assert FEEDBACK in s.completion_text
    assert 1.0 < result.metrics["env_turns_mean"] <= 3.0
    assert 0.0 < result.metrics["env_token_frac"] < 1.0
    assert result.metrics["version_min"] == 0.0  # the environment's -1 is no version


def test_env_service_killed_mid_episode_the_steps_episodes_are_played_again(
    service_factory, redis_url, chat_model
):
    """kill -9 of the env service between two turns of an episode, and a new one on its
    port (what `rlfleet up` or Kubernetes does): the episodes it held are lost
    (NOT_FOUND), so the step's episodes are all played again from their prompts; the
    step still hands every sample over once, and none of them is a half-played one."""
    common = ["--redis-url", redis_url, "--log-format", "text"]
    env = service_factory("env", "rlfleet.env", common, env=ENV)
    port = env.address.rsplit(":", 1)[1]
    replica = service_factory("rollout-0", "rlfleet.rollout",
                              common + ["--replica-id", "r0", "--model-path", str(chat_model),
                                        "--device", "cpu", "--torch-threads", "1"], env=ENV)  # fmt: skip
    resets: list[str] = []
    restarted = []

    class KillingEnvOnFirstStep(ServiceClients):
        def env_call(self, what, method, request, *, timeout):
            if method == "Reset":
                resets.append(request.episode_id)
            if method == "Step" and not restarted:
                os.kill(env.pid, signal.SIGKILL)  # mid-episode: reset, not yet stepped
                restarted.append(service_factory("env-2", "rlfleet.env",
                                                 common + ["--port", port], env=ENV))  # fmt: skip
            return super().env_call(what, method, request, timeout=timeout)

    clients = KillingEnvOnFirstStep(reward_address="127.0.0.1:1", trainer_address="127.0.0.1:1",
                                    env_address=env.address)  # fmt: skip
    result = _play_one_step(replica.address, clients, chat_model)
    assert restarted, "the env service was not killed"
    assert sorted(s.sample_id for s in result.samples) == ["g0-0", "g0-1", "g1-0", "g1-1"]
    # Every episode was reset twice: under the first attempt's ids, then fresh ones.
    assert len(resets) == 8 and len(set(resets)) == 8
    first, second = (
        {r.rsplit("/", 1)[1] for r in resets[:4]},
        {r.rsplit("/", 1)[1] for r in resets[4:]},
    )
    assert len(first) == len(second) == 1 and first != second
    assert all(s.finish_reason in ("stop", "length") for s in result.samples)


def test_a_retry_job_trains_through_the_fleet(service_factory, redis_url, tmp_path, chat_model):
    common = ["--redis-url", redis_url, "--log-format", "text"]

    def start(name, module, args):
        return service_factory(name, module, common + args, env=ENV)

    ws = start("weightsync", "rlfleet.weightsync", [])
    reward = start("reward", "rlfleet.reward", [])
    env = start("env", "rlfleet.env", [])
    trainer = start("trainer", "rlfleet.trainer",
                    ["--weightsync-address", ws.address, "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--torch-threads", "1", "--device", "cpu"])  # fmt: skip
    replica = start("rollout-0", "rlfleet.rollout",
                    ["--replica-id", "r0", "--weightsync-address", ws.address,
                     "--torch-threads", "1", "--device", "cpu"])  # fmt: skip
    scheduler = start("scheduler", "rlfleet.scheduler",
                      ["--rollout-addresses", replica.address, "--reward-address", reward.address,
                       "--trainer-address", trainer.address, "--weightsync-address", ws.address,
                       "--env-address", env.address, "--poll-interval-s", "0.2"])  # fmt: skip
    with make_channel(scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        spec = json.dumps(_spec(chat_model, steps=2, eval={"prompts": 2, "pass_k": 2}))
        job = stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=spec), timeout=30)
        end = time.monotonic() + 400
        while job.state not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < end, f"job still {job.state} at step {job.current_step}"
            time.sleep(0.5)
            job = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
        assert job.state == "succeeded", job.reason
        steps = stub.GetSteps(scheduler_pb2.GetStepsRequest(job_id=job.job_id), timeout=10).steps
    assert [s.step for s in steps] == [0, 1]
    last = steps[-1].metrics  # the eval after the last step, on episodes
    assert last["eval_prompts"] == 2 and 0.0 <= last["eval_pass_at_2"] <= 1.0, dict(last)
    assert last["eval_greedy_env_turns_mean"] >= 1.0
    for record in steps:
        m = record.metrics
        assert m["samples_trained"] == 4 and m["env_turns_mean"] >= 1.0
        assert 0.0 <= m["reward_mean"] <= 1.0
        # Only the model's tokens count in IcePop's k: float32 on both sides, so ~0.
        assert abs(m["train_infer_kl_k1"]) < 1e-3 and m["max_abs_dp"] < 1e-2, dict(m)


def test_what_a_job_with_an_environment_accepts(chat_model, tmp_path):
    JobSpec.model_validate(_spec(chat_model, scheduling={"mode": "c3po"}))
    with pytest.raises(ValueError, match="scheduling.overlap = false"):
        JobSpec.model_validate(_spec(chat_model, scheduling={"mode": "c3po", "overlap": True}))
    # A dataset job needs no reward block: the environment scores its episodes.
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "1 + 1", "answer": "2"}\n')
    spec = _spec(chat_model)
    spec["task"] = {"kind": "dataset", "dataset": {"path": str(rows)},
                    "environment": spec["task"]["environment"]}  # fmt: skip
    JobSpec.model_validate(spec)


def test_eval_plays_episodes_scored_by_the_environment(service_factory, redis_url, chat_model):
    from rlfleet.scheduler.evaluation import Evaluator

    common = ["--redis-url", redis_url, "--log-format", "text"]
    env = service_factory("env", "rlfleet.env", common, env=ENV)
    replica = service_factory("rollout-0", "rlfleet.rollout",
                              common + ["--replica-id", "r0", "--model-path", str(chat_model),
                                        "--device", "cpu", "--torch-threads", "1"], env=ENV)  # fmt: skip
    calls: list[tuple[str, object, object]] = []

    class Recording(ServiceClients):
        def env_call(self, what, method, request, *, timeout):
            reply = super().env_call(what, method, request, timeout=timeout)
            calls.append((method, request, reply))
            return reply

    clients = Recording(reward_address="127.0.0.1:1", trainer_address="127.0.0.1:1",
                        env_address=env.address)  # fmt: skip
    pool = ReplicaPool(StaticDiscovery([replica.address]))
    spec = JobSpec.model_validate(_spec(chat_model, eval={"prompts": 3, "pass_k": 2}))
    try:
        [held] = pool.refresh()
        held.job_id, held.version = "job-e", 0
        evaluator = Evaluator(spec=spec, pool=pool, clients=clients,
                              codec=load_codec(str(chat_model)))  # fmt: skip
        out = evaluator.run(job_id="job-e", step=0, version=0, stop=threading.Event())
    finally:
        clients.close()
        pool.close()

    resets = [req.episode_id for m, req, _ in calls if m == "Reset"]
    assert len(resets) == 3 + 3 * 2 and len(set(resets)) == 9  # greedy, then 2 sampled each
    assert all(r.split("/")[1].startswith("eval-") for r in resets)
    assert {req.episode_id for m, req, _ in calls if m == "Close"} == set(resets)
    # Each episode's reward is the environment's, from its last Step reply.
    final: dict[str, float] = {}
    for method, req, reply in calls:
        if method == "Step":
            final[req.episode_id] = reply.reward_so_far
    greedy = [final[r] for r in resets[:3]]
    sampled = [final[r] for r in resets[3:]]
    assert out["eval_prompts"] == 3.0
    assert out["eval_greedy_reward_mean"] == pytest.approx(sum(greedy) / 3)
    assert out["eval_greedy_accuracy"] == pytest.approx(sum(g >= 1.0 for g in greedy) / 3)
    assert out["eval_sampled_reward_mean"] == pytest.approx(sum(sampled) / 6)
    by_prompt = [sampled[2 * i : 2 * i + 2] for i in range(3)]
    assert out["eval_pass_at_2"] == pytest.approx(sum(max(r) >= 1.0 for r in by_prompt) / 3)
    assert 1.0 <= out["eval_greedy_env_turns_mean"] <= 3.0
    assert 1.0 <= out["eval_sampled_env_turns_mean"] <= 3.0
    steps_of = {req.episode_id: req.turn + 1 for m, req, _ in calls if m == "Step"}
    assert out["eval_sampled_env_turns_mean"] == pytest.approx(
        sum(steps_of[r] for r in resets[3:]) / 6
    )
