"""The C3PO++ pool in Redis: exact round trip, incremental writes, and a restart
that continues a job's rollouts as if nothing had happened."""

from __future__ import annotations

import redis
from rlfleet.rollout.sim_engine import LengthModel
from rlfleet.scheduler.c3po.driver import C3poSettings, IterationDriver
from rlfleet.scheduler.c3po.pool import ENV_VERSION, EpisodeState, Group, InferencePool, Rollout
from rlfleet.scheduler.c3po.sim import SimFleet, SimGroupSource
from rlfleet.scheduler.c3po.store import C3poStore, decode_group, encode_group


def _group(serial: int) -> Group:
    return Group(
        serial=serial,
        prompt_len=3,
        prompt_ids=[5, 6, 7],
        task_json='{"question": "1 + 1"}',
        entered_step=2,
        members=[
            Rollout(
                seq_id=f"g{serial}-0",
                member=0,
                length=3,
                spans=[[1, 2], [2, 1]],
                token_ids=[9, 10, 11],
                logprobs=[-0.5, -1.25, -3.0],
                retention=1,
            ),
            Rollout(
                seq_id=f"g{serial}-1",
                member=1,
                length=1,
                spans=[[2, 1]],
                token_ids=[2],
                logprobs=[-0.125],
                finished=True,
                finish_reason="stop",
            ),
        ],
    )


def test_an_episodes_state_round_trips_and_its_environment_tokens_count_nowhere():
    """A multi-turn episode: the model's 2 tokens, the environment's 3, the model's 1."""
    member = Rollout(
        seq_id="g1-0", member=0, length=6, spans=[[4, 2], [ENV_VERSION, 3], [5, 1]],
        token_ids=[9, 2, 30, 31, 32, 11], logprobs=[-0.5, -0.25, 0.0, 0.0, 0.0, -1.0],
        episode=EpisodeState("job/g1-0/abc", turns=1, turn_start=5, reward=0.5,
                             tool_calls=2, restarts=1),
    )  # fmt: skip
    group = Group(serial=1, prompt_len=1, prompt_ids=[5], members=[member], entered_step=0)
    assert group.tokens == 3  # the budget C counts the model's tokens only
    assert group.oldest_version() == 4  # the environment's -1 is no version
    [back] = decode_group(encode_group(group)).members
    assert back.episode == member.episode and back.spans == member.spans
    assert _group(2).members[0].episode is None
    assert decode_group(encode_group(_group(2))).members[0].episode is None


def test_group_encoding_round_trips():
    group = _group(4)
    back = decode_group(encode_group(group))
    assert back.serial == 4 and back.prompt_ids == [5, 6, 7] and back.entered_step == 2
    assert back.task_json == group.task_json
    for a, b in zip(group.members, back.members, strict=True):
        assert (a.seq_id, a.length, a.spans, a.token_ids, a.logprobs) == (
            b.seq_id,
            b.length,
            b.spans,
            b.token_ids,
            b.logprobs,
        )
        assert (a.retention, a.finished, a.finish_reason) == (
            b.retention,
            b.finished,
            b.finish_reason,
        )


def test_save_writes_changes_only_and_keeps_released_until_the_next_save(redis_url):
    store = C3poStore(redis.Redis.from_url(redis_url))
    assert store.load("j").step == -1
    pool = InferencePool(next_serial=3)
    for serial in (0, 1):
        pool.add(_group(serial))
    released = [_group(2)]
    written = store.save("j", pool, step=0, released=released)
    assert written > 0
    assert store.save("j", pool, step=0, released=released) == 0  # nothing changed

    state = store.load("j")
    assert state.step == 0 and state.pool.next_serial == 3
    assert sorted(state.pool.groups) == [0, 1]
    assert [g.serial for g in state.released] == [2]
    assert state.pool.unfinished == 2

    # Next iteration: group 0 is released, group 1 purged, group 3 enters.
    g0 = pool.remove(0)
    pool.remove(1)
    pool.add(_group(3))
    pool.groups[3].members[0].token_ids.append(12)
    store.save("j", pool, step=1, released=[g0])
    state = store.load("j")
    assert sorted(state.pool.groups) == [3] and [g.serial for g in state.released] == [0]
    raw = store.r.hkeys("rlfleet:c3po:j:groups")
    assert sorted(int(k) for k in raw) == [0, 3]  # 1 (purged) and 2 (trained) are gone

    store.delete("j")
    assert store.load("j").step == -1


def _driver(pool: InferencePool, lengths: LengthModel) -> IterationDriver:
    settings = C3poSettings(token_budget=60_000, pool_capacity=64, retention_limit=2, group_size=4)
    return IterationDriver(pool, SimGroupSource(lengths, seed=1, group_size=4), settings)


def _run(steps: range, pool: InferencePool, store: C3poStore, lengths: LengthModel):
    fleet = SimFleet(replicas=4, lengths=lengths, seed=1)
    driver = _driver(pool, lengths)
    out = []
    for step in steps:
        fleet.begin(version=step, at=fleet.now())
        report = driver.run_c3po(fleet, step=step)
        store.save("job", pool, step=step, released=report.released)
        out.append(
            [(m.seq_id, m.length, m.spans, m.retention) for g in report.released for m in g.members]
        )
    return out


def test_a_restarted_scheduler_continues_the_pool(redis_url):
    """Three iterations straight, or one, a restart (state from Redis only), then two more."""
    lengths = LengthModel(median=2000, cap=16384)
    client = redis.Redis.from_url(redis_url)
    straight = _run(range(3), InferencePool(), C3poStore(client, prefix="a"), lengths)

    store = C3poStore(client, prefix="b")
    first = _run(range(1), InferencePool(), store, lengths)
    restored = store.load("job")
    assert restored.step == 0 and restored.pool.unfinished > 0
    rest = _run(range(1, 3), restored.pool, store, lengths)
    assert first + rest == straight
    assert any(r > 0 for step in rest for *_, r in step)  # carried rollouts were trained
