"""Helpers of the fleet tests that check trained samples token by token: a model whose
completions vary in length, a tap on a job's experience stream, a version pulled back
from weight-sync, and a sample's log-probs recomputed under given weights."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import redis
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.weights import assemble, decode_state_dict
from rlfleet.v1 import common_pb2, weightsync_pb2, weightsync_pb2_grpc


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
