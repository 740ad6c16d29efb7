"""RolloutCore over the real PyTorch engine: streams, Abort, status, metrics, load checks."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from rlfleet.common.errors import FailedPrecondition, InvalidArgument
from rlfleet.rollout.config import RolloutConfig
from rlfleet.rollout.core import RolloutCore
from rlfleet.rollout.engine import Sampling, SeqRequest
from rlfleet.rollout.torch_engine import TorchEngine


@pytest.fixture
def core(tiny_model_dir):
    engine = TorchEngine(device="cpu", dtype="float32")
    engine.load_model(str(tiny_model_dir))
    core = RolloutCore(engine, replica_id="r0", address="127.0.0.1:1")
    yield core
    core.close()


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_generate_streams_every_sequence_and_counts_metrics(core):
    tokens_before = metric("rlfleet_rollout_tokens_generated_total")
    length_before = metric("rlfleet_rollout_sequences_finished_total", reason="length")
    prefix = dict(prefix_token_ids=[7, 8], prefix_logprobs=[-1.0, -1.0], prefix_versions=[0, 0])
    seqs = [SeqRequest("a", [5, 6]), SeqRequest("b", [9], **prefix)]
    results = list(core.generate(seqs, Sampling(max_new_tokens=6, temperature=0)))
    assert sorted(r.seq_id for r in results) == ["a", "b"]
    assert all(r.finished and len(r.token_ids) == 6 for r in results)
    # "b" resumed with 2 prefix tokens: only 4 + 6 tokens were sampled now.
    assert metric("rlfleet_rollout_tokens_generated_total") - tokens_before == 10
    assert metric("rlfleet_rollout_sequences_finished_total", reason="length") - length_before == 2
    assert core.running_sequences == 0
    assert metric("rlfleet_rollout_running_sequences") == 0


def test_abort_ends_every_stream_and_counts_the_partials(core):
    # The tiny model's greedy output never reaches EOS, so nothing ends before the abort.
    sampling = Sampling(max_new_tokens=500, temperature=0)
    first = core.generate([SeqRequest("a", [5, 6]), SeqRequest("b", [7])], sampling)
    second = core.generate([SeqRequest("c", [9, 10, 11])], sampling)
    assert core.status().running_sequences == 3
    assert core.abort() == 3
    results = list(first) + list(second)
    assert sorted(r.seq_id for r in results) == ["a", "b", "c"]
    assert all(not r.finished and r.finish_reason == "aborted" for r in results)
    assert core.status().running_sequences == 0
    assert core.abort() == 0  # nothing left in flight


def test_cancelled_stream_stops_its_sequences(core):
    stream = core.generate([SeqRequest("a", [5])], Sampling(max_new_tokens=500, temperature=0))
    stream.cancel()
    (result,) = list(stream)
    assert result.finish_reason == "aborted"


def test_status_describes_the_replica(core, tiny_model_dir):
    s = core.status()
    assert (s.replica_id, s.engine, s.version, s.job_id) == ("r0", "torch", 0, "")
    assert s.model_path == str(tiny_model_dir)


def test_generate_is_refused_before_a_model_and_with_bad_input():
    core = RolloutCore(TorchEngine(device="cpu", dtype="float32"), replica_id="r1")
    try:
        with pytest.raises(FailedPrecondition, match="LoadVersion"):
            core.generate([SeqRequest("a", [1])], Sampling(max_new_tokens=2))
        with pytest.raises(FailedPrecondition, match="model_path"):
            core.load_version(job_id="j", version=1, weightsync_address="127.0.0.1:1")
    finally:
        core.close()


def test_invalid_input_is_refused_before_streaming(core):
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        core.generate([SeqRequest("a", [1])], Sampling(max_new_tokens=0))
    assert core.running_sequences == 0


def test_load_version_checks_its_arguments(core):
    with pytest.raises(InvalidArgument, match="job_id"):
        core.load_version(job_id="", version=1)
    with pytest.raises(InvalidArgument, match="version"):
        core.load_version(job_id="j", version=-1, weightsync_address="127.0.0.1:1")
    with pytest.raises(FailedPrecondition, match="weight-sync address"):
        core.load_version(job_id="j", version=1)
    with pytest.raises(InvalidArgument, match="config.json"):
        core.load_version(
            job_id="j", version=1, model_path="/nonexistent", weightsync_address="127.0.0.1:1"
        )


def test_config_reads_flags_and_environment(monkeypatch):
    from rlfleet.common.config import load_config

    monkeypatch.setenv("RLFLEET_ROLLOUT_DEVICE", "cpu")
    cfg = load_config(RolloutConfig, ["--max-batch-seqs", "8", "--dtype", "float32"])
    assert (cfg.device, cfg.max_batch_seqs, cfg.dtype, cfg.engine) == ("cpu", 8, "float32", "torch")
    with pytest.raises(SystemExit, match="engine"):
        load_config(RolloutConfig, ["--engine", "nope"])


def test_a_version_of_another_job_drops_the_kept_kv_cache(core, monkeypatch):
    """Kept KV rows are matched by seq_id; another job's sequences reuse those ids.
    (Weight-sync is stubbed out here: this checks the core's bookkeeping only.)"""
    dropped: list[str] = []
    monkeypatch.setattr(core.engine, "drop_kept_kv", lambda: dropped.append(core.job_id))
    monkeypatch.setattr(core, "_pull_and_swap", lambda address, job_id, version: version)
    monkeypatch.setattr(core, "_report_held", lambda *args: None)
    for job, version in (("a", 1), ("a", 2), ("b", 1), ("b", 2)):
        core.load_version(job_id=job, version=version, weightsync_address="127.0.0.1:1")
    assert dropped == ["", "a"]  # on the first job, then on the switch from a to b
