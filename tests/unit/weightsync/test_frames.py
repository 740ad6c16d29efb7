"""Serialised chunk frames: the same wire format as WeightChunk messages, fewer copies.

Frames and messages must be interchangeable in both directions (a trainer on
the generated stubs talking to a weight-sync on frames, and back), and frames
must be refused exactly where messages are: malformed, torn, corrupted.
"""

from __future__ import annotations

import os

import grpc
import pytest
import torch
from rlfleet.common.config import ServiceConfig
from rlfleet.common.errors import DataLoss, InvalidArgument
from rlfleet.common.grpc_client import make_channel, wait_healthy
from rlfleet.common.grpc_server import start_server
from rlfleet.common.weights import (
    assemble,
    assemble_frames,
    checksum_of,
    encode_frames,
    iter_chunks,
    pull_frames,
    push_frames,
    split_frame,
)
from rlfleet.v1 import weightsync_pb2, weightsync_pb2_grpc
from rlfleet.weightsync.replicas import MemoryReplicaRegistry
from rlfleet.weightsync.servicer import WeightSyncServicer, add_to_server
from rlfleet.weightsync.store import VersionStore

PAYLOAD = os.urandom(10_000)


def _frames(payload: bytes = PAYLOAD, *, version: int = 1, chunk_bytes: int = 1024):
    return list(encode_frames(payload, job_id="j", version=version, chunk_bytes=chunk_bytes))


def test_a_frame_is_the_serialised_message():
    messages = list(iter_chunks(PAYLOAD, job_id="j", version=1, chunk_bytes=1024))
    frames = _frames()
    assert len(frames) == len(messages) == 10
    for frame, message in zip(frames, messages, strict=True):
        assert weightsync_pb2.WeightChunk.FromString(frame) == message
        header, data = split_frame(message.SerializeToString())  # data in the middle
        assert bytes(data) == message.data
        assert (header.offset, header.last, header.data) == (message.offset, message.last, b"")


def test_frames_and_messages_assemble_alike():
    frames = _frames()
    assert assemble_frames(frames) == ("j", 1, PAYLOAD, checksum_of(PAYLOAD))
    assert assemble(weightsync_pb2.WeightChunk.FromString(f) for f in frames)[2] == PAYLOAD
    assert assemble_frames(_frames(b""))[2] == b""


def test_the_last_data_field_wins_as_in_any_protobuf_reader():
    frame = _frames()[0]
    doubled = weightsync_pb2.WeightChunk(data=b"old").SerializeToString() + frame
    assert bytes(split_frame(doubled)[1]) == weightsync_pb2.WeightChunk.FromString(doubled).data


def test_malformed_torn_and_corrupted_frames_are_refused():
    frames = _frames()
    with pytest.raises(InvalidArgument, match="not a valid WeightChunk"):
        split_frame(frames[0][:-5] + b"\x22\xff")  # a length past the end
    with pytest.raises(InvalidArgument, match="offset"):
        assemble_frames([frames[1], frames[0], *frames[2:]])
    with pytest.raises(DataLoss, match="torn"):
        assemble_frames(frames[:-1])
    header, data = split_frame(frames[3])
    flipped = bytes(data[:1]) + bytes([data[1] ^ 1]) + bytes(data[2:])
    bad = header.SerializeToString() + weightsync_pb2.WeightChunk(data=flipped).SerializeToString()
    with pytest.raises(DataLoss, match="checksum"):
        assemble_frames([*frames[:3], bad, *frames[4:]])


def test_store_serves_pushed_frames_as_they_came_or_reframes_them():
    store = VersionStore(chunk_bytes=1024)
    frames = _frames()
    store.push_frames(iter(frames))
    assert list(store.pull_frames("j", 1)) == frames  # no copy between push and pull
    store.push_frames(iter(_frames(version=2, chunk_bytes=4096)))  # another chunk size
    pulled = list(store.pull("j", 2))
    assert all(len(c.data) <= 1024 for c in pulled) and len(pulled) == 10
    assert assemble(pulled)[2] == PAYLOAD


@pytest.fixture
def channel():
    store = VersionStore(chunk_bytes=1024)
    running = start_server(
        ServiceConfig(),
        lambda s: add_to_server(WeightSyncServicer(store, MemoryReplicaRegistry()), s),
        service_names=["rlfleet.v1.WeightSyncService"],
        metrics=False,
    )
    wait_healthy(running.address)
    with make_channel(running.address) as ch:
        yield ch
    running.stop(0)


def test_generated_stubs_and_frame_helpers_talk_to_each_other(channel):
    stub = weightsync_pb2_grpc.WeightSyncServiceStub(channel)
    stub.PushVersion(iter_chunks(PAYLOAD, job_id="j", version=1, chunk_bytes=1024), timeout=10)
    request = weightsync_pb2.PullVersionRequest(job_id="j", version=1)
    assert assemble_frames(pull_frames(channel, request, timeout=10))[2] == PAYLOAD

    reply = push_frames(channel, _frames(PAYLOAD[::-1], version=2), timeout=10)
    assert reply.version == 2
    pulled = stub.PullVersion(weightsync_pb2.PullVersionRequest(job_id="j"), timeout=10)
    assert assemble(pulled)[1:3] == (2, PAYLOAD[::-1])

    with pytest.raises(grpc.RpcError) as info:  # a corrupted push, sent as frames
        push_frames(channel, _frames(version=3)[:-1], timeout=10)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS


def test_in_place_decode_matches_safetensors_for_every_dtype():
    from rlfleet.common.weight_transport import alloc_buffer
    from rlfleet.common.weights import decode_state_dict, encode_state_dict

    state = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).to(torch.float16),
        "i64": torch.arange(6).view(2, 3),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
    }
    payload = encode_state_dict(state)
    received = alloc_buffer(len(payload))  # as the data plane receives it
    memoryview(received)[:] = payload
    in_place, copied = decode_state_dict(received), decode_state_dict(payload)
    assert set(in_place) == set(copied) == set(state)
    for name, tensor in state.items():
        assert in_place[name].dtype == copied[name].dtype == tensor.dtype
        assert torch.equal(in_place[name], tensor) and torch.equal(copied[name], tensor)
    with pytest.raises(ValueError, match="not a safetensors payload"):
        decode_state_dict(bytearray(b"\xff" * 16))


def test_encoding_into_a_pooled_buffer_is_safetensors_and_reuses_the_buffer():
    from rlfleet.common.weight_transport import BufferPool
    from rlfleet.common.weights import decode_state_dict, encode_state_dict_into
    from safetensors.torch import load

    state = {
        "odd_bf16": torch.randn(3).to(torch.bfloat16),  # 6 bytes: the next tensor stays aligned
        "f32": torch.randn(2, 3),
        "i64": torch.arange(5),
        "empty": torch.empty(0, 2),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
    }
    pool = BufferPool()
    first = encode_state_dict_into(state, pool.take)
    for got in (load(bytes(first)), decode_state_dict(first)):  # safetensors reads it, and we do
        assert set(got) == set(state)
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in state.items())
    pool.give(first)
    state["f32"] += 1
    again = encode_state_dict_into(state, pool.take)
    assert again is first and torch.equal(load(bytes(again))["f32"], state["f32"])
