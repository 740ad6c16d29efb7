"""The simulated engine in real replica processes (``python -m rlfleet.rollout
--engine sim``): C3PO++ iterations over gRPC across processes, with Abort handing
back partials and carried rollouts resumed from their prefix on another process."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from rlfleet.common.jobspec import TaskSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.c3po.driver import C3poSettings, IterationDriver
from rlfleet.scheduler.c3po.grpc_backend import GrpcBackend
from rlfleet.scheduler.c3po.pool import InferencePool
from rlfleet.scheduler.c3po.strategy import PromptGroupSource, group_samples
from rlfleet.scheduler.discovery import StaticDiscovery
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.scheduler.samples import load_codec
from rlfleet.v1 import rollout_pb2

pytestmark = pytest.mark.slow

ENV = {
    "OMP_NUM_THREADS": "1",
    "RLFLEET_ROLLOUT_SIM_TIME_SCALE": "0.02",
    "RLFLEET_ROLLOUT_SIM_LENGTH_SCALE": "0.004",
    "RLFLEET_ROLLOUT_SIM_SEED": "3",
}


@pytest.fixture
def sim_model_dir(tmp_path):
    from rlfleet.common.tinymodel import train_tokenizer

    corpus = [f"What is {a} + {b}? Answer: {a + b}" for a in range(30) for b in range(30)]
    tok = train_tokenizer(corpus, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(
        json.dumps({"vocab_size": tok.get_vocab_size(), "eos_token_id": tok.token_to_id("</s>")})
    )
    return tmp_path


def test_c3po_over_sim_replica_processes(service_factory, redis_url, sim_model_dir):
    args = ["--redis-url", redis_url, "--engine", "sim", "--model-path", str(sim_model_dir)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(
            pool.map(
                lambda i: service_factory(
                    f"sim-{i}", "rlfleet.rollout", [*args, "--replica-id", f"sim-{i}"], env=ENV
                ),
                range(2),
            )
        )
    replicas = ReplicaPool(StaticDiscovery([p.address for p in procs]))
    try:
        healthy = replicas.refresh()
        assert [r.engine for r in healthy] == ["sim", "sim"]
        codec = load_codec(str(sim_model_dir))
        task = TaskSpec(name="basic_arithmetic", size=100)
        driver = IterationDriver(
            InferencePool(),
            PromptGroupSource(PromptSource(task), codec, group_size=4),
            C3poSettings(token_budget=600, pool_capacity=32, retention_limit=3, group_size=4),
        )
        released = []
        for step in range(3):
            backend = GrpcBackend(
                replicas,
                job_id="",  # replicas started with --model-path hold version 0 of no job
                version=0,
                sampling=rollout_pb2.SamplingParams(max_new_tokens=300, seed=step),
            )
            report = driver.run_c3po(backend, step=step)
            assert report.budget_used >= 600 and backend.in_flight == 0
            assert report.aborted == report.carried > 0
            if step:
                assert report.resumed > 0
            released += group_samples(report.released, codec, job_id="j", step=step)
        resumed = [s for s in released if s.retention > 0]
        assert resumed, "no carried rollout was finished and released"
        for s in released:
            assert len(s.completion_token_ids) == len(s.inference_logprobs)
            assert set(s.token_versions) == {0}
            assert s.finish_reason in ("stop", "length")
    finally:
        replicas.close()
