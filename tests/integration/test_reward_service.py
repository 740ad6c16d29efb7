"""The reward service as the real process over gRPC, writing to the real Redis."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
import reasoning_gym
from rlfleet.common.buffer import setup_buffer
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.tasks import entry_to_json
from rlfleet.v1 import reward_pb2, reward_pb2_grpc
from rlfleet.v1.common_pb2 import Sample


@pytest.fixture
def reward(service_factory, redis_url):
    proc = service_factory("reward", "rlfleet.reward", ["--redis-url", redis_url])
    with make_channel(proc.address) as channel:
        yield proc, reward_pb2_grpc.RewardServiceStub(channel)


def _samples(n: int) -> list[Sample]:
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=n, seed=11)
    return [
        Sample(
            job_id="job-int",
            sample_id=f"g{i}-0",
            group_id=f"g{i}",
            completion_text=f" {ds[i]['answer'] if i % 2 else 'wrong'}\n",
            task_json=entry_to_json(ds[i]),
        )
        for i in range(n)
    ]


@pytest.mark.slow
def test_score_and_write_over_grpc(reward, redis_url):
    proc, stub = reward
    request = reward_pb2.ScoreRequest(
        job_id="job-int", verifier="reasoning_gym", samples=_samples(6), write_to_buffer=True
    )
    reply = stub.Score(request, timeout=60)
    assert list(reply.rewards) == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert reply.written == 6
    assert stub.Score(request, timeout=60).written == 0  # retried call: no duplicates
    assert setup_buffer("redis", redis_url).length("job-int") == 6

    math = reward_pb2.ScoreRequest(
        verifier="math",
        samples=[Sample(completion_text=" 0.5", task_json='{"answer": "1/2"}')],
    )
    assert list(stub.Score(math, timeout=60).rewards) == [1.0]

    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{proc.info['metrics_port']}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'rlfleet_reward_samples_scored_total{verifier="reasoning_gym"} 12.0' in metrics
    assert "rlfleet_reward_samples_written_total 6.0" in metrics


BAD_REQUESTS = [
    ({"verifier": "no_such_verifier"}, "verifier"),
    ({"verifier": "regex", "verifier_config_json": '{"pattern": "(["}'}, "pattern"),
    ({"verifier": "regex", "verifier_config_json": "{oops"}, "verifier_config_json"),
    ({"verifier": "exact", "task_json": "not json"}, "samples[0].task_json"),
    ({"verifier": "reasoning_gym"}, "source_dataset"),
    ({"verifier": "exact", "write_to_buffer": True, "sample_id": ""}, "sample_id"),
]


@pytest.mark.slow
def test_bad_requests_are_invalid_argument(reward):
    """One process, every bad request: each is refused with a sentence, no traceback."""
    _, stub = reward
    for fields, needle in BAD_REQUESTS:
        fields = dict(fields)
        task_json = fields.pop("task_json", '{"answer": "1"}')
        sample_id = fields.pop("sample_id", "s")
        request = reward_pb2.ScoreRequest(
            job_id="job-int",
            samples=[Sample(sample_id=sample_id, completion_text=" 1", task_json=task_json)],
            **fields,
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert needle in info.value.details(), info.value.details()
        assert "Traceback" not in info.value.details()
