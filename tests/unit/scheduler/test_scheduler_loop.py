"""The step loop against scripted services over real gRPC, and a real Redis.

Covers what the whole-fleet test cannot reach cheaply: a replica dying
mid-stream, a late or restarted replica, cancellation during generation, a
service failing for good, resuming a running job after a restart.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from rlfleet.common.errors import Unavailable
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.discovery import StaticDiscovery, setup_discovery
from rlfleet.scheduler.jobs import JobState
from rlfleet.scheduler.pool import ReplicaPool, spread
from rlfleet.scheduler.samples import load_codec
from rlfleet.scheduler.strategy import setup_strategy
from rlfleet.v1 import rollout_pb2
from scheduler_fakes import COMPLETION


def _wait(predicate, timeout: float = 120.0) -> None:
    """Polls until ``predicate()``; the deadline only bounds a hang (a loaded machine)."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def _run(core, spec_json: str):
    job = core.submit(spec_json)
    assert core.run_once()
    return core.get(job.job_id)


def test_two_steps_end_to_end(fleet_core, fleet, spec_of, token_model_dir):
    job = _run(fleet_core, spec_of())
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.current_step == 2 and job.policy_version == 2

    # Trainer: init, then one TrainStep per step with every sample of the step.
    assert fleet.trainer.inits == [job.job_id]
    assert fleet.trainer.steps == [(job.job_id, 0, 6), (job.job_id, 1, 6)]

    # Every replica was loaded with 0 (before step 0), then 1 and 2, and holds 2.
    for replica in fleet.replicas:
        assert [r.version for r in replica.loads] == [0, 1, 2]
        assert replica.version == 2 and replica.job_id == job.job_id
        assert all(r.model_path == str(token_model_dir) for r in replica.loads)

    # Whole groups went to one replica, and both replicas got work.
    for replica in fleet.replicas:
        assert replica.generates
        for request in replica.generates:
            groups = {s.seq_id.rsplit("-", 1)[0] for s in request.sequences}
            assert len(request.sequences) == 2 * len(groups)

    # Samples: ids by prompt serial, prompts tokenised, text stripped at EOS.
    samples = [s for req in fleet.reward.requests for s in req.samples]
    assert all(
        req.write_to_buffer and req.verifier == "reasoning_gym" for req in fleet.reward.requests
    )
    by_id = {s.sample_id: s for s in samples}
    assert sorted(by_id) == sorted(f"g{p}-{m}" for p in range(6) for m in range(2))
    codec = load_codec(str(token_model_dir))
    prompts = PromptSource(JobSpec.model_validate_json(job.spec_json).task)
    for serial in range(6):
        text, entry = prompts.get(serial)
        sample = by_id[f"g{serial}-1"]
        assert sample.group_id == f"g{serial}" and sample.step == serial // 3
        assert list(sample.prompt_token_ids) == codec.encode(text)
        assert json.loads(sample.task_json)["question"] == entry["question"]
        assert sample.completion_text == COMPLETION  # EOS stripped, text kept as decoded
        assert list(sample.completion_token_ids)[-1] in codec.eos_ids
        assert set(sample.token_versions) == {sample.step}  # sampled by version = step
        assert len(sample.inference_logprobs) == len(sample.completion_token_ids)

    steps = fleet_core.steps(job.job_id)
    assert [s.step for s in steps] == [0, 1]
    m = steps[1].metrics
    assert m["reward_mean"] == 1.0 and m["loss"] == 0.25 and m["policy_version"] == 2
    assert m["samples"] == 6 and m["tokens_generated"] == sum(
        len(by_id[f"g{p}-{k}"].completion_token_ids) for p in (3, 4, 5) for k in (0, 1)
    )
    for key in ("rollout_seconds", "reward_seconds", "train_seconds", "sync_seconds"):
        assert 0 <= m[key] <= m["step_seconds"]
    assert job.summary == m


def test_replica_dying_mid_stream_is_dropped_and_its_work_redone(fleet_core, fleet, spec_of):
    fleet.replicas[0].script.fail_generate = grpc.StatusCode.UNAVAILABLE
    fleet.replicas[0].script.fail_generate_after = 1
    fleet.replicas[0].script.fail_times = 1
    job = _run(fleet_core, spec_of(steps=1))
    assert job.state == JobState.SUCCEEDED, job.reason
    assert fleet.trainer.steps == [(job.job_id, 0, 6)]
    first, second = fleet.replicas
    # The dying replica's unfinished sequences went to the other one.
    redone = {s.seq_id for s in second.generates[-1].sequences}
    assert redone and redone <= {s.seq_id for s in first.generates[0].sequences}
    assert len(fleet.reward.requests[0].samples) + len(fleet.reward.requests[1].samples) == 6


def test_dropped_replica_catches_up_and_works_again_next_step(fleet_core, fleet, spec_of):
    fleet.replicas[0].script.fail_generate = grpc.StatusCode.UNAVAILABLE
    fleet.replicas[0].script.fail_times = 1
    job = _run(fleet_core, spec_of(steps=2))
    assert job.state == JobState.SUCCEEDED, job.reason
    # Replica 0 was dropped during step 0 (so it missed the sync to version 1),
    # was found healthy again at step 1 and loaded version 1 before any work.
    assert [r.version for r in fleet.replicas[0].loads] == [0, 1, 2]
    assert len(fleet.replicas[0].generates) == 2
    assert {s.seq_id for s in fleet.replicas[0].generates[1].sequences}
    assert fleet.trainer.steps == [(job.job_id, 0, 6), (job.job_id, 1, 6)]


def test_pool_reloads_a_restarted_replica(fleet, token_model_dir):
    pool = ReplicaPool(StaticDiscovery(fleet.replica_addresses), replica_retry_s=0.5)
    try:
        assert len(pool.refresh()) == 2
        kwargs = {"job_id": "j", "version": 3, "model_path": str(token_model_dir)}
        assert len(pool.ensure_version(**kwargs)) == 2
        assert len(pool.ensure_version(**kwargs)) == 2  # nothing lags: no calls
        assert [len(r.loads) for r in fleet.replicas] == [1, 1]
        fleet.replicas[1].forget()  # restarted: holds nothing
        pool.refresh()
        assert [r.address for r in pool.ready("j", 3)] == fleet.replica_addresses[:1]
        pool.ensure_version(**kwargs)
        assert [len(r.loads) for r in fleet.replicas] == [1, 2]
        fleet.stop_replica(0)
        assert [r.address for r in pool.refresh()] == fleet.replica_addresses[1:]
        assert len(pool.ensure_version(**kwargs)) == 1
        assert len(pool.ready("j", 3, limit=1)) == 1
    finally:
        pool.close()


def test_each_term_of_a_weighted_reward_is_a_step_metric(fleet_core, fleet, spec_of):
    terms = [
        {"verifier": "regex", "weight": 0.1, "name": "format", "settings": {"pattern": ".+"}},
        {"verifier": "exact", "weight": 1.0},
    ]
    job = _run(fleet_core, spec_of(reward={"verifier": "weighted", "terms": terms}))
    assert job.state == JobState.SUCCEEDED, job.reason
    sent = json.loads(fleet.reward.requests[0].verifier_config_json)
    assert fleet.reward.requests[0].verifier == "weighted" and sent["terms"][0]["weight"] == 0.1
    for record in fleet_core.steps(job.job_id):
        m = record.metrics
        assert m["reward_format_mean"] == 1.0
        assert m["reward_exact_mean"] == pytest.approx(m["reward_mean"])


def test_reward_failure_fails_the_job_with_the_reason(fleet_core, fleet, spec_of):
    fleet.reward.fail = grpc.StatusCode.INVALID_ARGUMENT
    job = _run(fleet_core, spec_of())
    assert job.state == JobState.FAILED
    assert job.reason.startswith("reward: Score(")
    assert "verifier 'nope' is not known" in job.reason
    assert fleet.trainer.steps == []


def test_unreachable_trainer_fails_the_job_after_retries(make_core, fleet, spec_of):
    core = make_core(
        replica_addresses=fleet.replica_addresses,
        reward_address=fleet.reward_address,
        trainer_address="127.0.0.1:1",
        retry_deadline=0.5,
    )
    job = _run(core, spec_of())
    assert job.state == JobState.FAILED
    assert job.reason.startswith("trainer: InitJob failed:")


def test_no_replica_reachable_fails_the_job(make_core, fleet, spec_of):
    core = make_core(
        replica_addresses=["127.0.0.1:1"],
        reward_address=fleet.reward_address,
        trainer_address=fleet.trainer_address,
    )
    job = _run(core, spec_of())
    assert job.state == JobState.FAILED
    assert "rollout: no replica holds version 0" in job.reason and "127.0.0.1:1" in job.reason


def test_replica_refusing_a_version_fails_the_job(fleet_core, fleet, spec_of):
    fleet.replicas[1].script.fail_load = grpc.StatusCode.DATA_LOSS
    job = _run(fleet_core, spec_of())
    assert job.state == JobState.FAILED
    assert "LoadVersion(0) failed" in job.reason and "r1 cannot load" in job.reason


def test_cancel_aborts_generation(fleet_core, fleet, spec_of):
    for replica in fleet.replicas:
        replica.script.block_until_abort = True
    fleet_core.start()
    job = fleet_core.submit(spec_of())
    _wait(lambda: all(r.generating.is_set() for r in fleet.replicas))
    cancelled = fleet_core.cancel(job.job_id)
    assert cancelled.state == JobState.CANCELLED and cancelled.reason == "cancelled by request"
    _wait(lambda: all(r.aborts for r in fleet.replicas))
    _wait(lambda: fleet_core._current is None)
    final = fleet_core.get(job.job_id)
    assert final.state == JobState.CANCELLED and final.current_step == 0
    assert fleet.trainer.steps == [] and fleet.reward.requests == []


def test_jobs_run_one_at_a_time_in_submission_order(fleet_core, fleet, spec_of):
    ids = [fleet_core.submit(spec_of(steps=1, seed=i)).job_id for i in range(3)]
    fleet_core.cancel(ids[1])
    fleet_core.start()
    _wait(lambda: fleet_core.get(ids[2]).state == JobState.SUCCEEDED)
    assert fleet.trainer.inits == [ids[0], ids[2]]
    assert fleet_core.get(ids[0]).state == JobState.SUCCEEDED
    assert fleet_core.get(ids[1]).state == JobState.CANCELLED


def test_running_job_resumes_from_its_recorded_step(fleet_core, fleet, spec_of):
    # Redis as a scheduler leaves it when it dies in step 1 of a running job.
    job = fleet_core.submit(spec_of(steps=3))
    fleet_core.store.transition(job.job_id, JobState.RUNNING)
    fleet_core.store.record_step(job.job_id, 0, {"reward_mean": 0.0}, policy_version=1)
    fleet_core.submit(spec_of(steps=1))  # queued behind it
    fleet.trainer.init_version = 1  # the trainer resumes at version 1

    assert fleet_core.run_once()
    final = fleet_core.get(job.job_id)
    assert final.state == JobState.SUCCEEDED, final.reason
    assert [s.step for s in fleet_core.steps(job.job_id)] == [0, 1, 2]
    assert fleet.trainer.steps == [(job.job_id, 1, 6), (job.job_id, 2, 6)]
    # Prompts continue from the job's step: serials 3..8, not 0..5 again.
    ids = {s.sample_id for req in fleet.reward.requests for s in req.samples}
    assert {i.split("-")[0] for i in ids} == {f"g{p}" for p in range(3, 9)}
    assert [r.version for r in fleet.replicas[0].loads] == [1, 2, 3]


def test_spread_keeps_groups_whole_and_balanced():
    def group(serial: int, size: int, prompt_len: int):
        return [
            rollout_pb2.SequenceRequest(seq_id=f"g{serial}-{m}", prompt_token_ids=[1] * prompt_len)
            for m in range(size)
        ]

    replicas = ReplicaPool(StaticDiscovery([]))  # spread needs only replica objects
    a, b = object(), object()
    plan = spread([group(i, 4, 10) for i in range(6)], [a, b], max_new_tokens=10)
    assert [len(gs) for _, gs in plan] == [3, 3]
    plan = spread([group(0, 4, 100), group(1, 4, 10), group(2, 4, 10)], [a, b], max_new_tokens=0)
    assert [[g[0].seq_id for g in gs] for _, gs in plan] == [["g0-0"], ["g1-0", "g2-0"]]
    plan = spread([group(0, 2, 5)], [a, b], max_new_tokens=5)
    assert len(plan) == 1  # an idle replica gets no empty stream
    replicas.close()


def test_pluggable_factories():
    assert StaticDiscovery(["a:1", " b:2", "a:1", ""]).addresses() == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="label selector"):
        setup_discovery("kubernetes")
    with pytest.raises(ValueError, match="unknown replica discovery"):
        setup_discovery("consul")
    pool = ReplicaPool(StaticDiscovery([]))
    assert type(setup_strategy("sync", pool=pool)).__name__ == "SyncStrategy"
    with pytest.raises(ValueError, match="C3PO"):
        setup_strategy("c3po", pool=pool)
    with pytest.raises(ValueError, match="unknown scheduling.mode"):
        setup_strategy("async", pool=pool)


def test_generate_with_no_replicas_says_so():
    pool = ReplicaPool(StaticDiscovery([]))
    assert pool.refresh() == []
    with pytest.raises(Unavailable, match="no healthy replica"):
        pool.generate(
            [[rollout_pb2.SequenceRequest(seq_id="g0-0")]],
            rollout_pb2.SamplingParams(max_new_tokens=4),
            job_id="j",
            version=0,
            stop=threading.Event(),
        )


def test_job_whose_steps_are_all_recorded_just_succeeds(fleet_core, fleet, spec_of):
    job = fleet_core.submit(spec_of(steps=1))
    fleet_core.store.transition(job.job_id, JobState.RUNNING)
    fleet_core.store.record_step(job.job_id, 0, {}, policy_version=1)
    assert fleet_core.run_once()
    assert fleet_core.get(job.job_id).state == JobState.SUCCEEDED
    assert fleet.trainer.inits == []


def test_a_replica_that_must_pull_a_version_still_being_published_waits_for_it():
    """After a TrainStep that published in the background, a replica that was not in the
    weight group (a late joiner, one restarted since the broadcast) finds the version
    missing in weight-sync: the loop repeats that TrainStep, which returns once
    weight-sync holds it, then loads again. Without a publish in flight, NOT_FOUND is
    the job's error. (Stand-ins: only the calls the loop makes are scripted.)"""
    from rlfleet.common.errors import NotFound
    from rlfleet.scheduler.loop import JobRunner

    class Pool:
        def __init__(self):
            self.loads = 0

        def ensure_version(self, **kwargs):
            self.loads += 1
            if self.loads == 1:
                raise NotFound("version 4 of job 'j' is not held (held: [3])")
            return ["replica"]

    class Clients:
        def __init__(self):
            self.steps = []

        def train_step(self, job_id, step, num_samples, *, background=False):
            self.steps.append((job_id, step, background))

    pool, clients = Pool(), Clients()
    runner = JobRunner(store=None, pool=pool, clients=clients)
    spec = JobSpec.model_validate({"model": {"path": "unused"}})
    runner._publishing["j"] = 3  # step 3's version (4) is on its way to weight-sync
    assert runner._ensure_version("j", spec, 4) == ["replica"]
    assert clients.steps == [("j", 3, False)] and pool.loads == 2
    pool.loads = 0
    with pytest.raises(NotFound):  # nothing in flight any more: a real NOT_FOUND
        runner._ensure_version("j", spec, 4)
