"""The embedded default's task with the calculator, scored: greedy multi-turn rollouts with `calc`, exact match of
the final answer, tool calls per problem and malformed calls (see [`~trl_onpolicy.toy.calculator`]).

The rollouts are the trainer's own ([`~trl_onpolicy.multi_turn.MultiTurnRollouts`] with the tool environment), so a
model is scored exactly as it is trained: the prompt is the chat template's rendering of the question with the tools
line, every call runs, every answer is appended as the template writes it.
"""

from __future__ import annotations

import contextlib

from transformers import GenerationConfig
from transformers.utils import get_json_schema

from .environments import tool_environment_factory
from .multi_turn import MultiTurnRollouts
from .prompts import chat_ids
from .samplers import GenerateSampler
from .toy.calculator import TOOL_CHAT_TEMPLATE, calc, parse_calc_turn
from .toy.task import is_correct, prompt_text


def tool_tokenizer(tokenizer):
    """A copy of the toy tokenizer with the calculator's chat template."""
    import copy

    tool = copy.deepcopy(tokenizer)
    tool.chat_template = TOOL_CHAT_TEMPLATE
    return tool


def greedy_tool_rollouts(model, tokenizer, problems: list[dict], max_new_tokens: int, batch_size: int = 64,
                         max_tool_calling_iterations: int = 12, sampler=None, source: str = "student"):  # fmt: skip
    """
    Greedy rollouts with `calc` on `problems`, `batch_size` at a time: yields each batch's problems and their
    [`~trl_onpolicy.rollouts.Rollouts`]. `tokenizer` carries the calculator's template ([`tool_tokenizer`]);
    `sampler` replaces greedy `generate` on `model` (a test's scripted turns).
    """
    schemas = [get_json_schema(calc)]
    engine = MultiTurnRollouts(tool_environment_factory([calc], max_tool_calling_iterations, 5.0), tokenizer,
                               max_tool_calling_iterations + 1, max_new_tokens, schemas, parse_calc_turn)  # fmt: skip
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    sampler = sampler or GenerateSampler(lambda: contextlib.nullcontext(model))
    for lo in range(0, len(problems), batch_size):
        part = problems[lo : lo + batch_size]
        prompts = [chat_ids(tokenizer, [{"role": "user", "content": prompt_text(p["question"])}], "prompt",
                            tools=schemas) for p in part]  # fmt: skip
        yield part, engine.rollouts(sampler, prompts, [{} for _ in part], source, config)


def evaluate_with_tools(model, tokenizer, problems: list[dict], max_new_tokens: int = 256, batch_size: int = 64,
                        max_tool_calling_iterations: int = 12, sampler=None) -> dict[str, float]:  # fmt: skip
    """
    Greedy rollouts with `calc` on `problems` ([`greedy_tool_rollouts`]); returns `exact_match` (GSM8K's strict match
    of the final `#### n`), `calls_per_problem`, `malformed_per_problem` and `failed_call_fraction` (calls answered by
    an error). `sampler` replaces greedy `generate` on `model` (a test's scripted turns).
    """
    tokenizer = tool_tokenizer(tokenizer)
    correct = calls = failures = malformed = 0
    for part, rollouts in greedy_tool_rollouts(model, tokenizer, problems, max_new_tokens, batch_size,
                                               max_tool_calling_iterations, sampler):  # fmt: skip
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        for problem, text, row in zip(part, texts, rollouts.rows):
            correct += is_correct(text, problem)
            stats = row["multi_turn"]
            calls, failures, malformed = (
                calls + stats["tool_calls"],
                failures + stats["tool_failures"],
                malformed + stats["malformed"],
            )
    n = max(len(problems), 1)
    return {"exact_match": correct / n, "calls_per_problem": calls / n, "malformed_per_problem": malformed / n,
            "failed_call_fraction": failures / calls if calls else 0.0}  # fmt: skip
