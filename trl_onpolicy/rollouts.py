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
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    source: str
    truncated: list[bool] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

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
        )

    def decode(self, tokenizer) -> tuple[list[str], list[str]]:
        """Prompt and completion texts (special tokens dropped)."""
        prompts = tokenizer.batch_decode(self.prompt_ids, skip_special_tokens=True)
        completions = tokenizer.batch_decode(self.completion_ids, skip_special_tokens=True)
        return prompts, completions


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


def collate(rollouts: Rollouts, pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """
    Model inputs for a batch of rollouts.

    Returns:
        `dict` with `input_ids` and `attention_mask` `(B, P + C)`, `completion_ids` and `completion_mask` `(B, C)`.
    """
    prompt_ids, prompt_mask = pad(rollouts.prompt_ids, pad_id, "left", device)  # (B, P)
    completion_ids, completion_mask = pad(rollouts.completion_ids, pad_id, "right", device)  # (B, C)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),  # (B, P + C)
        "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),  # (B, P + C)
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def build_generation_config(args, tokenizer, max_new_tokens: int | None = None) -> GenerationConfig:
    """A sampling `GenerationConfig` from the config's rollout fields; `generation_kwargs` override them."""
    kwargs = {
        "max_new_tokens": max_new_tokens or args.max_completion_length,
        "do_sample": True,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,  # 0 disables it; None would let the model's default (often 50) apply
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "stop_strings": args.stop_strings,
    }
    kwargs.update(args.generation_kwargs or {})
    kwargs["use_cache"] = True  # generation always keeps its KV cache
    return GenerationConfig(**kwargs)


def _trim(tokens: list[int], eos_ids: set[int], pad_id: int | None) -> tuple[list[int], bool]:
    """Cut a generated row after its first EOS; without one, drop trailing padding. Returns (ids, stopped)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1], True
    if pad_id is not None and pad_id not in eos_ids:
        while tokens and tokens[-1] == pad_id:
            tokens = tokens[:-1]
    return tokens, False


@torch.no_grad()
def sample(
    model, prompt_ids: list[list[int]], generation_config: GenerationConfig, tokenizer=None
) -> tuple[list[list[int]], list[bool]]:
    """
    Sample one completion per prompt with `model.generate` (KV cache on, left padding).

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
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config, **kwargs
        )  # (B, P + C')
    finally:
        model.train(was_training)
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    completions, truncated = [], []
    stops = generation_config.stop_strings or []
    for row in out[:, input_ids.shape[1] :].tolist():
        ids, stopped = _trim(row, eos_ids, pad_id)
        if not stopped and stops and tokenizer is not None:
            text = tokenizer.decode(ids)
            stopped = any(text.endswith(s) or s in text for s in stops)
        completions.append(ids)
        truncated.append(not stopped and len(ids) >= generation_config.max_new_tokens)
    return completions, truncated
