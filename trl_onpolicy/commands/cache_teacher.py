"""`trl-onpolicy cache-teacher`: score a dataset's completions with a teacher once, for training without it.

    trl-onpolicy cache-teacher TEACHER DATASET OUTPUT [--top-k 20] [--max-length 1024] [--max-completion-length 256]

TEACHER is a model path (or Hub id, when online) with its tokenizer. DATASET is `toy` (the built-in task), a folder
written by `Dataset.save_to_disk`, a `.json`/`.jsonl`/`.csv`/`.parquet` file, or a Hub id (`--split`, `--subset`);
its rows are prompt-completion or conversational. OUTPUT receives the shards and `manifest.json` (see
[`~trl_onpolicy.teachers.build_teacher_cache`]). Train from it with `teacher_model_name_or_path=OUTPUT`, `lmbda=0.0`
and the same `max_length` / `max_completion_length`: the flags default to `OnPolicyDistillConfig`'s. With
`--student-tokenizer` (a student of another model family), each completion is re-tokenized for the teacher and the
cache holds the teacher's scores per aligned span, in the student's positions (cross-tokenizer distillation).
"""

from __future__ import annotations

import argparse
import os
import time

# `OnPolicyDistillConfig`'s defaults, written out so that `--help` needs neither TRL nor torch (a test keeps them equal)
DEFAULTS = {"max_length": 1024, "max_completion_length": 256}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cache-teacher` flags."""
    parser.add_argument("teacher", help="Path (or Hub id, when online) of the teacher model and its tokenizer.")
    parser.add_argument("dataset", help="'toy', a save_to_disk folder, a json/jsonl/csv/parquet file, or a Hub id.")
    parser.add_argument("output", help="Folder of the cache.")
    parser.add_argument("--split", default="train", help="Dataset split (Hub datasets and data files).")
    parser.add_argument("--subset", default=None, help="Dataset configuration name (Hub datasets).")
    parser.add_argument("--num-rows", type=int, default=None, help="Use the first N rows (toy: rows to make, 640).")
    parser.add_argument("--top-k", type=int, default=20, help="Log-probs kept per completion token.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Loss temperature of the log-probs.")
    parser.add_argument("--max-length", type=int, default=DEFAULTS["max_length"], help="As the training config's.")
    parser.add_argument(
        "--max-completion-length",
        type=int,
        default=DEFAULTS["max_completion_length"],
        help="As the training config's.",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Rows per teacher forward pass.")
    parser.add_argument("--shard-tokens", type=int, default=1_000_000, help="Completion tokens per shard.")
    parser.add_argument("--dtype", default="auto", help="Teacher dtype: auto, float32, bfloat16 or float16.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a cache already in OUTPUT.")
    parser.add_argument(
        "--student-tokenizer",
        default=None,
        help="The student's tokenizer, when it is not the teacher's (another model family): the cache holds the "
        "teacher's scores aligned to the student's tokens (cross-tokenizer).",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")


def load_rows(name: str, split: str = "train", subset: str | None = None, num_rows: int | None = None):
    """The dataset a command line names (see the module docstring)."""
    from datasets import load_dataset, load_from_disk

    from .distill import refuse_empty_source

    refuse_empty_source(name, split)
    if name == "toy":
        from ..toy import make_dataset

        return make_dataset(num_rows or 640, split="train").select_columns(["prompt", "completion"])
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")):
        dataset = load_from_disk(name)
    elif name.endswith((".json", ".jsonl", ".csv", ".parquet")):
        kind = {"jsonl": "json"}.get(name.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1])
        dataset = load_dataset(kind, data_files=name, split=split)
    else:
        dataset = load_dataset(name, subset, split=split)
    return dataset.select(range(min(num_rows, len(dataset)))) if num_rows else dataset


def run(args: argparse.Namespace) -> None:
    from ..model_paths import check_model_name

    check_model_name(args.teacher, "teacher", "TEACHER")
    import torch

    from ..teachers.cache_build import build_teacher_cache
    from .serve_teacher import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_length is not None and args.max_length <= args.max_completion_length:
        raise SystemExit(f"--max-length ({args.max_length}) must exceed --max-completion-length.")
    dataset = load_rows(args.dataset, args.split, args.subset, args.num_rows)  # a bad dataset fails before loading
    model, tokenizer = load_model(args.teacher, args.dtype, args.trust_remote_code)
    teacher_tokenizer = None
    if args.student_tokenizer:  # a teacher of another family: rows in the student's tokens, scores in the teacher's
        from transformers import AutoTokenizer

        check_model_name(args.student_tokenizer, "student tokenizer", "--student-tokenizer")
        teacher_tokenizer = tokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.student_tokenizer, trust_remote_code=args.trust_remote_code)
    max_prompt = None if args.max_length is None else args.max_length - args.max_completion_length
    start = time.perf_counter()
    cache = build_teacher_cache(
        model, dataset, tokenizer, args.output, top_k=args.top_k, temperature=args.temperature,
        max_prompt_length=max_prompt, max_completion_length=args.max_completion_length, batch_size=args.batch_size,
        shard_tokens=args.shard_tokens, teacher_name=args.teacher, overwrite=args.overwrite,
        teacher_tokenizer=teacher_tokenizer,
    )  # fmt: skip
    manifest = cache.manifest
    print(
        f"Cached {manifest['rows']} rows ({manifest['tokens']} completion tokens, top-{manifest['top_k']}) of "
        f"{args.teacher} in {args.output} ({len(manifest['shards'])} shards, {time.perf_counter() - start:.1f} s). "
        f"Train with teacher_model_name_or_path={args.output!r}, lmbda=0.0.",
        flush=True,
    )
