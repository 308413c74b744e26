"""Tiny models and datasets on disk, for the tests that run scripts and commands the way a user does.

`save_tiny_assets(folder)` writes a 1-layer Llama student and a differently seeded teacher, each with the character
tokenizer of `tests/tiny_models.py` (chat template included), a prompt-completion `.jsonl` file and a GSM8K-format
(`question`, `answer`) `DatasetDict` written with `save_to_disk`. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_models
from datasets import Dataset, DatasetDict

QUESTIONS = ["Tom has 3 pens. He buys 2 more. How many?", "Mia has 5 cups. She sells 1. How many?"] * 4
ANSWERS = ["3 + 2 = 5.\n#### 5", "5 - 1 = 4.\n#### 4"] * 4


def save_tiny_assets(folder: Path) -> dict[str, str]:
    """Returns the paths: `student`, `teacher`, `jsonl`, `gsm8k` (a save_to_disk folder)."""
    folder = Path(folder)
    tok = tiny_models.tokenizer()
    paths = {name: folder / name for name in ("student", "teacher")}
    for name, seed, hidden in (("student", 0, 16), ("teacher", 1, 32)):
        tiny_models.model(tok, layers=1, hidden=hidden, seed=seed).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    paths["jsonl"] = folder / "data.jsonl"
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in tiny_models.dataset("prompt_completion").to_list())
    paths["gsm8k"] = folder / "gsm8k"
    columns = {"question": QUESTIONS, "answer": ANSWERS}
    DatasetDict({"train": Dataset.from_dict(columns), "test": Dataset.from_dict(columns)}).save_to_disk(paths["gsm8k"])
    return {name: str(path) for name, path in paths.items()}


def train_flags(assets: dict[str, str], output_dir, dataset: str = "jsonl", steps: int = 2) -> list[str]:
    """Flags of a `steps`-step CPU run on the tiny assets (batch 2, completions of at most 8 tokens, no saving)."""
    return [
        "--model_name_or_path", assets["student"], "--teacher_model_name_or_path", assets["teacher"],
        "--dataset_name", assets[dataset], "--output_dir", str(output_dir), "--max_steps", str(steps),
        "--per_device_train_batch_size", "2", "--max_completion_length", "8", "--max_length", "64",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
        "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0", "--num_threads", "1",
    ]  # fmt: skip
