"""Running tool calls (`tool_calls.py`): results and error messages verbatim, and the Python tool's opt-in."""

import os

import pytest
from test_multi_turn import add, boom

from trl_onpolicy.tool_calls import run_tool_calls, tool_map


def test_tool_results_verbatim():
    """The tool messages themselves (the char tokenizer above cannot spell every character of them)."""
    tools = tool_map([add, boom])
    calls = [{"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
             {"type": "function", "function": {"name": "boom", "arguments": {"a": 1}}},
             {"type": "function", "function": {"name": "add", "arguments": "{not json"}},
             {"type": "function", "function": {"name": "nope", "arguments": {}}}]  # fmt: skip
    results = run_tool_calls(tools, calls, timeout=1.0)
    assert [r.message["content"] for r in results] == [
        "3",
        "Error: tool 'boom' raised RuntimeError: no such luck",
        (
            "Error: malformed tool call: the arguments of 'add' are not JSON (Expecting property name enclosed in "
            "double quotes)."
        ),
        "Error: unknown tool 'nope'; the tools are: add, boom.",
    ]
    assert [r.error is None for r in results] == [True, False, False, False]


def test_the_python_tool_needs_an_opt_in_and_runs_in_a_subprocess():
    from trl_onpolicy.tool_calls import PYTHON_TOOL_REFUSAL, python_tool

    with pytest.raises(ValueError) as info:
        python_tool()
    assert str(info.value) == PYTHON_TOOL_REFUSAL and "confirm_run_unsafe_code=True" in PYTHON_TOOL_REFUSAL
    tools = tool_map([python_tool(confirm_run_unsafe_code=True, timeout=2.0)])

    def call(code):
        return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}

    here = os.getpid()
    results = run_tool_calls(tools, [call(f"import os; print(os.getpid() != {here})"), call("raise SystemExit('bad')"),
                                     call("while True: pass")], timeout=5.0)  # fmt: skip
    assert [r.message["content"] for r in results] == [
        "True\n",
        "Error: bad",
        "Error: the program ran past 2 s and was stopped.",
    ]
