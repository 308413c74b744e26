"""Multi-turn rollouts: the student writes a turn, an environment answers, the student goes on, up to `max_turns`.

The turns of all the rollouts of a call are batched: each turn is one sampler call over every conversation still
open (the transcript so far as its prompt), then every open conversation's environment answers at once (tool calls
run concurrently). A rollout's completion is its whole transcript after the prompt: the student's turns, and between
them the environment's messages rendered by the chat template (with the template's glue: the end of the student's
turn, the tool turn's header, the next assistant header). `tool_mask` is 1 on the tokens the student drew and 0 on
everything between them, so the teacher scores the transcript in one pass and only the student's own tokens are in
the loss and in the token count.

A turn's text is parsed into an assistant message by the tokenizer's own response parser (`tokenizer.parse_response`,
the chat template's format of tool calls; TRL's way), or by a `parse_response(text) -> message` callable the user
gives. A turn the parser cannot read is passed on with `tool_call_error` set, which a [`ToolEnvironment`] answers
with an error message. A conversation that would pass `max_completion_length` is cut there and flagged `truncated`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from transformers import GenerationConfig

from .environments import checked_reset, checked_step
from .prompts import chat_ids
from .rollouts import Rollouts

NOT_PREFIX_PRESERVING = (
    "The chat template does not render a conversation as the prefix of the same conversation with one more message, "
    "so a multi-turn transcript cannot be built turn by turn. Give the tokenizer a prefix-preserving template "
    "(TRL's `get_training_chat_template` makes one for known families)."
)


@dataclass
class Conversation:
    """One rollout in progress: its prompt, its completion so far with the mask of drawn tokens, and its counts."""

    env: Any
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logps: list[float] | None = field(default_factory=list)
    turns: int = 0
    reward: float = 0.0
    malformed: int = 0
    done: bool = False
    truncated: bool = False
    last_message: dict[str, Any] | None = None

    def add(self, ids: list[int], drawn: bool, logps: list[float] | None = None) -> None:
        self.ids += ids
        self.mask += [int(drawn)] * len(ids)
        if self.logps is not None:
            self.logps = None if drawn and logps is None else self.logps + (logps or [float("nan")] * len(ids))


def glue_ids(tokenizer, messages: list[dict], chat_template_kwargs: dict, openings: dict | None = None) -> list[int]:
    """
    The tokens the chat template puts after an assistant turn's end-of-turn token for `messages` (tool or user
    turns) and the next assistant header: the difference of a short conversation rendered with and without them
    (the same device as TRL's tool loop), the shorter one cut after its last EOS. `openings` keeps the short
    conversation's rendering per tool name across calls (it depends on nothing else).
    """
    name = next((m.get("name", "tool") for m in messages if m["role"] == "tool"), None)
    calls = [] if name is None else [{"type": "function", "function": {"name": name, "arguments": {}}}]
    opening = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x", **({"tool_calls": calls} if
               calls else {})}]  # fmt: skip
    openings = {} if openings is None else openings
    if name not in openings:
        prefix = chat_ids(tokenizer, opening, "environment messages", **chat_template_kwargs)
        eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
        openings[name] = prefix[: eos[-1] + 1] if eos else prefix
    prefix = openings[name]
    full = chat_ids(tokenizer, opening + messages, "environment messages", add_generation_prompt=True,
                    **chat_template_kwargs)  # fmt: skip
    if full[: len(prefix)] != prefix:
        raise ValueError(NOT_PREFIX_PRESERVING)
    return full[len(prefix) :]


def parse_turn(tokenizer, ids: list[int], prefix: list[int], tools: list | None, parse_response) -> dict[str, Any]:
    """An assistant message from a turn's ids: `parse_response(text)` when given, else the tokenizer's parser when
    it has one, else the text as content. A parser's error is kept as `tool_call_error`."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    try:
        if parse_response is not None:
            message = parse_response(text)
        elif getattr(tokenizer, "response_template", None) is not None:
            message = tokenizer.parse_response(ids, prefix=prefix, tools=tools)
        else:
            return {"role": "assistant", "content": text}
    except Exception as e:  # noqa: BLE001 (any parser's error is a malformed call: answered, the rollout goes on)
        return {"role": "assistant", "content": text, "tool_call_error": f"{type(e).__name__}: {e}"}
    if not isinstance(message, dict):
        return {"role": "assistant", "content": text, "tool_call_error": f"the parser returned {message!r:.100}"}
    return {"role": "assistant", **{k: v for k, v in message.items() if v is not None}, "content": message.get(
        "content") or ""}  # fmt: skip


class MultiTurnRollouts:
    """
    Writes multi-turn rollouts with any [`~trl_onpolicy.samplers.Sampler`] (the student's, or the teacher's).

    Args:
        environment_factory (`Callable[[], Environment]`): Makes one environment per rollout.
        tokenizer: The student's tokenizer (its chat template renders the environments' messages).
        max_turns (`int`): Student turns per rollout at most.
        max_completion_length (`int`): Tokens of a rollout after its prompt (the student's and the environment's).
        tools (`list[dict]`, *optional*): The tools' JSON schemas, rendered into prompts and given to the parser.
        parse_response (`Callable[[str], dict]`, *optional*): Parses a turn's text into an assistant message.
        chat_template_kwargs (`dict`, *optional*): More arguments of `apply_chat_template`.
    """

    def __init__(self, environment_factory: Callable, tokenizer, max_turns: int, max_completion_length: int,
                 tools: list[dict] | None = None, parse_response=None, chat_template_kwargs: dict | None = None):  # fmt: skip
        self.factory, self.tokenizer, self.max_turns = environment_factory, tokenizer, max_turns
        self.budget, self.tools, self.parse_response = max_completion_length, tools, parse_response
        self.template_kwargs = {**(chat_template_kwargs or {}), **({"tools": tools} if tools else {})}
        self._openings: dict = {}  # `glue_ids`' constant half, rendered once per tool name

    def rollouts(self, sampler, prompt_ids: list[list[int]], rows: list[dict], source: str,
                 generation_config: GenerationConfig) -> Rollouts:  # fmt: skip
        """Each row's conversation played to its end; one [`Rollouts`] entry per row, with `tool_mask`."""
        talks = [self._start(prompt, row) for prompt, row in zip(prompt_ids, rows, strict=True)]
        with ThreadPoolExecutor(max_workers=max(len(talks), 1), thread_name_prefix="environment") as pool:
            for _ in range(self.max_turns):
                open_ = [c for c in talks if not c.done]
                if not open_:
                    break
                self._student_turn(sampler, open_, generation_config)
                answering = [c for c in open_ if not c.done]
                steps = list(pool.map(lambda c: checked_step(c.env, c.last_message), answering))
                for talk, step in zip(answering, steps):
                    self._answer(talk, step)
        for talk in talks:  # `max_turns` ran out: the last turn stands
            talk.done = True
        out_rows = [{**row, "multi_turn": self._stats(c)} for row, c in zip(rows, talks)]
        logps = [c.logps for c in talks]
        return Rollouts([c.prompt_ids for c in talks], [c.ids for c in talks], source, [c.truncated for c in talks],
                        out_rows, None if any(lp is None for lp in logps) else logps, [c.mask for c in talks])  # fmt: skip

    def _start(self, prompt: list[int], row: dict) -> Conversation:
        env = self.factory()
        opening = checked_reset(env, row)
        if opening is not None:
            prompt = chat_ids(self.tokenizer, opening, "the environment's opening", add_generation_prompt=True,
                              **self.template_kwargs)  # fmt: skip
        return Conversation(env, list(prompt))

    def _student_turn(self, sampler, talks: list[Conversation], generation_config: GenerationConfig) -> None:
        """One turn of every open conversation in one sampler call, each cut to its own remaining budget."""
        left = [self.budget - len(c.ids) for c in talks]
        config = replace_max_new_tokens(generation_config, max(left))
        samples = sampler.sample([c.prompt_ids + c.ids for c in talks], config, self.tokenizer)
        for i, talk in enumerate(talks):
            ids, logps = samples.completion_ids[i][: left[i]], None
            if samples.logps is not None:
                logps = samples.logps[i][: left[i]]
            cut = samples.truncated[i] or len(samples.completion_ids[i]) > left[i]  # ran into its own budget
            prefix = talk.prompt_ids + talk.ids
            talk.add(ids, True, logps)
            talk.turns += 1
            if cut:
                talk.done, talk.truncated = True, True
                continue
            talk.last_message = parse_turn(self.tokenizer, ids, prefix, self.tools, self.parse_response)
            talk.malformed += "tool_call_error" in talk.last_message

    def _answer(self, talk: Conversation, step) -> None:
        talk.reward += step.reward
        if step.done or talk.turns >= self.max_turns or not step.messages:
            talk.done = True
            return
        glue = glue_ids(self.tokenizer, step.messages, self.template_kwargs, self._openings)
        if len(talk.ids) + len(glue) >= self.budget:  # no room left for a student token after the answer
            talk.done, talk.truncated = True, True
            return
        talk.add(glue, False)

    @staticmethod
    def _stats(talk: Conversation) -> dict[str, Any]:
        env = talk.env
        return {"turns": talk.turns, "reward": talk.reward, "malformed": talk.malformed,
                "tool_calls": getattr(env, "calls", 0), "tool_failures": getattr(env, "failures", 0)}  # fmt: skip


def replace_max_new_tokens(config: GenerationConfig, n: int) -> GenerationConfig:
    """A copy of `config` that writes at most `n` tokens."""
    copy = GenerationConfig.from_dict(config.to_dict())
    copy.max_new_tokens = n
    return copy
