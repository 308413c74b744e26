"""The trainer's callback handler: the Trainer's events, plus the distillation events and the rounds.

[`DistillCallbackHandler`] is the [`~transformers.trainer_callback.CallbackHandler`] the trainer runs with. Beside the
Trainer's events it sends the distillation events of [`~trl_onpolicy.callbacks.DistillCallback`] to the callbacks
that define them (`on_rollouts`, chained; `on_scored`; `on_round_end`), and it ends the rounds itself: after the step
that ends a round it fires `on_round_end` on every process, waits for all of them, and asks for a checkpoint. Every
event's kwargs carry the `trainer` (as they carry the `model`), which a callback uses to log (`trainer.log`) or to
reach the accelerator; nothing is written into the callbacks.
"""

from __future__ import annotations

import logging

from transformers.trainer_callback import CallbackHandler

from .callbacks import completion_records
from .rounds import round_ends

logger = logging.getLogger(__name__)


def round_ending_at(step: int, max_steps: int, num_rounds: int) -> int | None:
    """The (1-based) round that ends at `step`, if any."""
    ends = round_ends(max_steps, num_rounds)
    return ends.index(step) + 1 if step in ends else None


class DistillCallbackHandler(CallbackHandler):
    """
    The Trainer's callback handler with the distillation events and the rounds.

    Args:
        handler ([`~transformers.trainer_callback.CallbackHandler`]): The handler the Trainer built, whose callbacks
            and objects this one takes over.
        trainer ([`OnPolicyDistillTrainer`]): Passed to every event as `trainer`.
    """

    def __init__(self, handler: CallbackHandler, trainer):
        super().__init__(handler.callbacks, handler.model, handler.processing_class, handler.optimizer,
                         handler.lr_scheduler)  # fmt: skip
        self.trainer = trainer

    def call_event(self, event, args, state, control, **kwargs):
        return super().call_event(event, args, state, control, trainer=self.trainer, **kwargs)

    def _methods(self, event: str) -> list:
        """The callbacks' methods for a distillation event, in order (callbacks without it are skipped)."""
        return [m for m in (getattr(callback, event, None) for callback in self.callbacks) if m is not None]

    def _carried(self) -> dict:
        """What every event's kwargs carry, distillation events too."""
        return {"model": self.model, "processing_class": self.processing_class, "trainer": self.trainer}

    def dispatch(self, event: str, args, state, control, **kwargs) -> None:
        """Send a distillation event to the callbacks that define it, in order."""
        for method in self._methods(event):
            method(args, state, control, **self._carried(), **kwargs)

    def on_rollouts(self, args, state, control, rollouts):
        """`on_rollouts` along the callbacks in order: each sees the rollouts the previous one returned (None: keep)."""
        for method in self._methods("on_rollouts"):
            edited = method(args, state, control, rollouts=rollouts, **self._carried())
            rollouts = edited if edited is not None else rollouts
        return rollouts

    @property
    def wants_scored(self) -> bool:
        return bool(self._methods("on_scored"))

    def on_scored(self, args, state, control, rollouts, student_logps, teacher_logps) -> None:
        """`on_scored` with one record per completion (see [`~trl_onpolicy.callbacks.completion_records`])."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        records = completion_records(rollouts, student_logps, teacher_logps, tokenizer)
        self.dispatch("on_scored", args, state, control, records=records)

    def on_step_end(self, args, state, control):
        control = super().on_step_end(args, state, control)
        round_index = round_ending_at(state.global_step, state.max_steps, args.num_rounds)
        if round_index is not None:
            logger.info("Round %d of %d ended at step %d.", round_index, args.num_rounds, state.global_step)
            self.dispatch("on_round_end", args, state, control, round_index=round_index)
            self.trainer.accelerator.wait_for_everyone()  # the main process may have been evaluating
            control.should_save = True
        return control
