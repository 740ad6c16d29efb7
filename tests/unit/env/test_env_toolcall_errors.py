"""The sentence the model reads when its tool call is not JSON names the fault and its
position once, whichever of json's messages it is."""

from __future__ import annotations

import pytest
from rlfleet.env.toolcalls import parse_tool_calls


@pytest.mark.parametrize(
    "body, error",
    [
        ('{"name": "calc', "Unterminated string starting at char 9"),
        ('{"name": "a", "arguments": {"x": 1,}}', "Expecting property name enclosed in double "
         "quotes at char 35"),
        ("{", "Expecting property name enclosed in double quotes at char 1"),
    ],
)  # fmt: skip
def test_a_call_that_is_not_json_says_where_once(body, error):
    [call] = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call.error == f"the tool call is not valid JSON ({error})"
    assert " at at " not in call.error
