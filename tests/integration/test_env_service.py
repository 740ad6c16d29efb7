"""The env service as the real process over gRPC: a tools episode, a retry episode,
idempotent retries, NOT_FOUND after Close, bad requests, and hostile tool input."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rlfleet.common.grpc_client import make_channel
from rlfleet.v1 import env_pb2, env_pb2_grpc


@pytest.fixture(scope="module")
def env_service(tmp_path_factory):
    # One process for the module (the fixture in tests/conftest.py is per test).
    from rlfleet.common.procs import start_service

    proc = start_service("env", "rlfleet.env", [], run_dir=tmp_path_factory.mktemp("env"))
    try:
        with make_channel(proc.address) as channel:
            yield proc, env_pb2_grpc.EnvServiceStub(channel), channel
    finally:
        proc.stop()


def _call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _error(fn, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=30)
    assert "Traceback" not in info.value.details()
    return info.value


def _messages(reply) -> list[tuple[str, str, str]]:
    return [(m.role, m.name, m.content) for m in reply.messages]


@pytest.mark.slow
def test_a_three_turn_tools_episode_with_a_retried_step(env_service):
    _, stub, _ = env_service
    assert {"tools", "retry"} <= set(stub.ListEnvironments(env_pb2.ListEnvironmentsRequest()).names)
    obs = stub.Reset(
        env_pb2.ResetRequest(
            episode_id="int-tools",
            env_name="tools",
            row_json=json.dumps({"question": "What is (17 * 23) + 4?", "answer": "395"}),
            options_json=json.dumps({"max_turns": 3}),
        ),
        timeout=30,
    )
    assert obs.episode_id == "int-tools" and not obs.done
    assert [m.role for m in obs.messages] == ["system", "user"]
    assert [t["function"]["name"] for t in json.loads(obs.tools_json)] == ["calculator", "python"]

    step0 = env_pb2.StepRequest(
        episode_id="int-tools", turn=0, model_text=_call("calculator", expression="17 * 23")
    )
    reply = stub.Step(step0, timeout=60)
    assert _messages(reply) == [("tool", "calculator", "391")] and not reply.done

    # The python tool prints something new on every run: a repeated Step that gave the
    # same text proves the tool did not run again.
    step1 = env_pb2.StepRequest(
        episode_id="int-tools",
        turn=1,
        model_text=_call("python", code="import os\nprint(391 + 4, os.urandom(8).hex())"),
    )
    first = stub.Step(step1, timeout=60)
    assert first.messages[0].content.startswith("395 ")
    assert stub.Step(step1, timeout=60) == first

    err = _error(stub.Step, env_pb2.StepRequest(episode_id="int-tools", turn=3, model_text="x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "turn 3" in err.details() and "expects turn 2" in err.details()

    last = stub.Step(
        env_pb2.StepRequest(episode_id="int-tools", turn=2, model_text="The answer is 395."),
        timeout=60,
    )
    assert (last.done, last.reward_so_far, list(last.messages)) == (True, 1.0, [])
    info = json.loads(last.info_json)
    assert (info["finish"], info["tool_calls_total"], info["tool_errors_total"]) == ("answer", 2, 0)

    close = env_pb2.CloseRequest(episode_id="int-tools")
    assert stub.Close(close, timeout=30).closed
    assert not stub.Close(close, timeout=30).closed
    err = _error(stub.Step, step1)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "reset a new episode" in err.details()


@pytest.mark.slow
def test_a_retry_episode(env_service):
    _, stub, _ = env_service
    stub.Reset(
        env_pb2.ResetRequest(
            episode_id="int-retry",
            env_name="retry",
            row_json=json.dumps({"prompt": "What is 6 * 7?", "answer": "42"}),
            options_json=json.dumps({"max_turns": 3, "discount": 0.5}),
        ),
        timeout=30,
    )
    wrong = stub.Step(
        env_pb2.StepRequest(episode_id="int-retry", turn=0, model_text="48"), timeout=30
    )
    assert _messages(wrong) == [("user", "", "That is not correct; try again.")]
    assert not wrong.done
    right = stub.Step(
        env_pb2.StepRequest(episode_id="int-retry", turn=1, model_text="42"), timeout=30
    )
    assert (right.done, right.reward_so_far) == (True, 0.5)
    assert json.loads(right.info_json)["correct"] is True
    assert stub.Close(env_pb2.CloseRequest(episode_id="int-retry"), timeout=30).closed


@pytest.mark.slow
def test_bad_requests_are_refused_with_a_sentence(env_service):
    _, stub, _ = env_service
    row = json.dumps({"question": "q", "answer": "1"})
    cases = [
        (dict(env_name="nope", row_json=row), "known environments: retry, tools"),
        (dict(env_name="tools", row_json="{oops"), "row_json is not valid JSON"),
        (dict(env_name="tools", row_json="[]"), "row_json must be a JSON object"),
        (dict(env_name="tools", row_json=row, options_json='{"max_turns": -1}'), "max_turns"),
    ]
    for fields, needle in cases:
        err = _error(stub.Reset, env_pb2.ResetRequest(episode_id="bad", **fields))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert needle in err.details(), err.details()
    err = _error(stub.Step, env_pb2.StepRequest(episode_id="never-reset", turn=0, model_text="x"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_hostile_tool_input_leaves_the_service_healthy(env_service):
    proc, stub, channel = env_service
    stub.Reset(
        env_pb2.ResetRequest(
            episode_id="int-hostile",
            env_name="tools",
            row_json=json.dumps({"question": "What is 6 * 7?", "answer": "42"}),
            options_json=json.dumps({"max_turns": 3, "python_timeout_s": 2.0}),
        ),
        timeout=30,
    )
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    flood = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)\n"  # 100 MB
    reply = stub.Step(
        env_pb2.StepRequest(
            episode_id="int-hostile",
            turn=0,
            model_text=_call("python", code=bomb) + _call("python", code=flood),
        ),
        timeout=120,
    )
    contents = [m.content for m in reply.messages]
    assert contents[0] == "error: the tool ran out of time (2.0 s)"
    assert "[output truncated at 16 KB]" in contents[1]
    assert not reply.done

    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="rlfleet.v1.EnvService"), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    last = stub.Step(
        env_pb2.StepRequest(episode_id="int-hostile", turn=1, model_text="42"), timeout=30
    )
    assert (last.done, last.reward_so_far) == (True, 1.0)
    assert proc.alive()

    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{proc.info['metrics_port']}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'rlfleet_env_tool_errors_total{env="tools"}' in metrics
    assert 'rlfleet_env_steps_total{env="tools"}' in metrics
