"""Building a teacher cache: score a dataset's own completions once and write the top-k log-probs to disk.

[`build_teacher_cache`] (what `trl-onpolicy cache-teacher` calls) tokenises the dataset exactly as the trainer does,
scores each distinct row with the teacher, and writes safetensors shards and then the manifest in the format of
[`~trl_onpolicy.teachers.cache_format`]; it returns the cache opened as a [`~trl_onpolicy.teachers.cache.TeacherCache`].
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from ..prompts import check_columns, column_names, prepare_dataset
from ..rollouts import Rollouts, collate, teacher_inputs
from ..teacher_prompts import (
    DEFAULT_TEACHER_PROMPT_TEMPLATE,
    add_native_teacher_prompt_ids,
    add_teacher_prompt_ids,
    check_template,
)
from . import cache_format as fmt
from .base import Teacher
from .cache import TeacherCache
from .cache_format import CacheError
from .cross_tokenizer import CrossTokenizerTeacher
from .local import LocalTeacher


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Collects scored rows and writes a shard whenever `shard_tokens` tokens are waiting."""

    def __init__(self, folder: str, shard_tokens: int):
        self.folder, self.shard_tokens = folder, shard_tokens
        self.entries: list[dict] = []
        self._rows: list[tuple[bytes, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._tokens = 0

    def add(self, key: bytes, topk_ids: torch.Tensor, topk_logps: torch.Tensor, token_logps: torch.Tensor,
            span_length: torch.Tensor | None = None) -> None:  # fmt: skip
        self._rows.append((key, topk_ids, topk_logps, token_logps, span_length))
        self._tokens += token_logps.shape[0]
        if self._tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        keys, ids, logps, tokens, spans = zip(*self._rows)
        lengths = torch.tensor([0] + [t.shape[0] for t in tokens], dtype=torch.int64)
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), 16),  # (R, 16)
            "offsets": lengths.cumsum(0),  # (R + 1,)
            "topk_ids": torch.cat(ids).to(torch.int32).contiguous(),  # (N, K)
            "topk_logps": torch.cat(logps).to(torch.float32).contiguous(),  # (N, K)
            "token_logps": torch.cat(tokens).to(torch.float32).contiguous(),  # (N,)
        }
        if spans[0] is not None:  # a teacher of another tokenizer: each span's length in student tokens at its start
            tensors["span_length"] = torch.cat(spans).to(torch.int32).contiguous()  # (N,)
        data = save_safetensors(tensors, metadata={"format": fmt.FORMAT, "version": str(fmt.VERSION)})
        name = fmt.SHARD_PATTERN.format(len(self.entries))
        _write_atomic(os.path.join(self.folder, name), data)
        entry = {"file": name, "rows": len(keys), "tokens": self._tokens, "sha256": hashlib.sha256(data).hexdigest()}
        self.entries.append(entry)
        self._rows, self._tokens = [], 0


def _as_local(teacher, teacher_name: str | None, vocab_size: int | None) -> tuple[Teacher, str | None, str | None]:
    """The teacher backend, its name and its weights' fingerprint (None for a backend that is not a local model)."""
    if not isinstance(teacher, Teacher):
        teacher = LocalTeacher(teacher, vocab_size=vocab_size)
    elif isinstance(teacher, LocalTeacher) and vocab_size is not None:
        teacher = LocalTeacher(teacher.model, teacher.disable_adapters, vocab_size, teacher.chunk_size)
    if isinstance(teacher, LocalTeacher):
        model = teacher._causal_lm()
        name = teacher_name or model.config._name_or_path or None
        return teacher, name, fmt.model_fingerprint(teacher.model, include_adapters=not teacher.disable_adapters)
    return teacher, teacher_name, None


def _prepare_folder(folder: str, overwrite: bool) -> None:
    if os.path.isfile(os.path.join(folder, fmt.MANIFEST)) and not fmt.is_teacher_cache(folder):
        raise CacheError(f"{folder} holds a {fmt.MANIFEST} that is not a teacher cache's: choose another folder.")
    if fmt.is_teacher_cache(folder):
        if not overwrite:
            raise CacheError(
                f"{folder} already holds a teacher cache (or the shards of an interrupted build). Pass "
                "`overwrite=True` to replace it, or choose another folder."
            )
        if os.path.isfile(os.path.join(folder, fmt.MANIFEST)):
            os.remove(os.path.join(folder, fmt.MANIFEST))
        for name in os.listdir(folder):  # the manifest went first: a crash from here on leaves an incomplete cache
            if name.startswith("shard-") and name.endswith(".safetensors"):
                os.remove(os.path.join(folder, name))
    os.makedirs(folder, exist_ok=True)


SAME_ROW_ERROR = (
    "Two rows of the dataset have the same prompt and completion but different teacher prompts (privileged "
    "context). A teacher cache finds a row by what the student sees, so it can hold one teacher view of it: make such "
    "rows' prompts differ, or train with a local teacher or a teacher server instead of a cache."
)


def _score_rows(teacher, rows, pad_id: int, temperature: float, top_k: int, batch_size: int, writer) -> int | None:
    """Score every distinct non-empty row of a tokenised dataset, `batch_size` rows a call; returns K (None: no row)."""
    device = next(teacher.model.parameters()).device if isinstance(teacher, LocalTeacher) else None
    seen, pending, k = {}, [], None
    total = len(rows) if hasattr(rows, "__len__") else None
    if hasattr(rows, "select_columns"):
        wanted = ("prompt_ids", "completion_ids", "teacher_prompt_ids", "teacher_native_prompt_ids")
        rows = rows.select_columns([c for c in wanted if c in rows.column_names])
    for row in tqdm(rows, total=total, desc="Teacher cache", unit="row"):
        key, teacher_prompt = (
            fmt.row_key(row["prompt_ids"], row["completion_ids"]),
            row.get("teacher_prompt_ids") or [],
        )
        if key in seen and seen[key] != teacher_prompt:
            raise ValueError(SAME_ROW_ERROR)
        if not row["completion_ids"] or key in seen:  # nothing to score, or scored already
            continue
        seen[key] = list(teacher_prompt)
        native = list(row.get("teacher_native_prompt_ids") or [])  # a teacher of another tokenizer: its own template
        pending.append((key, list(row["prompt_ids"]), list(row["completion_ids"]), (list(teacher_prompt), native)))
        if len(pending) == batch_size:
            k = _score_batch(teacher, pending, pad_id, device, temperature, top_k, writer)
            pending = []
    if pending:
        k = _score_batch(teacher, pending, pad_id, device, temperature, top_k, writer)
    writer.flush()
    return k


def _score_batch(teacher, pending, pad_id, device, temperature, top_k, writer) -> int:
    """Score `pending` `(key, prompt_ids, completion_ids, teacher_prompt_ids)` rows (each after its teacher prompt
    when it has one), hand each row's scores to `writer`; returns K."""
    rows = [{"teacher_prompt_ids": t, "teacher_native_prompt_ids": native} for *_, (t, native) in pending]
    rollouts = Rollouts([p for _, p, _, _ in pending], [c for _, _, c, _ in pending], "dataset", rows=rows)
    batch = teacher_inputs(rollouts, collate(rollouts, pad_id, device), pad_id, device)
    scores = teacher.score(batch, temperature=temperature, top_k=top_k)
    if scores.form not in ("topk", "spans") or scores.token_logps is None:
        raise CacheError(
            f"The teacher returned {scores.form!r} scores for `top_k={top_k}`; a cache needs the top-k form with the "
            "sampled tokens' log-probs."
        )
    ids, logps, tokens = scores.topk_ids.cpu(), scores.topk_logps.float().cpu(), scores.token_logps.float().cpu()
    spans = None if scores.span_length is None else scores.span_length.cpu()  # (B, C): the spans form
    for i, (key, _, completion, _) in enumerate(pending):
        n = len(completion)
        writer.add(key, ids[i, :n], logps[i, :n], tokens[i, :n], None if spans is None else spans[i, :n])
    return ids.shape[-1]


def _check_arguments(dataset, top_k: int, temperature: float, batch_size: int, shard_tokens: int) -> None:
    """Refuse bad sizes, a temperature <= 0, and a dataset without completions to score."""
    if top_k < 1 or temperature <= 0 or batch_size < 1 or shard_tokens < 1:
        raise ValueError(
            "`top_k`, `batch_size` and `shard_tokens` must be >= 1 and `temperature` > 0, got "
            f"top_k={top_k}, batch_size={batch_size}, shard_tokens={shard_tokens}, temperature={temperature}."
        )
    check_columns(dataset, "cache")
    columns = column_names(dataset)
    if "completion" not in columns and "messages" not in columns:
        raise ValueError(
            f"The dataset has no completions (columns: {columns}). A teacher cache scores the dataset's own "
            "completions: it needs a `completion` column or a `messages` column. A prompt-only dataset needs a live "
            "teacher (on-policy distillation, `lmbda > 0`)."
        )


def _manifest(
    teacher, name, fingerprint, tokenizer, k, temperature, entries, max_prompt_length, max_completion_length
) -> dict:
    """The manifest of a cache whose shards `entries` describe (with a teacher of another tokenizer: its
    tokenizer's fingerprint, and `spans`)."""
    cross = isinstance(teacher, CrossTokenizerTeacher)
    return {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "teacher": {"name": name, "fingerprint": fingerprint},
        "tokenizer": {"fingerprint": fmt.tokenizer_fingerprint(tokenizer)},
        "top_k": k,
        "temperature": float(temperature),
        "vocab_size": None if cross else getattr(teacher, "compare_vocab", None) or teacher.vocab_size,
        "spans": cross,
        "teacher_tokenizer": {"fingerprint": fmt.tokenizer_fingerprint(teacher.teacher_tokenizer)} if cross else None,
        "rows": sum(e["rows"] for e in entries),
        "tokens": sum(e["tokens"] for e in entries),
        "max_prompt_length": max_prompt_length,
        "max_completion_length": max_completion_length,
        "shards": entries,
    }


def build_teacher_cache(
    teacher,
    dataset,
    tokenizer,
    output_dir: str,
    *,
    top_k: int = 20,
    temperature: float = 1.0,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    batch_size: int = 16,
    shard_tokens: int = 1_000_000,
    teacher_name: str | None = None,
    vocab_size: int | None = None,
    overwrite: bool = False,
    teacher_prompt_template: str = DEFAULT_TEACHER_PROMPT_TEMPLATE,
    teacher_tokenizer=None,
) -> TeacherCache:
    """
    Score a dataset's own completions with `teacher` once and store the top-k log-probs as a teacher cache.

    Args:
        teacher ([`Teacher`] or [`~transformers.PreTrainedModel`]): The teacher; a model is wrapped in a
            [`LocalTeacher`].
        dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]): Prompt-completion or conversational rows
            (prompt-only rows have nothing to score). Tokenised as the trainer does; identical rows are scored once.
        tokenizer: The student's tokenizer (its fingerprint is stored and checked when training).
        output_dir (`str`): Folder of the cache: `shard-00000.safetensors`, ... and `manifest.json`, written last.
        top_k (`int`, *optional*, defaults to `20`): Log-probs kept per token.
        temperature (`float`, *optional*, defaults to `1.0`): Loss temperature of the log-probs; training must use it.
        max_prompt_length, max_completion_length (`int`, *optional*): Cut rows as the trainer will (its
            `max_length - max_completion_length` and `max_completion_length`), or rows will not be found.
        batch_size (`int`, *optional*, defaults to `16`): Rows per teacher call.
        shard_tokens (`int`, *optional*, defaults to `1_000_000`): Completion tokens per shard (about 160 bytes each
            at `k=20`).
        teacher_name (`str`, *optional*): Stored name; defaults to the model's `_name_or_path`.
        vocab_size (`int`, *optional*): Rank only the first `vocab_size` logits (`len(tokenizer)` when the student's
            embedding matrix is padded to another size than the teacher's); defaults to all of the teacher's.
        overwrite (`bool`, *optional*, defaults to `False`): Replace a cache already in `output_dir`.
        teacher_prompt_template (`str`, *optional*, defaults to `"{prompt}\n\n{privileged_context}"`): With a
            `privileged_context` or `teacher_prompt` column, the teacher scores each completion after its own prompt
            (see [`~trl_onpolicy.teacher_prompts`]); rows are still found by the student's prompt and completion.
        teacher_tokenizer (*optional*): The teacher's tokenizer, when it is not the student's (cross-tokenizer
            distillation): each completion is re-tokenized for the teacher (a conversational prompt in the teacher's
            own chat template), scored in the teacher's tokens, and stored as [`CrossTokenizerTeacher`] hands it to
            the loss: per aligned span, the teacher's top-k over its own vocabulary at the span's first student token,
            with the span's length. Training from it needs no teacher and no `teacher_tokenizer_name_or_path`.

    Returns:
        [`TeacherCache`]: The new cache, opened with `tokenizer`.
    """
    _check_arguments(dataset, top_k, temperature, batch_size, shard_tokens)
    check_template(teacher_prompt_template)
    teacher, name, fingerprint = _as_local(teacher, teacher_name, vocab_size)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if teacher_tokenizer is not None:
        teacher = CrossTokenizerTeacher(teacher, tokenizer, teacher_tokenizer, top_k=top_k)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    _prepare_folder(output_dir, overwrite)
    rows = prepare_dataset(dataset, tokenizer, max_prompt_length, max_completion_length, name="cache")
    rows = add_teacher_prompt_ids(rows, tokenizer, teacher_prompt_template, max_prompt_length, name="cache")
    if teacher_tokenizer is not None:
        rows = add_native_teacher_prompt_ids(rows, teacher_tokenizer, teacher_prompt_template, name="cache")
    writer = _ShardWriter(output_dir, shard_tokens)
    k = _score_rows(teacher, rows, pad_id, float(temperature), top_k, batch_size, writer)
    if k is None:
        raise ValueError("Every completion in the dataset is empty: there is nothing for the teacher to score.")
    manifest = _manifest(teacher, name, fingerprint, tokenizer, k, temperature, writer.entries,
                         max_prompt_length, max_completion_length)  # fmt: skip
    _write_atomic(os.path.join(output_dir, fmt.MANIFEST), json.dumps(manifest, indent=2).encode())
    return TeacherCache(output_dir, tokenizer)
