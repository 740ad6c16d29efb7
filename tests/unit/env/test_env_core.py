"""The episode store: ids, turn order, idempotent retries, limits, errors."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from rlfleet.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from rlfleet.env.core import EnvCore
from rlfleet.env.protocol import Message, Observation, StepResult
from rlfleet.env.registry import Registry


class CountingEnvironment:
    """Ends after ``options.turns`` turns; counts every real step (a tool run)."""

    name = "count"

    def __init__(self):
        self.steps = 0
        self.gate: threading.Event | None = None
        self.fail_next: Exception | None = None

    def reset(self, row: dict[str, Any], options: dict[str, Any]) -> Observation:
        if "prompt" not in row:
            raise ValueError("row_json has no 'prompt'")
        return Observation(
            messages=[Message("user", row["prompt"])],
            tools=[{"type": "function", "function": {"name": "t"}}],
            state={"turn": 0, "turns": options.get("turns", 3)},
        )

    def step(self, state: dict, model_text: str) -> StepResult:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.steps += 1
        state["turn"] += 1
        done = state["turn"] >= state["turns"]
        return StepResult(
            [Message("tool", f"ran {self.steps}: {model_text}", name="t")],
            reward=1.0 if done else 0.0,
            done=done,
            info={"tool_calls": 1},
        )


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env() -> CountingEnvironment:
    return CountingEnvironment()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(env, clock) -> EnvCore:
    return EnvCore(Registry(envs={"count": env}), max_episodes=3, episode_ttl_s=60, clock=clock)


def _reset(core, episode_id="e1", turns=3, prompt="hi"):
    return core.reset(
        episode_id=episode_id,
        env_name="count",
        row_json=json.dumps({"prompt": prompt}),
        options_json=json.dumps({"turns": turns}),
    )


def test_an_episode_turn_by_turn(core, env):
    obs = _reset(core)
    assert obs.episode_id == "e1"
    assert obs.messages == [Message("user", "hi")]
    assert json.loads(obs.tools_json) == [{"type": "function", "function": {"name": "t"}}]
    replies = [core.step(episode_id="e1", turn=t, model_text=f"m{t}") for t in range(3)]
    assert [r.done for r in replies] == [False, False, True]
    assert replies[-1].reward_so_far == 1.0
    assert replies[0].messages == [Message("tool", "ran 1: m0", name="t")]
    assert json.loads(replies[0].info_json) == {"tool_calls": 1}
    assert env.steps == 3


def test_a_repeated_step_returns_the_same_reply_without_running_again(core, env):
    _reset(core)
    first = core.step(episode_id="e1", turn=0, model_text="m0")
    assert core.step(episode_id="e1", turn=0, model_text="m0") == first
    core.step(episode_id="e1", turn=1, model_text="m1")
    assert core.step(episode_id="e1", turn=0, model_text="m0") == first  # a late duplicate
    assert env.steps == 2


def test_a_repeat_with_another_text_is_refused(core):
    _reset(core)
    core.step(episode_id="e1", turn=0, model_text="m0")
    with pytest.raises(FailedPrecondition, match="already taken with another model_text"):
        core.step(episode_id="e1", turn=0, model_text="other")


def test_a_retry_while_the_first_attempt_runs_waits_for_it(core, env):
    _reset(core)
    env.gate = threading.Event()
    replies = []
    threads = [
        threading.Thread(
            target=lambda: replies.append(core.step(episode_id="e1", turn=0, model_text="m0"))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    env.gate.set()
    for t in threads:
        t.join(10)
    assert len(replies) == 2 and replies[0] == replies[1]
    assert env.steps == 1


def test_turns_out_of_order_name_both_turns(core):
    _reset(core)
    with pytest.raises(
        FailedPrecondition, match="turn 2 is out of order: episode 'e1' expects turn 0"
    ):
        core.step(episode_id="e1", turn=2, model_text="m")
    with pytest.raises(InvalidArgument, match="turn must be 0 or more"):
        core.step(episode_id="e1", turn=-1, model_text="m")


def test_a_done_episode_takes_no_more_turns(core):
    _reset(core, turns=1)
    assert core.step(episode_id="e1", turn=0, model_text="m").done
    with pytest.raises(FailedPrecondition, match="is done"):
        core.step(episode_id="e1", turn=1, model_text="m")


def test_unknown_and_closed_episodes_are_not_found(core):
    with pytest.raises(NotFound, match="reset a new episode"):
        core.step(episode_id="never", turn=0, model_text="m")
    _reset(core)
    assert core.close(episode_id="e1") is True
    assert core.close(episode_id="e1") is False  # closing twice is fine
    with pytest.raises(NotFound, match="'e1' is unknown"):
        core.step(episode_id="e1", turn=0, model_text="m")


def test_reset_is_idempotent_until_the_first_step(core):
    first = _reset(core)
    assert _reset(core) == first
    with pytest.raises(AlreadyExists, match="from another request"):
        _reset(core, prompt="other")
    core.step(episode_id="e1", turn=0, model_text="m")
    with pytest.raises(AlreadyExists, match="at turn 1"):
        _reset(core)


def test_an_empty_id_gets_one(core):
    a, b = _reset(core, episode_id=""), _reset(core, episode_id="")
    assert a.episode_id.startswith("ep-") and a.episode_id != b.episode_id


def test_idle_episodes_expire(core, clock):
    _reset(core, "old")
    clock.now += 30
    _reset(core, "young")
    clock.now += 40  # "old" idle 70 s, "young" 40 s
    with pytest.raises(NotFound, match="idle for more than 60 s"):
        core.step(episode_id="old", turn=0, model_text="m")
    core.step(episode_id="young", turn=0, model_text="m")  # a step touches it
    clock.now += 50
    core.step(episode_id="young", turn=1, model_text="m")
    assert len(core) == 1


def test_when_full_finished_episodes_make_room_and_live_ones_never(core):
    _reset(core, "a", turns=1)
    _reset(core, "b")
    _reset(core, "c")
    with pytest.raises(ResourceExhausted, match="holds 3 episodes and none has finished"):
        _reset(core, "d")
    core.step(episode_id="a", turn=0, model_text="m")  # a is done
    _reset(core, "d")
    with pytest.raises(NotFound):
        core.step(episode_id="a", turn=0, model_text="m")
    core.step(episode_id="b", turn=0, model_text="m")


def test_the_hard_turn_limit_ends_an_episode(env):
    core = EnvCore(Registry(envs={"count": env}), max_turns=2)
    _reset(core, turns=10)
    assert not core.step(episode_id="e1", turn=0, model_text="m").done
    last = core.step(episode_id="e1", turn=1, model_text="m")
    assert last.done
    assert json.loads(last.info_json)["finish"] == "turn_limit"


def test_a_step_that_raises_can_be_retried(core, env):
    _reset(core)
    env.fail_next = Unavailable("the sandbox could not start")
    with pytest.raises(Unavailable):
        core.step(episode_id="e1", turn=0, model_text="m0")
    assert not core.step(episode_id="e1", turn=0, model_text="m0").done
    assert env.steps == 1


BAD_RESETS = [
    ({"env_name": "nope"}, "env_name 'nope' is unknown; known environments: count"),
    ({"row_json": "{oops"}, "row_json is not valid JSON"),
    ({"row_json": "[1]"}, "row_json must be a JSON object"),
    ({"row_json": ""}, "row_json is empty"),
    ({"options_json": "3"}, "options_json must be a JSON object"),
    ({"row_json": "{}"}, "cannot start an episode from this request: row_json has no 'prompt'"),
    ({"episode_id": "x" * 300}, "episode_id is longer than"),
]


@pytest.mark.parametrize(("fields", "needle"), BAD_RESETS)
def test_bad_resets_are_invalid_argument(core, fields, needle):
    request = {"episode_id": "e", "env_name": "count", "row_json": '{"prompt": "p"}',
               "options_json": "", **fields}  # fmt: skip
    with pytest.raises(InvalidArgument) as info:
        core.reset(**request)
    assert needle in info.value.message


def test_a_too_long_model_text_is_refused(env):
    core = EnvCore(Registry(envs={"count": env}), max_model_text_chars=10)
    _reset(core)
    with pytest.raises(InvalidArgument, match="at most 10"):
        core.step(episode_id="e1", turn=0, model_text="x" * 11)
