"""Privileged context: the teacher's own prompt for a row, which may hold what the student never sees.

The teacher scores the student's completion tokens after *its* prompt, not the student's: the reference answer, a
system prompt, a constitution, few-shot examples or retrieved documents can sit there (context distillation, SDFT,
on-policy self-distillation). A row gives it in one of two columns (TRL's `SDFTTrainer` names):

- `privileged_context` (a string, or a list of messages whose contents are joined by newlines): composed with the
  row's prompt by `teacher_prompt_template` (default `"{prompt}\\n\\n{privileged_context}"`). A plain prompt becomes
  the template's text; in a conversational prompt the last user turn's content is replaced by the template applied to
  it (the other messages, a system prompt included, are kept);
- `teacher_prompt`: the teacher's whole prompt, as the user built it (a string, or a list of messages).

`add_teacher_prompt_ids` tokenizes it as the student's prompt is tokenized (the chat template with the generation
prompt for messages) into a `teacher_prompt_ids` column; a row with neither column set gets `[]`: its teacher reads
the student's prompt. Nothing else changes: the completion tokens are the student's, so the teacher's scores align
with them whatever the two prompts' lengths (see `trl_onpolicy.rollouts.teacher_inputs`).
"""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset, IterableDataset

from .prompts import chat_ids, check_messages, column_names, split_messages

logger = logging.getLogger(__name__)

PRIVILEGED_COLUMNS = ("privileged_context", "teacher_prompt")
DEFAULT_TEACHER_PROMPT_TEMPLATE = "{prompt}\n\n{privileged_context}"
BOTH_COLUMNS_ERROR = (
    "A row sets both `teacher_prompt` and `privileged_context`. `teacher_prompt` is the teacher's whole prompt; "
    "`privileged_context` is composed with the student's prompt by `teacher_prompt_template`. Keep one of the two "
    "(set the other to None)."
)
NO_USER_TURN_ERROR = (
    "A row's `privileged_context` goes into its prompt's last user turn, but the prompt has no message with role "
    "'user' (roles: {roles}). Give the row a `teacher_prompt` (the teacher's whole prompt) instead."
)


def check_template(template: str) -> None:
    """`teacher_prompt_template` must hold both `{prompt}` and `{privileged_context}` and no other field."""
    try:
        template.format(prompt="", privileged_context="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"`teacher_prompt_template` {template!r} cannot be filled ({type(e).__name__}: {e}): it may hold only the "
            "fields `{prompt}` and `{privileged_context}`; write a literal brace as `{{` or `}}`."
        ) from e
    missing = [f for f in ("{prompt}", "{privileged_context}") if f not in template]
    if missing:
        raise ValueError(
            f"`teacher_prompt_template` {template!r} lacks {' and '.join(missing)}: it must place both the student's "
            'prompt and the privileged context, e.g. "{prompt}\\n\\n{privileged_context}". To give the teacher a '
            "prompt of your own making, put it in a `teacher_prompt` column instead."
        )


def context_text(context: Any) -> str:
    """A privileged context as text: a string as it is; a list of messages as their contents, one per line."""
    if isinstance(context, str):
        return context
    if isinstance(context, list):
        check_messages(context, "privileged_context")
        return "\n".join(message["content"] for message in context if message["content"])
    raise ValueError(
        f"A row's `privileged_context` must be a string or a list of messages, got {type(context).__name__} "
        f"({context!r:.80}). Fill in or filter out such rows first."
    )


def _student_prompt(row: dict[str, Any]) -> Any:
    if "messages" in row and row.get("prompt") is None:
        return split_messages(row["messages"])[0]
    return row.get("prompt")


def teacher_prompt(row: dict[str, Any], template: str) -> str | list[dict[str, Any]] | None:
    """The row's teacher prompt (a string or messages), or None when the row gives none (see the module docstring)."""
    given, context = row.get("teacher_prompt"), row.get("privileged_context")
    if given is not None and context is not None:
        raise ValueError(BOTH_COLUMNS_ERROR)
    if given is not None:
        if isinstance(given, list):
            check_messages(given, "teacher_prompt")
        elif not isinstance(given, str):
            raise ValueError(
                f"A row's `teacher_prompt` must be a string or a list of messages, got {type(given).__name__} "
                f"({given!r:.80}). Fill in or filter out such rows first."
            )
        return given
    if context is None:
        return None
    text, prompt = context_text(context), _student_prompt(row)
    if isinstance(prompt, str):
        return template.format(prompt=prompt, privileged_context=text)
    check_messages(prompt, "prompt")
    users = [i for i, message in enumerate(prompt) if message["role"] == "user"]
    if not users:
        raise ValueError(NO_USER_TURN_ERROR.format(roles=[m["role"] for m in prompt]))
    last = users[-1]
    composed = {**prompt[last], "content": template.format(prompt=prompt[last]["content"], privileged_context=text)}
    return [*prompt[:last], composed, *prompt[last + 1 :]]


def teacher_prompt_ids(
    row: dict[str, Any], tokenizer, template: str, chat_template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of the row's teacher prompt, tokenized as a student prompt is; `[]` when the row gives none."""
    prompt = teacher_prompt(row, template)
    if prompt is None:
        return []
    if isinstance(prompt, list):
        field = "teacher_prompt" if row.get("teacher_prompt") is not None else "prompt"
        return chat_ids(tokenizer, prompt, field, add_generation_prompt=True, **(chat_template_kwargs or {}))
    return list(tokenizer(prompt)["input_ids"])


def has_privileged_columns(dataset: Dataset | IterableDataset) -> bool:
    return any(c in column_names(dataset) for c in PRIVILEGED_COLUMNS)


def add_teacher_prompt_ids(
    dataset: Dataset | IterableDataset,
    tokenizer,
    template: str,
    max_prompt_length: int | None,
    name: str = "train",
    num_proc: int | None = None,
    chat_template_kwargs: dict | None = None,
) -> Dataset | IterableDataset:
    """
    Add a `teacher_prompt_ids` column when the dataset has a `privileged_context` or `teacher_prompt` column (else
    return it unchanged). Teacher prompts longer than `max_prompt_length` keep their last tokens, with one warning.
    """
    if not has_privileged_columns(dataset):
        return dataset

    def tokenize(row):
        ids = teacher_prompt_ids(row, tokenizer, template, chat_template_kwargs)
        cut = max_prompt_length is not None and len(ids) > max_prompt_length
        return {"teacher_prompt_ids": ids[-max_prompt_length:] if cut else ids, "teacher_prompt_truncated": cut}

    kwargs = (
        {"num_proc": num_proc, "desc": f"Tokenizing {name} teacher prompts"} if isinstance(dataset, Dataset) else {}
    )
    dataset = dataset.map(tokenize, **kwargs)
    if isinstance(dataset, Dataset) and sum(dataset["teacher_prompt_truncated"]):
        logger.warning(
            "%d of %d teacher prompts (prompt + privileged context) in the %s dataset are longer than max_length - "
            "max_completion_length = %d tokens and were cut from the left. Raise `max_length` to keep them whole.",
            sum(dataset["teacher_prompt_truncated"]), len(dataset), name, max_prompt_length,
        )  # fmt: skip
    return dataset


def add_native_teacher_prompt_ids(dataset, teacher_tokenizer, template: str, name: str = "train",
                                  num_proc: int | None = None):  # fmt: skip
    """
    For a teacher of another tokenizer: add a `teacher_native_prompt_ids` column, each conversational prompt (the
    teacher prompt where a row gives one, else the student's) rendered with the *teacher's* chat template and tokenized
    by the teacher's tokenizer, so a Llama teacher reads Llama's turn markers where the student reads Qwen's. A plain
    text prompt gets `[]` (the teacher reads the student's text), and so does every row when the teacher's tokenizer
    has no chat template (with one warning).
    """
    if getattr(teacher_tokenizer, "chat_template", None) is None:
        if isinstance(dataset, Dataset) and len(dataset) and isinstance(_student_prompt(dataset[0]), list):
            logger.warning("The teacher's tokenizer has no chat template: the teacher reads each conversational "
                           "prompt as the student's chat template renders it.")  # fmt: skip
        return dataset

    def tokenize(row):
        prompt = teacher_prompt(row, template)
        field = "teacher_prompt" if row.get("teacher_prompt") is not None else "prompt"
        prompt = _student_prompt(row) if prompt is None else prompt
        if not isinstance(prompt, list):
            return {"teacher_native_prompt_ids": []}
        return {"teacher_native_prompt_ids": chat_ids(teacher_tokenizer, prompt, field, add_generation_prompt=True)}

    kwargs = {"num_proc": num_proc, "desc": f"Tokenizing {name} prompts for the teacher"} if isinstance(dataset, Dataset) else {}
    return dataset.map(tokenize, **kwargs)

