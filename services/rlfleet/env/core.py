"""Episodes: ids, turn order, idempotent retries and the in-memory store.

Why it is shaped this way
- The caller (a rollout) retries a Step whose reply it did not get (a timeout, a
  dropped connection). So every reply is stored per (episode, turn) and a repeat
  returns it without stepping the environment again: a python tool never runs
  twice for one turn. A repeat with a *different* model text is a caller bug and
  is refused. Steps of one episode are serialised by its lock, so a retry that
  arrives while the first attempt still runs waits for it and gets its reply.
- A step that raises stores nothing and leaves the turn where it was, so the same
  turn may be retried (environments leave their state untouched when they raise).
- Episodes live in this process's memory only: they are cheap to recreate and
  meaningless without the rollout that drives them. After a restart every Step is
  NOT_FOUND; that is the caller's signal to reset a new episode (see
  docs/ENVIRONMENTS.md, "When the env service restarts").
- Memory is bounded: ``max_episodes`` at once, each dropped after ``episode_ttl_s``
  untouched; when full, finished episodes go first and a live one never is (Reset
  is refused with RESOURCE_EXHAUSTED, retryable backpressure).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from rlfleet.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RlfleetError,
)
from rlfleet.env.protocol import Environment, Message, Observation, StepResult
from rlfleet.env.registry import Registry

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
MAX_EPISODE_ID_CHARS = 256

EPISODES_ACTIVE = Gauge("rlfleet_env_episodes", "Episodes held in memory.")
EPISODES_STARTED = Counter("rlfleet_env_episodes_started_total", "Episodes reset.", ["env"])
EPISODES_FINISHED = Counter(
    "rlfleet_env_episodes_finished_total", "Episodes that reached done.", ["env", "finish"]
)
EPISODES_DROPPED = Counter(
    "rlfleet_env_episodes_dropped_total",
    "Episodes dropped without a Close.",
    ["reason"],  # ttl, capacity
)
STEPS = Counter("rlfleet_env_steps_total", "Model turns stepped.", ["env"])
STEP_REPEATS = Counter(
    "rlfleet_env_step_repeats_total", "Repeated Steps answered from the stored reply.", ["env"]
)
STEP_SECONDS = Histogram(
    "rlfleet_env_step_seconds",
    "Time to step one model turn (tools included).",
    ["env"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 15, 60),
)
TOOL_CALLS = Counter("rlfleet_env_tool_calls_total", "Tool calls the model made.", ["env"])
TOOL_ERRORS = Counter(
    "rlfleet_env_tool_errors_total", "Tool calls that ended in an error message.", ["env"]
)
EPISODE_REWARD = Histogram(
    "rlfleet_env_episode_reward",
    "Final reward of finished episodes.",
    ["env"],
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)


@dataclass(frozen=True)
class ResetReply:
    episode_id: str
    messages: list[Message]
    tools_json: str


@dataclass(frozen=True)
class StepReply:
    messages: list[Message]
    reward_so_far: float
    done: bool
    info_json: str


@dataclass
class Episode:
    id: str
    env_name: str
    env: Environment
    state: Any
    request_key: str
    opening: ResetReply
    next_turn: int = 0
    done: bool = False
    replies: dict[int, tuple[str, StepReply]] = field(default_factory=dict)
    """turn -> (sha256 of the model text, the reply)."""
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _json_object(text: str, field_name: str, *, empty_ok: bool) -> dict[str, Any]:
    if not text.strip():
        if empty_ok:
            return {}
        raise InvalidArgument(f"{field_name} is empty; it must be a JSON object")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field_name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field_name} must be a JSON object, not {type(value).__name__}")
    return value


def _describe(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"options_json {'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
            for e in exc.errors()
        )
    return str(exc)


def _check_messages(messages: Any, what: str) -> list[Message]:
    if not isinstance(messages, list) or not all(isinstance(m, Message) for m in messages):
        raise TypeError(f"{what} must be a list of Message")
    for m in messages:
        if m.role not in ROLES or not isinstance(m.content, str):
            raise TypeError(f"{what} has a message with role {m.role!r}; roles: {ROLES}")
    return messages


class EnvCore:
    """The episode store over a registry of environments."""

    def __init__(
        self,
        registry: Registry,
        *,
        max_episodes: int = 10_000,
        episode_ttl_s: float = 3600.0,
        max_turns: int = 256,
        max_model_text_chars: int = 1_000_000,
        clock=time.monotonic,
    ):
        self.registry = registry
        self.max_episodes = max_episodes
        self.episode_ttl_s = episode_ttl_s
        self.max_turns = max_turns
        self.max_model_text_chars = max_model_text_chars
        self._clock = clock
        self._episodes: OrderedDict[str, Episode] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    # -- the store ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._episodes)

    def _sweep(self, now: float) -> None:
        """Drops episodes idle past the TTL (oldest first). Holds ``_lock``."""
        while self._episodes:
            oldest = next(iter(self._episodes.values()))
            if now - oldest.last_used < self.episode_ttl_s:
                break
            del self._episodes[oldest.id]
            EPISODES_DROPPED.labels("ttl").inc()
            logger.info("episode expired", extra={"episode_id": oldest.id})
        EPISODES_ACTIVE.set(len(self._episodes))

    def _make_room(self) -> None:
        """One free place for a new episode, or ResourceExhausted. Holds ``_lock``."""
        if len(self._episodes) < self.max_episodes:
            return
        for ep in self._episodes.values():
            if ep.done:
                del self._episodes[ep.id]
                EPISODES_DROPPED.labels("capacity").inc()
                return
        raise ResourceExhausted(
            f"the env service holds {self.max_episodes} episodes and none has finished; "
            "close the episodes you are done with (or raise max_episodes), then retry"
        )

    def _get(self, episode_id: str) -> Episode:
        with self._lock:
            now = self._clock()
            self._sweep(now)
            ep = self._episodes.get(episode_id)
            if ep is None:
                raise NotFound(
                    f"episode {episode_id!r} is unknown to this env service: it was closed, "
                    f"idle for more than {self.episode_ttl_s:g} s, or lost when the service "
                    "restarted; reset a new episode"
                )
            ep.last_used = now
            self._episodes.move_to_end(episode_id)
            return ep

    # -- the API -------------------------------------------------------------------

    def names(self) -> list[str]:
        return self.registry.names

    def reset(
        self, *, episode_id: str, env_name: str, row_json: str, options_json: str
    ) -> ResetReply:
        if len(episode_id) > MAX_EPISODE_ID_CHARS:
            raise InvalidArgument(f"episode_id is longer than {MAX_EPISODE_ID_CHARS} characters")
        try:
            env = self.registry.get(env_name)
        except KeyError as exc:
            raise InvalidArgument(exc.args[0]) from None
        row = _json_object(row_json, "row_json", empty_ok=False)
        options = _json_object(options_json, "options_json", empty_ok=True)
        key = _digest(env_name, row_json, options_json)
        if episode_id:
            with self._lock:
                known = self._episodes.get(episode_id)
                if known is not None:
                    return self._repeat_reset(known, key)

        try:
            obs = env.reset(row, options)
        except ValueError as exc:
            raise InvalidArgument(
                f"environment {env_name!r} cannot start an episode from this request: "
                f"{_describe(exc)}"
            ) from None
        if not isinstance(obs, Observation):
            raise TypeError(f"{env_name}.reset returned {type(obs).__name__}, not Observation")
        messages = _check_messages(obs.messages, f"{env_name}.reset's messages")
        tools_json = json.dumps(obs.tools or [])

        with self._lock:
            now = self._clock()
            self._sweep(now)
            if episode_id and episode_id in self._episodes:  # a concurrent twin won
                return self._repeat_reset(self._episodes[episode_id], key)
            self._make_room()
            episode_id = episode_id or f"ep-{uuid.uuid4().hex}"
            opening = ResetReply(episode_id=episode_id, messages=messages, tools_json=tools_json)
            self._episodes[episode_id] = Episode(
                id=episode_id,
                env_name=env_name,
                env=env,
                state=obs.state,
                request_key=key,
                opening=opening,
                last_used=now,
            )
            EPISODES_ACTIVE.set(len(self._episodes))
        EPISODES_STARTED.labels(env_name).inc()
        return opening

    @staticmethod
    def _repeat_reset(known: Episode, key: str) -> ResetReply:
        if known.request_key == key and known.next_turn == 0:
            return known.opening
        where = f"at turn {known.next_turn}" if known.next_turn else "from another request"
        raise AlreadyExists(
            f"episode {known.id!r} already exists ({known.env_name!r}, {where}); "
            "close it first or reset with a new episode_id"
        )

    def step(self, *, episode_id: str, turn: int, model_text: str) -> StepReply:
        if turn < 0:
            raise InvalidArgument(f"turn must be 0 or more, not {turn}")
        if len(model_text) > self.max_model_text_chars:
            raise InvalidArgument(
                f"model_text has {len(model_text)} characters; at most "
                f"{self.max_model_text_chars} are accepted"
            )
        ep = self._get(episode_id)
        text_key = _digest(model_text)
        with ep.lock:
            stored = ep.replies.get(turn)
            if stored is not None:
                if stored[0] != text_key:
                    raise FailedPrecondition(
                        f"turn {turn} of episode {episode_id!r} was already taken with another "
                        "model_text; a repeated Step must send the same text"
                    )
                STEP_REPEATS.labels(ep.env_name).inc()
                return stored[1]
            if ep.done:
                raise FailedPrecondition(
                    f"episode {episode_id!r} is done (its last turn was {ep.next_turn - 1}); "
                    f"turn {turn} cannot be taken"
                )
            if turn != ep.next_turn:
                raise FailedPrecondition(
                    f"turn {turn} is out of order: episode {episode_id!r} expects turn "
                    f"{ep.next_turn}"
                )
            reply = self._step(ep, turn, model_text)
            ep.replies[turn] = (text_key, reply)
            ep.next_turn = turn + 1
            ep.done = reply.done
            return reply

    def _step(self, ep: Episode, turn: int, model_text: str) -> StepReply:
        start = time.perf_counter()
        try:
            result = ep.env.step(ep.state, model_text)
        except RlfleetError:
            raise  # e.g. Unavailable: the sandbox could not start; the turn may be retried
        except Exception:
            logger.exception(
                "environment step raised", extra={"env": ep.env_name, "episode_id": ep.id}
            )
            raise
        STEP_SECONDS.labels(ep.env_name).observe(time.perf_counter() - start)
        if not isinstance(result, StepResult):
            raise TypeError(f"{ep.env_name}.step returned {type(result).__name__}")
        messages = _check_messages(result.messages, f"{ep.env_name}.step's messages")
        reward = float(result.reward)
        if not math.isfinite(reward):
            raise TypeError(f"{ep.env_name}.step gave a reward that is not finite: {reward}")
        info = dict(result.info or {})
        done = bool(result.done)
        if not done and turn + 1 >= self.max_turns:
            done = True
            info.update(truncated=True, finish="turn_limit")
        STEPS.labels(ep.env_name).inc()
        TOOL_CALLS.labels(ep.env_name).inc(int(info.get("tool_calls", 0) or 0))
        TOOL_ERRORS.labels(ep.env_name).inc(int(info.get("tool_errors", 0) or 0))
        if done:
            EPISODES_FINISHED.labels(ep.env_name, str(info.get("finish") or "done")).inc()
            EPISODE_REWARD.labels(ep.env_name).observe(reward)
        return StepReply(
            messages=messages,
            reward_so_far=reward,
            done=done,
            info_json=json.dumps(info, default=str),
        )

    def close(self, *, episode_id: str) -> bool:
        """Frees the episode; False when there was none (closing twice is fine)."""
        with self._lock:
            found = self._episodes.pop(episode_id, None) is not None
            EPISODES_ACTIVE.set(len(self._episodes))
        return found
