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

An episode ends when the environment says so, at ``max_turns`` or at
``max_total_tokens``. A model turn cut off at its token cap (``sampling.max_new_tokens``)
without its end-of-turn token goes to the environment as it is, and the end-of-turn
token is inserted before the reply as one of the environment's (masked) tokens.

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
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rlfleet.common.errors import InvalidArgument, NotFound, RlfleetError
from rlfleet.common.tasks import entry_to_json
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

ENV_VERSION = -1  # token_versions of the environment's tokens: no policy produced them
RESTARTS = 3  # times a step's episodes are played again after the env service lost them


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


class EpisodeStrategy(RolloutStrategy):
    """Step s plays the episodes of prompts s·P .. s·P + P − 1, G each, to their ends
    under version s (sync mode: every turn of the step samples with the same version)."""

    def __init__(self, pool, clients: ServiceClients, *, env_timeout_s: float = 120.0):
        super().__init__(pool)
        self.clients = clients
        self.env_timeout_s = env_timeout_s

    def rollout(self, ctx: StepContext) -> RolloutResult:
        """The step's episodes; all of them again when the env service lost them (it was
        restarted mid-episode: NOT_FOUND), up to ``RESTARTS`` times."""
        for attempt in range(RESTARTS + 1):
            try:
                return self._play(ctx)
            except NotFound as exc:
                if attempt == RESTARTS:
                    raise
                logger.warning("job %s step %d: the env service lost episodes (%s); playing "
                               "the step's episodes again", ctx.job_id, ctx.step, exc.message)  # fmt: skip
        raise AssertionError("unreachable")

    def _play(self, ctx: StepContext) -> RolloutResult:
        spec, env = ctx.spec, ctx.spec.task.environment
        algo, renderer = spec.algorithm, _renderer(spec.model.path, ctx.codec)
        cap_turn = spec.sampling.max_new_tokens
        cap_total = env.max_total_tokens or 2**31 - 1
        nonce = uuid.uuid4().hex[:8]  # fresh episodes per attempt (see the module docstring)
        episodes = [
            self._reset(ctx, renderer, serial, member, nonce)
            for serial in range(ctx.step * algo.prompts_per_step,
                                (ctx.step + 1) * algo.prompts_per_step)
            for member in range(algo.group_size)
        ]  # fmt: skip
        start = time.perf_counter()
        try:
            for turn in range(env.max_turns):
                active = [e for e in episodes if not e.done]
                if not active:
                    break
                self._turn(ctx, renderer, active, turn, cap_turn=cap_turn, cap_total=cap_total,
                           last=turn == env.max_turns - 1)  # fmt: skip
        finally:
            for e in episodes:
                with contextlib.suppress(RlfleetError):  # a lost episode needs no closing
                    self._env("Close", "Close", env_pb2.CloseRequest(episode_id=e.episode_id))
        elapsed = time.perf_counter() - start
        samples = [self._sample(ctx, e) for e in episodes]
        out = rollout_metrics(samples, ctx)
        model_tokens = sum(sum(e.mask) for e in episodes)
        out.update({
            "env_turns_mean": sum(e.turns for e in episodes) / len(episodes),
            "env_tool_calls_per_episode": sum(e.tool_calls for e in episodes) / len(episodes),
            "env_tool_call_rate": sum(e.tool_calls > 0 for e in episodes) / len(episodes),
            "env_truncated_frac": sum(e.finish != "stop" for e in episodes) / len(episodes),
            "env_token_frac": 1.0 - model_tokens / max(1, sum(len(e.tokens) for e in episodes)),
            "rollout_tokens_per_second": model_tokens / elapsed if elapsed > 0 else 0.0,
        })  # fmt: skip
        return RolloutResult(samples, out)

    # -- the env service --------------------------------------------------------------
    def _env(self, what: str, method: str, request):
        return self.clients.env_call(what, method, request, timeout=self.env_timeout_s)

    def _reset(self, ctx: StepContext, renderer: ChatRenderer, serial: int, member: int,
               nonce: str) -> Episode:  # fmt: skip
        env = ctx.spec.task.environment
        _, entry = ctx.prompts.get(serial)
        sid = sample_id(serial, member)
        episode_id = f"{ctx.job_id}/{sid}/{nonce}"
        task_json = entry_to_json(entry)
        obs = self._env(f"Reset({sid})", "Reset", env_pb2.ResetRequest(
            episode_id=episode_id, env_name=env.name, row_json=task_json,
            options_json=json.dumps(env.options)))  # fmt: skip
        tools = json.loads(obs.tools_json) if obs.tools_json else None
        prompt = renderer.prompt_ids([_message(m) for m in obs.messages], tools)
        return Episode(episode_id, sid, group_id(serial), task_json, prompt)

    # -- one turn of every active episode ---------------------------------------------
    def _turn(self, ctx: StepContext, renderer: ChatRenderer, active: list[Episode], turn: int,
              *, cap_turn: int, cap_total: int, last: bool) -> None:  # fmt: skip
        # The engines count max_new_tokens from the prompt, prefix included: the longest
        # prefix plus one turn; each episode keeps at most its own cap of the new tokens.
        sampling = sampling_params(ctx.spec, ctx.step * 64 + turn)
        longest = max(len(e.tokens) for e in active)
        sampling.max_new_tokens = min(cap_total, longest + cap_turn)
        by_group: dict[str, list[rollout_pb2.SequenceRequest]] = {}
        for e in active:
            by_group.setdefault(e.group, []).append(rollout_pb2.SequenceRequest(
                seq_id=e.seq_id, prompt_token_ids=e.prompt_ids, prefix_token_ids=e.tokens,
                prefix_logprobs=e.logprobs, prefix_versions=e.versions))  # fmt: skip
        results = self.pool.generate(list(by_group.values()), sampling, job_id=ctx.job_id,
                                     version=ctx.version, stop=ctx.stop,
                                     limit=ctx.spec.resources.rollout_replicas)  # fmt: skip
        for e in active:
            result = results[e.seq_id]
            room = min(cap_turn, cap_total - len(e.tokens))
            new = list(result.token_ids[len(e.tokens) :])[:room]
            n = len(new)
            e.add(new, list(result.logprobs[len(e.tokens) :])[:n],
                  list(result.versions[len(e.tokens) :])[:n], model=True)  # fmt: skip
            e.turns += 1
            ended_turn = any(t in ctx.codec.eos_ids for t in new)
            reply = self._env(f"Step({e.seq_id}, turn {turn})", "Step", env_pb2.StepRequest(
                episode_id=e.episode_id, turn=turn,
                model_text=ctx.codec.completion_text(new)))  # fmt: skip
            info = json.loads(reply.info_json or "{}")
            e.tool_calls += int(info.get("tool_calls", 0) or 0)
            e.reward = reply.reward_so_far
            if reply.done:
                e.done, e.finish = True, "stop"
            elif last:
                e.done, e.finish = True, "length"  # out of turns
            else:
                env_ids = renderer.reply_ids([_message(m) for m in reply.messages])
                if not ended_turn:  # cut off at its cap: the template's end of turn closes it
                    env_ids = [min(ctx.codec.eos_ids), *env_ids]
                if len(e.tokens) + len(env_ids) >= cap_total:
                    e.done, e.finish = True, "length"
                else:
                    e.add(env_ids, [0.0] * len(env_ids), [ENV_VERSION] * len(env_ids),
                          model=False)  # fmt: skip

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
