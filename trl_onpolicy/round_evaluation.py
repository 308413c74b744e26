"""Scoring the live student over a run: before training, after every round, optionally every `eval_steps` steps.

[`RoundEvalCallback`] holds what every such evaluation shares, whatever it measures: when it runs, the `history` it
keeps (which `trl_onpolicy.reports` turns into the per-round table, plot and model card section), the log line, the
checkpointed state (a resumed run keeps the rounds already scored), the training run's RNG left as it was, and a failed
evaluation recorded without stopping the run. What is measured is a subclass's `evaluate`:
[`~trl_onpolicy.eval.LmEvalCallback`] runs lm-eval tasks, [`~trl_onpolicy.tool_evaluation.ToolEvalCallback`] the toy
task with the calculator.

Which processes evaluate: the main one, while the others wait at the trainer's barrier after the round (and at the
callback's own barrier for step and pre-training evaluations), so an evaluation must finish within the process-group
timeout (`ddp_timeout`, 1800 s by default). A sharded student (FSDP2, DeepSpeed ZeRO-3) is different: each forward pass
gathers its weights from every process (a collective), so every process evaluates, the same requests in the same order,
and the main process records and logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from typing import Any

import numpy as np
import torch
from transformers.trainer_callback import ExportableState

from .callbacks import DistillCallback
from .launchers import SHARDED, launcher

logger = logging.getLogger(__name__)


def unwrap_model(model, trainer=None):
    """The bare model under accelerate / DDP / `torch.compile` wrappers (a PEFT model stays a PEFT model)."""
    if trainer is not None and getattr(trainer, "accelerator", None) is not None:
        model = trainer.accelerator.unwrap_model(model)
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def preserved_rng_and_env(allow_code: bool = False):
    """Put the training run's python/numpy/torch RNG states back after an evaluation (lm-eval reseeds them all);
    with `allow_code`, set `HF_ALLOW_CODE_EVAL=1` for the evaluation only."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allow_code:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if allow_code:
            if previous is None:
                os.environ.pop("HF_ALLOW_CODE_EVAL", None)
            else:
                os.environ["HF_ALLOW_CODE_EVAL"] = previous


class RoundEvalCallback(DistillCallback, ExportableState):
    """
    The events, history and state of an evaluation of the live student (see the module docstring); a subclass
    implements `evaluate(model, tokenizer, output_dir=None, trainer=None)`, which returns `{"scores": {task: value},
    "primary": {task: metric}, "metrics": {task: {metric: value}}}` (None on a process that evaluated along with the
    main one), and `describe()`, which names what failed in the log.

    Args:
        eval_steps (`int` or `None`, *optional*):
            Also evaluate every this many optimizer steps (in addition to round ends).
        eval_before_training (`bool`, *optional*, defaults to `True`):
            Evaluate once in `on_train_begin`, recorded as round 0, step 0.
        tokenizer (*optional*):
            Used when the trainer does not pass `processing_class`.

    After training, `callback.history` holds one entry per evaluation: `{"round", "step", "kind" ("before", "round"
    or "step"), "scores": {task: value}, "metrics": {task: {metric: value}}, "seconds"}` plus `"error"` when it failed.
    Each evaluation is logged as `eval/<task>/<metric>` and `eval/seconds`.
    """

    def __init__(self, eval_steps: int | None = None, eval_before_training: bool = True, tokenizer=None):
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"`eval_steps` must be >= 1 or None, got {eval_steps}.")
        self.eval_steps, self.eval_before_training, self.tokenizer = eval_steps, eval_before_training, tokenizer
        self.trainer = None  # the last trainer an event named (events carry `trainer`), to log through Trainer.log
        self.history: list[dict[str, Any]] = []
        self.teacher_scores: dict[str, float] | None = None  # the teacher's scores, for the report and model card
        self._round = 0  # rounds finished so far
        self._evaluated_step = None  # the step of the last evaluation, known on every process

    def evaluate(self, model=None, tokenizer=None, output_dir: str | None = None, trainer=None) -> dict | None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def _tokenizer(self, tokenizer, name: str):
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer) or self.tokenizer  # a processor carries a tokenizer
        if tokenizer is None:
            raise ValueError(f"{name} needs a tokenizer: pass `processing_class` to the trainer or "
                             f"`{name}(tokenizer=...)`.")  # fmt: skip
        return tokenizer

    def _run(self, args, state, kind: str, round_index: int, **kwargs) -> None:
        """Evaluate, record and log on the main process (on every process for a sharded student, the main one
        records); never raise (the training run must survive)."""
        trainer = kwargs.pop("trainer", None) or self.trainer
        accelerator = getattr(trainer, "accelerator", None)
        self._evaluated_step = state.global_step  # on every process, so that they all take the same branches
        sharded = accelerator is not None and launcher(accelerator) in SHARDED  # a forward pass is a collective
        if state.is_world_process_zero or sharded:
            entry, logs = self._evaluate_entry(args, state, kind, round_index, trainer, **kwargs)
            if state.is_world_process_zero:
                self._record(entry, logs, state, trainer)
        if kind != "round" and accelerator is not None:
            accelerator.wait_for_everyone()  # the trainer already waits after round ends

    def _evaluate_entry(self, args, state, kind, round_index, trainer, **kwargs) -> tuple[dict, dict]:
        entry = {"round": round_index, "step": state.global_step, "kind": kind}
        start = time.perf_counter()
        logs = {}
        try:
            out = self.evaluate(kwargs.get("model"), kwargs.get("processing_class") or kwargs.get("tokenizer"),
                                output_dir=args.output_dir, trainer=trainer)  # fmt: skip
        except Exception as e:  # a failed evaluation must not lose the training run
            logger.exception(  # the message names the evaluation and the exception; the traceback follows
                "%s failed at step %d (round %d), training continues: %s: %s",
                self.describe(), state.global_step, round_index, type(e).__name__, e,  # noqa: TRY401
            )
            entry.update(scores={}, metrics={}, error=f"{type(e).__name__}: {e}")
        else:
            if out is not None:  # None: a process that evaluated along with the main one (sharded student)
                entry.update(scores=out["scores"], metrics=out["metrics"])
                logs = {f"eval/{t}/{out['primary'][t].split(',')[0]}": v for t, v in out["scores"].items()}
        entry["seconds"] = round(time.perf_counter() - start, 3)
        return entry, logs

    def _record(self, entry: dict, logs: dict, state, trainer) -> None:
        self.history.append(entry)
        if logs:
            logs["eval/seconds"] = entry["seconds"]
            if trainer is not None:
                trainer.log(logs)
            else:
                state.log_history.append({**logs, "step": state.global_step})

    # ------------------------------------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_before_training and not any(e["kind"] == "before" for e in self.history):
            self._run(args, state, "before", 0, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        due = self.eval_steps and state.global_step % self.eval_steps == 0
        if due and self._evaluated_step != state.global_step:  # not the round end's
            self._run(args, state, "step", self._round, **kwargs)

    def on_round_end(self, args, state, control, round_index: int, **kwargs):
        self._round = round_index
        self.trainer = kwargs.get("trainer") or self.trainer
        if self._evaluated_step == state.global_step:  # evaluated at this very step already (`eval_steps`)
            if self.history and self.history[-1]["step"] == state.global_step:  # (the main process's record)
                self.history[-1].update(kind="round", round=round_index)
            return
        self._run(args, state, "round", round_index, **kwargs)

    # ------------------------------------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {"history": [dict(e) for e in self.history], "round": self._round}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(e) for e in state.get("history", [])]
        self._round = int(state.get("round", 0))

    def _state(self, names: tuple[str, ...]) -> dict:
        """For `Trainer` checkpoints (`ExportableState`): rebuilt with the attributes `names` as arguments, then the
        history and round set."""
        args = {name: getattr(self, name) for name in names}
        return {"args": args, "attributes": {"history": self.history, "_round": self._round}}
