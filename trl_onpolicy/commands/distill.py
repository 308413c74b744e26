"""`trl-onpolicy distill`: on-policy distillation from the command line or a YAML recipe, in TRL's script style.

    trl-onpolicy distill --config examples/recipes/qwen-gsm8k-jsd.yaml [--max_steps 50 --output_dir out ...]
    accelerate launch examples/on_policy_distill.py --config examples/recipes/qwen-gsm8k-jsd.yaml   # the same code

Three groups of flags, parsed by `trl.TrlParser` (so `--config recipe.yaml` sets any of them and flags given after it
win): [`DistillScriptArguments`] (the data), [`~trl_onpolicy.OnPolicyDistillConfig`] (training, the teacher, the loss)
and [`~trl.ModelConfig`] (the student: `--model_name_or_path`, `--dtype`, LoRA with `--use_peft`, QLoRA with
`--load_in_4bit`). The flow is TRL's `trl/scripts/sft.py` with the teacher added:

1. student init kwargs from `ModelConfig` (revision, dtype, attention); the teacher gets the same dtype and attention
   unless `--teacher_model_init_kwargs` says otherwise (the teacher is never quantized by `--load_in_4bit`);
2. the dataset: a Hub id, a `save_to_disk` folder, a `.json`/`.jsonl`/`.csv`/`.parquet` file, or `toy`; GSM8K-style
   rows (`question`, `answer`) become conversational prompt + completion rows;
3. `OnPolicyDistillTrainer(model=<name>, teacher_model=None, ...)`: the student is loaded by the trainer (with
   `quantization_config=get_quantization_config(model_args)` and `peft_config=get_peft_config(model_args)`, as in
   TRL's SFT script); `teacher_model_name_or_path` picks the teacher backend (a model, a server URL, a cache folder);
4. train, save, and with `--eval_tasks` a per-round lm-eval report (`report.json`, `report.md`, `scores.png`).

`toy` as `--model_name_or_path`, `--teacher_model_name_or_path` or `--dataset_name` means the embedded default
(`trl_onpolicy.toy`: trained once, then cached), so a recipe can run offline on a CPU.

TRL 1.16 no longer has `get_kbit_device_map`: for a quantized student, `SFTTrainer` sets `device_map=None` under
DDP/DeepSpeed and transformers' bitsandbytes loader places the model on the current device.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments

from .. import checkpoints
from ..config import OnPolicyDistillConfig
from ..model_paths import check_model_names
from .distill_parser import DistillParser

TOY = "toy"
TOY_DOMAINS = "toy_domains"  # the toy task as two domains: "standard" (2-4 equations) and "hard" (5-8)
DATA_FILE_TYPES = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


@dataclass
class DistillScriptArguments(ScriptArguments):
    """
    The data of an on-policy distillation run (TRL's `ScriptArguments` plus a few fields).

    Args:
        dataset_name (`str`): A Hub id (`openai/gsm8k` with `--dataset_config main`), a `save_to_disk` folder, a
            `.json`/`.jsonl`/`.csv`/`.parquet` file, or `toy` (the embedded GSM8K-format task).
        system_prompt (`str`, *optional*): A system message put before every conversational prompt.
        max_train_samples (`int`, *optional*): Use the first N training rows (`toy`: rows to make, default 640).
        eval_tasks (`str`, *optional*): Comma-separated lm-eval tasks (`toy_gsm8k,gsm8k,mmlu`) scored before training
            and after every round (`--num_rounds`); the report lands in `output_dir`.
        eval_limit (`int`, *optional*): Examples per eval task.
        num_threads (`int`, *optional*): torch CPU threads (tiny models are fastest on one).
        domain_column (`str`, *optional*): A column naming each row's domain: one specialised student per domain, each
            from its teacher, and a router beside them (see `trl_onpolicy.commands.distill_domains`).
        router (`str`, *optional*, defaults to `"classifier"`): With `domain_column`: `"classifier"` (trained on the
            prompts) or `"column"` (the caller names each prompt's domain).
    """

    system_prompt: str | None = field(
        default=None, metadata={"help": "System message put before every conversational prompt."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    eval_tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated lm-eval tasks scored before training and after each round."}
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Examples per eval task."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    domain_column: str | None = field(
        default=None, metadata={"help": "Column naming each row's domain: one student per domain, and a router."}
    )
    router: str = field(
        default="classifier", metadata={"help": "With --domain_column: 'classifier' (trained on the prompts) or 'column'."}
    )


USAGE_NOTE = """\
Distill a teacher into a student. Every field is a flag (--field value) and can come from a YAML recipe
(--config recipe.yaml; flags on the command line win). A switch takes true or false (--use_peft true).
Below: the data, the distillation options, the student model's main options and the common training options.
"""


def make_parser(prog: str | None = None) -> DistillParser:
    """The parser of the script's three argument groups; `parse_args_and_config()` reads `--config` first."""
    return DistillParser(DistillScriptArguments, OnPolicyDistillConfig, prog=prog, description=USAGE_NOTE)


# ----------------------------------------------------------------------------------------------------------- data


def to_conversational(row: dict, system_prompt: str | None = None) -> dict:
    """A GSM8K-style row (`question`, `answer`) as a conversational prompt and completion."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {
        "prompt": [*system, {"role": "user", "content": row["question"]}],
        "completion": [{"role": "assistant", "content": row["answer"]}],
    }


def refuse_empty_source(name: str, split: str = "train") -> None:
    """Raise the trainer's empty-dataset error for a local data file or `save_to_disk` folder without rows, which
    `datasets` would otherwise fail on (`StopIteration` for an empty `.jsonl`, `IndexError` for an empty folder)."""
    from ..prompts import EMPTY_DATASET_ERROR

    if os.path.isfile(name) and os.path.getsize(name) <= 4096:  # empty, or only blank lines
        with open(name, "rb") as f:
            blank = not f.read().strip()
        if blank:
            raise ValueError(EMPTY_DATASET_ERROR.format(name=split, where=f" ({name} has no rows)"))
    folder = glob.escape(name)
    states = glob.glob(os.path.join(folder, "state.json")) + glob.glob(os.path.join(folder, "*", "state.json"))
    for state in states if os.path.isdir(name) else []:
        with open(state, encoding="utf-8") as f:
            if json.load(f).get("_data_files") == []:
                where = os.path.dirname(state)
                raise ValueError(EMPTY_DATASET_ERROR.format(name=split, where=f" ({where} has no rows)"))


def load_datasets(script_args: DistillScriptArguments, need_eval: bool = False):
    """The train split (and the test split when `need_eval` and it exists) that `dataset_name` names."""
    from datasets import DatasetDict, IterableDatasetDict, load_dataset, load_from_disk

    name = script_args.dataset_name
    if name is None:
        raise ValueError("Set `--dataset_name` (a Hub id, a save_to_disk folder, a data file, or 'toy').")
    if name == TOY:
        from ..toy import make_dataset

        train = make_dataset(script_args.max_train_samples or 640, split="train")
        return train.select_columns(["prompt", "completion"]), None
    if name == TOY_DOMAINS:
        return toy_domains(script_args.max_train_samples or 640), None
    refuse_empty_source(name, script_args.dataset_train_split)
    if any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
        dataset = load_from_disk(name)  # a Dataset or DatasetDict written by `save_to_disk`
    elif name.rsplit(".", 1)[-1] in DATA_FILE_TYPES and os.path.isfile(name):
        kind = DATA_FILE_TYPES[name.rsplit(".", 1)[-1]]
        dataset = load_dataset(kind, data_files={script_args.dataset_train_split: name})
    else:
        dataset = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    if not isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        dataset = DatasetDict({script_args.dataset_train_split: dataset})
    train = dataset[script_args.dataset_train_split]
    test = dataset.get(script_args.dataset_test_split) if need_eval else None
    if script_args.max_train_samples is not None:
        n = script_args.max_train_samples
        train = train.take(n) if script_args.dataset_streaming else train.select(range(min(n, len(train))))
    columns = set(train.column_names or [])
    if {"question", "answer"} <= columns and not columns & {"prompt", "messages"}:  # GSM8K's format
        kept = {script_args.domain_column}
        train, test = (
            None if d is None else d.map(to_conversational, fn_kwargs={"system_prompt": script_args.system_prompt},
                                         remove_columns=[c for c in d.column_names if c not in kept])
            for d in (train, test)
        )  # fmt: skip
    return train, test


def toy_domains(n: int):
    """`n` toy rows in two domains (the `domain` column), alternating: "standard" problems (2-4 equations) and "hard"
    ones (5-8)."""
    from datasets import Dataset

    from ..toy import make_dataset

    parts = {"standard": make_dataset((n + 1) // 2, split="train"),
             "hard": make_dataset(n // 2, split="train", min_steps=5, max_steps=8)}  # fmt: skip
    rows = [{"prompt": parts[d][i]["prompt"], "completion": parts[d][i]["completion"], "domain": d}
            for i in range((n + 1) // 2) for d in parts if i < len(parts[d])]  # fmt: skip
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------------------- run


def check_arguments(model_args: ModelConfig, training_args: OnPolicyDistillConfig) -> None:
    """Fail on a missing student or teacher name, or a model or checkpoint that does not exist, before loading."""
    if model_args.model_name_or_path is None:
        raise ValueError("Set `--model_name_or_path` (the student: a Hub id, a local path, or 'toy').")
    if training_args.teacher_model_name_or_path is None and training_args.teacher_model_kind == "separate":
        raise ValueError(
            "Set `--teacher_model_name_or_path`: a Hub id or path, an http(s):// teacher server, a teacher-cache "
            "folder, or 'toy' (or `--teacher_model_kind base|live|ema`: the student as its own teacher)."
        )
    check_model_names(  # fail on a missing model or checkpoint before loading anything
        None if model_args.model_name_or_path == TOY else model_args.model_name_or_path,
        None if training_args.teacher_model_name_or_path == TOY else training_args.teacher_model_name_or_path,
        training_args.reference_model_name_or_path,
        flags=("--model_name_or_path", "--teacher_model_name_or_path", "--reference_model_name_or_path"),
        revisions=(model_args.model_revision, training_args.teacher_model_revision),
    )


def resolve_models(model_args: ModelConfig, training_args: OnPolicyDistillConfig):
    """The student, teacher and tokenizer for the trainer: toy models loaded, other names kept with init kwargs set."""
    student, teacher, tokenizer = model_args.model_name_or_path, None, None
    if student == TOY:
        from .. import toy

        student, tokenizer, _ = toy.load_or_train_student()
    else:
        model_init_kwargs = {
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
        }
        training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    if training_args.teacher_model_name_or_path == TOY:
        from .. import toy

        teacher, toy_tokenizer, _ = toy.load_or_train_teacher()
        tokenizer = tokenizer or toy_tokenizer
    elif training_args.teacher_model_name_or_path is not None:  # never quantized by --load_in_4bit: a quantized
        # teacher degrades the target distribution
        teacher_init_kwargs = {"attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype}
        training_args.teacher_model_init_kwargs = {
            **teacher_init_kwargs, **(training_args.teacher_model_init_kwargs or {})
        }  # fmt: skip
    return student, teacher, tokenizer


def eval_callbacks(script_args: DistillScriptArguments) -> list:
    """An `LmEvalCallback` for `--eval_tasks`, or none."""
    if not script_args.eval_tasks:
        return []
    from ..eval import LmEvalCallback

    tasks = [t.strip() for t in script_args.eval_tasks.split(",") if t.strip()]
    return [LmEvalCallback(tasks=tasks, limit=script_args.eval_limit)]


def _finish(trainer, script_args, training_args, callbacks: list, command: list[str] | None) -> None:
    """After `train()`: on a SIGTERM stop, say how to resume; else save the student, write the eval report and push."""
    stop = checkpoints.sigterm_stop(trainer)
    if stop is not None:  # not finished: no final model, report or upload; say how to go on
        launcher = " (under the same launcher as before)" if trainer.accelerator.num_processes > 1 else ""
        trainer.accelerator.print(
            f"Stopped by SIGTERM at step {stop.stopped_at[0]} of {stop.stopped_at[1]}; the checkpoint is "
            f"{stop.checkpoint}. Resume with{launcher}:\n  "
            + checkpoints.resume_command(command or ["python", *sys.argv], stop.checkpoint)
        )
        return
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved the student to {training_args.output_dir}.")
    if callbacks and trainer.is_world_process_zero():
        from ..reports import format_table, write_report

        write_report(training_args.output_dir, callbacks[0].history)
        trainer.accelerator.print(format_table(callbacks[0].history))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def build_trainer(script_args, training_args, model_args, callbacks: list, train_dataset=None):
    """The `OnPolicyDistillTrainer` of a run: the student and teacher that the arguments name (toy models loaded, other
    names loaded by the trainer, as in TRL's SFT script), and the data of `--dataset_name` unless `train_dataset` is
    given (then no eval split). `trl-onpolicy compare` builds each of its pilots with it."""
    from trl import get_peft_config, get_quantization_config

    from ..trainer import OnPolicyDistillTrainer

    student, teacher, tokenizer = resolve_models(model_args, training_args)
    eval_dataset = None
    if train_dataset is None:
        train_dataset, eval_dataset = load_datasets(script_args, need_eval=training_args.eval_strategy != "no")
    return OnPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,  # None: `training_args.teacher_model_name_or_path` picks the backend
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        quantization_config=get_quantization_config(model_args) if isinstance(student, str) else None,
        peft_config=get_peft_config(model_args),
    )


def main(
    script_args: DistillScriptArguments,
    training_args: OnPolicyDistillConfig,
    model_args: ModelConfig,
    command: list[str] | None = None,
):  # -> OnPolicyDistillTrainer
    """
    Distill `training_args.teacher_model_name_or_path` into `model_args.model_name_or_path`; returns the trainer.
    `command` (the program and its arguments, default `python` and `sys.argv`) is what the message after a SIGTERM
    stop tells the user to run again, with `--resume_from_checkpoint`.
    """
    import torch

    from ..step_log import use_step_lines

    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    if script_args.domain_column:  # one student per domain, and a router
        from .distill_domains import distill_domains

        return distill_domains(script_args, training_args, model_args, command or ["python", *sys.argv])
    check_arguments(model_args, training_args)
    resume = checkpoints.resolve_resume_from_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    callbacks = eval_callbacks(script_args)
    trainer = build_trainer(script_args, training_args, model_args, callbacks)
    use_step_lines(trainer)  # one readable line per logging step instead of the Trainer's dicts
    trainer.train(resume_from_checkpoint=resume)
    _finish(trainer, script_args, training_args, callbacks, command)
    return trainer


def run(argv: list[str] | None = None, prog: str = "trl-onpolicy distill") -> int:
    """Parse `argv` (default: `sys.argv[1:]`, with `--config`) and run [`main`]; the entry point of `trl-onpolicy
    distill`. Returns the exit status: 0, or 143 when SIGTERM stopped training (see [`~trl_onpolicy.checkpoints`])."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(prog=prog)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    trainer = main(script_args, training_args, model_args, command=[*shlex.split(prog), *argv])
    stopped = trainer is not None and checkpoints.sigterm_stop(trainer)  # None: every domain was already trained
    return checkpoints.SIGTERM_EXIT_STATUS if stopped else 0


if __name__ == "__main__":  # accelerate launch -m trl_onpolicy.commands.distill --config recipe.yaml
    sys.exit(run(prog="python -m trl_onpolicy.commands.distill"))
