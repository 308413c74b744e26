"""The trainer's own callback for rounds: it ends each round and starts the loss temperature schedule.

Internal: [`OnPolicyDistillTrainer`] adds it to itself. User callbacks receive the rounds through
[`~trl_onpolicy.callbacks.DistillCallback.on_round_end`].
"""

from __future__ import annotations

from transformers import TrainerCallback


class RoundsCallback(TrainerCallback):
    """The trainer's own: ends rounds (fires `on_round_end` on every process, asks for a checkpoint) and tells the loss
    temperature schedule the run's length once training starts."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.loss_temperature.total_steps = max(int(state.max_steps), 1)  # known only once training starts

    def on_step_end(self, args, state, control, **kwargs):
        round_index = self.trainer.round_ending_at(state.global_step)
        if round_index is not None:
            self.trainer.end_round(round_index)
            control.should_save = True
        return control
