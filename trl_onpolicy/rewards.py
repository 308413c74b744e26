"""Task rewards beside distillation: TRL GRPO's `reward_funcs`, scored on the student's own rollouts.

A reward function has GRPO's signature, `f(prompts, completions, completion_ids, **columns) -> list[float | None]`:
`prompts` as the dataset gives them (strings, or lists of messages), `completions` as text (or, for conversational
prompts, `[{"role": "assistant", "content": text}]`), `completion_ids` the token ids, and every other column of the
rows as a keyword (a list per column, one entry per rollout). `None` means "this function does not apply here": it
counts as NaN and is left out of the sums, as in GRPO. A reward function can also be a sequence-classification model
(or its id or path): its single logit on the prompt + completion text is the reward.

For each rollout the weighted sum over the functions (`reward_weights`, 1 each by default) is its reward `r`; rewards
are normalised within the group of rollouts of the same prompt (`num_generations` of them): `A = (r - mean) / (std +
1e-4)`, GRPO's group advantage (a group of one has advantage 0). The loss then adds, on every completion token, the
policy-gradient term `-reward_weight * A * q_t / stopgrad(q_t)` (see `docs/divergences.md`). Only the student's own
rollouts get it: a policy gradient needs samples of the policy, so dataset or teacher-written batches train on the
divergence alone.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from .rollouts import Rollouts

logger = logging.getLogger(__name__)

ADVANTAGE_EPS = 1e-4  # GRPO's


def reward_name(func) -> str:
    """The name a reward function is logged under: a function's `__name__`, a model's name or path."""
    if isinstance(func, torch.nn.Module):
        return str(getattr(func.config, "_name_or_path", "") or type(func).__name__).split("/")[-1]
    return getattr(func, "__name__", type(func).__name__)


def group_advantages(rewards: torch.Tensor, groups: list[Any]) -> torch.Tensor:
    """`(B,)` GRPO advantages of `(B,)` rewards: `(r - mean) / (std + 1e-4)` over the rollouts that share a group key
    (the unbiased std, as GRPO's; 0 for a group of one)."""
    advantages = torch.zeros_like(rewards, dtype=torch.float32)  # (B,)
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    for index in members.values():
        if len(index) < 2:
            continue
        r = rewards[index].float()  # (g,)
        advantages[index] = (r - r.mean()) / (r.std() + ADVANTAGE_EPS)
    return advantages


class Rewards:
    """
    The task rewards of a run: scores the student's rollouts with each reward function and attaches their group
    advantages to the step's batch (see the module docstring).

    Args:
        reward_funcs (`list`): Callables with GRPO's signature, and/or sequence-classification models (or their ids).
        reward_weights (`list[float]`, *optional*): One weight per function; 1 each by default.
        reward_weight (`float`): The weight of the whole reward term beside the distillation term.
        tokenizer: The student's tokenizer (decodes completions).
        trust_remote_code (`bool`): For reward models loaded here by id.
    """

    def __init__(self, reward_funcs: list, reward_weights: list[float] | None, reward_weight: float, tokenizer,
                 trust_remote_code: bool = False):  # fmt: skip
        self.funcs = [_as_reward(f, trust_remote_code) for f in reward_funcs]
        self.names = [reward_name(f) for f in self.funcs]
        self.weights = torch.tensor(reward_weights or [1.0] * len(self.funcs), dtype=torch.float32)  # (F,)
        self.reward_weight, self.tokenizer = reward_weight, tokenizer
        self._warned: set[str] = set()

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """`(B, F)` each function's reward of each rollout (NaN where a function returned None)."""
        prompt_texts, texts = rollouts.decode(self.tokenizer)
        prompts = [row.get("prompt", text) for row, text in zip(rollouts.rows, prompt_texts)]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]  # fmt: skip
        columns = {k: [row.get(k) for row in rollouts.rows] for k in rollouts.rows[0] if k not in RESERVED}
        out = torch.full((len(rollouts), len(self.funcs)), float("nan"))  # (B, F)
        for j, (func, name) in enumerate(zip(self.funcs, self.names)):
            if isinstance(func, torch.nn.Module):
                values = _model_rewards(func, self.tokenizer, prompts, texts)
            else:
                values = _called(func, name, prompts, completions, rollouts.completion_ids, columns)
            out[:, j] = self._checked(values, name, len(rollouts))
        return out

    def _checked(self, values, name: str, n: int) -> torch.Tensor:
        """A function's rewards as `(n,)` float32 (None -> NaN), or an error naming the function and the fix; a NaN
        it returned counts as None, with one warning per function."""
        rewards = _checked(values, name, n)
        if torch.isinf(rewards).any():
            raise ValueError(f"The reward function {name} returned an infinite reward for completion "
                             f"{int(torch.isinf(rewards).nonzero()[0])}: return finite floats (or None).")  # fmt: skip
        nan = [i for i, v in enumerate(values) if v is not None and math.isnan(float(v))]
        if nan and name not in self._warned:
            self._warned.add(name)
            logger.warning("The reward function %s returned NaN for %d of %d completions (first: %d); they count as "
                           "None (left out of the sums), as GRPO counts them.", name, len(nan), n, nan[0])  # fmt: skip
        return rewards

    def attach(self, batch, rollouts: Rollouts, metrics: dict[str, list[float]], accelerator) -> None:
        """On the student's rollouts: `batch.advantages` `(B, C)` (the group advantage times `reward_weight` on every
        completion token, 0 on padding) and the rewards' metrics (means over all processes)."""
        if rollouts.source != "student":
            return
        per_func = self.score(rollouts)  # (B, F)
        total = (per_func * self.weights).nansum(1)  # (B,)
        advantages = group_advantages(total, [tuple(p) for p in rollouts.prompt_ids])  # (B,)
        mask = batch.completion_mask  # (B, C)
        batch.advantages = (self.reward_weight * advantages.to(mask.device))[:, None] * mask  # (B, C)
        self._log(per_func, total, metrics, accelerator)

    def _log(self, per_func: torch.Tensor, total: torch.Tensor, metrics, accelerator) -> None:
        """`rewards/<name>/mean` and `/std` per function and `reward`, `reward_std` of the weighted sum (GRPO's
        names), over every process's rollouts (one reduction)."""
        values = torch.cat([per_func, total[:, None]], 1)  # (B, F + 1)
        finite = ~torch.isnan(values)  # (B, F + 1)
        v = torch.where(finite, values, 0.0).double()
        sums = torch.stack([v.sum(0), (v * v).sum(0), finite.sum(0).double()])  # (3, F + 1)
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        for j, name in enumerate([*[f"rewards/{n}" for n in self.names], "reward"]):
            s, s2, n = sums[:, j].tolist()
            if n == 0:
                continue
            mean = s / n
            std = math.sqrt(max(s2 / n - mean * mean, 0.0) * n / max(n - 1, 1))
            metrics[f"{name}/mean" if name != "reward" else "reward"].append(mean)
            metrics[f"{name}/std" if name != "reward" else "reward_std"].append(std)


RESERVED = ("prompt", "prompts", "completions", "completion_ids", "teacher_prompt_ids")


def _as_reward(func, trust_remote_code: bool):
    """A callable as it is; a sequence-classification model (or its id or path) loaded and frozen."""
    if isinstance(func, str):
        from transformers import AutoModelForSequenceClassification

        func = AutoModelForSequenceClassification.from_pretrained(func, num_labels=1,
                                                                  trust_remote_code=trust_remote_code)  # fmt: skip
    if isinstance(func, torch.nn.Module):
        if getattr(func.config, "num_labels", 1) != 1:
            raise ValueError(
                f"A reward model must give one score per sequence (`num_labels=1`); {reward_name(func)} has "
                f"{func.config.num_labels} labels."
            )
        return func.eval().requires_grad_(False)
    if not callable(func):
        raise TypeError(
            f"Each of `reward_funcs` must be a callable `(prompts, completions, completion_ids, **columns) -> "
            f"list[float]`, a sequence-classification model, or its id or path; got {type(func).__name__}."
        )
    if not _takes_keywords(func):
        raise TypeError(
            f"The reward function {reward_name(func)} must accept `prompts`, `completions` and `**kwargs` as keyword "
            "arguments (TRL GRPO's signature), e.g. `def reward(prompts, completions, **kwargs) -> list[float]`."
        )
    return func


def _takes_keywords(func: Callable) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _called(func, name: str, prompts: list, completions: list, completion_ids: list, columns: dict) -> list:
    """`func` on the whole batch; when it raises, the first rollout it raises on alone is found and named."""
    try:
        return func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as error:
        row = None
        for i in range(len(prompts)):
            one = {k: v[i : i + 1] for k, v in columns.items()}
            try:
                func(prompts=prompts[i : i + 1], completions=completions[i : i + 1],
                     completion_ids=completion_ids[i : i + 1], **one)  # fmt: skip
            except Exception:  # noqa: BLE001
                row = i
                break
        where = "" if row is None else f" on completion {row} (prompt {prompts[row]!r:.80})"
        raise ValueError(f"The reward function {name} raised {type(error).__name__}: {error}{where}. Fix the "
                         "function, or have it return None where it does not apply.") from error  # fmt: skip


def _checked(values, name: str, n: int) -> torch.Tensor:
    """A function's rewards as `(n,)` float32 (None -> NaN), or an error naming the function and the fix."""
    values = list(values) if values is not None else None
    if values is None or len(values) != n:
        got = "None" if values is None else f"{len(values)} values"
        raise ValueError(f"The reward function {name} returned {got} for {n} completions: return one float (or None) "
                         "per completion, in order.")  # fmt: skip
    try:
        return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"The reward function {name} returned a value that is not a number ({e}); return floats "
                         "(or None where it does not apply).") from e  # fmt: skip


@torch.no_grad()
def _model_rewards(model, tokenizer, prompts: list, texts: list[str]) -> list[float]:
    """A sequence-classification model's logit on each prompt + completion (the chat template for messages)."""
    sequences = []
    for prompt, text in zip(prompts, texts):
        if isinstance(prompt, list):
            messages = [*prompt, {"role": "assistant", "content": text}]
            sequences.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            sequences.append(prompt + text)
    inputs = tokenizer(sequences, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in inputs.items()}).logits[:, 0].float().tolist()
