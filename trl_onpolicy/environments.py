"""Environments: what answers the student between its turns in a multi-turn rollout.

An environment is any object with two methods (one instance per rollout, made by the `environment_factory` the
trainer is given, so rollouts never share state):

- `reset(row) -> list[dict] | None`: the dataset row starts a conversation. Return the opening messages (e.g. a system
  and a user message; the chat template renders them as the prompt), or None to keep the row's own prompt.
- `step(message) -> EnvStep`: the student's last turn, parsed into an assistant message (`role`, `content`, and
  `tool_calls` where the chat template's parser found any), gives the messages that answer it (`"tool"` or `"user"`
  turns), a reward, and whether the conversation is over. A plain `(messages, reward, done)` tuple is accepted.

The student's tokens are trained on; the messages an environment returns are context: the teacher scores them as
part of the transcript, the loss never includes them (see [`~trl_onpolicy.rollouts.Rollouts.tool_mask`]).

Tools are an environment: [`ToolEnvironment`] runs the tool calls of the student's turn (TRL's `tools` and
`max_tool_calling_iterations`) and ends the conversation at a turn without one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from .tool_calls import run_tool_calls, tool_map


class EnvStep(NamedTuple):
    """What an environment answers to one student turn."""

    messages: list[dict[str, Any]]
    reward: float = 0.0
    done: bool = False


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]] | None: ...

    def step(self, message: dict[str, Any]) -> EnvStep: ...


def _name(env, method: str) -> str:
    return f"`{type(env).__name__}.{method}`"


def _check_messages(messages, subject: str) -> list[dict[str, Any]]:
    """`messages` if it is a list of messages, else a `TypeError` that starts with `subject`."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
        for m in messages
    ):
        raise TypeError(
            f"{subject} a list of messages, each a dict with a string `role` and `content` (e.g. "
            f"[{{'role': 'user', 'content': '...'}}]), got {messages!r:.200}."
        )
    return messages


def checked_reset(env, row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """`env.reset(row)`, its type checked (a `TypeError` naming the method and the expected type)."""
    opening = env.reset(row)
    return None if opening is None else _check_messages(opening, f"{_name(env, 'reset')} must return None or")


def checked_step(env, message: dict[str, Any]) -> EnvStep:
    """`env.step(message)` as an [`EnvStep`], its types checked (a `TypeError` naming the method)."""
    out = env.step(message)
    where = _name(env, "step")
    if not isinstance(out, tuple) or len(out) != 3:
        raise TypeError(
            f"{where} must return an `EnvStep(messages, reward, done)` (or that 3-tuple), got {out!r:.200}."
        )
    messages, reward, done = out
    _check_messages(messages, f"{where}'s `messages` must be")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise TypeError(f"{where}'s `reward` must be a number, got {type(reward).__name__} ({reward!r:.50}).")
    if not isinstance(done, bool):
        raise TypeError(f"{where}'s `done` must be a bool, got {type(done).__name__} ({done!r:.50}).")
    return EnvStep(messages, float(reward), done)


class ToolEnvironment:
    """
    Tools as an environment: each turn's tool calls are run (concurrently, see
    [`~trl_onpolicy.tool_calls.run_tool_calls`]) and their results answer it as `"tool"` messages; a turn without a
    call ends the conversation, and so does the turn after `max_tool_calling_iterations` rounds of calls (its calls
    are not run, as in TRL). A turn whose calls could not be parsed (`message["tool_call_error"]`, see
    [`~trl_onpolicy.multi_turn`]) is answered by a tool message with the parser's error.

    Args:
        tools (`list[Callable]` or `dict[str, Callable]`): The tools.
        max_tool_calling_iterations (`int`, *optional*): Rounds of tool calls per rollout; None: no limit but the
            token budget and `max_turns`.
        timeout (`float`): Seconds one call may run.

    Attributes:
        calls, failures (`int`): Tool calls run in this rollout, and those that ended in an error message.
    """

    def __init__(self, tools, max_tool_calling_iterations: int | None = None, timeout: float = 30.0):
        self.tools = tools if isinstance(tools, dict) else tool_map(tools)
        self.max_iterations, self.timeout = max_tool_calling_iterations, timeout
        self.iterations = self.calls = self.failures = 0

    def reset(self, row: dict[str, Any]) -> None:
        self.iterations = self.calls = self.failures = 0

    def step(self, message: dict[str, Any]) -> EnvStep:
        calls, error = message.get("tool_calls") or [], message.get("tool_call_error")
        if not calls and not error:
            return EnvStep([], 0.0, True)
        if self.max_iterations is not None and self.iterations >= self.max_iterations:
            return EnvStep([], 0.0, True)
        self.iterations += 1
        if error:  # the turn tried to call a tool and the call could not be read
            self.calls, self.failures = self.calls + 1, self.failures + 1
            return EnvStep([{"role": "tool", "name": "unknown", "content": f"Error: malformed tool call: {error}"}])
        results = run_tool_calls(self.tools, calls, self.timeout)
        self.calls += len(results)
        self.failures += sum(r.error is not None for r in results)
        return EnvStep([r.message for r in results])


def tool_environment_factory(
    tools, max_tool_calling_iterations: int | None, timeout: float
) -> Callable[[], ToolEnvironment]:
    """A factory of [`ToolEnvironment`]s sharing one checked tool map."""
    named = tools if isinstance(tools, dict) else tool_map(tools)
    return lambda: ToolEnvironment(named, max_tool_calling_iterations, timeout)
