"""The embedded default's task with the calculator, scored: greedy multi-turn rollouts with `calc`, exact match of
the final answer, tool calls per problem and malformed calls (see [`~trl_onpolicy.toy.calculator`]).

The rollouts are the trainer's own ([`~trl_onpolicy.multi_turn.MultiTurnRollouts`] with the tool environment), so a
model is scored exactly as it is trained: the prompt is the chat template's rendering of the question with the tools
line, every call runs, every answer is appended as the template writes it. [`ToolEvalCallback`] scores the live
student so before training and after every round (`trl-onpolicy quickstart --tools`).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import GenerationConfig
from transformers.utils import get_json_schema

from .environments import tool_environment_factory
from .multi_turn import MultiTurnRollouts
from .prompts import chat_ids
from .round_evaluation import RoundEvalCallback, preserved_rng_and_env, unwrap_model
from .samplers import GenerateSampler
from .toy.calculator import TOOL_CHAT_TEMPLATE, calc, parse_calc_turn
from .toy.task import generate_problems, is_correct, prompt_text

TOOL_TASK, CALLED = "toy_tools", "toy_tools_called"  # the report's columns: exact match, problems with a call


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
    correct = calls = failures = malformed = called = 0
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
            called += stats["tool_calls"] > stats["tool_failures"]
    n = max(len(problems), 1)
    return {"exact_match": correct / n, "calls_per_problem": calls / n, "malformed_per_problem": malformed / n,
            "failed_call_fraction": failures / calls if calls else 0.0, "called_fraction": called / n}  # fmt: skip


class ToolEvalCallback(RoundEvalCallback):
    """
    Scores the live student on the toy task with the calculator ([`evaluate_with_tools`]) before training and after
    every round, into the history that `trl_onpolicy.reports` turns into the per-round table and plot (see
    [`~trl_onpolicy.round_evaluation.RoundEvalCallback`] for when and where it runs).

    Args:
        eval_size (`int`, *optional*, defaults to `200`), eval_seed (`int`, *optional*, defaults to `0`):
            The toy eval problems scored (`toy.generate_problems(eval_size, "eval", eval_seed)`).
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Tokens of a rollout after its prompt (the model's turns and the calculator's answers).
        eval_steps (`int` or `None`, *optional*), eval_before_training (`bool`, *optional*, defaults to `True`),
        tokenizer (*optional*): As for [`~trl_onpolicy.eval.LmEvalCallback`].

    Scores: `toy_tools` (exact match with the calculator) and `toy_tools_called` (the fraction of problems with at
    least one call that ran); the metrics hold all of [`evaluate_with_tools`]' numbers under `toy_tools`.
    """

    def __init__(self, eval_size: int = 200, eval_seed: int = 0, max_new_tokens: int = 256,
                 eval_steps: int | None = None, eval_before_training: bool = True, tokenizer=None):  # fmt: skip
        super().__init__(eval_steps, eval_before_training, tokenizer)
        self.eval_size, self.eval_seed, self.max_new_tokens = eval_size, eval_seed, max_new_tokens
        self.problems = generate_problems(eval_size, "eval", seed=eval_seed)

    def evaluate(self, model=None, tokenizer=None, output_dir: str | None = None, trainer=None) -> dict:
        """Score `model` now; raises on failure. Restores training mode and the RNG states."""
        model, tokenizer = unwrap_model(model, trainer), self._tokenizer(tokenizer, "ToolEvalCallback")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), preserved_rng_and_env():
                metrics = evaluate_with_tools(model, tokenizer, self.problems, self.max_new_tokens)
        finally:
            model.train(was_training)
        return {"scores": {TOOL_TASK: metrics["exact_match"], CALLED: metrics["called_fraction"]},
                "primary": {TOOL_TASK: "exact_match", CALLED: "called_fraction"}, "metrics": {TOOL_TASK: metrics}}

    def describe(self) -> str:
        return "the calculator evaluation"

    def state(self) -> dict:
        return self._state(("eval_size", "eval_seed", "max_new_tokens", "eval_steps", "eval_before_training"))
