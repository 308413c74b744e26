"""Callbacks with the distillation events: see the rollouts before the teacher scores them, and act at round ends.

[`DistillCallback`] is a [`~transformers.TrainerCallback`] with two extra events. The trainer sends them only to the
callbacks that define them, so ordinary `TrainerCallback`s keep working unchanged:

- `on_rollouts(args, state, control, rollouts, **kwargs)`: called on every process after the completions of a
  generation batch are known and before the teacher scores them. Return `None` to keep the rollouts, or a
  [`~trl_onpolicy.rollouts.Rollouts`] (filtered or edited) to replace them. Callbacks run in order, each on what the
  previous one returned, so filters and editors chain.
- `on_round_end(args, state, control, round_index, **kwargs)`: called on every process after the last optimizer step of
  a round (`round_index` counts from 1). `kwargs` holds `model`, `processing_class` and `trainer`.

Built in: [`CompletionsLogger`] writes one JSON line per completion with the per-token log-prob summary of the
teacher and the student.

[`completion_records`] makes the records that `on_scored` receives. The trainer's callback handler
([`~trl_onpolicy.callback_handler.DistillCallbackHandler`]) sends these events and ends the rounds; every event's
kwargs carry the `trainer`.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from .rollouts import Rollouts


class DistillCallback(TrainerCallback):
    """A [`~transformers.TrainerCallback`] that also receives the distillation events (see the module docstring)."""

    def on_rollouts(self, args, state, control, rollouts: Rollouts, **kwargs) -> Rollouts | None:
        return None

    def on_round_end(self, args, state, control, round_index: int, **kwargs) -> None:
        return None


class CompletionsLogger(DistillCallback):
    """
    Appends every scored completion to `<output_dir>/completions.jsonl` (main process only), with the prompt, the
    completion, and the mean teacher and student log-prob of the sampled tokens.

    Args:
        every_n_steps (`int`, *optional*, defaults to `1`):
            Log the rollouts of one generation batch every this many optimizer steps.
        max_per_batch (`int` or `None`, *optional*, defaults to `8`):
            Log at most this many completions per batch.
        path (`str` or `None`, *optional*):
            Where to write; defaults to `<output_dir>/completions.jsonl`.
    """

    def __init__(self, every_n_steps: int = 1, max_per_batch: int | None = 8, path: str | None = None):
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be >= 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.max_per_batch = max_per_batch
        self.path = path

    def on_scored(self, args, state, control, records: list[dict[str, Any]], **kwargs) -> None:
        """Receives the scored rollouts of one generation batch as plain records (sent by the trainer)."""
        step = state.global_step + 1  # sent during the step, before the Trainer counts it: the step of log_history
        if not state.is_world_process_zero or step % self.every_n_steps != 0:
            return
        path = self.path or os.path.join(args.output_dir, "completions.jsonl")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(
                json.dumps({"step": step, **record}, ensure_ascii=False) + "\n"
                for record in records[: self.max_per_batch]
            )


def completion_records(rollouts: Rollouts, student_logps, teacher_logps, tokenizer) -> list[dict[str, Any]]:
    """
    One record per completion for `on_scored`: source, texts, token count, and the mean log-prob of the sampled
    tokens under the student and the teacher (NaN where the teacher gave none), from the flat `(N,)` log-probs.
    """
    prompts, completions = rollouts.decode(tokenizer)
    records, start = [], 0
    for prompt, completion, ids in zip(prompts, completions, rollouts.completion_ids):
        n = len(ids)
        s, t = student_logps[start : start + n], teacher_logps[start : start + n]
        start += n
        records.append({
            "source": rollouts.source, "prompt": prompt, "completion": completion, "tokens": n,
            "student_mean_logp": s.mean().item() if n else None,
            "teacher_mean_logp": t.mean().item() if n else None,
            "mean_logp_gap": (s - t).mean().item() if n else None,
        })  # fmt: skip
    return records
