"""What a checkpoint holds beyond the Trainer's own, which checkpoints are whole, and stopping cleanly on SIGTERM.

The Trainer saves the weights, optimizer, scheduler, RNG state of every process and `trainer_state.json` (step, log
history). On top of that, `distill_state.json` holds the distillation state: the loss temperature schedule, the
non-finite-step counters, and the state of every callback that has `state_dict()` / `load_state_dict()` (the eval
hook's per-round history, so the report continues instead of starting over). A checkpoint written while a batch of
rollouts is being reused (`num_iterations > 1`) also holds that batch, `rollout_buffer_<process>.pt` (see
[`~trl_onpolicy.rollout_buffer`]); one written inside a rollout pool (`steps_per_generation > 1`) holds the pool's
remaining steps, `rollout_pool_<process>.pt` (see [`~trl_onpolicy.rollout_pool`]).

A checkpoint folder is *whole* when its `distill_state.json` (written first, to a temporary name and renamed) and its
`trainer_state.json` (written last by the Trainer) both parse and its weights are there. A process killed while
writing leaves a folder that is not whole; [`last_whole_checkpoint`] skips it, so `resume_from_checkpoint=True` never
loads a half-written checkpoint.

[`resolve_resume_from_checkpoint`] turns what a user passes as `resume_from_checkpoint` (the trainer's argument, the
`--resume_from_checkpoint` flag, a recipe's field) into one checkpoint folder: `True`, `"true"` or `"last"` is the
last whole checkpoint in `output_dir`; a run folder (one holding `checkpoint-N` folders) is its last whole checkpoint;
a `checkpoint-N` folder is itself; anything else is an error that lists the checkpoints there are. As transformers does
for `resume_from_checkpoint=True`, asking to resume where there is no checkpoint is an error, not a fresh start.

A run stopped by SIGTERM ([`SigtermCheckpoint`]) writes a checkpoint and ends training early; `trl-onpolicy distill`
then prints the step it stopped at and the command that resumes it, and exits with status 143 (128 + SIGTERM, what a
shell reports for a process SIGTERM killed), so that a scheduler sees an interrupted job, not a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import threading

from transformers import TrainerCallback

from .launchers import any_process

logger = logging.getLogger(__name__)

STATE_FILE = "distill_state.json"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RESUME_LAST = ("true", "last")  # `resume_from_checkpoint` values (any case) meaning "the last whole one in output_dir"
RESUME_NONE = ("false", "")
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM  # 143: what a shell reports for a process stopped by SIGTERM


def write_state(folder: str, state: dict) -> None:
    """Write `distill_state.json` atomically (temporary name, then rename)."""
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, STATE_FILE))


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_state(folder: str) -> dict | None:
    """The folder's distillation state, or None (a checkpoint written before it existed, or damaged)."""
    return _read_json(os.path.join(folder, STATE_FILE))


def distill_state(trainer) -> dict:
    """The distillation state of `trainer` (see the module docstring), JSON-serialisable."""
    callbacks = {
        type(c).__name__: c.state_dict() for c in trainer.callback_handler.callbacks if hasattr(c, "load_state_dict")
    }
    return {
        "loss_temperature": trainer.loss_temperature.state_dict(),
        "last_teacher_entropy": trainer._last_teacher_entropy,
        "nonfinite_in_a_row": trainer.nonfinite.in_a_row,
        "nonfinite_total": trainer.nonfinite.total,
        "callbacks": callbacks,
    }


def save_distill_state(trainer, folder: str) -> None:
    """Everything of a checkpoint beyond the Trainer's, written first (atomically): the distillation state (main
    process), each process's rollout buffer within a reuse window and rollout pool, and what the teacher learns (an
    EMA self-teacher's weights)."""
    index = trainer.accelerator.process_index
    if trainer.args.should_save:
        write_state(folder, distill_state(trainer))
    trainer.rollout_buffer.save(folder, index, trainer.state.global_step)
    trainer.rollout_pool.save(folder, index)
    trainer.teacher.save_state(folder, index)


def restore_distill_state(trainer, state: dict) -> None:
    """Put back what [`distill_state`] saved (callbacks matched by class name)."""
    trainer.loss_temperature.load_state_dict(state["loss_temperature"])
    trainer._last_teacher_entropy = state["last_teacher_entropy"]
    trainer.nonfinite.in_a_row = state["nonfinite_in_a_row"]
    trainer.nonfinite.total = state["nonfinite_total"]
    saved = state.get("callbacks", {})
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "load_state_dict") and type(callback).__name__ in saved:
            callback.load_state_dict(saved[type(callback).__name__])


def prepare_resume(trainer, resume_from_checkpoint):
    """Before `Trainer.train`: the checkpoint to resume from ([`resolve_resume_from_checkpoint`]), with the
    distillation state and this process's rollout buffer and rollout pool restored from it; returns it as the Trainer
    takes it."""
    resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, trainer.args.output_dir)
    folder = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
    trainer._rng_checkpoint = folder  # restored once, before the first resumed step samples (see the trainer)
    state = read_state(folder) if folder is not None else None
    if state is not None:
        restore_distill_state(trainer, state)
    trainer.rollout_buffer.restore(folder, trainer.accelerator, trainer.teacher.output_heads)
    trainer.rollout_pool.restore(folder, trainer.accelerator, skip_data=not trainer.args.ignore_data_skip)
    trainer.teacher.restore_state(folder, trainer.accelerator.process_index)
    return resume_from_checkpoint


def is_whole(folder: str) -> bool:
    """Both state files parse and the weights are there (see the module docstring)."""
    return (
        read_state(folder) is not None
        and _read_json(os.path.join(folder, TRAINER_STATE)) is not None
        and any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHTS)
    )


def _checkpoint_names(folder: str) -> list[str]:
    """The `checkpoint-N` folders in `folder`, largest N first."""
    if not os.path.isdir(folder):
        return []
    found = ((int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name)))
    return [name for _, name in sorted(found, reverse=True) if os.path.isdir(os.path.join(folder, name))]


def last_whole_checkpoint(output_dir: str) -> str | None:
    """The whole `checkpoint-N` folder with the largest N, skipping (and naming) any that is not whole."""
    for name in _checkpoint_names(output_dir):
        folder = os.path.join(output_dir, name)
        if is_whole(folder):
            return folder
        logger.warning("Skipping %s: it is incomplete (a run stopped while writing it).", folder)
    return None


def describe_checkpoints(folder: str) -> str:
    """What `folder` holds, for an error message: its checkpoints, whole or not, largest step first."""
    names = _checkpoint_names(folder)
    if not os.path.isdir(folder):
        return f"{folder!r} does not exist"
    if not names:
        return f"{folder!r} holds no checkpoint-N folder"
    listed = [name if is_whole(os.path.join(folder, name)) else f"{name} (incomplete)" for name in names[:8]]
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return f"{folder!r} holds {', '.join(listed)}{more}"


def resolve_resume_from_checkpoint(value, output_dir: str) -> str | None:
    """
    The checkpoint folder that `resume_from_checkpoint` means (see the module docstring), or None to start fresh.

    Args:
        value (`str`, `bool`, `os.PathLike` or `None`):
            `None`, `False` or `"false"`: start fresh. `True`, `"true"` or `"last"` (any case): the last whole
            checkpoint in `output_dir`. A `checkpoint-N` folder: that checkpoint. A run folder: its last whole one.
        output_dir (`str`):
            The run's output directory.

    Raises:
        `FileNotFoundError`: the path does not exist. `ValueError`: there is no whole checkpoint where it points.
    """
    if value is None or value is False:
        return None
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    fix = "or `true` for the last whole checkpoint in output_dir, or leave resume_from_checkpoint unset to start fresh"
    if value is True or value.strip().lower() in RESUME_LAST:
        found = last_whole_checkpoint(output_dir)
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint={value!r} resumes from the last whole checkpoint in output_dir, but output_dir "
                f"{describe_checkpoints(output_dir)}. Check `output_dir`, give a checkpoint folder, or leave "
                "resume_from_checkpoint unset to start fresh."
            )
        return found
    if value.strip().lower() in RESUME_NONE:
        return None
    if not os.path.exists(value):
        raise FileNotFoundError(
            f"resume_from_checkpoint {value!r} does not exist; output_dir {describe_checkpoints(output_dir)}. Give a "
            f"checkpoint-N folder, a run folder holding them, {fix}."
        )
    state_file = os.path.join(value, TRAINER_STATE)
    if _CHECKPOINT.match(os.path.basename(os.path.normpath(value))) or os.path.isfile(state_file):
        if _read_json(state_file) is None:
            beside = last_whole_checkpoint(os.path.dirname(os.path.normpath(value)) or ".")
            raise ValueError(
                f"resume_from_checkpoint {value!r} is incomplete (its {TRAINER_STATE}, written last, is missing or "
                f"cut: a run stopped while writing it). Resume from {beside or 'a whole checkpoint'} instead."
            )
        return value
    found = last_whole_checkpoint(value)
    if found is None:
        raise ValueError(
            f"resume_from_checkpoint {value!r} is neither a checkpoint (no {TRAINER_STATE}) nor a run folder with a "
            f"whole checkpoint: {describe_checkpoints(value)}. Give a checkpoint-N folder, {fix}."
        )
    return found


def resume_command(command: list[str], checkpoint: str) -> str:
    """`command` (a program and its arguments) with `--resume_from_checkpoint checkpoint` instead of any it had."""
    kept, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg == "--resume_from_checkpoint":
            skip = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    return shlex.join([*kept, "--resume_from_checkpoint", checkpoint])


class SigtermCheckpoint(TrainerCallback):
    """
    On SIGTERM (a scheduler's preemption, `kill`), finish the current optimizer step, write a checkpoint, and stop
    training normally. The previous handler is put back when training ends. When that stop came before `max_steps`,
    `stopped_at` is `(step, max_steps)` and `checkpoint` the folder it wrote (see [`sigterm_stop`]).

    Args:
        accelerator (`accelerate.Accelerator`, *optional*): With several processes, the flag is or-ed over them at
            every step end (one small all-reduce), so that a signal delivered to one process only stops all of them at
            the same step: a process saving and stopping alone would leave the others in a collective it never joins.
    """

    def __init__(self, accelerator=None):
        self.received = False
        self.accelerator = accelerator
        self.checkpoint = None
        self.stopped_at = None
        self._previous = None

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping.")
        self.received = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.checkpoint, self.stopped_at = False, None, None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.accelerator is not None:
            self.received = any_process(self.accelerator, self.received)
        if self.received:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.received:
            self.checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self.received and state.global_step < state.max_steps:
            self.stopped_at = (state.global_step, state.max_steps)
            logger.warning(
                "Training stopped by SIGTERM at step %d of %d; resume from %s (resume_from_checkpoint).",
                state.global_step, state.max_steps, self.checkpoint,
            )  # fmt: skip


def sigterm_stop(trainer) -> SigtermCheckpoint | None:
    """The trainer's [`SigtermCheckpoint`] if SIGTERM ended its last `train()` before `max_steps`, else None."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, SigtermCheckpoint) and callback.stopped_at is not None:
            return callback
    return None
