"""The distillation section of the model card: student, teacher(s), method and settings, scores per round, compute.

[`OnPolicyDistillTrainer.create_model_card`] writes TRL's card (`README.md` in the output folder, uploaded by
`push_to_hub`) and appends [`card_section`]. Everything here comes from the trainer's state and config; nothing from
the environment, so no token or key can reach the card.
"""

from __future__ import annotations

import platform

import torch
import transformers
import trl

from . import __version__
from .reports import format_table

SETTINGS = (  # config fields that define the method, in the order a reader wants them
    "loss_type", "beta", "skew_alpha", "reward_scale", "lmbda", "seq_kd", "num_generations", "teacher_top_k",
    "max_completion_length", "temperature", "loss_temperature_schedule", "temperature_start", "temperature_end",
    "temperature_grad_scale", "hidden_state_weight", "hidden_state_distance", "teacher_mixture", "num_rounds",
    "max_steps", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
)  # fmt: skip
PHASES = (("time/generation", "generation"), ("time/teacher", "teacher scoring"), ("time/update", "updates"))


def _student_name(trainer) -> str:
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = base.config._name_or_path or type(base).__name__
    return f"`{name}`" + (" with LoRA adapters" if base is not model else "")


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


def _evaluation(trainer) -> str:
    for callback in trainer.callback_handler.callbacks:
        history = getattr(callback, "history", None)
        if isinstance(history, list) and history:
            return "\n\n" + format_table(history, getattr(callback, "teacher_scores", None))
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
        parts.append(
            "### Scores per round\n\nMeasured with lm-evaluation-harness on the student after each round (round 0: "
            "before training), next to the teacher's scores on the same tasks." + evaluation
        )
    return "\n\n".join(parts) + "\n"
