"""C3PO++ across turns on the real fleet: multi-turn `retry` episodes (answer, feedback,
answer again) in a C3PO++ job, with weight-sync, reward, env, trainer, two PyTorch
rollout replicas and the scheduler each its own process.

A token budget far below a step's work stops every step with episodes unfinished, some
in the middle of a model turn and some between turns; they are carried into the next
version and resumed there. The test reads every trained sample from the experience
stream and checks it token by token:

- the environment's tokens are exactly what the chat template renders for the feedback
  (after the end-of-turn token the engine sampled, or one inserted when the turn was cut
  off at its cap), masked from the loss, with log-prob 0 and version -1;
- each model token's recorded version is the one that sampled it: the log-prob that
  version's weights (pulled back from weight-sync) give the token equals the one the
  replica recorded, and samples that crossed a version boundary exist;
- the budget C counts the model's tokens only, and every sample is trained once.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rlfleet.scheduler.episodes import ENV_VERSION, _renderer
from rlfleet.scheduler.samples import load_codec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_samples import logprobs_under_versions, run_tapped, varied_model  # noqa: E402

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 6
TURN_CAP = 10
FEEDBACK = "Wrong, once more."
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    """The varied-length model with a chat template whose assistant turns end with EOS."""
    out = varied_model(tiny_model_dir, tmp_path_factory.mktemp("episode-model"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture
def fleet(service_factory, redis_url, tmp_path):
    common = ["--redis-url", redis_url, "--log-format", "text"]

    def start(name: str, module: str, args: list[str]):
        return service_factory(name, module, common + args, env=ENV)

    torch_args = ["--torch-threads", "1", "--device", "cpu"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        ws = pool.submit(start, "weightsync", "rlfleet.weightsync",
                         ["--keep-versions", str(STEPS + 2)]).result()  # fmt: skip
        reward = pool.submit(start, "reward", "rlfleet.reward", [])
        env = pool.submit(start, "env", "rlfleet.env", [])
        trainer = pool.submit(start, "trainer", "rlfleet.trainer",
                              ["--weightsync-address", ws.address,
                               "--checkpoint-dir", str(tmp_path / "ckpt"), *torch_args])  # fmt: skip
        rollouts = [pool.submit(start, f"rollout-{i}", "rlfleet.rollout",
                                ["--replica-id", f"rollout-{i}", "--weightsync-address",
                                 ws.address, *torch_args]) for i in range(2)]  # fmt: skip
        reward, env, trainer = reward.result(), env.result(), trainer.result()
        rollouts = [f.result() for f in rollouts]
    scheduler = start("scheduler", "rlfleet.scheduler",
                      ["--rollout-addresses", ",".join(r.address for r in rollouts),
                       "--reward-address", reward.address, "--trainer-address", trainer.address,
                       "--weightsync-address", ws.address, "--env-address", env.address,
                       "--poll-interval-s", "0.2"])  # fmt: skip
    return {"scheduler": scheduler, "weightsync": ws}


def _segments(mask: list[bool]) -> list[tuple[bool, int, int]]:
    """Runs of equal mask values as (model?, start, end)."""
    out: list[tuple[bool, int, int]] = []
    for i, m in enumerate(mask):
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1], i + 1)
        else:
            out.append((m, i, i + 1))
    return out


def test_episodes_carried_over_keep_their_masks_and_versions(fleet, redis_url, chat_model):
    spec = {
        "name": "c3po-episodes",
        "model": {"path": str(chat_model)},
        "task": {"name": "basic_arithmetic", "size": 256,
                 "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
                 "environment": {"name": "retry", "max_turns": 3,
                                 "options": {"max_turns": 3, "feedback": FEEDBACK}}},
        "sampling": {"temperature": 1.0, "max_new_tokens": TURN_CAP},
        # A large learning rate makes consecutive versions clearly different models.
        "algorithm": {"group_size": 2, "prompts_per_step": 4, "lr": 1e-2},
        "scheduling": {"mode": "c3po", "token_budget": 30, "pool_capacity": 8,
                       "retention_limit": 4,
                       # Re-prefill under the new version, so that every token's log-prob
                       # is exactly one version's (see test_c3po_fleet.py).
                       "resume_kv": False},
        "steps": STEPS,
        "seed": 5,
    }  # fmt: skip
    job, steps, samples = run_tapped(fleet["scheduler"].address, redis_url, spec)
    assert job.state == "succeeded", job.reason
    assert len({s.sample_id for s in samples}) == len(samples), "a sample was written twice"
    by_step: dict[int, list] = {}
    for s in samples:
        by_step.setdefault(s.step, []).append(s)
    assert sorted(by_step) == list(range(STEPS))
    for record in steps:
        m, got = record.metrics, by_step[record.step]
        assert m["samples_trained"] == len(got)
        # C counts the model's tokens, not the environment's.
        assert m["c3po_budget_used"] == sum(sum(s.loss_mask) for s in got) >= 30
        assert m["env_turns_mean"] >= 1.0
    assert sum(r.metrics["c3po_sequences_carried"] for r in steps) > 0

    codec = load_codec(str(chat_model))
    reply = _renderer(str(chat_model), codec).reply_ids([{"role": "user", "content": FEEDBACK}])
    multi_turn, crossed, crossed_mid_turn = [], [], []
    for s in samples:
        tokens, mask = list(s.completion_token_ids), list(s.loss_mask)
        versions, logprobs = list(s.token_versions), list(s.inference_logprobs)
        assert len(tokens) == len(mask) == len(versions) == len(logprobs)
        segments = _segments(mask)
        turns = [(a, b) for model, a, b in segments if model]
        assert segments[0][0] and len(turns) <= 3
        for model, a, b in segments:
            if model:
                assert all(v >= 0 for v in versions[a:b]) and all(lp < 0 for lp in logprobs[a:b])
                assert b - a <= TURN_CAP  # a turn resumed after a carry-over keeps its cap
                continue
            assert all(v == ENV_VERSION for v in versions[a:b]) and not any(logprobs[a:b])
            env = tokens[a:b]
            if tokens[a - 1] in codec.eos_ids:  # the turn ended with its sampled EOS
                assert env == reply, (env, reply)
            else:  # cut off at its cap: the end of turn is inserted with the reply
                assert env == [min(codec.eos_ids), *reply], (env, reply)
        model_versions = [v for v in versions if v >= 0]
        assert model_versions == sorted(model_versions)
        if len(turns) > 1:
            multi_turn.append(s)
        if model_versions[0] != model_versions[-1]:
            crossed.append(s)
            if any(versions[a] != versions[b - 1] for a, b in turns):
                crossed_mid_turn.append(s)
    assert multi_turn, "no episode took more than one turn"
    assert crossed, "no trained episode crossed a version boundary"
    print(f"\n{len(samples)} episodes trained, {len(multi_turn)} of several turns, "
          f"{len(crossed)} across versions ({len(crossed_mid_turn)} within a turn)")  # fmt: skip

    # Each model token's log-prob, recomputed under the version it is recorded with.
    recomputed = logprobs_under_versions(chat_model, fleet["weightsync"].address, job.job_id,
                                         crossed)  # fmt: skip
    for s in crossed:
        for i, (v, lp) in enumerate(zip(s.token_versions, s.inference_logprobs, strict=True)):
            if v >= 0:
                assert abs(recomputed[(s.sample_id, v)][i] - lp) < 1e-3, (
                    f"{s.sample_id} token {i}: recorded version {v} does not explain its log-prob"
                )
