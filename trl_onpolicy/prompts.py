"""Dataset rows to token ids: the first stage of the step (dataset -> prompts).

Accepts the SFT dataset formats and turns every row into `prompt_ids` and `completion_ids` (empty for prompt-only
rows); other columns are kept for routing and callbacks.

- prompt-only: `{"prompt": str}` or `{"prompt": [messages]}`;
- prompt-completion: `{"prompt": ..., "completion": ...}`, standard or conversational;
- conversational: `{"messages": [...]}`, where the prompt is everything before the last assistant turn and that turn is
  the completion.

A plain `text` dataset has no prompt to start generation from, so it is refused with a message that says how to
convert it. Prompts longer than the limit keep their last tokens (the question usually comes last) with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping  # a BatchEncoding is a UserDict, not a dict
from typing import Any

from datasets import Dataset, IterableDataset


logger = logging.getLogger(__name__)

TEXT_DATASET_ERROR = (
    "The dataset has a `text` column but no `prompt` or `messages` column. On-policy distillation needs prompts for "
    "the student to complete. Convert it, e.g. `dataset.map(lambda x: {{'prompt': x['text'][:n]}})` for a prompt-only "
    "dataset, or rename your columns to `prompt`/`completion` or `messages`. Columns found: {columns}."
)
MISSING_COLUMNS_ERROR = (
    "The {name} dataset needs a `prompt` column (prompt-only or prompt-completion) or a `messages` column "
    "(conversational). Columns found: {columns}. Rename the column that holds the prompts to `prompt`."
)


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    names = dataset.column_names
    if names is None:  # an IterableDataset of unknown features
        names = list(next(iter(dataset)).keys())
    return list(names)


def check_columns(dataset: Dataset | IterableDataset, name: str = "train") -> None:
    """Raise a `ValueError` that names the fix when `dataset` is empty or has no prompt column."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: pass a dataset with at least one prompt.")
    columns = _column_names(dataset)
    if "prompt" in columns or "messages" in columns:
        return
    if "text" in columns:
        raise ValueError(TEXT_DATASET_ERROR.format(columns=columns))
    raise ValueError(MISSING_COLUMNS_ERROR.format(name=name, columns=columns))


def split_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a conversation into (prompt, completion): the completion is the last assistant turn, if it ends it."""
    if messages and messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1:]
    return messages, []


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(row: dict[str, Any], tokenizer, chat_template_kwargs: dict | None = None) -> dict[str, list[int]]:
    """Token ids of one row's prompt and (possibly empty) completion, the completion ending with EOS."""
    kwargs = chat_template_kwargs or {}
    if "messages" in row and row.get("prompt") is None:
        prompt, completion = split_messages(row["messages"])
    else:
        prompt, completion = row["prompt"], row.get("completion")
    if isinstance(prompt, list):  # conversational
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **kwargs)
        prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, Mapping) else prompt_ids)
        if not completion:
            return {"prompt_ids": prompt_ids, "completion_ids": []}
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, **kwargs)
        full = list(full["input_ids"] if isinstance(full, Mapping) else full)
    else:
        if not isinstance(prompt, str):
            raise ValueError(f"A `prompt` must be a string or a list of messages, got {type(prompt).__name__}.")
        prompt_ids = tokenizer(prompt)["input_ids"]
        if not completion:
            return {"prompt_ids": prompt_ids, "completion_ids": []}
        full = tokenizer(prompt + completion)["input_ids"]
    start = _common_prefix_length(prompt_ids, full)
    completion_ids = full[start:]
    if tokenizer.eos_token_id is not None and (not completion_ids or completion_ids[-1] != tokenizer.eos_token_id):
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return {"prompt_ids": prompt_ids[:start], "completion_ids": completion_ids}


def prepare_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    max_prompt_length: int | None,
    max_completion_length: int,
    name: str = "train",
    num_proc: int | None = None,
    chat_template_kwargs: dict | None = None,
) -> Dataset | IterableDataset:
    """
    Add `prompt_ids` and `completion_ids` columns to every row.

    Prompts longer than `max_prompt_length` keep their last `max_prompt_length` tokens, and dataset completions are cut
    to `max_completion_length`; a warning says how many rows were cut. Rows whose prompt is empty are refused.
    """
    check_columns(dataset, name)

    def tokenize(row):
        out = tokenize_row(row, tokenizer, chat_template_kwargs)
        if len(out["prompt_ids"]) == 0:
            raise ValueError(
                f"A row of the {name} dataset has an empty prompt ({row.get('prompt', row.get('messages'))!r}): "
                "every row needs a prompt for the student to complete. Filter such rows out first."
            )
        out["prompt_truncated"] = max_prompt_length is not None and len(out["prompt_ids"]) > max_prompt_length
        if out["prompt_truncated"]:
            out["prompt_ids"] = out["prompt_ids"][-max_prompt_length:]
        out["completion_ids"] = out["completion_ids"][:max_completion_length]
        return out

    kwargs = {"num_proc": num_proc, "desc": f"Tokenizing {name} prompts"} if isinstance(dataset, Dataset) else {}
    dataset = dataset.map(tokenize, **kwargs)
    if isinstance(dataset, Dataset):
        n_cut = sum(dataset["prompt_truncated"])
        if n_cut:
            logger.warning(
                "%d of %d prompts in the %s dataset are longer than max_length - max_completion_length = %d tokens "
                "and were cut from the left. Raise `max_length` to keep them whole.",
                n_cut,
                len(dataset),
                name,
                max_prompt_length,
            )
    return dataset
