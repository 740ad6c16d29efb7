"""C3PO++ over real gRPC: replicas are ``RolloutCore`` + ``RolloutServicer`` with the
simulated engine, each its own in-process server; reward and trainer are the
scripted servers of ``scheduler_fakes``.

LoadVersion is answered locally (the simulated engine ignores weights, and these
tests run no weight-sync); Generate and Abort are the real rollout code paths.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from rlfleet.common.config import ServiceConfig
from rlfleet.common.grpc_server import start_server
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.rollout.core import RolloutCore
from rlfleet.rollout.servicer import SERVICE_NAME, RolloutServicer
from rlfleet.rollout.sim_engine import SimEngine, SimEngineSettings
from rlfleet.scheduler.c3po.driver import C3poSettings, IterationDriver
from rlfleet.scheduler.c3po.grpc_backend import GrpcBackend
from rlfleet.scheduler.c3po.pool import InferencePool
from rlfleet.scheduler.c3po.store import C3poStore
from rlfleet.scheduler.c3po.strategy import C3poStrategy, PromptGroupSource, group_samples
from rlfleet.scheduler.discovery import StaticDiscovery
from rlfleet.scheduler.jobs import JobState
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.scheduler.samples import load_codec
from rlfleet.scheduler.strategy import StepContext, sampling_params
from rlfleet.v1 import rollout_pb2, rollout_pb2_grpc
from scheduler_fakes import ScriptedFleet, write_tokenizer_model

# 1 simulated second = 20 ms: a token every ~0.6 ms of wall time, slow enough that
# an Abort lands while most sequences are still running.
SIM = SimEngineSettings(time_scale=0.02, length_scale=0.004, seed=5)


class LocalLoadServicer(RolloutServicer):
    """Real Generate/Abort; LoadVersion just records the version (no weight-sync here)."""

    def __init__(self, core: RolloutCore):
        super().__init__(core)
        self.generates = 0

    def Generate(self, request, context):  # noqa: N802
        self.generates += 1
        yield from super().Generate(request, context)

    def LoadVersion(self, request, context):  # noqa: N802
        self.core.engine.load_state_dict({}, request.version)
        self.core.job_id = request.job_id
        return rollout_pb2.LoadVersionResponse(version=request.version)


@pytest.fixture(scope="module")
def sim_model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer

    out = write_tokenizer_model(tmp_path_factory.mktemp("sim-model"))
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture
def sim_replicas(sim_model_dir):
    servers, servicers = [], []
    for i in range(3):
        engine = SimEngine(settings=SIM)
        engine.load_model(str(sim_model_dir))
        servicer = LocalLoadServicer(RolloutCore(engine, replica_id=f"sim-{i}"))
        server = start_server(
            ServiceConfig(host="127.0.0.1", port=0),
            lambda s, sv=servicer: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(sv, s),
            service_names=[SERVICE_NAME],
            max_workers=32,
            metrics=False,
        )
        servers.append(server)
        servicers.append(servicer)
    yield servers, servicers
    for server, servicer in zip(servers, servicers, strict=True):
        server.server.stop(0).wait()
        servicer.core.close()


@pytest.fixture
def replica_pool(sim_replicas, sim_model_dir):
    servers, _ = sim_replicas
    pool = ReplicaPool(StaticDiscovery([s.address for s in servers]), status_timeout_s=5.0)
    pool.refresh()
    yield pool
    pool.close()


def _spec(model_dir: Path, **scheduling) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"path": str(model_dir)},
            "task": {"name": "basic_arithmetic", "size": 200},
            "sampling": {"max_new_tokens": 400},
            "algorithm": {"group_size": 4, "prompts_per_step": 6},
            "scheduling": {"mode": "c3po", **scheduling},
            "steps": 3,
        }
    )


@pytest.mark.slow
def test_iterations_abort_and_resume_across_versions(replica_pool, sim_model_dir):
    spec = _spec(sim_model_dir, token_budget=1500, pool_capacity=48, retention_limit=3)
    codec = load_codec(str(sim_model_dir))
    pool = InferencePool()
    source = PromptGroupSource(PromptSource(spec.task), codec, group_size=4)
    driver = IterationDriver(pool, source, C3poSettings.from_spec(spec))
    seen: set[str] = set()
    multi = 0
    for step in range(4):
        replica_pool.ensure_version(job_id="j", version=step, model_path=str(sim_model_dir))
        backend = GrpcBackend(
            replica_pool, job_id="j", version=step, sampling=sampling_params(spec, step)
        )
        before = {m.seq_id: (list(m.token_ids), m.spans) for g in pool for m in g.unfinished()}
        home = {m.seq_id: m.replica for g in pool for m in g.unfinished()}
        report = driver.run_c3po(backend, step=step)
        assert backend.in_flight == 0
        assert report.budget_used >= 1500 and report.released
        assert report.aborted == report.carried == pool.unfinished
        for sample in group_samples(report.released, codec, job_id="j", step=step):
            assert sample.sample_id not in seen
            seen.add(sample.sample_id)
            versions = list(sample.token_versions)
            assert versions == sorted(versions) and versions[-1] <= step
            assert (
                len(versions) == len(sample.completion_token_ids) == len(sample.inference_logprobs)
            )
            multi += versions[0] != versions[-1]
        # Every carried rollout kept its prefix: tokens and versions only grew.
        for g in [*pool, *report.released]:
            for m in g.members:
                if m.seq_id in before:
                    # Resumed on the replica that generated it (it may keep its KV cache).
                    assert m.replica and m.replica == home[m.seq_id]
                    tokens, spans = before[m.seq_id]
                    assert m.token_ids[: len(tokens)] == tokens
                    assert m.versions[: len(tokens)] == [v for v, n in spans for _ in range(n)]
    assert multi > 0  # some trained sequences crossed a version boundary


def test_redone_step_trains_the_groups_the_first_attempt_released(
    redis_url, replica_pool, sim_replicas, sim_model_dir
):
    import redis

    spec = _spec(sim_model_dir, token_budget=800, pool_capacity=24)
    replica_pool.ensure_version(job_id="j", version=0, model_path=str(sim_model_dir))
    store = C3poStore(redis.Redis.from_url(redis_url))
    codec = load_codec(str(sim_model_dir))

    def ctx():
        return StepContext("j", spec, 0, 0, codec, PromptSource(spec.task), threading.Event())

    first = C3poStrategy(replica_pool, store=store).rollout(ctx())
    generates = sum(s.generates for s in sim_replicas[1])
    # A scheduler restarted before step 0 was recorded redoes it: same samples, no generation.
    again = C3poStrategy(replica_pool, store=store).rollout(ctx())
    assert [s.SerializeToString() for s in again.samples] == [
        s.SerializeToString() for s in first.samples
    ]
    assert sum(s.generates for s in sim_replicas[1]) == generates
    assert first.metrics["c3po_budget_used"] >= 800
    assert first.metrics["c3po_sequences_carried"] == store.load("j").pool.unfinished


def test_c3po_job_through_the_scheduler(make_core, sim_replicas, sim_model_dir, redis_url):
    servers, _ = sim_replicas
    scripted = ScriptedFleet(sim_model_dir, replicas=0)
    try:
        core = make_core(
            replica_addresses=[s.address for s in servers],
            reward_address=scripted.reward_address,
            trainer_address=scripted.trainer_address,
        )
        spec = _spec(sim_model_dir, token_budget=1200, pool_capacity=32, retention_limit=1)
        job = core.submit(spec.model_dump_json())
        assert core.run_once()
        job = core.get(job.job_id)
        assert job.state == JobState.SUCCEEDED, job.reason
        assert job.current_step == 3 and job.policy_version == 3

        samples = [s for r in scripted.reward.requests for s in r.samples]
        ids = [s.sample_id for s in samples]
        assert len(ids) == len(set(ids))
        # The trainer was asked for exactly the samples each step released.
        per_step = [sum(1 for s in samples if s.step == k) for k in range(3)]
        assert [n for _, _, n in scripted.trainer.steps] == per_step
        for s in samples:
            assert s.retention <= 1
            assert max(s.token_versions) <= s.step
            assert max(s.token_versions) - min(s.token_versions) <= s.retention
        records = core.steps(job.job_id)
        for record in records:
            m = record.metrics
            assert m["c3po_budget_used"] >= 1200 and m["c3po_budget_tokens"] == 1200
            assert m["tokens_generated"] == m["c3po_budget_used"]
            # σ = 1 carry-over, plus one step for a group deferred from the last stop.
            assert m["version_span"] <= 2 and "replica_idle_seconds_mean" in m
            assert m["c3po_sequences_completed"] > 0 and m["c3po_groups_released"] > 0
        # The job's pool state is dropped once it succeeded.
        assert not core.store.r.exists(f"rlfleet:c3po:{job.job_id}:meta")
    finally:
        scripted.close()


def test_restarted_scheduler_resumes_the_pool(make_core, sim_replicas, sim_model_dir):
    """The scheduler stops after step 1 (the job stays running); a new one, with
    nothing but Redis, finishes the job and trains rollouts carried from before."""
    servers, _ = sim_replicas
    scripted = ScriptedFleet(sim_model_dir, replicas=0)
    try:

        def core():
            return make_core(
                replica_addresses=[s.address for s in servers],
                reward_address=scripted.reward_address,
                trainer_address=scripted.trainer_address,
            )

        first = core()
        spec = _spec(sim_model_dir, token_budget=1200, pool_capacity=32, retention_limit=2)
        job = first.submit(spec.model_dump_json())
        scripted.trainer.block_at_step = 1
        worker = threading.Thread(target=first.run_once)
        worker.start()
        assert scripted.trainer.at_block.wait(60)
        first.stop()  # the step in flight finishes; the loop stops before step 2
        scripted.trainer.release.set()
        worker.join(60)
        assert first.get(job.job_id).state == JobState.RUNNING
        assert first.get(job.job_id).current_step == 2
        carried = C3poStore(first.store.r).load(job.job_id)
        assert carried.step == 1 and carried.pool.unfinished > 0
        carried_ids = {m.seq_id for g in carried.pool for m in g.members}

        second = core()
        assert second.run_once()
        assert second.get(job.job_id).state == JobState.SUCCEEDED
        step2 = [s for r in scripted.reward.requests for s in r.samples if s.step == 2]
        resumed = [s for s in step2 if s.sample_id in carried_ids]
        assert resumed and any(min(s.token_versions) < 2 for s in resumed)
    finally:
        scripted.close()


def test_cancelled_job_drops_its_pool(make_core, sim_replicas, sim_model_dir):
    servers, _ = sim_replicas
    scripted = ScriptedFleet(sim_model_dir, replicas=0)
    try:
        core = make_core(
            replica_addresses=[s.address for s in servers],
            reward_address=scripted.reward_address,
            trainer_address=scripted.trainer_address,
        )
        spec = _spec(sim_model_dir, token_budget=1200, pool_capacity=32)
        job = core.submit(spec.model_dump_json())
        scripted.trainer.block_at_step = 1
        worker = threading.Thread(target=core.run_once)
        worker.start()
        assert scripted.trainer.at_block.wait(60)
        assert core.store.r.exists(f"rlfleet:c3po:{job.job_id}:meta")
        core.cancel(job.job_id)
        scripted.trainer.release.set()
        worker.join(60)
        assert core.get(job.job_id).state == JobState.CANCELLED
        assert not core.store.r.exists(f"rlfleet:c3po:{job.job_id}:meta")
        assert not core.store.r.exists(f"rlfleet:c3po:{job.job_id}:groups")
    finally:
        scripted.close()


def test_overlapped_job_generates_while_training_and_loads_versions_in_flight(
    make_core, sim_replicas, sim_model_dir
):
    """scheduling.overlap: at the budget nothing is aborted; the replicas keep sampling
    while the step trains, take the new version between engine iterations (tokens
    before and after it keep their versions), and nothing is trained twice."""
    servers, servicers = sim_replicas
    scripted = ScriptedFleet(sim_model_dir, replicas=0)
    try:
        core = make_core(
            replica_addresses=[s.address for s in servers],
            reward_address=scripted.reward_address,
            trainer_address=scripted.trainer_address,
        )
        spec = _spec(
            sim_model_dir, token_budget=1200, pool_capacity=32, retention_limit=2, overlap=True
        )
        assert spec.scheduling.max_staleness == 3  # σ + 1 unless set
        job = core.submit(spec.model_dump_json())
        scripted.trainer.block_at_step = 1
        worker = threading.Thread(target=core.run_once)
        worker.start()
        assert scripted.trainer.at_block.wait(60)
        # The step trains; the replicas still have sequences of the pool running.
        assert sum(s.core.running_sequences for s in servicers) > 0
        scripted.trainer.release.set()
        worker.join(120)
        job = core.get(job.job_id)
        assert job.state == JobState.SUCCEEDED, job.reason

        samples = [s for r in scripted.reward.requests for s in r.samples]
        ids = [s.sample_id for s in samples]
        assert len(ids) == len(set(ids))  # nothing trained twice
        crossed = 0
        for s in samples:
            versions = list(s.token_versions)
            assert versions == sorted(versions) and versions[-1] <= s.step
            assert s.step - versions[0] <= 3  # max_staleness
            crossed += versions[0] != versions[-1]
        records = core.steps(job.job_id)
        for record in records:
            m = record.metrics
            # Nothing was aborted and re-dispatched: a sample that spans versions took
            # the new one in flight.
            assert m["c3po_sequences_aborted"] == 0 and m["c3po_sequences_resumed"] == 0
            assert m["c3po_budget_used"] >= 1200
        assert crossed > 0
        # The streams left running at the end of the job were stopped.
        assert sum(s.core.running_sequences for s in servicers) == 0
    finally:
        scripted.close()
