"""JobStore against a real redis-server: state machine, idempotency, listing, restart."""

from __future__ import annotations

import threading

import pytest
import redis
from rlfleet.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from rlfleet.scheduler.jobs import JobState, check_transition
from rlfleet.scheduler.store import JobStore


@pytest.fixture
def store(redis_url) -> JobStore:
    s = JobStore.from_url(redis_url)
    yield s
    s.r.close()


def _create(store: JobStore, spec: str = '{"x": 1}', **kwargs):
    job, created = store.create(spec_json=spec, total_steps=3, **kwargs)
    assert created
    return job


def test_create_and_get(store):
    job = _create(store)
    got = store.get(job.job_id)
    assert got.state == JobState.QUEUED
    assert got.current_step == 0 and got.total_steps == 3
    assert got.spec_json == '{"x": 1}'
    assert got.created_at == got.updated_at > 0
    with pytest.raises(NotFound, match="does not exist"):
        store.get("job-nope")


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        (JobState.QUEUED, JobState.RUNNING, True),
        (JobState.QUEUED, JobState.CANCELLED, True),
        (JobState.QUEUED, JobState.FAILED, True),
        (JobState.QUEUED, JobState.SUCCEEDED, False),
        (JobState.RUNNING, JobState.SUCCEEDED, True),
        (JobState.RUNNING, JobState.FAILED, True),
        (JobState.RUNNING, JobState.CANCELLED, True),
        (JobState.RUNNING, JobState.QUEUED, False),
        (JobState.SUCCEEDED, JobState.CANCELLED, False),
        (JobState.FAILED, JobState.RUNNING, False),
        (JobState.CANCELLED, JobState.CANCELLED, False),
    ],
)
def test_state_machine(old, new, ok):
    if ok:
        check_transition("j", old, new)
    else:
        with pytest.raises(FailedPrecondition):
            check_transition("j", old, new)


def test_transitions_are_checked_and_indexed(store):
    job = _create(store)
    store.transition(job.job_id, JobState.RUNNING)
    assert store.ids_in_state(JobState.RUNNING) == [job.job_id]
    assert store.ids_in_state(JobState.QUEUED) == []
    done = store.transition(job.job_id, JobState.FAILED, reason="trainer: boom")
    assert done.state == JobState.FAILED and done.reason == "trainer: boom"
    with pytest.raises(FailedPrecondition, match="already failed"):
        store.transition(job.job_id, JobState.CANCELLED)
    assert store.get(job.job_id).state == JobState.FAILED
    counts = store.count_by_state()
    assert counts[JobState.FAILED] == 1 and counts[JobState.RUNNING] == 0


def test_fifo_queue(store):
    ids = [_create(store).job_id for _ in range(3)]
    assert store.next_queued() == ids[0]
    store.transition(ids[0], JobState.RUNNING)
    assert store.next_queued() == ids[1]
    store.transition(ids[1], JobState.CANCELLED)
    assert store.next_queued() == ids[2]
    store.transition(ids[2], JobState.RUNNING)
    assert store.next_queued() is None


def test_idempotency_key(store):
    job = _create(store, idempotency_key="k1")
    again, created = store.create(spec_json='{"x": 1}', total_steps=3, idempotency_key="k1")
    assert not created and again.job_id == job.job_id
    with pytest.raises(AlreadyExists, match="different spec"):
        store.create(spec_json='{"x": 2}', total_steps=3, idempotency_key="k1")
    other = _create(store, idempotency_key="k2")
    assert other.job_id != job.job_id
    assert store.r.get("rlfleet:idem:k1").decode() == job.job_id
    # Only the two distinct jobs exist.
    assert len(store.list()[0]) == 2


def test_idempotency_key_under_concurrent_submits(store):
    results = []

    def submit():
        results.append(store.create(spec_json="{}", total_steps=1, idempotency_key="same"))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job.job_id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list()[0]) == 1


def test_list_pagination_and_filter(store):
    ids = [_create(store).job_id for _ in range(7)]
    for job_id in ids[:3]:
        store.transition(job_id, JobState.CANCELLED)

    seen, token, pages = [], "", 0
    while True:
        page, token = store.list(page_size=3, page_token=token)
        seen += [j.job_id for j in page]
        pages += 1
        if not token:
            break
    assert seen == list(reversed(ids))  # newest first, nothing repeated or skipped
    assert pages == 3

    cancelled, token = store.list(state=JobState.CANCELLED, page_size=2)
    assert [j.job_id for j in cancelled] == [ids[2], ids[1]] and token
    rest, token = store.list(state=JobState.CANCELLED, page_size=2, page_token=token)
    assert [j.job_id for j in rest] == [ids[0]] and token == ""
    queued, _ = store.list(state=JobState.QUEUED)
    assert [j.job_id for j in queued] == list(reversed(ids[3:]))

    exact, token = store.list(page_size=7)
    assert len(exact) == 7 and token == ""
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list(page_token="not-a-token")
    with pytest.raises(InvalidArgument, match="page_size"):
        store.list(page_size=-1)


def test_steps_are_recorded_in_order(store):
    job = _create(store)
    store.transition(job.job_id, JobState.RUNNING)
    store.record_step(job.job_id, 0, {"reward_mean": 0.5}, policy_version=1)
    after = store.record_step(job.job_id, 1, {"reward_mean": 0.75}, policy_version=2)
    assert after.current_step == 2 and after.policy_version == 2
    assert after.summary == {"reward_mean": 0.75}
    # A redone step (resume after a crash) is not recorded twice.
    store.record_step(job.job_id, 1, {"reward_mean": 9.0}, policy_version=2)
    with pytest.raises(InvalidArgument, match="before step 2"):
        store.record_step(job.job_id, 5, {}, policy_version=6)
    steps = store.steps(job.job_id)
    assert [(s.step, s.metrics["reward_mean"]) for s in steps] == [(0, 0.5), (1, 0.75)]
    assert [s.step for s in store.steps(job.job_id, since_step=1)] == [1]
    with pytest.raises(NotFound):
        store.steps("job-nope")


def test_cancel_and_progress_do_not_overwrite_each_other(store):
    job = _create(store)
    store.transition(job.job_id, JobState.RUNNING)

    def progress():
        for step in range(30):
            store.record_step(job.job_id, step, {"s": float(step)}, policy_version=step + 1)

    t = threading.Thread(target=progress)
    t.start()
    store.transition(job.job_id, JobState.CANCELLED, reason="by test")
    t.join()
    final = store.get(job.job_id)
    assert final.state == JobState.CANCELLED and final.reason == "by test"
    assert final.current_step == 30 and len(store.steps(job.job_id)) == 30


def test_state_survives_a_new_store(redis_url, store):
    job = _create(store, idempotency_key="k")
    store.transition(job.job_id, JobState.RUNNING)
    store.record_step(job.job_id, 0, {"reward_mean": 1.0}, policy_version=1)

    fresh = JobStore(redis.Redis.from_url(redis_url))  # as after a scheduler restart
    got = fresh.get(job.job_id)
    assert got.state == JobState.RUNNING and got.current_step == 1 and got.policy_version == 1
    assert fresh.ids_in_state(JobState.RUNNING) == [job.job_id]
    assert fresh.create(spec_json='{"x": 1}', total_steps=3, idempotency_key="k")[0].job_id == (
        job.job_id
    )
    later = _create(fresh)
    assert later.seq > job.seq  # submission order continues
