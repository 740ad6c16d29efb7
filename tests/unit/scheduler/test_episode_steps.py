"""A turn's environment Steps go out at once (scheduler/episodes.step_all), in order.

The environment here is a stand-in for ``EnvTurns`` (the env service is exercised by
tests/integration/test_episodes.py): each Step waits at a barrier that only opens when
``STEP_WORKERS`` Steps are in flight together, so Steps sent one by one would never get
past the first (the barrier breaks after 30 s and the test fails).
"""

from __future__ import annotations

import threading

import pytest
from rlfleet.common.errors import NotFound
from rlfleet.scheduler.episodes import STEP_WORKERS, Episode, TurnOutcome, step_all


class _Env:
    def __init__(self, parties: int, *, fail: str = ""):
        self.barrier = threading.Barrier(parties, timeout=30)
        self.fail = fail
        self.seen: list[tuple[str, int, list[int]]] = []

    def after_turn(self, episode_id, turn, turn_ids, *, length, prompt_len, what):
        self.barrier.wait()
        self.seen.append((episode_id, turn, turn_ids))
        if episode_id == self.fail:
            raise NotFound(f"episode {episode_id!r} is not held")
        return TurnOutcome(False, "", [], float(int(episode_id[1:])), 1)


def _episodes(n: int) -> list[tuple[Episode, list[int]]]:
    return [(Episode(f"e{i}", f"s{i}", "g", "{}", [1, 2], tokens=[i, i]), [i, i])
            for i in range(n)]  # fmt: skip


def test_a_turns_steps_are_in_flight_together_and_come_back_in_order():
    turns = _episodes(2 * STEP_WORKERS)
    env = _Env(STEP_WORKERS)
    outcomes = step_all(env, turns, 3)
    assert [o.reward for o in outcomes] == [float(i) for i in range(2 * STEP_WORKERS)]
    assert sorted(env.seen) == sorted((f"e{i}", 3, [i, i]) for i in range(2 * STEP_WORKERS))


def test_a_failed_step_raises_after_the_others_are_done():
    env = _Env(4, fail="e2")
    with pytest.raises(NotFound, match="'e2' is not held"):
        step_all(env, _episodes(4), 0)
    assert len(env.seen) == 4  # every Step of the turn was taken before the error came up
