"""What a checkpoint holds beyond the Trainer's own, which checkpoints are whole, and stopping cleanly on SIGTERM.

The Trainer saves the weights, optimizer, scheduler, RNG state of every process and `trainer_state.json` (step, log
history). On top of that, `distill_state.json` holds the distillation state: the loss temperature schedule, the
non-finite-step counters, and the state of every callback that has `state_dict()` / `load_state_dict()` (the eval
hook's per-round history, so the report continues instead of starting over). A checkpoint written while a batch of
rollouts is being reused (`num_iterations > 1`) also holds that batch, `rollout_buffer_<process>.pt` (see
[`~trl_onpolicy.rollout_buffer`]).

A checkpoint folder is *whole* when its `distill_state.json` (written first, to a temporary name and renamed) and its
`trainer_state.json` (written last by the Trainer) both parse and its weights are there. A process killed while
writing leaves a folder that is not whole; [`last_whole_checkpoint`] skips it, so `resume_from_checkpoint=True` never
loads a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading

from transformers import TrainerCallback

from .launchers import any_process

logger = logging.getLogger(__name__)

STATE_FILE = "distill_state.json"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def is_whole(folder: str) -> bool:
    """Both state files parse and the weights are there (see the module docstring)."""
    return (
        read_state(folder) is not None
        and _read_json(os.path.join(folder, TRAINER_STATE)) is not None
        and any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHTS)
    )


def last_whole_checkpoint(output_dir: str) -> str | None:
    """The whole `checkpoint-N` folder with the largest N, skipping (and naming) any that is not whole."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(
        ((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))), reverse=True
    )
    for _, name in found:
        folder = os.path.join(output_dir, name)
        if os.path.isdir(folder) and is_whole(folder):
            return folder
        logger.warning("Skipping %s: it is incomplete (a run stopped while writing it).", folder)
    return None


class SigtermCheckpoint(TrainerCallback):
    """
    On SIGTERM (a scheduler's preemption, `kill`), finish the current optimizer step, write a checkpoint, and stop
    training normally. The previous handler is put back when training ends.

    Args:
        accelerator (`accelerate.Accelerator`, *optional*): With several processes, the flag is or-ed over them at
            every step end (one small all-reduce), so that a signal delivered to one process only stops all of them at
            the same step: a process saving and stopping alone would leave the others in a collective it never joins.
    """

    def __init__(self, accelerator=None):
        self.received = False
        self.accelerator = accelerator
        self._previous = None

    def _handle(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping.")
        self.received = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.accelerator is not None:
            self.received = any_process(self.accelerator, self.received)
        if self.received:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
