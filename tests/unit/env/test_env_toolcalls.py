"""Reading Hermes/Qwen tool calls out of a model's turn."""

from __future__ import annotations

import json

from rlfleet.env.toolcalls import final_text, parse_tool_calls, strip_reasoning


def test_one_call_as_qwen_writes_it():
    text = (
        "I will compute it.\n<tool_call>\n"
        '{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
    )
    [call] = parse_tool_calls(text)
    assert (call.name, call.arguments, call.error) == ("calculator", {"expression": "2 + 3"}, "")


def test_several_calls_in_order():
    text = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call> then '
        '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    )
    assert [(c.name, c.arguments) for c in parse_tool_calls(text)] == [("a", {}), ("b", {"x": 1})]


def test_raw_newlines_in_code_are_accepted():
    text = '<tool_call>\n{"name": "python", "arguments": {"code": "x = 1\nprint(x)"}}\n</tool_call>'
    [call] = parse_tool_calls(text)
    assert call.arguments["code"] == "x = 1\nprint(x)"


def test_arguments_as_a_json_string():
    arguments = json.dumps({"expression": "1+1"})  # a JSON string inside the JSON
    text = f"<tool_call>{json.dumps({'name': 'calculator', 'arguments': arguments})}</tool_call>"
    [call] = parse_tool_calls(text)
    assert call.arguments == {"expression": "1+1"}


def test_malformed_calls_are_calls_with_an_error():
    cases = [
        "<tool_call>{not json}</tool_call>",
        "<tool_call>[1, 2]</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "python", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "python", "arguments": "nope"}</tool_call>',
        '<tool_call>{"name": "python", "arguments": {"code": "pri',  # cut by the token limit
    ]
    for text in cases:
        [call] = parse_tool_calls(text)
        assert call.error, text
        assert call.arguments == {}


def test_an_unclosed_but_whole_call_still_counts():
    [call] = parse_tool_calls('<tool_call>{"name": "a", "arguments": {"k": 2}}')
    assert (call.name, call.arguments, call.error) == ("a", {"k": 2}, "")


def test_no_call_and_calls_inside_reasoning_are_ignored():
    assert parse_tool_calls("The answer is 4.") == []
    think = '<think>maybe <tool_call>{"name": "a", "arguments": {}}</tool_call></think>It is 4.'
    assert parse_tool_calls(think) == []
    assert final_text(think) == "It is 4."


def test_final_text_drops_reasoning_calls_and_end_markers():
    assert final_text("reasoning here</think>\n\n42<|im_end|>") == "42"
    assert final_text('x <tool_call>{"name": "a"}</tool_call> y') == "x  y"
    assert strip_reasoning("<think>unfinished") == ""
