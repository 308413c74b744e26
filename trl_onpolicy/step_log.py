"""One readable line per logging step, for the command line.

The Trainer prints each log as a Python dict of strings (`{'loss': '0.001655', 'grad_norm': '0.008018', ...}`, ~400
characters, no step number). [`StepLineCallback`] prints instead:

    step 10/300 | loss 0.001655 | divergence 0.001655 | entropy student 3.928 teacher 3.929 | lr 2e-05 |
    completions 8.0 tokens | 331 tokens/s | seconds: generation 0.034 teacher 0.002 update 0.013

(one line), and other logs (lm-eval scores, the eval loss, the end-of-training summary) as `step N/M | key value ...`.
[`use_step_lines`] puts it in place of the Trainer's printing: [`StepLineProgressCallback`] keeps the progress bar
and writes the line above it; with `disable_tqdm`, [`StepLineCallback`] prints it.
"""

from __future__ import annotations

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

PHASES = (("time/generation", "generation"), ("time/teacher", "teacher"), ("time/update", "update"))
SHOWN = {"loss", "divergence", "student_entropy", "teacher_entropy", "learning_rate", "tokens_per_second", "completion_length",
         *(key for key, _ in PHASES)}  # fmt: skip
HIDDEN = {"epoch", "total_flos", "grad_norm", "truncated_fraction", "loss_temperature"}  # in the
# run's log history (trainer_state.json, report_to) all the same


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_step_line(logs: dict, step: int, max_steps: int) -> str:
    """The line for one log (see the module docstring)."""
    parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
    if "loss" not in logs:  # eval scores, eval loss, the training summary: every value
        return " | ".join(parts + [f"{k} {_number(v)}" for k, v in logs.items() if k != "total_flos"])
    parts.append(f"loss {_number(logs['loss'])}")
    if "divergence" in logs:
        parts.append(f"divergence {_number(logs['divergence'])}")
    if "student_entropy" in logs or "teacher_entropy" in logs:
        sides = [f"{side} {_number(logs[f'{side}_entropy'])}" for side in ("student", "teacher")
                 if f"{side}_entropy" in logs]  # fmt: skip
        parts.append("entropy " + " ".join(sides))
    if "learning_rate" in logs:
        parts.append(f"lr {_number(logs['learning_rate'])}")
    if "completion_length" in logs:
        parts.append(f"completions {logs['completion_length']:.1f} tokens")
    if "tokens_per_second" in logs:
        parts.append(f"{logs['tokens_per_second']:.0f} tokens/s")
    phases = [f"{label} {logs[key]:.3f}" for key, label in PHASES if key in logs]
    if phases:
        parts.append("seconds: " + " ".join(phases))
    rest = [f"{k} {_number(v)}" for k, v in logs.items()
            if k not in SHOWN and k not in HIDDEN and not (k == "nonfinite_skipped" and not v)]  # fmt: skip
    return " | ".join(parts + rest)


class StepLineCallback(TrainerCallback):
    """Prints one line per log on the main process (see [`format_step_line`])."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(format_step_line(logs, state.global_step, state.max_steps), flush=True)


class StepLineProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with one line per log written above it instead of the dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_step_line(logs, state.global_step, state.max_steps))


def use_step_lines(trainer) -> None:
    """Replace `trainer`'s printing of log dicts (`ProgressCallback` / `PrinterCallback`) by step lines."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(StepLineProgressCallback())
    if trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(StepLineCallback())
