"""Helpers of the fleet tests that check trained samples token by token: a model whose
completions vary in length, a job run with a tap on its experience stream, and every
sample's log-probs recomputed under the versions its tokens record (pulled back from
weight-sync)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import redis
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.weights import assemble, decode_state_dict
from rlfleet.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    weightsync_pb2,
    weightsync_pb2_grpc,
)


def varied_model(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with larger weights and a stronger EOS: lengths from 2 to the limit."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        model.get_input_embeddings().weight[model.config.eos_token_id] *= 6.0
    model.save_pretrained(out, safe_serialization=True)
    return out


class StreamTap:
    """Reads a job's experience stream as reward writes it (XREAD, outside the trainer's
    consumer group), so the test sees every sample before the trainer acknowledges and
    deletes it."""

    def __init__(self, url: str, job_id: str):
        self.r = redis.Redis.from_url(url)
        self.key = f"rlfleet:exp:{job_id}"
        self.samples: list[common_pb2.Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = "0"
        while not self._stop.is_set():
            reply = self.r.xread({self.key: last}, block=200, count=500)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    self.samples.append(common_pb2.Sample.FromString(fields[b"pb"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.r.close()


def pull_version(ws_address: str, job_id: str, version: int) -> dict:
    with make_channel(ws_address) as channel:
        stub = weightsync_pb2_grpc.WeightSyncServiceStub(channel)
        chunks = stub.PullVersion(
            weightsync_pb2.PullVersionRequest(job_id=job_id, version=version, replica_id="test"),
            timeout=60,
        )
        _, got, payload, _ = assemble(chunks)
    assert got == version
    return decode_state_dict(payload)


def sample_logprobs(model, sample) -> list[float]:
    """log_softmax(logits)[token] of every completion token (temperature 1), one full forward."""
    import torch

    prompt, completion = list(sample.prompt_token_ids), list(sample.completion_token_ids)
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[torch.arange(len(completion)), torch.tensor(completion)].tolist()


def run_tapped(scheduler_address: str, redis_url: str, spec: dict, *, timeout_s: float = 500.0):
    """Submits ``spec`` and reads its experience stream until the job ends; returns (the
    job, its step records, every sample reward wrote)."""
    with make_channel(scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        job = stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=json.dumps(spec)), timeout=30)
        tap = StreamTap(redis_url, job.job_id)
        try:
            end = time.monotonic() + timeout_s
            while job.state not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < end, f"job still {job.state} at step {job.current_step}"
                time.sleep(0.5)
                job = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
            time.sleep(0.5)  # the last entries reach the tap
        finally:
            tap.close()
        steps = stub.GetSteps(scheduler_pb2.GetStepsRequest(job_id=job.job_id), timeout=10).steps
    return job, steps, tap.samples


def logprobs_under_versions(model_dir: Path, ws_address: str, job_id: str, samples) -> dict:
    """{(sample_id, version): the log-prob of every completion token under that version's
    weights}, for each policy version any of ``samples``' tokens records (version 0 is the
    base model: PullVersion's 0 means "the newest")."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out: dict[tuple[str, int], list[float]] = {}
    for version in sorted({v for s in samples for v in s.token_versions if v >= 0}):
        state = base.state_dict() if version == 0 else pull_version(ws_address, job_id, version)
        model.load_state_dict(state, strict=False)
        for s in samples:
            out[(s.sample_id, version)] = sample_logprobs(model, s)
    return out
