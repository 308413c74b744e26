"""Dataset rows to token ids: the first stage of the step (dataset -> prompts).

Accepts the SFT dataset formats and turns every row into `prompt_ids` and `completion_ids` (empty for prompt-only
rows); other columns are kept for routing and callbacks.

- prompt-only: `{"prompt": str}` or `{"prompt": [messages]}`;
- prompt-completion: `{"prompt": ..., "completion": ...}`, standard or conversational;
- conversational: `{"messages": [...]}`, where the prompt is everything before the last assistant turn and that turn is
  the completion.

A plain `text` dataset has no prompt to start generation from, so it is refused with a message that says how to
convert it. Prompts longer than the limit keep their last tokens (the question usually comes last) with one warning.

Malformed rows are refused with a `ValueError` that names the row's problem and the fix, before any tokenizer or chat
template sees them: a prompt that is neither a string nor a list of messages (e.g. None), an empty prompt or
conversation, a message that is not a `{"role": str, "content": str}` mapping, a completion whose format differs from
its prompt's (a string prompt with a list of messages as completion, or the reverse), and a chat template that fails.
An empty string completion is a completion of one token, EOS ("stop here"), as in `SFTTrainer`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping  # a BatchEncoding is a UserDict, not a dict
from typing import Any

from datasets import Dataset, IterableDataset
from jinja2.exceptions import TemplateError

logger = logging.getLogger(__name__)

EMPTY_DATASET_ERROR = "The {name} dataset is empty{where}: pass a dataset with at least one prompt."
TEXT_DATASET_ERROR = (
    "The dataset has a `text` column but no `prompt` or `messages` column. On-policy distillation needs prompts for "
    "the student to complete. Convert it, e.g. `dataset.map(lambda x: {{'prompt': x['text'][:n]}})` for a prompt-only "
    "dataset, or rename your columns to `prompt`/`completion` or `messages`. Columns found: {columns}."
)
MESSAGE_ERROR = (
    "A row's {field} holds a malformed message at index {index}: {problem}. Every message must be a mapping "
    '`{{"role": str, "content": str}}` (e.g. `{{"role": "user", "content": "What is 2+2?"}}`); fix or filter out '
    "such rows first."
)
MIXED_FORMAT_ERROR = (
    "A row mixes formats: its prompt is {prompt} but its completion is of type {completion}. Use one format per row: "
    "a string prompt with a string completion, or a list of messages as prompt with a list of messages (the assistant "
    "turn) as completion."
)
CHAT_TEMPLATE_ERROR = (
    "The tokenizer's chat template failed on a row's {field} ({error}). Check that the row's messages have the roles "
    "and order the template expects, or set `tokenizer.chat_template` to one that accepts them."
)
NO_CHAT_TEMPLATE_ERROR = (
    "The dataset is conversational (its {field} is a list of messages) but the tokenizer has no chat template. Set "
    "`tokenizer.chat_template`, or map the rows to plain-text `prompt`/`completion` strings."
)
MISSING_COLUMNS_ERROR = (
    "The {name} dataset needs a `prompt` column (prompt-only or prompt-completion) or a `messages` column "
    "(conversational). Columns found: {columns}. Rename the column that holds the prompts to `prompt`."
)


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """The dataset's columns; an iterable dataset of unknown features is asked for its first row."""
    names = dataset.column_names
    if names is None:  # an IterableDataset of unknown features
        names = list(next(iter(dataset)).keys())
    return list(names)


def check_columns(dataset: Dataset | IterableDataset, name: str = "train") -> None:
    """Raise a `ValueError` that names the fix when `dataset` is empty or has no prompt column."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(EMPTY_DATASET_ERROR.format(name=name, where=""))
    columns = column_names(dataset)
    if "prompt" in columns or "messages" in columns:
        return
    if "text" in columns:
        raise ValueError(TEXT_DATASET_ERROR.format(columns=columns))
    raise ValueError(MISSING_COLUMNS_ERROR.format(name=name, columns=columns))


def check_messages(messages: Any, field: str) -> None:
    """Raise a `ValueError` that names the fix unless `messages` is a list of `{"role": str, "content": str}`."""
    if not isinstance(messages, list):
        raise ValueError(  # noqa: TRY004 (a dataset error, as the others)
            f"A row's `{field}` must be a list of messages, got {type(messages).__name__} ({messages!r:.80})."
        )
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            problem = f"a {type(message).__name__}, not a mapping"
        elif not isinstance(message.get("role"), str) or not message.get("role"):
            problem = f"its `role` is {message.get('role')!r}, not a non-empty string"
        elif not isinstance(message.get("content"), (str, list)):  # a list: content parts, if the template takes them
            problem = f"its `content` is {message.get('content')!r}, not a string"
        else:
            continue
        raise ValueError(MESSAGE_ERROR.format(field=f"`{field}`", index=index, problem=problem))


def split_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a conversation into (prompt, completion): the completion is the last assistant turn, if it ends it."""
    check_messages(messages, "messages")
    if messages and messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1:]
    return messages, []


def chat_ids(tokenizer, messages: list[dict[str, Any]], field: str, **kwargs) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template; a template error becomes a `ValueError`."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(NO_CHAT_TEMPLATE_ERROR.format(field=f"`{field}`"))
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    except (TemplateError, TypeError) as e:  # e.g. raised on the role order, or content parts the template cannot join
        raise ValueError(CHAT_TEMPLATE_ERROR.format(field=f"`{field}`", error=f"{type(e).__name__}: {e}")) from e
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


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
        field = "messages"
        if row["messages"] is None:
            raise ValueError(
                "A row's `messages` is None (and it has no `prompt`): fill in or filter out such rows first."
            )
        prompt, completion = split_messages(row["messages"])
    else:
        field = "prompt"
        prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list):  # conversational
        check_messages(prompt, field)
        if completion is not None and not isinstance(completion, list):
            raise ValueError(
                MIXED_FORMAT_ERROR.format(prompt="a list of messages", completion=type(completion).__name__)
            )
        if not prompt:  # refused by `prepare_dataset` with the empty-prompt message
            return {"prompt_ids": [], "completion_ids": []}
        prompt_ids = chat_ids(tokenizer, prompt, field, add_generation_prompt=True, **kwargs)
        if not completion:
            return {"prompt_ids": prompt_ids, "completion_ids": []}
        check_messages(completion, "completion")
        full = chat_ids(tokenizer, prompt + completion, field, **kwargs)
    else:
        if not isinstance(prompt, str):
            raise ValueError(  # noqa: TRY004 (a dataset error, as the others)
                f"A `prompt` must be a string or a list of messages, got {type(prompt).__name__} ({prompt!r:.80}). "
                "Fill in or filter out such rows first."
            )
        if completion is not None and not isinstance(completion, str):
            raise ValueError(MIXED_FORMAT_ERROR.format(
                prompt="a string", completion=f"{type(completion).__name__} ({completion!r:.80})"
            ))  # fmt: skip
        prompt_ids = tokenizer(prompt)["input_ids"]
        if completion is None:  # an empty string is a completion: EOS alone
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
            shown = row.get("prompt") if row.get("prompt") is not None else row.get("messages")
            raise ValueError(
                f"A row of the {name} dataset has an empty prompt ({shown!r:.200}): every row needs a prompt for the "
                "student to complete (a conversation needs a turn before its last assistant turn). Filter such rows "
                "out first."
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
