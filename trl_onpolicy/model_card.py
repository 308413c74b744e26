"""The distillation section of the model card: student, teacher(s), method and settings, scores per round, compute.

[`OnPolicyDistillTrainer.create_model_card`] writes TRL's card (`README.md` in the output folder, uploaded by
`push_to_hub`) and appends [`card_section`]. Everything here comes from the trainer's state and config; nothing from
the environment, so no token or key can reach the card.
"""

from __future__ import annotations

import json
import os
import platform
import re

import torch
import transformers
import trl

from . import __version__
from .reports import format_table, round_rows

SETTINGS = (  # config fields that define the method, in the order a reader wants them
    "loss_type", "beta", "skew_alpha", "reward_scale", "lmbda", "lmbda_schedule", "lmbda_start", "lmbda_end",
    "lmbda_schedule_steps", "seq_kd", "num_generations", "teacher_top_k", "max_completion_length", "temperature", "loss_temperature_schedule", "temperature_start", "temperature_end",
    "temperature_grad_scale", "hidden_state_weight", "hidden_state_distance", "teacher_mixture", "num_rounds",
    "max_steps", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
)  # fmt: skip
PHASES = (("time/generation", "generation"), ("time/teacher", "teacher scoring"), ("time/update", "updates"))


def _student_base(trainer):
    """The unwrapped student without its adapters, and whether it had any."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, base is not model


def _student_name(trainer) -> str:
    base, adapted = _student_base(trainer)
    name = base.config._name_or_path or type(base).__name__
    return f"`{name}`" + (" with LoRA adapters" if adapted else "")


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id (`org/model`, `gpt2`) and no local path; `None` for a path or nothing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _origin_sentence(base_model: str | None, dataset_name: str | None) -> str:
    """TRL's "This model is a fine-tuned version of [...]" line, with Hub links only for Hub ids."""
    if hub_id(base_model):
        text = f"This model is a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})"
    elif base_model:
        text = f"This model is a fine-tuned version of a local model (`{base_model}`)"
    else:
        text = "This model was fine-tuned from a model built in memory"
    if hub_id(dataset_name):
        text += f" on the [{dataset_name}](https://huggingface.co/datasets/{dataset_name}) dataset"
    elif dataset_name:
        text += f" on a local dataset (`{dataset_name}`)"
    return text + "."


def finish_card(trainer, path: str, dataset_name: str | None = None) -> None:
    """
    Rewrite TRL's card at `path` where its template assumes Hub ids (a student given as a local path read "fine-tuned
    from [None](https://huggingface.co/None)" and `pipeline(..., model="None")`), then append [`card_section`].
    The pipeline loads `hub_model_id` when the run has one, else the output folder.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    base, _ = _student_base(trainer)
    repo = trainer.hub_model_id or trainer.args.hub_model_id or trainer.args.output_dir
    for i, line in enumerate(lines):
        if line.startswith("This model is a fine-tuned version of "):
            lines[i] = _origin_sentence(base.config._name_or_path, dataset_name)
        elif line.startswith("generator = pipeline(") and 'model="' in line:
            lines[i] = re.sub(r'model="[^"]*"', lambda _: f"model={json.dumps(repo)}", line)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n" + card_section(trainer))


def _settings(args) -> str:
    rows = [f"| `{name}` | `{getattr(args, name)!r}` |" for name in SETTINGS if getattr(args, name, None) is not None]
    return "| setting | value |\n| --- | --- |\n" + "\n".join(rows)


def _compute(trainer) -> str:
    """Steps, completion tokens and seconds per phase, summed over the logged steps (times the logging interval)."""
    steps = [h for h in trainer.state.log_history if "loss" in h and "completion_length" in h]
    if not steps:
        return "No training steps were logged."
    logging_steps = trainer.args.logging_steps  # an int, or a fraction of max_steps
    every = int(logging_steps) if logging_steps >= 1 else max(1, round(logging_steps * trainer.state.max_steps))
    batch = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    processes = trainer.accelerator.num_processes
    tokens = sum(h["completion_length"] for h in steps) * every * batch * trainer.args.num_generations * processes
    lines = [
        f"- optimizer steps: {trainer.state.global_step}",
        f"- completion tokens trained on (estimated from the logged steps): {tokens:,.0f}",
        f"- processes: {processes} ({trainer.accelerator.device.type})",
    ]
    for key, label in PHASES:
        seconds = sum(h.get(key, 0.0) for h in steps) * every
        lines.append(f"- {label}: {seconds:,.1f} s (main process)")
    return "\n".join(lines)


def model_card_section(
    history: list[dict], teacher_scores: dict[str, float] | None = None, heading: str = "## Evaluation"
) -> str:
    """
    Markdown for a model card: `heading`, how the scores were measured, and the per-round table of
    [`~trl_onpolicy.reports.format_table`] (round 0: the student before training); `""` when `history` (as
    [`~trl_onpolicy.eval.LmEvalCallback`] fills it) holds no round-level evaluation.
    """
    if not round_rows(history):
        return ""
    return (
        f"{heading}\n\nMeasured with lm-evaluation-harness on the student after each round (round 0: before "
        "training), next to the teacher's scores on the same tasks.\n\n" + format_table(history, teacher_scores)
    )


def _evaluation(trainer) -> str:
    """The scores section from the first callback with an evaluation `history` (`""` without one)."""
    for callback in trainer.callback_handler.callbacks:
        history = getattr(callback, "history", None)
        if isinstance(history, list) and history:
            return model_card_section(history, getattr(callback, "teacher_scores", None), "### Scores per round")
    return ""


def card_section(trainer) -> str:
    """Markdown describing how the student was distilled (appended to TRL's model card)."""
    versions = (
        f"trl-onpolicy {__version__}, TRL {trl.__version__}, Transformers {transformers.__version__}, "
        f"PyTorch {torch.__version__}, Python {platform.python_version()}"
    )
    evaluation = _evaluation(trainer)
    parts = [
        "## On-policy distillation",
        f"- student: {_student_name(trainer)}",
        f"- teacher: {trainer.teacher.describe()}",
        "- method: on-policy knowledge distillation (the student writes completions, the teacher scores every "
        "token, the student moves toward the teacher under the divergence below) with "
        "[trl-onpolicy](https://pypi.org/project/trl-onpolicy/)'s `OnPolicyDistillTrainer`",
        f"- versions: {versions}",
        "### Settings\n\n" + _settings(trainer.args),
        "### Compute\n\n" + _compute(trainer),
    ]
    if evaluation:
        parts.append(evaluation)
    return "\n\n".join(parts) + "\n"
