"""The built-in environments, ``tools`` and ``retry``, through the episode core."""

from __future__ import annotations

import json

import pytest
from rlfleet.common.errors import InvalidArgument
from rlfleet.env.core import EnvCore
from rlfleet.env.registry import discover

ROW = {"question": "What is (17 * 23) + 4?", "answer": "395"}


@pytest.fixture(scope="module")
def core() -> EnvCore:
    return EnvCore(discover())


def _call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _reset(core, episode_id, env="tools", row=ROW, **options):
    return core.reset(
        episode_id=episode_id,
        env_name=env,
        row_json=json.dumps(row),
        options_json=json.dumps(options),
    )


def _step(core, episode_id, turn, text):
    reply = core.step(episode_id=episode_id, turn=turn, model_text=text)
    return reply, json.loads(reply.info_json)


# -- tools ---------------------------------------------------------------------------


def test_tools_reset_explains_the_tools_and_gives_their_schemas(core):
    obs = _reset(core, "t-reset")
    system, user = obs.messages
    assert system.role == "system" and "<tool_call>" in system.content
    assert "- calculator:" in system.content and "- python:" in system.content
    assert (user.role, user.content) == ("user", ROW["question"])
    tools = json.loads(obs.tools_json)
    assert [t["function"]["name"] for t in tools] == ["calculator", "python"]
    assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object"
               for t in tools)  # fmt: skip


def test_tools_reset_options(core):
    full = _reset(
        core, "t-full", tools=["calculator"], tool_prompt="full", system_prompt="Be terse."
    )
    assert full.messages[0].content.startswith("Be terse.\n\n")
    assert "<tools>" in full.messages[0].content and "python" not in full.messages[0].content
    none = _reset(core, "t-none", tool_prompt="none")
    assert [m.role for m in none.messages] == ["user"]
    chat_row = {"messages": [{"role": "system", "content": "Row system."},
                             {"role": "user", "content": "Hi?"}], "answer": "1"}  # fmt: skip
    chat = _reset(core, "t-chat", row=chat_row)
    assert chat.messages[0].content.startswith("Row system.\n\nYou can call tools")
    assert chat.messages[1].content == "Hi?"


def test_a_three_turn_tools_episode(core):
    _reset(core, "t3", max_turns=3)
    r0, i0 = _step(core, "t3", 0, "Let me multiply. " + _call("calculator", expression="17 * 23"))
    assert [(m.role, m.name, m.content) for m in r0.messages] == [("tool", "calculator", "391")]
    assert (r0.done, r0.reward_so_far, i0["tool_calls"], i0["tool_errors"]) == (False, 0.0, 1, 0)
    r1, i1 = _step(core, "t3", 1, _call("python", code="print(391 + 4)"))
    assert [(m.role, m.name, m.content) for m in r1.messages] == [("tool", "python", "395")]
    r2, i2 = _step(core, "t3", 2, "<think>391 + 4</think>The answer is 395.")
    assert (r2.done, r2.reward_so_far, r2.messages) == (True, 1.0, [])
    assert i2 == {
        "turn": 2,
        "tool_calls": 0,
        "tool_errors": 0,
        "tool_calls_total": 2,
        "tool_errors_total": 0,
        "truncated": False,
        "finish": "answer",
        "score": 1.0,
    }


def test_a_wrong_final_answer_scores_zero(core):
    _reset(core, "t-wrong")
    reply, info = _step(core, "t-wrong", 0, "It is 400.")
    assert (reply.done, reply.reward_so_far, info["finish"]) == (True, 0.0, "answer")


def test_tool_errors_are_messages_and_the_episode_goes_on(core):
    _reset(core, "t-err", tools=["calculator"], max_tool_calls_per_turn=4)
    text = (
        _call("calculator", expression="__import__('os').system('id')")
        + _call("python", code="print(1)")  # not offered in this episode
        + "<tool_call>{broken</tool_call>"
        + _call("calculator", expr="1")
        + _call("calculator", expression="9 ** 9 ** 9")  # the fifth: over the limit
    )
    reply, info = _step(core, "t-err", 0, text)
    contents = [m.content for m in reply.messages]
    assert contents[0].startswith("error: names, calls and attributes are not allowed")
    assert contents[1] == "error: there is no tool 'python'; tools: calculator"
    assert contents[2].startswith("error: the tool call is not valid JSON")
    assert contents[3] == 'error: calculator takes one argument, "expression" (a string)'
    assert contents[4] == "error: at most 4 tool calls per turn; this one was not run"
    assert (info["tool_calls"], info["tool_errors"], reply.done) == (5, 5, False)
    reply, _ = _step(core, "t-err", 1, "395")
    assert (reply.done, reply.reward_so_far) == (True, 1.0)


def test_a_tool_call_on_the_last_turn_is_truncated(core):
    _reset(core, "t-max", max_turns=2)
    _step(core, "t-max", 0, _call("calculator", expression="1 + 1"))
    reply, info = _step(core, "t-max", 1, _call("calculator", expression="2 + 2"))
    assert (reply.done, reply.reward_so_far, reply.messages) == (True, 0.0, [])
    assert (info["truncated"], info["finish"], info["tool_calls"]) == (True, "max_turns", 0)


def test_other_verifiers_and_answer_fields(core):
    row = {"question": "Capital of France?", "gold": "Paris"}
    _reset(core, "t-exact", row=row, answer_key="gold", verifier="exact",
           verifier_config={"ignore_case": True})  # fmt: skip
    reply, _ = _step(core, "t-exact", 0, "paris")
    assert reply.reward_so_far == 1.0


@pytest.mark.parametrize(
    ("row", "options", "needle"),
    [
        ({"answer": "1"}, {}, "row_json has no 'messages', 'prompt' or 'question' field"),
        ({"question": "q"}, {}, "row_json has no 'answer' field"),
        ({"question": "q", "answer": [1]}, {}, "cannot be scored by 'math'"),
        (ROW, {"verifier": "nope"}, "verifier 'nope' is unknown; known verifiers:"),
        (ROW, {"tools": ["shell"]}, "options_json tools.0"),
        (ROW, {"max_turns": 0}, "options_json max_turns"),
        (ROW, {"python_timeout_s": 1000}, "options_json python_timeout_s"),
        (ROW, {"typo": 1}, "options_json typo: Extra inputs are not permitted"),
        ({"question": "", "answer": "1"}, {}, "row_json field 'question' is empty"),
        ({"messages": [{"role": "robot", "content": "x"}], "answer": "1"}, {}, "has role 'robot'"),
    ],
)
def test_bad_rows_and_options_are_refused_with_a_sentence(core, row, options, needle):
    with pytest.raises(InvalidArgument) as info:
        _reset(core, "", row=row, **options)
    assert needle in info.value.message, info.value.message


# -- retry ---------------------------------------------------------------------------


def test_retry_feedback_then_a_correct_answer():
    core = EnvCore(discover())
    obs = _reset(core, "r", env="retry", row={"prompt": "2 + 2 = ?", "answer": 4})
    assert [(m.role, m.content) for m in obs.messages] == [("user", "2 + 2 = ?")]
    assert json.loads(obs.tools_json) == []
    reply, info = _step(core, "r", 0, "5")
    assert [(m.role, m.content) for m in reply.messages] == [
        ("user", "That is not correct; try again.")
    ]
    assert (reply.done, info["correct"], info["finish"]) == (False, False, None)
    reply, info = _step(core, "r", 1, "4")
    assert (reply.done, reply.reward_so_far, info["finish"]) == (True, 1.0, "answer")


def test_retry_discount_and_running_out_of_turns():
    core = EnvCore(discover())
    _reset(core, "d", env="retry", row={"prompt": "p", "answer": "7"}, discount=0.5,
           max_turns=3, feedback="No.", system_prompt="Answer with a number.")  # fmt: skip
    _step(core, "d", 0, "1")
    _step(core, "d", 1, "2")
    reply, _ = _step(core, "d", 2, "7")
    assert (reply.done, reply.reward_so_far) == (True, 0.25)  # 0.5 ** 2

    obs = _reset(core, "z", env="retry", row={"prompt": "p", "answer": "7"}, max_turns=2)
    assert obs.messages[0].role == "user"
    reply, _ = _step(core, "z", 0, "1")
    assert reply.messages[0].content == "That is not correct; try again."
    reply, info = _step(core, "z", 1, "2")
    assert (reply.done, reply.reward_so_far, reply.messages, info["finish"]) == (
        True, 0.0, [], "max_turns",
    )  # fmt: skip
