"""A replica never serves a half-loaded or corrupted version.

A real rollout process loads version 1 from a weight-sync that then goes bad:
it serves version 2 corrupted (a flipped byte), torn (the last chunk missing),
as garbage that passes its checksum, and as the wrong job. Every LoadVersion(2)
is refused with DATA_LOSS, and the replica keeps generating with version 1,
token for token as before.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.weights import encode_state_dict, iter_chunks
from rlfleet.v1 import rollout_pb2, rollout_pb2_grpc, weightsync_pb2, weightsync_pb2_grpc

pytestmark = pytest.mark.slow

CHUNK = 64 * 1024


def _payload(model_dir, seed: int) -> bytes:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # lm_head is tied to the embeddings: one tensor, written once into the payload.
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return encode_state_dict(state)


class BadWeightSync(weightsync_pb2_grpc.WeightSyncServiceServicer):
    """Serves version 1 intact and version 2 in whatever broken way ``mode`` says."""

    def __init__(self, good: bytes, next_payload: bytes):
        self.good, self.next = good, next_payload
        self.mode = "intact"

    def PullVersion(self, request, context):
        if request.version == 1:
            yield from iter_chunks(self.good, job_id=request.job_id, version=1, chunk_bytes=CHUNK)
            return
        chunks = list(iter_chunks(self.next, job_id=request.job_id, version=2, chunk_bytes=CHUNK))
        if self.mode == "flipped":
            data = bytearray(chunks[1].data)
            data[17] ^= 0x01
            chunks[1].data = bytes(data)
        elif self.mode == "torn":
            chunks = chunks[:-1]
        elif self.mode == "garbage":  # checksum matches, contents are not safetensors
            chunks = list(
                iter_chunks(b"\x00" * 4096, job_id=request.job_id, version=2, chunk_bytes=CHUNK)
            )
        elif self.mode == "wrong_job":
            chunks = list(iter_chunks(self.next, job_id="other", version=2, chunk_bytes=CHUNK))
        yield from chunks

    def ReportHeld(self, request, context):
        return weightsync_pb2.ReportHeldResponse()


def test_replica_refuses_broken_versions_and_keeps_serving_the_last_good_one(
    service_factory, tiny_model_dir
):
    torch.set_num_threads(1)
    fake = BadWeightSync(_payload(tiny_model_dir, 1), _payload(tiny_model_dir, 2))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    weightsync_pb2_grpc.add_WeightSyncServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        # Every broken version is refused as soon as its stream ends; the pull timeout only
        # bounds a hang, and a good pull on a loaded 2-core machine can take seconds.
        rollout = service_factory(
            "rollout",
            "rlfleet.rollout",
            ["--device", "cpu", "--dtype", "float32", "--torch-threads", "1",
             "--pull-timeout-s", "60", "--weightsync-address", address],
        )  # fmt: skip
        prompt = rollout_pb2.SequenceRequest(seq_id="a", prompt_token_ids=[5, 6, 7])
        greedy = rollout_pb2.SamplingParams(temperature=0.0, max_new_tokens=8, seed=1)
        with make_channel(rollout.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)

            def load(version: int):
                return stub.LoadVersion(
                    rollout_pb2.LoadVersionRequest(
                        job_id="job-w", version=version, model_path=str(tiny_model_dir)
                    ),
                    timeout=120,
                )

            def generate():
                (result,) = list(
                    stub.Generate(
                        rollout_pb2.GenerateRequest(sequences=[prompt], sampling=greedy),
                        timeout=60,
                    )
                )
                return list(result.token_ids), set(result.versions)

            assert load(1).version == 1
            tokens, versions = generate()
            assert versions == {1}
            for mode in ("flipped", "torn", "garbage", "wrong_job"):
                fake.mode = mode
                with pytest.raises(grpc.RpcError) as info:
                    load(2)
                assert info.value.code() == grpc.StatusCode.DATA_LOSS, mode
                status = stub.GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=10)
                assert (status.job_id, status.version) == ("job-w", 1), mode
                assert generate() == (tokens, {1}), mode
            fake.mode = "intact"
            assert load(2).version == 2
            assert generate()[1] == {2}
        assert rollout.alive()
    finally:
        server.stop(0)
