"""Non-finite updates: a NaN or inf loss or gradient skips the optimizer step; too many in a row stop training.

The decision is taken once per optimizer step, after the last micro-batch's backward pass, from flags reduced over all
processes (so every process skips the same steps: a sharded gradient can be non-finite on one process only). How the
step is skipped depends on what applies the update:

- a torch optimizer: every gradient is set to None, and the optimizer skips parameters without one (no update, no
  change of its moments);
- under a `GradScaler` (`fp16=True`): the scaler skips a step whose gradients hold an inf or NaN itself, and lowers the
  scale. An overflow of the scaled gradients with a finite loss is routine there and is left to the scaler, not
  counted. A non-finite loss poisons one gradient with NaN so that the scaler skips that step too (setting the
  gradients to None would make `scaler.step` raise "No inf checks were recorded for this optimizer");
- DeepSpeed: its engine steps inside `backward`, before this check, and keeps no `p.grad`. DeepSpeed 0.19.8 skips a
  step whose gradient norm is not finite itself (ZeRO-3 always; ZeRO-1/2 in fp32, and in bf16 with
  `bf16.check_grad_overflow`, its default), so its verdict is read back ([`deepspeed_skipped`]) for the log and the
  counters; a non-finite loss it applied anyway is refused.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def local_nonfinite(grads: list[torch.Tensor]) -> torch.Tensor:
    """`()` float 1.0 when any of this process's gradients (its shards, for sharded ones) holds a NaN or inf, else 0.0;
    on the gradients' device, without a host sync."""
    if not grads:
        return torch.zeros(())
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor shards (FSDP2)
    finite = torch.stack([torch.isfinite(g).all() for g in local])  # (P,)
    return (~finite.all()).float()


def deepspeed_skipped(engine, loss_nonfinite: bool) -> bool | None:
    """
    Whether a DeepSpeed engine skipped the optimizer step it took inside `backward` for non-finite gradients (the same
    verdict on every process: DeepSpeed reduces the gradient norm); None for a model that is not a DeepSpeed engine.
    An fp16 loss-scale overflow is routine and reads False.

    Raises:
        FloatingPointError: The loss (`loss_nonfinite`, reduced over the processes) is not finite and DeepSpeed applied
            the update anyway (its gradient-norm check is turned off).
    """
    if not hasattr(engine, "was_step_applied"):
        return None
    skipped = not engine.was_step_applied()
    if loss_nonfinite and not skipped:
        raise FloatingPointError(
            "The loss is not finite and DeepSpeed applied the update anyway: it skips a step only when it checks the "
            'gradient norm. Set `"bf16": {"check_grad_overflow": true}` and keep `zero_optimization.'
            "compute_grad_norm` on in the DeepSpeed config, or use ZeRO-3."
        )
    return skipped and not engine.fp16_enabled()


class NonfiniteGuard:
    """
    Counts and skips non-finite updates (see the module docstring).

    Args:
        max_in_a_row (`int`): This many skipped updates in a row raise a `FloatingPointError`.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def check(self, step: int, parameters, loss_nonfinite: bool, grads_nonfinite: bool, scaler=None) -> str | None:
        """
        Skip the update of optimizer step `step` (1-based) if it is not finite; returns what was not finite
        (`"loss"` / `"gradients"`), or None when the update goes ahead (an fp16 overflow is the scaler's to skip).

        Args:
            parameters: The parameters whose gradients the optimizer applies.
            loss_nonfinite, grads_nonfinite: The flags, already reduced over all processes.
            scaler: The run's `GradScaler`, if any.
        """
        what = "loss" if loss_nonfinite else "gradients" if grads_nonfinite and scaler is None else None
        if what is None:
            self.in_a_row = 0
            return None
        grads = [p for p in parameters if p.grad is not None]
        if scaler is not None:
            if grads:
                grads[0].grad.fill_(float("nan"))  # the scaler's inf check sees it and skips the step
        else:
            for p in grads:
                p.grad = None
        self.in_a_row += 1
        self.total += 1
        logger.warning("Step %d: non-finite %s; the update is skipped (%d in a row).", step, what, self.in_a_row)
        return what

    def raise_if_stuck(self, step: int, what: str, learning_rate: float, temperature: float, output_dir: str) -> None:
        """Stop training with an error naming the likely causes after `max_in_a_row` skipped updates in a row."""
        if self.in_a_row < self.max_in_a_row:
            return
        raise FloatingPointError(
            f"Training stopped at step {step}: {self.in_a_row} updates in a row had a non-finite {what} (NaN or inf) "
            f"and were skipped. Likely causes: a learning rate too high ({learning_rate}), a loss temperature too low "
            f"({temperature:.3g}), or a teacher returning -inf log-probs for tokens the student samples. The last "
            f"checkpoint in {output_dir} is intact."
        )
