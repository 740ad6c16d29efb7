"""The rollout replica as the real process over gRPC: streaming Generate, refusals,
Abort, status and metrics; and LoadVersion against the real weight-sync process.
"""

from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
import torch
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.weights import encode_state_dict, iter_chunks
from rlfleet.v1 import rollout_pb2, rollout_pb2_grpc, weightsync_pb2, weightsync_pb2_grpc

ROLLOUT_ARGS = ["--device", "cpu", "--dtype", "float32", "--torch-threads", "1",
                "--log-format", "text"]  # fmt: skip


def _seq(seq_id: str, prompt: list[int], prefix: list[int] | None = None):
    prefix = prefix or []
    return rollout_pb2.SequenceRequest(
        seq_id=seq_id,
        prompt_token_ids=prompt,
        prefix_token_ids=prefix,
        prefix_logprobs=[-1.0] * len(prefix),
        prefix_versions=[0] * len(prefix),
    )


def _greedy(n: int) -> rollout_pb2.SamplingParams:
    return rollout_pb2.SamplingParams(temperature=0.0, max_new_tokens=n, seed=1)


def _error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert "Traceback" not in (info.value.details() or "")
    return info.value


@pytest.mark.slow
def test_generate_streams_and_refuses_bad_requests(service_factory, tiny_model_dir):
    proc = service_factory(
        "rollout",
        "rlfleet.rollout",
        [*ROLLOUT_ARGS, "--model-path", str(tiny_model_dir), "--replica-id", "r-gen"],
    )
    with make_channel(proc.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)

        # "quick" is one token from its limit, so its result is streamed before the others end.
        request = rollout_pb2.GenerateRequest(
            sequences=[_seq("a", [5, 6, 7]), _seq("quick", [8], [9] * 11), _seq("b", [10])],
            sampling=_greedy(12),
        )
        results = list(stub.Generate(request, timeout=60))
        assert results[0].seq_id == "quick"
        assert sorted(r.seq_id for r in results) == ["a", "b", "quick"]
        for r in results:
            assert r.finished and r.finish_reason in ("length", "stop")
            assert len(r.token_ids) == len(r.logprobs) == len(r.versions) <= 12
            assert all(lp <= 0 for lp in r.logprobs) and set(r.versions) == {0}
        quick = next(r for r in results if r.seq_id == "quick")
        assert list(quick.token_ids[:11]) == [9] * 11

        bad = [
            (_seq("a", []), _greedy(4), "prompt_token_ids"),
            (_seq("a", [1, 100000]), _greedy(4), "vocabulary"),
            (_seq("a", [1]), rollout_pb2.SamplingParams(temperature=-1, max_new_tokens=4),
             "temperature"),
            (_seq("a", [1]), rollout_pb2.SamplingParams(top_p=1.5, max_new_tokens=4), "top_p"),
            (_seq("a", [1]), _greedy(0), "max_new_tokens"),
            (rollout_pb2.SequenceRequest(seq_id="a", prompt_token_ids=[1], prefix_token_ids=[2],
                                         prefix_logprobs=[], prefix_versions=[0]),
             _greedy(4), "equal lengths"),
        ]  # fmt: skip
        for seq, sampling, words in bad:
            req = rollout_pb2.GenerateRequest(sequences=[seq], sampling=sampling)
            err = _error(lambda req=req: list(stub.Generate(req, timeout=30)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in err.details()

        # Abort: once "quick" has arrived the call is surely in flight; "long" comes back partial.
        request = rollout_pb2.GenerateRequest(
            sequences=[_seq("quick", [8], [9] * 399), _seq("long", [5])], sampling=_greedy(400)
        )
        stream = stub.Generate(request, timeout=120)
        assert next(stream).seq_id == "quick"
        aborted = {}
        reader = threading.Thread(target=lambda: aborted.update({r.seq_id: r for r in stream}))
        reader.start()
        assert stub.Abort(rollout_pb2.AbortRequest(), timeout=60).aborted == 1
        reader.join(60)
        long = aborted["long"]
        assert not long.finished and long.finish_reason == "aborted"
        assert 0 < len(long.token_ids) < 400

        status = stub.GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=10)
        assert (status.replica_id, status.engine, status.version) == ("r-gen", "torch", 0)
        assert status.model_path == str(tiny_model_dir) and status.running_sequences == 0

    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{proc.info['metrics_port']}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'rlfleet_rollout_sequences_finished_total{reason="aborted"} 1.0' in metrics
    assert "rlfleet_rollout_tokens_generated_total" in metrics


def _perturbed_state(model_dir, seed: int):
    """A new version of the tiny model's weights and the model that holds them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    # lm_head is tied to the embeddings: one tensor, written once into the payload.
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return state, model


@torch.no_grad()
def _ref_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(tok)
        if tok == model.config.eos_token_id:
            break
    return ids[len(prompt) :]


@pytest.mark.slow
def test_load_version_pulls_from_weightsync(service_factory, tiny_model_dir):
    torch.set_num_threads(1)
    ws = service_factory("weightsync", "rlfleet.weightsync", ["--chunk-bytes", str(64 * 1024)])
    rollout = service_factory(
        "rollout",
        "rlfleet.rollout",
        [*ROLLOUT_ARGS, "--weightsync-address", ws.address, "--replica-id", "r-load"],
    )
    state, model = _perturbed_state(tiny_model_dir, seed=3)
    payload = encode_state_dict(state)
    with make_channel(ws.address) as ws_channel, make_channel(rollout.address) as channel:
        ws_stub = weightsync_pb2_grpc.WeightSyncServiceStub(ws_channel)
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        request = rollout_pb2.GenerateRequest(sequences=[_seq("a", [5, 6])], sampling=_greedy(8))

        err = _error(lambda: list(stub.Generate(request, timeout=30)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

        load = rollout_pb2.LoadVersionRequest(
            job_id="job-r", version=1, model_path=str(tiny_model_dir)
        )
        err = _error(lambda: stub.LoadVersion(load, timeout=60))
        assert err.code() == grpc.StatusCode.NOT_FOUND  # weight-sync has no version yet

        chunks = iter_chunks(payload, job_id="job-r", version=1, chunk_bytes=64 * 1024)
        assert ws_stub.PushVersion(chunks, timeout=60).version == 1
        reply = stub.LoadVersion(load, timeout=120)
        assert reply.version == 1 and reply.load_seconds > 0

        status = stub.GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=10)
        assert (status.version, status.job_id) == (1, "job-r")
        held = ws_stub.ListReplicas(weightsync_pb2.ListReplicasRequest(job_id="job-r"), timeout=10)
        assert [(r.replica_id, r.version, r.address) for r in held.replicas] == [
            ("r-load", 1, rollout.address)
        ]

        (result,) = list(stub.Generate(request, timeout=60))
        assert list(result.token_ids) == _ref_greedy(model, [5, 6], 8)
        assert set(result.versions) == {1}

        # Loading the version already held is cheap and idempotent (a retry is safe).
        assert stub.LoadVersion(load, timeout=60).version == 1
