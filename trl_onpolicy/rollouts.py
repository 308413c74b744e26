"""Rollouts: completions sampled for a batch of prompts, their masks, and their layout as model inputs.

A [`Rollouts`] holds token ids as Python lists (what callbacks see, log, filter or edit). [`collate`] lays them out as
one tensor batch: prompts padded on the left to a common length `P`, completions padded on the right to `C`, so the
logits at positions `P - 1 ... P + C - 2` predict the completion tokens and every completion starts at the same column.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import GenerationConfig

from .launchers import needs_synced_generation
from .token_sampling import inverse_cdf_generation


@dataclass
class Rollouts:
    """
    Completions for a batch of prompts, one entry per completion.

    Args:
        prompt_ids (`list[list[int]]`): Prompt token ids (repeated `num_generations` times per dataset row).
        completion_ids (`list[list[int]]`): Completion token ids, ending with EOS unless truncated.
        source (`str`): Who wrote the completions: `"student"`, `"teacher"` or `"dataset"`.
        truncated (`list[bool]`): Whether a completion hit `max_completion_length` without stopping.
        rows (`list[dict]`): The dataset row each completion comes from (for routing, logging and filters).
        sampling_logps (`list[list[float]]`, *optional*): The sampler's own log-prob of each completion token, where
            the sampler reports it (vLLM; NaN where it could not): the behaviour policy of the importance-sampling
            correction (see [`~trl_onpolicy.divergences.sampled_reverse_kl`]). A callback that edits completions
            must edit these alike or set them to `None`.
        tool_mask (`list[list[int]]`, *optional*): 1 on each completion token the sampler drew, 0 on the tokens a
            multi-turn rollout added between the student's turns (tool results, environment messages, the chat
            template's glue): context the teacher scores, never trained on or counted (TRL's name). None: every
            completion token was drawn.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    source: str
    truncated: list[bool] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    sampling_logps: list[list[float]] | None = None
    tool_mask: list[list[int]] | None = None

    def __post_init__(self):
        if not self.truncated:
            self.truncated = [False] * len(self.completion_ids)
        if not self.rows:
            self.rows = [{} for _ in self.completion_ids]
        n = len(self.prompt_ids)
        if not (len(self.completion_ids) == len(self.truncated) == len(self.rows) == n):
            raise ValueError(
                f"Rollouts fields disagree in length: {n} prompts, {len(self.completion_ids)} completions, "
                f"{len(self.truncated)} truncation flags, {len(self.rows)} rows."
            )
        _check_per_token(self.sampling_logps, self.completion_ids, "`sampling_logps` must hold one log-prob per "
                         "completion token", "A callback that edits completions must edit `sampling_logps` alike (NaN "
                         "for a token the sampler did not draw) or set them to `None` (no importance-sampling "
                         "correction).")  # fmt: skip
        _check_per_token(self.tool_mask, self.completion_ids, "`tool_mask` must hold one 0/1 flag per completion token",
                         "A callback that edits the completions of multi-turn rollouts must edit `tool_mask` alike.")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: list[int]) -> Rollouts:
        """The rollouts at `indices`, in that order."""
        return replace(
            self,
            prompt_ids=[self.prompt_ids[i] for i in indices],
            completion_ids=[self.completion_ids[i] for i in indices],
            truncated=[self.truncated[i] for i in indices],
            rows=[self.rows[i] for i in indices],
            sampling_logps=None if self.sampling_logps is None else [self.sampling_logps[i] for i in indices],
            tool_mask=None if self.tool_mask is None else [self.tool_mask[i] for i in indices],
        )

    def teacher_prompt_ids(self) -> list[list[int]]:
        """Each rollout's teacher prompt (see [`teacher_prompts_of`])."""
        return teacher_prompts_of(self.prompt_ids, self.rows)

    @property
    def has_teacher_prompts(self) -> bool:
        return any(row.get("teacher_prompt_ids") for row in self.rows)

    def decode(self, tokenizer) -> tuple[list[str], list[str]]:
        """Prompt and completion texts (special tokens dropped)."""
        prompts = tokenizer.batch_decode(self.prompt_ids, skip_special_tokens=True)
        completions = tokenizer.batch_decode(self.completion_ids, skip_special_tokens=True)
        return prompts, completions


def _check_per_token(values: list[list] | None, completions: list[list[int]], what: str, fix: str) -> None:
    """A `ValueError` "{what}, got {where}. {fix}" unless `values` (None passes) has one entry per completion token."""
    if values is None:
        return
    bad = [i for i, (v, c) in enumerate(zip(values, completions)) if len(v) != len(c)]
    if len(values) != len(completions) or bad:
        where = f"completions {bad[:5]}" if bad else f"{len(values)} rows for {len(completions)} completions"
        raise ValueError(f"{what}, got {where}. {fix}")


def pad(sequences: list[list[int]], pad_id: int, side: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest (at least 1 column) on `side` (`"left"` or `"right"`): ids and mask, both `(B, L)`."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, L)
    for i, s in enumerate(sequences):
        if s:
            columns = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, columns] = torch.tensor(s, dtype=torch.long)
            mask[i, columns] = 1
    return ids.to(device), mask.to(device)


def position_kwargs(model, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    `position_ids` `(B, L)` counted over real tokens only, as `generate` counts them, for models whose forward takes them.

    Without them a model numbers positions from the first column, so left padding shifts a row's positions: harmless
    for rotary embeddings (shift-invariant), but with learned absolute positions (GPT-2, OPT) a row's logits would
    depend on its batch-mates' lengths (one process vs two) and differ from the ones it was sampled with.
    """
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}  # (B, L)


def teacher_prompts_of(prompt_ids: list[list[int]], rows: list[dict[str, Any]]) -> list[list[int]]:
    """Each row's teacher prompt: its `teacher_prompt_ids` (privileged context, see `trl_onpolicy.teacher_prompts`)
    where set and non-empty, else its own prompt `prompt_ids[i]`."""
    return [list(row.get("teacher_prompt_ids") or prompt) for prompt, row in zip(prompt_ids, rows, strict=True)]


def teacher_inputs(rollouts: Rollouts, student_inputs: dict[str, Any], pad_id: int, device=None) -> dict[str, Any]:
    """
    What the teacher scores: the same completions after each rollout's teacher prompt
    ([`Rollouts.teacher_prompt_ids`]), laid out as [`collate`] lays them out (teacher prompts padded on the left to
    their own `P_t`), so `completion_ids` and `completion_mask` are the student's; `student_inputs` itself when no
    rollout has a teacher prompt of its own. Rows with `teacher_native_prompt_ids` (a teacher of another tokenizer,
    see `teacher_prompts.add_native_teacher_prompt_ids`) add them as a list under that key.
    """
    native = {}  # a teacher of another tokenizer: its own rendering of each prompt, in its tokens ([] where none)
    if any(row.get("teacher_native_prompt_ids") for row in rollouts.rows):
        native = {"teacher_native_prompt_ids": [list(row.get("teacher_native_prompt_ids") or []) for row in rollouts.rows]}
    if not rollouts.has_teacher_prompts:
        return {**student_inputs, **native} if native else student_inputs
    inputs = collate(rollouts, pad_id, device, rollouts.teacher_prompt_ids())
    return {**student_inputs, "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], **native}


def collate(
    rollouts: Rollouts, pad_id: int, device=None, prompt_ids: list[list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """
    Model inputs for a batch of rollouts (after `prompt_ids` instead of the rollouts' own prompts, when given).

    Returns:
        `dict` with `input_ids` and `attention_mask` `(B, P + C)` (1 on every real token), `completion_ids` and
        `completion_mask` `(B, C)` (1 on the completion tokens in the loss: the drawn ones, see
        [`Rollouts.tool_mask`]), and, where the sampler reported them, `sampling_logps` `(B, C)` float32 (NaN on
        padding).
    """
    prompt_ids, prompt_mask = pad(prompt_ids or rollouts.prompt_ids, pad_id, "left", device)  # (B, P)
    completion_ids, real = pad(rollouts.completion_ids, pad_id, "right", device)  # (B, C)
    completion_mask = real
    if rollouts.tool_mask is not None:
        drawn, _ = pad(rollouts.tool_mask, 0, "right", device)  # (B, C)
        completion_mask = real * drawn.clamp(0, 1)
    batch = {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),  # (B, P + C)
        "attention_mask": torch.cat([prompt_mask, real], dim=1),  # (B, P + C)
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    if rollouts.sampling_logps is not None:
        logps = torch.full(completion_ids.shape, float("nan"), dtype=torch.float32)  # (B, C)
        for i, row in enumerate(rollouts.sampling_logps):
            logps[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        batch["sampling_logps"] = logps.to(device)  # (B, C)
    return batch


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """The tokenizer's EOS, then every EOS id of the model's generation config (which may list several: chat models
    end a turn with one token and a document with another), as TRL's GRPO collects them."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    model_eos = getattr(generation_config, "eos_token_id", None)
    for i in model_eos if isinstance(model_eos, (list, tuple)) else [] if model_eos is None else [model_eos]:
        if i not in ids:
            ids.append(i)
    return ids


def build_generation_config(args, tokenizer, max_new_tokens: int | None = None, model=None) -> GenerationConfig:
    """A sampling `GenerationConfig` from the config's rollout fields; `generation_kwargs` override them. Generation
    stops at any of [`eos_token_ids`] (`model`'s too, when given)."""
    eos = eos_token_ids(tokenizer, model)
    kwargs = {
        "max_new_tokens": max_new_tokens or args.max_completion_length,
        "do_sample": True,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,  # 0 disables it; None would let the model's default (often 50) apply
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": eos if len(eos) > 1 else next(iter(eos), None),
        "bos_token_id": tokenizer.bos_token_id,
        "stop_strings": args.stop_strings,
    }
    kwargs.update(args.generation_kwargs or {})
    kwargs["use_cache"] = True  # generation always keeps its KV cache
    return GenerationConfig(**kwargs)


def finish_completion(
    tokens: list[int], generation_config: GenerationConfig, tokenizer=None, pad_id: int | None = None
) -> tuple[list[int], bool]:
    """
    Cut a generated row after its first EOS (any of `generation_config.eos_token_id`); without one, drop trailing
    `pad_id`s. The same for every sampler, so the transformers and vLLM paths agree.

    Returns:
        `(ids, truncated)`: `truncated` when the row ran to `max_new_tokens` with neither an EOS nor a stop string
        (`generation_config.stop_strings`, found in the decoded text; the completion keeps it).
    """
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    stopped = False
    for i, t in enumerate(tokens):
        if t in eos_ids:
            tokens, stopped = tokens[: i + 1], True
            break
    if not stopped and pad_id is not None and pad_id not in eos_ids:
        while tokens and tokens[-1] == pad_id:
            tokens = tokens[:-1]
    stops = generation_config.stop_strings or []
    if not stopped and stops and tokenizer is not None:
        text = tokenizer.decode(tokens)
        stopped = any(s in text for s in stops)
    return tokens, not stopped and len(tokens) >= generation_config.max_new_tokens


@torch.no_grad()
def sample(
    model, prompt_ids: list[list[int]], generation_config: GenerationConfig, tokenizer=None
) -> tuple[list[list[int]], list[bool]]:
    """
    Sample one completion per prompt with `model.generate` (KV cache on, left padding), drawing sampled tokens by
    inverse-CDF sampling (see [`~trl_onpolicy.token_sampling`]; same distribution as `generate`'s own sampling).

    Returns:
        `(completion_ids, truncated)`: ids cut after the first EOS, and whether each one ran to `max_new_tokens`
        without an EOS or a stop string.
    """
    device = next(model.parameters()).device
    pad_id = generation_config.pad_token_id
    input_ids, attention_mask = pad(prompt_ids, pad_id if pad_id is not None else 0, "left", device)  # (B, P)
    was_training = model.training
    model.eval()
    try:
        kwargs = {"tokenizer": tokenizer} if generation_config.stop_strings else {}
        if needs_synced_generation(model):  # each step gathers sharded weights: no process may stop early
            kwargs["synced_gpus"] = True
        config, draw_kwargs = inverse_cdf_generation(model, generation_config)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs, **draw_kwargs
        )  # (B, P + C')
    finally:
        model.train(was_training)
    completions, truncated = [], []
    for row in out[:, input_ids.shape[1] :].tolist():
        ids, cut = finish_completion(row, generation_config, tokenizer, pad_id)
        completions.append(ids)
        truncated.append(cut)
    return completions, truncated
