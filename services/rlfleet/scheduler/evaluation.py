"""Evaluation during training (the job's ``eval`` block).

After every ``eval.every_steps``-th step and after the last, once every replica holds
the new version, the first ``eval.prompts`` prompts of the eval part (a dataset's eval
split or held-out fraction; for reasoning-gym a second draw with the next seed) are
generated twice: once greedily, and ``eval.pass_k`` times each at the job's sampling
temperature. The job's own verifier scores them through the reward service without
writing to the buffer, so nothing of the eval reaches training. A sample is correct
when its reward reaches ``eval.correct_at``; pass@k is the share of prompts with at
least one correct sample among their k (the estimator with n = k).

A job with a ``task.environment`` is evaluated on episodes instead
(``episodes.evaluate_episodes``): each eval row starts an episode in the env service,
played turn by turn to its end, and the environment's reward is the sample's; the
greedy episodes' turns and tool calls join the figures (``eval_greedy_env_*``).

The figures join the step's record (``eval_*`` keys: ``GET /v1/jobs/{id}/steps``,
``rlfleet status``), and the latest of each is a Prometheus gauge
``rlfleet_eval_score{job_id, metric}`` (the Grafana dashboard's eval panel). Eval
sequence ids start with ``eval-`` so they never meet a training rollout's id on a
replica (kept KV caches are matched by id).
"""

from __future__ import annotations

import threading

from prometheus_client import Gauge

from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource, entry_to_json
from rlfleet.scheduler.clients import ServiceClients
from rlfleet.scheduler.episodes import episode_metrics, evaluate_episodes
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.scheduler.samples import TextCodec
from rlfleet.scheduler.strategy import StepContext
from rlfleet.v1 import common_pb2, rollout_pb2

EVAL_SCORE = Gauge(
    "rlfleet_eval_score",
    "Latest evaluation of a job's policy: greedy reward and accuracy, pass@k.",
    ["job_id", "metric"],
)


class Evaluator:
    """Greedy and pass@k evaluation of one job's policy on its eval prompts."""

    def __init__(
        self,
        *,
        spec: JobSpec,
        pool: ReplicaPool,
        clients: ServiceClients,
        codec: TextCodec,
        score_batch_size: int = 256,
    ):
        assert spec.eval is not None
        self.spec, self.cfg = spec, spec.eval
        self.pool, self.clients, self.codec = pool, clients, codec
        self.score_batch_size = score_batch_size
        self._rows: list[tuple[str, str]] | None = None  # (prompt text, task JSON)
        self._prompts: list[tuple[list[int], str]] | None = None

    def due(self, step: int) -> bool:
        every = self.cfg.every_steps
        return step == self.spec.steps - 1 or (every > 0 and (step + 1) % every == 0)

    def rows(self) -> list[tuple[str, str]]:
        """(prompt text, task JSON) of the eval prompts, read once per job run."""
        if self._rows is None:
            source = PromptSource(self.spec.task, part="eval")
            self._rows = []
            for i in range(min(self.cfg.prompts, len(source))):
                text, entry = source.get(i)
                self._rows.append((text, entry_to_json(entry)))
        return self._rows

    def prompts(self) -> list[tuple[list[int], str]]:
        """(prompt ids, task JSON) of the eval prompts of a single-completion job."""
        if self._prompts is None:
            self._prompts = [(self.codec.prompt_ids(text, self.spec.task), task_json)
                             for text, task_json in self.rows()]  # fmt: skip
        return self._prompts

    def run(
        self, *, job_id: str, step: int, version: int, stop: threading.Event
    ) -> dict[str, float]:
        greedy, extra = self._rewards(job_id, version, stop, samples=1, temperature=0.0,
                                      step=step)  # fmt: skip
        out = {
            "eval_prompts": float(len(self.rows())),
            "eval_greedy_reward_mean": _mean([r[0] for r in greedy]),
            "eval_greedy_accuracy": _share([r[0] >= self.cfg.correct_at for r in greedy]),
        }
        k = self.cfg.pass_k
        if k > 1:
            sampled, sampled_extra = self._rewards(job_id, version, stop, samples=k,
                                       temperature=self.spec.sampling.temperature,
                                       step=step)  # fmt: skip
            out["eval_sampled_reward_mean"] = _mean([x for r in sampled for x in r])
            out[f"eval_pass_at_{k}"] = _share(
                [any(x >= self.cfg.correct_at for x in r) for r in sampled]
            )
            extra.update(sampled_extra)
        out.update(extra)
        for name, value in out.items():
            EVAL_SCORE.labels(job_id, name.removeprefix("eval_")).set(value)
        return out

    def _rewards(self, job_id: str, version: int, stop: threading.Event, *, samples: int,
                 temperature: float, step: int) -> tuple[list[list[float]], dict]:  # fmt: skip
        """Each prompt's rewards over ``samples`` generations at ``temperature``, and what
        else the figures report (episodes: turns and tool calls)."""
        mode = "greedy" if temperature == 0 else "sampled"
        params = rollout_pb2.SamplingParams(
            temperature=temperature,
            top_p=self.spec.sampling.top_p,
            max_new_tokens=self.spec.sampling.max_new_tokens,
            seed=(self.spec.seed * 1_000_003 + step + 7919) % (2**31 - 1),
        )
        if self.spec.task.environment is not None:
            ctx = StepContext(job_id=job_id, spec=self.spec, step=step, version=version,
                              codec=self.codec, prompts=None, stop=stop)  # fmt: skip
            rewards, episodes = evaluate_episodes(
                self.pool, self.clients, ctx, [task for _, task in self.rows()],
                samples=samples, sampling=params, mode=mode)  # fmt: skip
            stats = episode_metrics([(e.turns, e.tool_calls, e.finish, e.versions)
                                     for e in episodes])  # fmt: skip
            return rewards, {f"eval_{mode}_{k}": v for k, v in stats.items()}
        return self._completion_rewards(job_id, version, stop, samples=samples, params=params,
                                        mode=mode), {}  # fmt: skip

    def _completion_rewards(self, job_id: str, version: int, stop: threading.Event, *,
                            samples: int, params: rollout_pb2.SamplingParams,
                            mode: str) -> list[list[float]]:  # fmt: skip
        """Single completions, scored by the job's verifier through the reward service."""
        prompts = self.prompts()
        groups = [
            [
                rollout_pb2.SequenceRequest(seq_id=f"eval-{mode}-{i}-{m}", prompt_token_ids=ids)
                for m in range(samples)
            ]
            for i, (ids, _) in enumerate(prompts)
        ]
        results = self.pool.generate(
            groups, params, job_id=job_id, version=version, stop=stop,
            limit=self.spec.resources.rollout_replicas,
        )  # fmt: skip
        scored = [
            common_pb2.Sample(
                sample_id=seq.seq_id,
                completion_token_ids=results[seq.seq_id].token_ids,
                completion_text=self.codec.completion_text(list(results[seq.seq_id].token_ids)),
                task_json=task_json,
            )
            for group, (_, task_json) in zip(groups, prompts, strict=True)
            for seq in group
        ]
        rewards: list[float] = []
        for i in range(0, len(scored), self.score_batch_size):
            reply = self.clients.score(
                job_id,
                scored[i : i + self.score_batch_size],
                verifier=self.spec.reward.verifier,
                verifier_config_json=self.spec.reward.model_dump_json(),
                write_to_buffer=False,
            )
            rewards += reply.rewards
        return [rewards[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0
