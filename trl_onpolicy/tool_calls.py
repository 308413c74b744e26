"""Tools the student may call: their JSON schemas, and running the calls of a turn into tool messages.

A tool is a Python callable the user chose, as in TRL (`tools=[...]`): its name, type hints and Google-style docstring
become the JSON schema the chat template shows the model (transformers' `get_json_schema`). A call is the dict of a
parsed assistant message, `{"type": "function", "function": {"name": ..., "arguments": {...}}}` (arguments may be a
JSON string). Running a call never raises: an unknown name, arguments that do not fit, an exception in the tool or a
tool that runs past its timeout all become an error text in the tool message, which the student reads on its next
turn, as a real agent loop would. Sync tools run in threads (a hung one is abandoned, not killed: Python cannot stop
a thread; code the model wrote must run in a subprocess instead), async tools in an event loop with
`asyncio.wait_for`; the calls of every rollout of a turn run concurrently.

[`python_tool`] is the one tool that runs code the model wrote: only with `confirm_run_unsafe_code=True`, each call in
its own `python -I` subprocess with a timeout (as HumanEval's evaluation does).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple

from transformers.utils import get_json_schema

from .code_execution import run_python


class ToolResult(NamedTuple):
    """The tool message of one call and whether the call failed (`error`: what the log counts)."""

    message: dict[str, Any]
    error: str | None = None


def tool_map(tools: list[Callable]) -> dict[str, Callable]:
    """`{name: tool}`, refusing what is not a callable, a name given twice, or a tool without a schema."""
    named: dict[str, Callable] = {}
    for tool in tools:
        if not callable(tool):
            raise ValueError(  # noqa: TRY004 (a configuration error, as the others)
                f"`tools` must be callables (functions with type hints and a docstring), got {tool!r}."
            )
        name = getattr(tool, "__name__", type(tool).__name__)
        if name in named:
            raise ValueError(
                f"Two tools are named {name!r}: tool names must be unique (the model calls them by name)."
            )
        try:
            get_json_schema(tool)
        except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
            raise ValueError(
                f"Tool {name!r} has no JSON schema: {e} Give it type hints for every argument and a Google-style "
                "docstring with an `Args:` section describing each (as transformers' `get_json_schema` needs)."
            ) from e
        named[name] = tool
    return named


def tool_schemas(tools: dict[str, Callable]) -> list[dict]:
    """The JSON schemas the chat template renders (`apply_chat_template(..., tools=...)`)."""
    return [get_json_schema(tool) for tool in tools.values()]


def _arguments(call: dict) -> tuple[str, dict]:
    """The called name and its arguments as a dict; `ValueError` naming what is wrong otherwise."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"a tool call needs a function name, got {call!r:.200}")  # noqa: TRY004 (caught as malformed)
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"the arguments of {function['name']!r} are not JSON ({e.msg})") from e
    if not isinstance(arguments, dict):
        raise ValueError(  # noqa: TRY004 (caught as a malformed call)
            f"the arguments of {function['name']!r} must be an object, got {arguments!r:.100}"
        )
    return function["name"], arguments


def _run(tool: Callable, arguments: dict, timeout: float) -> Any:
    if inspect.iscoroutinefunction(tool):
        return asyncio.run(asyncio.wait_for(tool(**arguments), timeout))
    return tool(**arguments)


def run_tool_calls(tools: dict[str, Callable], calls: list[dict], timeout: float) -> list[ToolResult]:
    """
    Run `calls` concurrently (each in its own thread; an async tool in its own event loop) and return one tool
    message per call, in order: `{"role": "tool", "name": name, "content": str(result)}`, or the error text.

    Args:
        tools (`dict[str, Callable]`): The tools by name ([`tool_map`]).
        calls (`list[dict]`): Parsed tool calls (see the module docstring).
        timeout (`float`): Seconds a call may run; a later one becomes an error message.
    """
    results: list[ToolResult | None] = [None] * len(calls)
    pending = {}
    pool = ThreadPoolExecutor(max_workers=max(len(calls), 1), thread_name_prefix="tool")
    for i, call in enumerate(calls):
        try:
            name, arguments = _arguments(call)
        except ValueError as e:
            results[i] = _error("unknown", f"malformed tool call: {e}.")
            continue
        if name not in tools:
            results[i] = _error(name, f"unknown tool {name!r}; the tools are: {', '.join(tools) or 'none'}.")
            continue
        pending[i] = (name, pool.submit(_run, tools[name], arguments, timeout))
    wait([future for _, future in pending.values()], timeout=timeout)
    pool.shutdown(wait=False, cancel_futures=True)  # a hung sync tool is left to finish in its thread
    for i, (name, future) in pending.items():
        if not future.done():
            results[i] = _error(name, f"tool {name!r} timed out after {timeout:g} s.")
        elif future.exception() is not None:
            e = future.exception()
            text = f"tool {name!r} timed out after {timeout:g} s." if isinstance(e, TimeoutError) else (
                f"tool {name!r} raised {type(e).__name__}: {e}")  # fmt: skip
            results[i] = _error(name, text)
        else:
            results[i] = ToolResult({"role": "tool", "name": name, "content": str(future.result())})
    return results


def _error(name: str, text: str) -> ToolResult:
    return ToolResult({"role": "tool", "name": name, "content": f"Error: {text}"}, text)


PYTHON_TOOL_REFUSAL = (
    "The Python tool EXECUTES code the model writes, on this machine, during training. That code is untrusted: it can "
    "delete files or reach the network. Pass `python_tool(confirm_run_unsafe_code=True)` to allow it, preferably "
    "inside a container or VM."
)


def python_tool(confirm_run_unsafe_code: bool = False, timeout: float = 5.0) -> Callable[[str], str]:
    """
    A tool `python(code)` that runs the model's code in a fresh `python -I` subprocess (killed after `timeout`
    seconds) and returns what it printed, or its error. Refused unless `confirm_run_unsafe_code=True`.
    """
    if not confirm_run_unsafe_code:
        raise ValueError(PYTHON_TOOL_REFUSAL)

    def python(code: str) -> str:
        """
        Runs a Python program and returns what it prints.

        Args:
            code: The program; print what you want to see.
        """
        result = run_python(code, timeout)
        if result.status == "timed out":
            return f"Error: the program ran past {timeout:g} s and was stopped."
        return result.output if result.status == "passed" else f"Error: {result.output.strip()}"

    return python
