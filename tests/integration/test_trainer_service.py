"""The trainer against a real Redis buffer and the real weight-sync process.

The core is driven in-process (fast), the whole service once as its own
process over gRPC. Samples carry inference log-probs taken from a forward pass
of the same tiny model plus noise, with a few tokens pushed far off so IcePop
has something to mask.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
import torch
from rlfleet.common.buffer import setup_buffer
from rlfleet.common.errors import FailedPrecondition, InvalidArgument, NotFound
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.procs import redis_url_of, start_redis
from rlfleet.common.weights import assemble, decode_state_dict
from rlfleet.trainer.core import TrainerCore
from rlfleet.trainer.publish import NoPublisher, setup_publisher
from rlfleet.trainer.state import TrainerStore
from rlfleet.v1 import trainer_pb2, trainer_pb2_grpc, weightsync_pb2, weightsync_pb2_grpc
from rlfleet.v1.common_pb2 import Sample

pytestmark = pytest.mark.slow

PROMPTS = ["3 + 4 = ? Answer:", "12 - 5 = ? Answer:"]
GROUP_SIZE = 3


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by everyone
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rollout_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def make_samples(model, model_dir: Path, *, job_id: str, step: int, seed: int) -> list[Sample]:
    """Two GRPO groups of three, completions of 5, 3 and 0 tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    out = []
    for g, text in enumerate(PROMPTS):
        prompt = tok.encode(text).ids
        for m in range(GROUP_SIZE):
            n = [5, 3, 0][m]
            completion = torch.randint(3, vocab, (n,), generator=gen).tolist()
            logps: list[float] = []
            if n:
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
                scored = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
                exact = scored.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
                noisy = exact + 0.02 * torch.randn(n, generator=gen)
                if m == 0:
                    noisy[0] = exact[0] - 3.0  # k = e^3 > β: IcePop masks it
                logps = noisy.clamp(max=0.0).tolist()
            gid = f"s{step}g{g}"
            out.append(
                Sample(
                    job_id=job_id,
                    sample_id=f"{gid}-{m}",
                    group_id=gid,
                    step=step,
                    prompt_token_ids=prompt,
                    completion_token_ids=completion,
                    inference_logprobs=logps,
                    token_versions=[step] * n,
                    reward=[1.0, 0.0, 0.5][m] if g == 0 else [0.0, 1.0, 1.0][m],
                    finish_reason="length",
                )
            )
    return out


def _spec(model_dir: Path, **over) -> JobSpec:
    raw = {
        "model": {"path": str(model_dir)},
        "sampling": {"temperature": 1.0, "max_new_tokens": 5},
        "algorithm": {"group_size": GROUP_SIZE, "prompts_per_step": 2, "lr": 1e-3,
                      "micro_batch_size": 4},
        "checkpoint": {"every_steps": 1, "keep": 2},
        "steps": 2,
    }  # fmt: skip
    raw.update(over)
    return JobSpec.model_validate(raw)


@pytest.fixture
def weightsync(service_factory, tmp_path):
    return service_factory(
        "weightsync", "rlfleet.weightsync", ["--spool-dir", str(tmp_path / "spool")]
    )


def _core(redis_url: str, ckpt: Path, ws_address: str = "", **kw) -> TrainerCore:
    publisher = (
        setup_publisher("grpc", address=ws_address, timeout_s=60)
        if ws_address
        else setup_publisher("none")
    )
    return TrainerCore(
        buffer=setup_buffer("redis", redis_url),
        store=TrainerStore.from_url(redis_url),
        publisher=publisher,
        checkpoint_dir=ckpt,
        device=torch.device("cpu"),
        **{"read_timeout_s": 10.0, "reclaim_idle_s": 60.0, **kw},
    )


def _pull(ws_address: str, job_id: str) -> tuple[int, dict[str, torch.Tensor]]:
    with make_channel(ws_address) as ch:
        stub = weightsync_pb2_grpc.WeightSyncServiceStub(ch)
        chunks = stub.PullVersion(weightsync_pb2.PullVersionRequest(job_id=job_id), timeout=30)
        _, version, payload, _ = assemble(chunks)
    return version, decode_state_dict(payload)


def test_train_steps_publish_checkpoint_and_acknowledge(
    redis_url, tiny_model_dir, rollout_model, weightsync, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = "job-t1"
    ckpt = tmp_path / "ckpt"
    core = _core(redis_url, ckpt, weightsync.address)
    buffer = setup_buffer("redis", redis_url)
    assert core.init_job(job, _spec(tiny_model_dir)) == (0, False)
    version, weights = _pull(weightsync.address, job)
    base = {k: v.clone() for k, v in core.jobs[job].model.state_dict().items()}
    assert version == 0 and torch.equal(weights["lm_head.weight"], base["lm_head.weight"])

    samples = make_samples(rollout_model, tiny_model_dir, job_id=job, step=0, seed=0)
    assert buffer.append(job, samples) == 6
    result = core.train_step(job, 0, 6)
    assert result.version == 1 and result.samples_trained == 6
    m = result.metrics
    assert m["masked_above_beta"] == pytest.approx(2 / 16)  # one spiked token per group
    assert m["masked_below_alpha"] == 0.0
    assert m["masked_entropy"] > 0.0 and m["grad_norm"] > 0.0
    assert m["reward_mean"] == pytest.approx(3.5 / 6)
    assert m["response_length_mean"] == pytest.approx(16 / 6)
    assert 0.0 < m["max_abs_dp"] < 1.0 and m["k_mean"] > 1.0
    for key in ("loss", "train_infer_kl_k1", "train_infer_kl_k3", "clip_fraction"):
        assert key in m

    # the entries are acknowledged, the new weights published and different
    assert buffer.length(job) == 0 and buffer.pending(job) == 0
    version, weights = _pull(weightsync.address, job)
    now = core.jobs[job].model.state_dict()
    assert version == 1
    assert not torch.equal(
        now["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    for name, tensor in now.items():
        assert torch.equal(weights[name], tensor), name

    # a repeated TrainStep returns the stored result and trains nothing
    again = core.train_step(job, 0, 6)
    assert again == result
    assert torch.equal(core.jobs[job].model.state_dict()["lm_head.weight"], now["lm_head.weight"])

    # every_steps = 1: a Hugging Face checkpoint per step, loadable by transformers,
    # written off the step's critical path (the job's last step waits for its own)
    assert result.checkpoint_path == str(ckpt / job / "step-0")
    core.jobs[job].wait_checkpoint()
    loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint_path)
    assert torch.equal(loaded.state_dict()["lm_head.weight"], now["lm_head.weight"])
    assert AutoTokenizer.from_pretrained(result.checkpoint_path).encode("3 + 4")

    # steps out of order are refused; the next one trains
    with pytest.raises(FailedPrecondition):
        core.train_step(job, 5, 6)
    buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=1, seed=1))
    assert core.train_step(job, 1, 6).version == 2
    assert core.status(job) == (2, 1)
    core.close()

    # a restarted trainer: stored results answer at once; InitJob resumes the checkpoint
    restarted = _core(redis_url, ckpt, weightsync.address)
    assert restarted.train_step(job, 1, 6).version == 2
    assert restarted.init_job(job, _spec(tiny_model_dir)) == (2, True)
    resumed = restarted.jobs[job].model.state_dict()
    assert torch.equal(
        resumed["lm_head.weight"], core.jobs[job].model.state_dict()["lm_head.weight"]
    )
    assert sorted(p.name for p in (ckpt / job).iterdir()) == ["step-0", "step-1"]
    restarted.close()

    # a TrainStep for a job the process has not seen reloads its spec from Redis
    # and resumes from the newest checkpoint before training
    buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=2, seed=5))
    again_restarted = _core(redis_url, ckpt, weightsync.address)
    assert again_restarted.train_step(job, 2, 6).version == 3
    assert _pull(weightsync.address, job)[0] == 3
    again_restarted.jobs[job].wait_checkpoint()
    assert sorted(p.name for p in (ckpt / job).iterdir()) == ["step-1", "step-2"]  # keep = 2
    again_restarted.close()


def test_redis_lost_while_a_step_is_stored_the_repeat_trains_nothing_again(
    tiny_model_dir, rollout_model, tmp_path
):
    """Redis killed (-9) after the optimizer step and the publish, before the result is
    stored: the call fails (the servicer answers UNAVAILABLE, tests/unit/common/
    test_grpc_errors.py), and the scheduler's repeat once Redis is back stores and
    acknowledges the same step, with the same weights, without training it again."""
    job = "job-t5"
    run = tmp_path / "redis-run"
    redis_proc = start_redis(run)  # append-only: the stream and its pending list survive
    port, url = redis_proc.port, redis_url_of(redis_proc)
    published: list[tuple[int, dict[str, torch.Tensor]]] = []

    class CrashRedisAfterFirstStep(NoPublisher):
        def publish(self, *, job_id: str, version: int, payload) -> str:
            weights = decode_state_dict(bytes(payload))
            published.append((version, weights))
            if len(published) == 2:  # version 0 at InitJob, then step 0's version 1
                redis_proc.kill()
            return ""

    core = TrainerCore(
        buffer=setup_buffer("redis", url),
        store=TrainerStore.from_url(url),
        publisher=CrashRedisAfterFirstStep(),
        checkpoint_dir=tmp_path / "ckpt",
        device=torch.device("cpu"),
        read_timeout_s=10.0,
        reclaim_idle_s=60.0,
    )
    try:
        core.init_job(job, _spec(tiny_model_dir, checkpoint={"every_steps": 0}))
        buffer = setup_buffer("redis", url)
        buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=0, seed=7))
        with pytest.raises(redis.ConnectionError):
            core.train_step(job, 0, 6)
        redis_proc = start_redis(run, port=port)  # back, from its append-only file
        result = core.train_step(job, 0, 6)
        assert (result.version, result.samples_trained) == (1, 6)
        assert [v for v, _ in published] == [0, 1, 1]  # published again, trained once
        assert all(torch.equal(published[2][1][k], t) for k, t in published[1][1].items())
        assert buffer.length(job) == 0 and buffer.pending(job) == 0
        assert TrainerStore.from_url(url).get_result(job, 0) == result
    finally:
        core.close()
        redis_proc.stop()


def test_samples_come_from_own_pending_and_dead_consumers(
    redis_url, tiny_model_dir, rollout_model, tmp_path
):
    job = "job-t2"
    core = _core(redis_url, tmp_path / "ckpt", reclaim_idle_s=0.0)
    buffer = setup_buffer("redis", redis_url)
    core.init_job(job, _spec(tiny_model_dir, checkpoint={"every_steps": 0}, steps=5))
    buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=0, seed=2))
    # a trainer that died holding 4 entries, and 2 delivered to us before our restart
    assert len(buffer.read(job, "trainer-dead", count=4)) == 4
    assert len(buffer.read(job, "trainer-0", count=2)) == 2
    result = core.train_step(job, 0, 6)
    assert result.samples_trained == 6
    assert buffer.length(job) == 0 and buffer.pending(job) == 0


def test_bad_samples_and_missing_samples_are_refused(
    redis_url, tiny_model_dir, rollout_model, tmp_path
):
    job = "job-t3"
    core = _core(redis_url, tmp_path / "ckpt", read_timeout_s=0.5)
    buffer = setup_buffer("redis", redis_url)
    with pytest.raises(NotFound):
        core.train_step(job, 0, 6)
    with pytest.raises(InvalidArgument, match="job_id"):
        core.train_step("../etc", 0, 6)
    core.init_job(job, _spec(tiny_model_dir, checkpoint={"every_steps": 0}, steps=5))
    with pytest.raises(FailedPrecondition, match="0 of 6 samples"):
        core.train_step(job, 0, 6)
    samples = make_samples(rollout_model, tiny_model_dir, job_id=job, step=0, seed=3)
    del samples[0].inference_logprobs[-1]
    buffer.append(job, samples)
    with pytest.raises(InvalidArgument, match="inference_logprobs"):
        core.train_step(job, 0, 6)
    assert core.status(job) == (0, -1)  # nothing was trained
    assert buffer.pending(job) == 6  # and nothing acknowledged


def _grpc_code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert "Traceback" not in (info.value.details() or "")
    return info.value.code()


def test_trainer_process_over_grpc(
    service_factory, weightsync, redis_url, tiny_model_dir, rollout_model, tmp_path
):
    trainer = service_factory(
        "trainer",
        "rlfleet.trainer",
        [
            "--redis-url", redis_url,
            "--weightsync-address", weightsync.address,
            "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--torch-threads", "1",
            "--log-format", "text",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    job = "job-t4"
    spec_json = _spec(tiny_model_dir, steps=1).model_dump_json()
    with make_channel(trainer.address) as ch:
        stub = trainer_pb2_grpc.TrainerServiceStub(ch)
        bad = json.dumps({"model": {"path": str(tiny_model_dir)}, "steps": 0})
        req = trainer_pb2.InitJobRequest(job_id=job, spec_json=bad)
        assert _grpc_code(lambda: stub.InitJob(req, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
        missing = trainer_pb2.InitJobRequest(job_id=job, spec_json='{"model": {"path": "/nope"}}')
        assert (
            _grpc_code(lambda: stub.InitJob(missing, timeout=30))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        status = trainer_pb2.TrainerStatusRequest(job_id=job)
        assert _grpc_code(lambda: stub.GetStatus(status, timeout=30)) == grpc.StatusCode.NOT_FOUND

        init = stub.InitJob(
            trainer_pb2.InitJobRequest(job_id=job, spec_json=spec_json), timeout=120
        )
        assert init.version == 0 and not init.resumed
        setup_buffer("redis", redis_url).append(
            job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=0, seed=4)
        )
        step = trainer_pb2.TrainStepRequest(job_id=job, step=0, num_samples=6)
        reply = stub.TrainStep(step, timeout=300)
        assert reply.version == 1 and reply.samples_trained == 6
        assert reply.checkpoint_path.endswith("step-0")  # the final step (steps = 1)
        assert reply.metrics["masked_fraction"] > 0.0
        assert stub.TrainStep(step, timeout=60) == reply
        assert stub.GetStatus(status, timeout=30).version == 1

    with make_channel(weightsync.address) as ch:
        ws = weightsync_pb2_grpc.WeightSyncServiceStub(ch)
        assert ws.GetCurrent(weightsync_pb2.GetCurrentRequest(job_id=job), timeout=30).version == 1
    assert redis.Redis.from_url(redis_url).xlen(f"rlfleet:exp:{job}") == 0
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{trainer.info['metrics_port']}/metrics")
    text = scrape.read().decode()
    assert f'rlfleet_trainer_masked_fraction{{job_id="{job}"}}' in text
    assert f'rlfleet_trainer_samples_trained_total{{job_id="{job}"}} 6.0' in text


def test_a_step_survives_weightsync_being_down(
    service_factory, redis_url, tiny_model_dir, rollout_model, tmp_path
):
    from rlfleet.common.errors import Unavailable
    from rlfleet.common.procs import free_port

    port = free_port()
    args = ["--spool-dir", str(tmp_path / "spool"), "--port", str(port)]
    ws = service_factory("weightsync", "rlfleet.weightsync", args)
    job = "job-t5"
    core = _core(redis_url, tmp_path / "ckpt", ws.address)
    core.publisher.timeout_s, core.publisher.deadline_s = 1.0, 2.0
    buffer = setup_buffer("redis", redis_url)
    core.init_job(job, _spec(tiny_model_dir, checkpoint={"every_steps": 0}, steps=5))
    buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=0, seed=6))
    ws.stop()

    with pytest.raises(Unavailable):
        core.train_step(job, 0, 6)
    # trained but not published: nothing acknowledged, no later step accepted
    assert buffer.pending(job) == 6
    with pytest.raises(FailedPrecondition, match="not yet published"):
        core.train_step(job, 1, 6)

    trained = core.jobs[job].model.state_dict()["lm_head.weight"].clone()
    ws = service_factory("weightsync-again", "rlfleet.weightsync", args)
    core.publisher.timeout_s, core.publisher.deadline_s = 10.0, 60.0
    result = core.train_step(job, 0, 6)  # the retry publishes; it does not train again
    assert result.version == 1
    assert torch.equal(core.jobs[job].model.state_dict()["lm_head.weight"], trained)
    assert _pull(ws.address, job)[0] == 1
    assert buffer.length(job) == 0 and buffer.pending(job) == 0
    core.close()

    # a restart with no checkpoint yet (every_steps = 0): the stored step's
    # weights come back from weight-sync, so the job goes on at version 1
    restarted = _core(redis_url, tmp_path / "ckpt", ws.address)
    spec = _spec(tiny_model_dir, checkpoint={"every_steps": 0}, steps=5)
    assert restarted.init_job(job, spec) == (1, True)
    assert torch.equal(restarted.jobs[job].model.state_dict()["lm_head.weight"], trained)
    restarted.close()


class GatedPublisher(NoPublisher):
    """Weight-sync stand-in that holds each push until ``gate`` opens: a push in flight
    for as long as a test needs. ``dead``: the push fails when let through (the process
    that made it is gone). Keeps what it got, for ``fetch``."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.dead = False
        self.dies_after_push = False  # weight-sync gets the version, the trainer dies then
        self.published: dict[int, bytes] = {}

    def publish(self, *, job_id: str, version: int, payload) -> str:
        assert self.gate.wait(120), "the test never opened the gate"
        if self.dead:
            raise ConnectionError("the trainer that made this push is gone")
        held = self.published.get(version)
        if held is not None and held != bytes(payload):  # as weight-sync refuses it
            raise FailedPrecondition(f"version {version} is already held with another payload")
        self.published[version] = bytes(payload)
        if self.dies_after_push:
            raise ConnectionError("the trainer died once weight-sync held the version")
        return ""

    def fetch(self, *, job_id: str, version: int):
        raw = self.published.get(version)
        return decode_state_dict(raw) if raw is not None else None


def _core_over(redis_url: str, store: TrainerStore, tmp_path, publisher) -> TrainerCore:
    """A trainer on the CPU over the test's Redis, pushing to ``publisher``."""
    return TrainerCore(buffer=setup_buffer("redis", redis_url), store=store,
                       publisher=publisher, checkpoint_dir=tmp_path / "ckpt",
                       device=torch.device("cpu"), read_timeout_s=10.0)  # fmt: skip


def _taken(replica, job: str, version: int, timeout: float = 30.0):
    """The version the replica's receiving thread has verified (it may still be checking
    the checksum when the trainer's broadcast returns)."""
    end = time.monotonic() + timeout
    while (got := replica.take(job, version)) is None and time.monotonic() < end:
        time.sleep(0.01)
    return got


def test_a_broadcast_version_reaches_weightsync_in_the_background_and_a_crash_retrains_it(
    redis_url, tiny_model_dir, rollout_model, tmp_path
):
    """``publish_in_background``: once the version is broadcast to the weight group the
    step returns; weight-sync gets it on a thread of its own, and only then are the
    result stored and the entries acknowledged (the next TrainStep waits for that). A
    trainer that dies before the push completes leaves a "settling" mark: its successor
    trains that step again from exactly the same entries and publishes it."""
    from rlfleet.common.weight_group import WeightReceiver

    job = "job-bg"
    publisher = GatedPublisher()
    store, buffer = TrainerStore.from_url(redis_url), setup_buffer("redis", redis_url)

    core_with = functools.partial(_core_over, redis_url, store, tmp_path)

    spec = _spec(tiny_model_dir, checkpoint={"every_steps": 0}, steps=5,
                 weights={"transport": "collective", "group_timeout_s": 60})  # fmt: skip
    core = core_with(publisher)
    core.init_job(job, spec)
    # On the CPU the group is gloo; nccl is refused with a sentence; world size 0 closes it.
    with pytest.raises(FailedPrecondition, match="trains on cpu; an nccl weight group needs"):
        core.open_weight_group(job, 2, "nccl")
    assert core.open_weight_group(job, 0) is None and core.jobs[job]._sender is None
    address = core.open_weight_group(job, 2)
    assert address.backend == "gloo"
    replica = WeightReceiver(address, 1, job_id=job, alloc=bytearray, release=lambda _: None)
    try:
        buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=0, seed=8))
        publisher.gate.clear()  # weight-sync does not get version 1 until the gate opens
        result = core.train_step(job, 0, 6, background=True)
        assert result.metrics["weights_broadcast"] == 1.0
        assert result.metrics["weights_published_in_background"] == 1.0
        received = _taken(replica, job, 1)
        assert received is not None, "the replica does not hold the broadcast version"
        # Returned, with version 1 on its way: nothing stored, nothing acknowledged.
        assert 1 not in publisher.published and store.get_result(job, 0) is None
        assert store.get_settling(job).entry_ids == result.entry_ids
        assert buffer.pending(job) == 6
        publisher.gate.set()
        core.jobs[job].wait_published()
        assert publisher.published[1] == bytes(received.payload)
        assert store.get_result(job, 0) == result and store.get_settling(job) is None
        assert buffer.pending(job) == 0 and buffer.length(job) == 0

        # Step 1 is broadcast, then the trainer dies before weight-sync has version 2.
        buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=1, seed=9))
        publisher.gate.clear()
        lost = core.train_step(job, 1, 6, background=True)
        assert _taken(replica, job, 2) is not None
        publisher.dead = True
        publisher.gate.set()
        with pytest.raises(ConnectionError):
            core.jobs[job].wait_published()
    finally:
        replica.close()
    # The scheduler goes on: step 2's samples arrive, and TrainStep(2) reaches a restarted
    # trainer, which finds step 1 settling and trains it again from the same entries.
    buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=2, seed=10))
    fresh = GatedPublisher()
    fresh.published = {v: p for v, p in publisher.published.items()}  # weight-sync's versions
    restarted = core_with(fresh)
    assert restarted.train_step(job, 2, 6).version == 3
    again = store.get_result(job, 1)
    assert again is not None and again.entry_ids == lost.entry_ids and again.version == 2
    assert sorted(fresh.published) == [0, 1, 2, 3]
    assert store.get_settling(job) is None
    assert buffer.pending(job) == 0 and buffer.length(job) == 0
    restarted.close()


def test_a_version_weightsync_got_before_the_trainer_died_is_taken_back_not_retrained(
    redis_url, tiny_model_dir, rollout_model, tmp_path
):
    """The trainer dies after weight-sync holds version 2 and before step 1's result is
    stored (no checkpoint since the start). Its successor must not train step 1 again:
    with the base model's AdamW moments it would make another version 2, which
    weight-sync refuses, and the job could never go on. It takes version 2 back, stores
    step 1's result with the entries the first trainer took, and step 2 follows."""
    job = "job-held"
    publisher = GatedPublisher()
    store, buffer = TrainerStore.from_url(redis_url), setup_buffer("redis", redis_url)

    core_with = functools.partial(_core_over, redis_url, store, tmp_path)

    core = core_with(publisher)
    core.init_job(job, _spec(tiny_model_dir, checkpoint={"every_steps": 0}, steps=5))
    buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=0, seed=8))
    assert core.train_step(job, 0, 6).version == 1
    buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=1, seed=9))
    publisher.dies_after_push = True
    with pytest.raises(ConnectionError):
        core.train_step(job, 1, 6)
    taken = store.get_settling(job)
    assert taken is not None and taken.step == 1 and store.get_result(job, 1) is None
    held = publisher.published[2]

    fresh = GatedPublisher()
    fresh.published = dict(publisher.published)  # weight-sync's versions
    restarted = core_with(fresh)
    again = restarted.train_step(job, 1, 6)  # the scheduler repeats the step that failed
    assert again.version == 2 and again.entry_ids == taken.entry_ids
    assert store.get_result(job, 1).entry_ids == taken.entry_ids
    assert fresh.published[2] == held and store.get_settling(job) is None
    assert buffer.pending(job) == 0
    served = decode_state_dict(held)
    trainer_state = restarted.jobs[job].model.state_dict()
    for name, tensor in served.items():
        assert torch.equal(trainer_state[name], tensor), name  # version 2 is the one held
    buffer.append(job, make_samples(rollout_model, tiny_model_dir, job_id=job, step=2, seed=10))
    assert restarted.train_step(job, 2, 6).version == 3
    assert sorted(fresh.published) == [0, 1, 2, 3] and buffer.pending(job) == 0
    restarted.close()
