"""What the truncated importance-sampling weight of vLLM's tokens did in an optimizer step, for the logs.

The weight itself is [`~trl_onpolicy.divergences.truncated_importance_weights`], applied inside the loss; this module
recomputes it from the same inputs (a few floats per token) and logs it under TRL's GRPO names:
`sampling/importance_sampling_ratio/{mean,min,max}` (of the truncated weight), `sampling/sampling_logp_difference/
{mean,max}` (of |log q - log mu|), plus `sampling/importance_sampling_ratio/clipped_fraction` (tokens whose ratio
exceeded the cap; TRL logs none). Tokens vLLM gave no log-prob for are left out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .divergences import truncated_importance_weights

if TYPE_CHECKING:  # annotations only
    from .step_batch import StepBatch

PREFIX = "sampling/"


class ImportanceSamplingStats:
    """
    Per-step statistics of the truncated importance-sampling weight, over all processes.

    Args:
        clip_max (`float` or `None`): The weight's cap (`vllm_importance_sampling_clip_max`).
    """

    def __init__(self, clip_max: float | None):
        self.clip_max = clip_max
        self._local = None  # (7,): tokens, sum of weights, clipped, sum |diff|, -min weight, max weight, max |diff|

    def add(self, batch: StepBatch, student_token_logps: torch.Tensor) -> None:
        """A micro-batch's `sampling_logps` `(b, C)` against the log-probs its weight used: the student's at the
        first use of the tokens (`behaviour_logps` `(b, C)` on a reused batch, else `student_token_logps` `(N,)`)."""
        if batch.sampling_logps is None:
            return
        behaviour = batch.flat("behaviour_logps")  # (N,) or None
        target = behaviour if behaviour is not None else student_token_logps  # (N,)
        sampler = batch.flat("sampling_logps")  # (N,)
        known = ~torch.isnan(sampler)  # (N,)
        target, sampler = target[known].float(), sampler[known].float()  # (n,) each
        weights = truncated_importance_weights(target, sampler, self.clip_max)  # (n,)
        diff = (target - sampler).abs()  # (n,)
        clipped = torch.zeros_like(diff, dtype=torch.bool)  # (n,)
        if self.clip_max is not None:
            clipped = torch.exp(target - sampler) > self.clip_max  # (n,)
        inf = torch.tensor(math.inf, device=weights.device)
        local = torch.stack([
            known.sum().float(), weights.sum(), clipped.sum().float(), diff.sum(),
            -weights.min() if weights.numel() else -inf, weights.max() if weights.numel() else -inf,
            diff.max() if diff.numel() else -inf,
        ])  # fmt: skip
        if self._local is None:
            self._local = local
        else:
            self._local = torch.cat([self._local[:4] + local[:4], torch.maximum(self._local[4:], local[4:])])

    def pop(self, accelerator) -> dict[str, float]:
        """The step's metrics over all processes (a collective: every process calls it), then reset. Empty when no
        token carried a vLLM log-prob."""
        local = self._local
        if local is None:
            local = torch.tensor([0.0] * 4 + [-math.inf] * 3)
        self._local = None
        rows = accelerator.gather(local.to(accelerator.device)[None]).cpu()  # (processes, 7)
        n, weight_sum, clipped, diff_sum = rows[:, :4].sum(0).tolist()
        neg_min, weight_max, diff_max = rows[:, 4:].max(0).values.tolist()
        if n == 0:
            return {}
        return {
            f"{PREFIX}importance_sampling_ratio/mean": weight_sum / n,
            f"{PREFIX}importance_sampling_ratio/min": -neg_min,
            f"{PREFIX}importance_sampling_ratio/max": weight_max,
            f"{PREFIX}importance_sampling_ratio/clipped_fraction": clipped / n,
            f"{PREFIX}sampling_logp_difference/mean": diff_sum / n,
            f"{PREFIX}sampling_logp_difference/max": diff_max,
        }
