"""The "code" verifier: scoring programs against test cases, and the reward service
staying healthy while it scores hostile ones (a real process, a real Redis)."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rlfleet.common.jobspec import RewardSpec
from rlfleet.reward.verifiers import setup_verifier
from rlfleet.reward.verifiers.code import extract_program
from rlfleet.v1 import common_pb2, reward_pb2, reward_pb2_grpc

FAST = {"cpu_seconds": 1, "wall_seconds": 3, "memory_mb": 128, "max_processes": 8}
SECRET = "reward-secret-9d8e7f"

SQUARE_TESTS = {
    "tests": [
        {"input": "3\n", "output": "9\n"},
        {"input": "-4\n", "output": "16"},
    ]
}
SQUARE = "n = int(input())\nprint(n * n)\n"


def test_extracts_the_last_fenced_block_or_the_whole_text():
    assert extract_program("x = 1\n</s>junk") == "x = 1\n"
    text = "Idea:\n```python\nprint(1)\n```\nBetter:\n```py\nprint(2)\n```\n"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("```\nprint(3)\n") == "print(3)\n"  # unterminated fence


def test_scores_stdin_stdout_tests():
    verifier = setup_verifier("code", FAST)
    verifier.check_entry(SQUARE_TESTS)
    assert verifier.score(f"```python\n{SQUARE}```", SQUARE_TESTS) == 1.0
    assert verifier.score("print(9)", SQUARE_TESTS) == 0.5
    assert verifier.score("print(", SQUARE_TESTS) == 0.0
    assert verifier.score("", SQUARE_TESTS) == 0.0


def test_scores_assert_test_code():
    entry = {"test_code": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    verifier = setup_verifier("code", FAST)
    verifier.check_entry(entry)
    assert verifier.score("def add(a, b):\n    return a + b\n", entry) == 1.0
    assert verifier.score("def add(a, b):\n    return a - b\n", entry) == 0.0


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({}, "tests"),
        ({"tests": []}, "list of 1 to"),
        ({"tests": [{"input": "1"}]}, r"tests\[0\]"),
        ({"tests": "print"}, "list"),
        ({"test_code": 3}, "not a string"),
    ],
)
def test_refuses_entries_without_usable_tests(entry, match):
    with pytest.raises(ValueError, match=match):
        setup_verifier("code", {}).check_entry(entry)


def test_limits_are_validated_and_the_job_spec_accepts_code():
    with pytest.raises(ValueError):
        setup_verifier("code", {"memory_mb": 1})
    assert RewardSpec(verifier="code").verifier == "code"


HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "infinite_loop": "while True:\n    pass\n",
    "memory_hog": "x = bytearray(1 << 31)\nprint(9)\n",
    "socket": (
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint(9)\n"
    ),
    "write_outside": "open({target!r}, 'w').write('pwned')\nprint(9)\n",
    "read_secret": (
        "import os\nprint(os.environ.get('RLFLEET_TEST_SECRET', 'none'))\n"
        "print(open('/proc/' + str(os.getppid()) + '/environ').read())\n"
    ),
}


@pytest.mark.slow
def test_reward_service_survives_hostile_code(service_factory, redis_url, tmp_path):
    reward = service_factory(
        "reward",
        "rlfleet.reward",
        ["--redis-url", redis_url, "--log-format", "json"],
        env={"RLFLEET_TEST_SECRET": SECRET},
    )
    target = tmp_path / "escaped.txt"
    redis_port = int(redis_url.split(":")[-1].split("/")[0])
    entry = {"tests": [{"input": "3\n", "output": "9\n"}]}
    programs = {
        name: code.format(port=redis_port, target=str(target)) for name, code in HOSTILE.items()
    }
    programs["honest"] = SQUARE
    samples = [
        common_pb2.Sample(sample_id=f"s-{name}", completion_text=code, task_json=json.dumps(entry))
        for name, code in programs.items()
    ]
    with grpc.insecure_channel(reward.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        reply = stub.Score(
            reward_pb2.ScoreRequest(
                job_id="hostile",
                verifier="code",
                verifier_config_json=json.dumps(FAST),
                samples=samples,
                write_to_buffer=True,
            ),
            timeout=120,
        )
        got = dict(zip(programs, reply.rewards, strict=True))
        assert got == {**{name: 0.0 for name in HOSTILE}, "honest": 1.0}
        assert reply.written == len(samples)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        again = stub.Score(
            reward_pb2.ScoreRequest(
                verifier="code",
                verifier_config_json=json.dumps(FAST),
                samples=[samples[-1]],
            ),
            timeout=60,
        )
        assert list(again.rewards) == [1.0]
    assert reward.alive()
    assert not target.exists()
    assert SECRET not in reward.log_path.read_text()
