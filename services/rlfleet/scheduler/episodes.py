"""Multi-turn episodes (``task.environment``): the model and an environment take turns.

Each prompt row starts an episode in the env service (``rlfleet env``, ``Reset``); its
messages (and tool schemas) go through the model's chat template to the prompt tokens.
Then, turn by turn, every unfinished episode of the step is generated together: the
trajectory so far travels as the sequence's *prefix* (the engines continue after it;
vLLM reuses the prefix's KV cache through its prefix caching, the torch engine
re-prefills), the model's new tokens are decoded and sent to the environment
(``Step``), and its reply is rendered by the chat template and appended as tokens the
model did not sample. One trajectory is one sample:

- ``completion_token_ids``: the model's turns and the environment's replies, in order;
- ``loss_mask``: true at the model's tokens, false at the environment's (the trainer
  leaves those out of the loss and of IcePop's k);
- ``inference_logprobs`` / ``token_versions``: the engine's, for the model's tokens; 0 and
  -1 for the environment's;
- ``reward``: the environment's reward when the episode ends.

An episode ends when the environment says so, at ``max_turns``, or at
``max_total_tokens`` and what the model's context leaves after the prompt. Each model
turn is capped per sequence (``SequenceRequest.max_new_tokens``: the turn's start plus
``sampling.max_new_tokens``); a turn cut off there without its end-of-turn token goes to
the environment as it is, and the end-of-turn token is inserted before the reply as one
of the environment's (masked) tokens.

``EnvTurns`` is the env-service side both strategies share: this module's sync
``EpisodeStrategy`` and C3PO++ across turns (``c3po/episodes.py``). The job's ``eval``
plays episodes the same way (``evaluate_episodes``): greedy, and ``eval.pass_k`` at the
sampling temperature, scored by the environment's reward, written nowhere.

The env service keeps episodes in memory. A restarted env service has lost them: the
next call answers ``NOT_FOUND``, and the step's episodes are all played again under
fresh episode ids (``RESTARTS`` times at most), never continued half played. Only
then are the samples written to the buffer, once, by sample id, so an episode cut
short by a crash is never trained, and no episode twice.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rlfleet.common.errors import InvalidArgument, NotFound, RlfleetError
from rlfleet.common.tasks import entry_to_json
from rlfleet.scheduler.c3po.pool import ENV_VERSION
from rlfleet.scheduler.clients import ServiceClients
from rlfleet.scheduler.samples import TextCodec, group_id, sample_id
from rlfleet.scheduler.strategy import (
    RolloutResult,
    RolloutStrategy,
    StepContext,
    rollout_metrics,
    sampling_params,
)
from rlfleet.v1 import common_pb2, env_pb2, rollout_pb2

logger = logging.getLogger(__name__)

RESTARTS = 3  # times a step's episodes are played again after the env service lost them
STEP_WORKERS = 16  # a turn's Step calls in flight at once (the env service serves 32)


@dataclass
class Episode:
    episode_id: str
    seq_id: str
    group: str
    task_json: str
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    turns: int = 0
    reward: float = 0.0
    done: bool = False
    finish: str = ""
    tool_calls: int = 0

    def add(self, tokens, logprobs, versions, *, model: bool) -> None:
        self.tokens += tokens
        self.logprobs += logprobs
        self.versions += versions
        self.mask += [model] * len(tokens)


class ChatRenderer:
    """The model's chat template: a conversation's prompt tokens, and the tokens of the
    environment's reply messages that continue a conversation after the model's turn."""

    def __init__(self, model_path: str, codec: TextCodec):
        from rlfleet.scheduler.chat import _chat_tokenizer

        self.tokenizer = _chat_tokenizer(model_path)
        self.codec = codec
        self.after_turn = self._after_turn()

    def _render(self, messages: list[dict], **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def _after_turn(self) -> str:
        """What the template writes between the model's end-of-turn token and the next
        message (e.g. a newline): the model's turn ends at that token, so it comes first."""
        marker = "\u2063turn\u2063"
        text = self._render([{"role": "user", "content": "x"},
                             {"role": "assistant", "content": marker}])  # fmt: skip
        end = text.find(marker)
        if end < 0:
            return ""
        rest = text[end + len(marker) :]
        for eos in sorted(self.codec.eos_ids):
            eos_text = self.tokenizer.decode([eos])
            if eos_text and rest.startswith(eos_text):
                return rest[len(eos_text) :]
        return ""

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=True
        )
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]

    def reply_ids(self, messages: list[dict]) -> list[int]:
        """Tokens of ``messages`` (the environment's reply) after a finished model turn, up
        to and including the opening of the model's next turn."""
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        before = self._render(base)
        after = self._render(base + messages, add_generation_prompt=True)
        if not after.startswith(before):
            raise InvalidArgument(
                "the model's chat template renders a conversation differently once messages "
                "follow it; multi-turn episodes need a template that only appends"
            )
        text = self.after_turn + after[len(before) :]
        return self.codec.encode(text)


@functools.lru_cache(maxsize=4)
def _renderer(model_path: str, codec: TextCodec) -> ChatRenderer:
    return ChatRenderer(model_path, codec)


@functools.lru_cache(maxsize=8)
def model_context(model_path: str) -> int | None:
    """The model's position limit (``max_position_embeddings`` in its config.json), if it
    says; an episode must fit in it with its prompt, or the replicas refuse the prefix."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        for scope in (config, config.get("text_config") or {}):
            if isinstance(scope.get(key), int) and scope[key] > 0:
                return int(scope[key])
    return None


@dataclass(frozen=True)
class TurnOutcome:
    """What the environment made of a model turn."""

    done: bool
    finish: str
    """``stop``: the environment ended the episode; ``length``: out of turns or tokens;
    ``""`` while it goes on."""
    env_ids: list[int]
    """The reply's tokens to append (masked) when the episode goes on."""
    reward: float
    tool_calls: int


class EnvTurns:
    """The env-service side of a job's episodes, for every rollout strategy: Reset (the
    prompt tokens), Step after each model turn (what comes next), Close."""

    def __init__(self, ctx: StepContext, clients: ServiceClients, *, timeout_s: float = 120.0):
        self.ctx = ctx
        self.env = ctx.spec.task.environment
        self.clients = clients
        self.timeout_s = timeout_s
        self.renderer = _renderer(ctx.spec.model.path, ctx.codec)
        self.cap_turn = ctx.spec.sampling.max_new_tokens
        self._context = model_context(ctx.spec.model.path)

    def call(self, what: str, method: str, request):
        return self.clients.env_call(what, method, request, timeout=self.timeout_s)

    def reset(self, episode_id: str, task_json: str, what: str) -> list[int]:
        """Starts ``episode_id`` from a prompt row; returns its prompt tokens."""
        obs = self.call(f"Reset({what})", "Reset", env_pb2.ResetRequest(
            episode_id=episode_id, env_name=self.env.name, row_json=task_json,
            options_json=json.dumps(self.env.options)))  # fmt: skip
        tools = json.loads(obs.tools_json) if obs.tools_json else None
        return self.renderer.prompt_ids([_message(m) for m in obs.messages], tools)

    def cap_total(self, prompt_len: int) -> int:
        """The tokens an episode's completion may hold: ``max_total_tokens``, and what the
        model's context leaves after the prompt."""
        cap = self.env.max_total_tokens or 2**31 - 1
        if self._context is not None:
            cap = min(cap, self._context - prompt_len)
        if cap < 1:
            raise InvalidArgument(
                f"an episode's prompt holds {prompt_len} tokens, as many as the model's "
                f"context ({self._context}): no room for a model turn"
            )
        return cap

    def turn_limit(self, turn_start: int, prompt_len: int) -> int:
        """The completion limit (prefix included) of a turn that began at ``turn_start``."""
        return min(self.cap_total(prompt_len), turn_start + self.cap_turn)

    def after_turn(self, episode_id: str, turn: int, turn_ids: list[int], *, length: int,
                   prompt_len: int, what: str) -> TurnOutcome:  # fmt: skip
        """Sends model turn ``turn`` (its tokens ``turn_ids``; the completion now holds
        ``length`` tokens) to the environment; raises NotFound when the env service no
        longer holds the episode (restarted, expired)."""
        codec = self.ctx.codec
        reply = self.call(f"Step({what}, turn {turn})", "Step", env_pb2.StepRequest(
            episode_id=episode_id, turn=turn, model_text=codec.completion_text(turn_ids)))  # fmt: skip
        info = json.loads(reply.info_json or "{}")
        calls = int(info.get("tool_calls", 0) or 0)
        reward = reply.reward_so_far
        if reply.done:
            return TurnOutcome(True, "stop", [], reward, calls)
        if turn + 1 >= self.env.max_turns:
            return TurnOutcome(True, "length", [], reward, calls)  # out of turns
        env_ids = self.renderer.reply_ids([_message(m) for m in reply.messages])
        if not any(t in codec.eos_ids for t in turn_ids):
            # Cut off at its cap: the template's end of turn closes it, as the env's token.
            env_ids = [min(codec.eos_ids), *env_ids]
        if length + len(env_ids) >= self.cap_total(prompt_len):
            return TurnOutcome(True, "length", [], reward, calls)  # no room for another turn
        return TurnOutcome(False, "", env_ids, reward, calls)

    def close(self, episode_ids: list[str]) -> None:
        close_episodes(self.clients, episode_ids, timeout_s=self.timeout_s)


def close_episodes(clients: ServiceClients, episode_ids: list[str], *, timeout_s: float) -> None:
    """Frees episodes in the env service; one it no longer holds needs no closing."""
    for episode_id in episode_ids:
        with contextlib.suppress(RlfleetError):
            clients.env_call("Close", "Close", env_pb2.CloseRequest(episode_id=episode_id),
                             timeout=timeout_s)  # fmt: skip


def episode_metrics(episodes: list[tuple[int, int, str, list[int]]]) -> dict[str, float]:
    """Step-record keys of the trained episodes, each as (turns, tool calls, finish
    reason, token versions of its completion)."""
    n = max(1, len(episodes))
    model = sum(sum(v != ENV_VERSION for v in vs) for *_, vs in episodes)
    tokens = sum(len(vs) for *_, vs in episodes)
    return {
        "env_turns_mean": sum(e[0] for e in episodes) / n,
        "env_tool_calls_per_episode": sum(e[1] for e in episodes) / n,
        "env_tool_call_rate": sum(e[1] > 0 for e in episodes) / n,
        "env_truncated_frac": sum(e[2] != "stop" for e in episodes) / n,
        "env_token_frac": 1.0 - model / max(1, tokens),
    }


def with_restarts(play, ctx: StepContext, what: str):
    """``play()``, again (fresh episodes) when the env service lost its episodes (it was
    restarted mid-episode: NOT_FOUND), up to ``RESTARTS`` times."""
    for attempt in range(RESTARTS + 1):
        try:
            return play()
        except NotFound as exc:
            if attempt == RESTARTS:
                raise
            logger.warning("job %s step %d: the env service lost episodes (%s); playing the "
                           "%s again", ctx.job_id, ctx.step, exc.message, what)  # fmt: skip
    raise AssertionError("unreachable")


def start_episodes(env: EnvTurns, rows: list[tuple[str, str, str]]) -> list[Episode]:
    """Resets an episode per (seq id, group id, task JSON) under fresh episode ids."""
    nonce = uuid.uuid4().hex[:8]  # fresh episodes per attempt (see the module docstring)
    episodes = []
    for seq_id, group, task_json in rows:
        episode_id = f"{env.ctx.job_id}/{seq_id}/{nonce}"
        prompt = env.reset(episode_id, task_json, seq_id)
        episodes.append(Episode(episode_id, seq_id, group, task_json, prompt))
    return episodes


def play_episodes(pool, env: EnvTurns, episodes: list[Episode], sampling_of_turn) -> None:
    """Plays ``episodes`` to their ends under ``env.ctx.version``, every unfinished one a
    turn at a time together (``sampling_of_turn(turn)``: the turn's SamplingParams), and
    closes them in the env service."""
    try:
        for turn in range(env.env.max_turns):
            active = [e for e in episodes if not e.done]
            if not active:
                break
            _turn(pool, env, active, turn, sampling_of_turn(turn))
    finally:
        env.close([e.episode_id for e in episodes])


def _turn(pool, env: EnvTurns, active: list[Episode], turn: int,
          sampling: rollout_pb2.SamplingParams) -> None:  # fmt: skip
    ctx = env.ctx
    by_group: dict[str, list[rollout_pb2.SequenceRequest]] = {}
    for e in active:
        by_group.setdefault(e.group, []).append(rollout_pb2.SequenceRequest(
            seq_id=e.seq_id, prompt_token_ids=e.prompt_ids, prefix_token_ids=e.tokens,
            prefix_logprobs=e.logprobs, prefix_versions=e.versions,
            max_new_tokens=env.turn_limit(len(e.tokens), len(e.prompt_ids))))  # fmt: skip
    results = pool.generate(list(by_group.values()), sampling, job_id=ctx.job_id,
                            version=ctx.version, stop=ctx.stop,
                            limit=ctx.spec.resources.rollout_replicas)  # fmt: skip
    turns = []  # (episode, the model's tokens of this turn)
    for e in active:
        result, n0 = results[e.seq_id], len(e.tokens)
        new = list(result.token_ids[n0:])
        e.add(new, list(result.logprobs[n0:]), list(result.versions[n0:]), model=True)
        e.turns += 1
        turns.append((e, new))
    for e, outcome in zip(active, step_all(env, turns, turn), strict=True):
        e.tool_calls += outcome.tool_calls
        e.reward = outcome.reward
        if outcome.done:
            e.done, e.finish = True, outcome.finish
        else:
            n = len(outcome.env_ids)
            e.add(outcome.env_ids, [0.0] * n, [ENV_VERSION] * n, model=False)


def evaluate_episodes(pool, clients: ServiceClients, ctx: StepContext, rows: list[str], *,
                      samples: int, sampling: rollout_pb2.SamplingParams, mode: str,
                      env_timeout_s: float = 120.0) -> tuple[list[list[float]], list[Episode]]:  # fmt: skip
    """The job's evaluation on episodes (scheduler/evaluation.py): ``samples`` episodes of
    each eval row (task JSON), played under ``ctx.version`` with ``sampling`` (the turn
    added to its seed), written nowhere. Each row's rewards (the environment's), and the
    episodes. Sequence ids start with ``eval-{mode}-`` (never a training rollout's)."""
    env = EnvTurns(ctx, clients, timeout_s=env_timeout_s)

    def play() -> list[Episode]:
        episodes = start_episodes(env, [(f"eval-{mode}-{i}-{m}", f"eval-{i}", task_json)
                                        for i, task_json in enumerate(rows)
                                        for m in range(samples)])  # fmt: skip

        def of_turn(turn: int) -> rollout_pb2.SamplingParams:
            turn_sampling = rollout_pb2.SamplingParams()
            turn_sampling.CopyFrom(sampling)
            turn_sampling.seed = (sampling.seed + turn) % (2**31 - 1)
            return turn_sampling

        play_episodes(pool, env, episodes, of_turn)
        return episodes

    episodes = with_restarts(play, ctx, f"{mode} eval episodes")
    rewards = [e.reward for e in episodes]
    return [rewards[i * samples : (i + 1) * samples] for i in range(len(rows))], episodes


def step_all(env: EnvTurns, turns: list[tuple[Episode, list[int]]],
             turn: int) -> list[TurnOutcome]:  # fmt: skip
    """Sends model turn ``turn`` of each episode (with its tokens) to the environment, at
    once: each may be a tool call or a sandbox run, and one after another their times
    would add up. The outcomes in order; the first failure raises."""

    def step(item: tuple[Episode, list[int]]) -> TurnOutcome:
        e, new = item
        return env.after_turn(e.episode_id, turn, new, length=len(e.tokens),
                              prompt_len=len(e.prompt_ids), what=e.seq_id)  # fmt: skip

    with ThreadPoolExecutor(max(1, min(STEP_WORKERS, len(turns))), "env-step") as steps:
        return list(steps.map(step, turns))


class EpisodeStrategy(RolloutStrategy):
    """Step s plays the episodes of prompts s·P .. s·P + P − 1, G each, to their ends
    under version s (sync mode: every turn of the step samples with the same version)."""

    def __init__(self, pool, clients: ServiceClients, *, env_timeout_s: float = 120.0):
        super().__init__(pool)
        self.clients = clients
        self.env_timeout_s = env_timeout_s

    def rollout(self, ctx: StepContext) -> RolloutResult:
        """The step's episodes; all of them again when the env service lost them."""
        return with_restarts(lambda: self._play(ctx), ctx, "step's episodes")

    def _play(self, ctx: StepContext) -> RolloutResult:
        algo, env = ctx.spec.algorithm, EnvTurns(ctx, self.clients, timeout_s=self.env_timeout_s)
        rows = []
        for serial in range(ctx.step * algo.prompts_per_step,
                            (ctx.step + 1) * algo.prompts_per_step):  # fmt: skip
            task_json = entry_to_json(ctx.prompts.get(serial)[1])
            rows += [(sample_id(serial, m), group_id(serial), task_json)
                     for m in range(algo.group_size)]  # fmt: skip
        episodes = start_episodes(env, rows)
        start = time.perf_counter()
        play_episodes(self.pool, env, episodes,
                      lambda turn: sampling_params(ctx.spec, ctx.step * 64 + turn))  # fmt: skip
        elapsed = time.perf_counter() - start
        samples = [self._sample(ctx, e) for e in episodes]
        out = rollout_metrics(samples, ctx)
        out.update(episode_metrics([(e.turns, e.tool_calls, e.finish, e.versions)
                                    for e in episodes]))  # fmt: skip
        model_tokens = sum(sum(e.mask) for e in episodes)
        out["rollout_tokens_per_second"] = model_tokens / elapsed if elapsed > 0 else 0.0
        return RolloutResult(samples, out)

    def _sample(self, ctx: StepContext, e: Episode) -> common_pb2.Sample:
        return common_pb2.Sample(
            job_id=ctx.job_id, sample_id=e.seq_id, group_id=e.group, step=ctx.step,
            prompt_token_ids=e.prompt_ids, completion_token_ids=e.tokens,
            inference_logprobs=e.logprobs, token_versions=e.versions, loss_mask=e.mask,
            reward=e.reward, finish_reason=e.finish, task_json=e.task_json,
            completion_text=ctx.codec.tokenizer.decode(e.tokens, skip_special_tokens=True),
        )  # fmt: skip


def _message(m: env_pb2.ChatMessage) -> dict[str, Any]:
    out = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    return out
