"""The metrics of one optimizer step: summed over its micro-batches on the device, reduced once, then logged.

[`StepStatistics`] adds each micro-batch's [`~trl_onpolicy.loss.LossSums`] (0-dim device tensors: no host sync per
micro-batch), and at the step's end reduces them over processes in one collective, with the flag of non-finite
gradients, so the trainer reads everything it decides on and logs with one host sync.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .loss import LossSums
from .nonfinite import local_nonfinite
from .teachers.ensemble import per_teacher_metrics

SUMS = ("divergence", "student_entropy", "teacher_entropy", "teacher_entropy_tokens", "hidden_distance")
KEYS = (*SUMS, "local_tokens", "nonfinite")


class StepStatistics:
    """The sums of one optimizer step (see the module docstring)."""

    def __init__(self):
        self.start(tokens=0.0)

    def start(self, tokens: float) -> None:
        """A new step whose rollouts hold `tokens` completion tokens on all processes."""
        self.sums = defaultdict(float)
        self.tokens = tokens
        self.per_teacher = None  # (2 T,) each teacher's summed divergence, then its tokens (several teachers)

    def add(self, loss: torch.Tensor, sums: LossSums) -> None:
        """One micro-batch's loss and sums."""
        for key in SUMS:
            self.sums[key] += getattr(sums, key)
        self.sums["local_tokens"] += sums.tokens
        self.sums["nonfinite"] += (~torch.isfinite(loss.detach())).float()  # no host sync: read once per step
        if sums.teacher_tokens is not None:
            part = torch.cat([sums.teacher_divergence, sums.teacher_tokens])
            self.per_teacher = part if self.per_teacher is None else self.per_teacher + part

    def reduce(self, accelerator, grads: list[torch.Tensor]) -> dict[str, float]:
        """The step's sums over all processes, and `nonfinite_grads` (> 0: a gradient somewhere is not finite)."""
        device = accelerator.device
        local = torch.stack(
            [torch.as_tensor(self.sums[k], dtype=torch.float64, device=device) for k in KEYS]
            + [local_nonfinite(grads).to(device=device, dtype=torch.float64)]
        )  # (8,)
        return dict(zip((*KEYS, "nonfinite_grads"), accelerator.reduce(local, reduction="sum").tolist()))

    def per_teacher_metrics(self, accelerator, names: list[str]) -> dict[str, float]:
        """Several teachers: each one's divergence (weighted by its share of each token) and its tokens."""
        local = self.per_teacher if self.per_teacher is not None else torch.zeros(2 * len(names), dtype=torch.float64)
        total = accelerator.reduce(local.to(accelerator.device), reduction="sum").tolist()
        return per_teacher_metrics(names, total)


def log_update(metrics: dict[str, list[float]], total: dict[str, float], extra: dict[str, float], *,
               hidden_matching: bool, teacher_entropy: float | None, seconds: float, tokens: float,
               nonfinite_total: int) -> None:  # fmt: skip
    """
    The step's update metrics: per-token divergence and student entropy, hidden-state distance (with hidden-state
    matching), `extra` (per-teacher, importance-sampling), the teacher's entropy, the update's seconds (the step's
    minus generation and teacher, logged by [`log_rollouts`]), completion tokens per second, skipped steps so far.
    """
    per_token = max(total["local_tokens"], 1.0)
    metrics["divergence"].append(total["divergence"] / per_token)
    metrics["student_entropy"].append(total["student_entropy"] / per_token)
    if hidden_matching:
        metrics["hidden_state_distance"].append(total["hidden_distance"] / per_token)
    for key, value in extra.items():
        metrics[key].append(value)
    if teacher_entropy is not None:
        metrics["teacher_entropy"].append(teacher_entropy)
    metrics["time/update"].append(seconds - metrics["time/generation"][-1] - metrics["time/teacher"][-1])
    metrics["tokens_per_second"].append(tokens / max(seconds, 1e-9))
    metrics["nonfinite_skipped"] = [float(nonfinite_total)]


def log_rollouts(metrics: dict[str, list[float]], stats: dict[str, float], seconds: tuple[float, float],
                 temperature: float, reused: float | None, lmbda: float | None = None,
                 pool_age: int | None = None) -> None:  # fmt: skip
    """The step's rollout metrics: a reused batch's lengths again (`reused` 1.0), and no generation or teacher time;
    `lmbda`, the schedule's value at the step (logged when `lmbda` is scheduled, on reused steps too); with rollout
    pools, whether the step's rollouts were generated at an earlier step (`rollouts/pooled` 1.0) and how many steps
    earlier (`rollouts/age`)."""
    metrics["completion_length"].append(stats["completion_length"])
    metrics["truncated_fraction"].append(stats["truncated_fraction"])
    metrics["loss_temperature"].append(temperature)
    metrics["time/generation"].append(seconds[0])
    metrics["time/teacher"].append(seconds[1])
    if reused is not None:
        metrics["rollouts/reused"].append(reused)
    if lmbda is not None:
        metrics["lmbda"].append(lmbda)
    if pool_age is not None:
        metrics["rollouts/pooled"].append(float(pool_age > 0))
        metrics["rollouts/age"].append(float(pool_age))


def log_multi_turn(metrics: dict[str, list[float]], rollouts) -> None:
    """Multi-turn rollouts' metrics, over this process's rollouts: student turns, tool calls per rollout
    (`tools/call_frequency`, TRL's name), the fraction of calls that failed (`tools/failure_frequency`), turns whose
    calls could not be parsed, environment reward, and the fraction of the completion tokens the student drew."""
    stats = [row["multi_turn"] for row in rollouts.rows]
    n, calls = max(len(stats), 1), sum(s["tool_calls"] for s in stats)
    metrics["multi_turn/turns"].append(sum(s["turns"] for s in stats) / n)
    metrics["tools/call_frequency"].append(calls / n)
    metrics["tools/failure_frequency"].append(sum(s["tool_failures"] for s in stats) / calls if calls else 0.0)
    metrics["multi_turn/malformed"].append(sum(s["malformed"] for s in stats) / n)
    metrics["multi_turn/reward"].append(sum(s["reward"] for s in stats) / n)
    drawn, total = sum(map(sum, rollouts.tool_mask)), sum(map(len, rollouts.tool_mask))
    metrics["multi_turn/drawn_fraction"].append(drawn / total if total else 1.0)
