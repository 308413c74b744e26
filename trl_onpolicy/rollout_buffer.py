"""Reusing one step's scored rollouts for `num_iterations` optimizer steps (TRL GRPO's `num_iterations`, its mu).

On a CPU, or with a slow teacher, sampling the rollouts and scoring them is most of an on-policy step; the update
(student forward and backward on the scored tokens) is cheap. With `num_iterations = n`, the rollouts and teacher scores
made at step `s` also train steps `s + 1, ..., s + n - 1`; the prompts the data loader hands those steps go unused
(GRPO's sampler repeats the prompts instead; the effect is the same).

[`RolloutBuffer`] holds the whole scored batch of the step that made it, not its micro-batches, so a reuse step with
fewer micro-batches (the last step of an epoch that gradient accumulation does not divide) still trains on every
rollout. Beside it: the step's global completion-token count (the loss's divisor), its rollout statistics (logged
again on reuse steps), and, for `sampled_reverse_kl`, the student's log-probs of the sampled tokens at their first use,
the behaviour policy `q_old` of the importance weight (see [`~trl_onpolicy.divergences.sampled_reverse_kl`]). A batch
vLLM sampled also holds vLLM's log-probs of its tokens (`sampling_logps` `(B, C)`), cut, saved and restored with the
other tensors: on a reuse step the loss weighs its tokens by `q / q_old` times `min(q_old / mu, C)`.

Resume. A checkpoint written inside a reuse window carries the buffer: `rollout_buffer_<process>.pt`, one per process,
written before the Trainer's state file (so a checkpoint killed while writing it is not whole). The batch is data
([`~trl_onpolicy.step_batch.StepBatch.state_dict`]): it is saved as it is and restored as it was, teacher scores
included, without scoring it again; only a full-distribution score's output head, which is the teacher's frozen
weights, is taken from the teacher again (checked against the fingerprint saved with it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from .launchers import on_every_process
from .step_batch import StepBatch

logger = logging.getLogger(__name__)


def buffer_file(folder: str, process_index: int) -> str:
    return os.path.join(folder, f"rollout_buffer_{process_index}.pt")


def rollout_stats(batch: StepBatch, accelerator) -> dict[str, float]:
    """Completion length, truncated fraction and completion tokens of a scored batch, over all processes (a reuse
    step logs its batch's again; `tokens` is also the loss's divisor), in one gather of integer counts. Processes may
    hold different numbers of rollouts (an `on_rollouts` filter): each pads its rows to the longest count before the
    gather, with rows of zeros, which add nothing to the sums."""
    lengths = batch.completion_mask.sum(1).long()  # (B,)
    truncated = torch.tensor(batch.truncated, dtype=torch.long, device=lengths.device)  # (B,)
    rows = torch.stack([lengths, truncated, torch.ones_like(lengths)], 1)  # (B, 3): the last column counts rows
    rows = accelerator.gather(accelerator.pad_across_processes(rows, dim=0))  # (P * B_max, 3)
    tokens, n_truncated, n_rows = rows.sum(0).tolist()
    return {"completion_length": tokens / n_rows, "truncated_fraction": n_truncated / n_rows, "tokens": float(tokens)}


def _to(value, device):
    """`value` with every tensor in its dicts and lists moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return [_to(v, device) for v in value] if isinstance(value, list) else value


class RolloutBuffer:
    """
    The scored batch of the last generation step, lent to the next `num_iterations - 1` optimizer steps.

    Args:
        num_iterations (`int`): Optimizer steps each batch trains (1: a fresh batch every step, nothing is kept).
        keep_logps (`bool`): Keep the student's log-probs of the sampled tokens at the first use (the behaviour
            policy of `sampled_reverse_kl`'s importance weight, [`record`]) in the batch's `behaviour_logps`, which
            the reuse steps' micro-batches carry.
    """

    def __init__(self, num_iterations: int, keep_logps: bool = False):
        self.num_iterations = num_iterations
        self.keep_logps = keep_logps and num_iterations > 1
        self.batch: StepBatch | None = None
        self.made_at = -1  # the 0-based global step that sampled and scored it
        self.stats: dict[str, float] = {}  # completion length, truncated fraction, tokens (all processes)
        self._age, self._ranges = 0, []

    def holds(self, step: int) -> bool:
        """Whether step `step` (0-based) trains on the buffered batch rather than a fresh one."""
        return self.batch is not None and 0 < step - self.made_at < self.num_iterations

    @property
    def num_items(self) -> float:
        """Completion tokens of the batch on all processes: the loss's divisor."""
        return self.stats["tokens"]

    def put(self, step: int, batch: StepBatch, stats: dict[str, float]) -> None:
        """Keep the scored batch that step `step` made (it trains this step and the next `num_iterations - 1`)."""
        if self.keep_logps:  # filled in by `record` as the micro-batches first train
            batch.behaviour_logps = torch.full(batch.completion_mask.shape, float("nan"), device=batch.input_ids.device)
        self.batch, self.made_at, self.stats = batch, step, stats

    def micro_batches(self, step: int, n_micro: int) -> list[StepBatch]:
        """The buffered batch cut for step `step` into `n_micro` micro-batches (with the behaviour log-probs on a
        reuse step only); the buffer lets the batch go at its last use."""
        self._age = step - self.made_at
        micro, self._ranges = self.batch.split(n_micro)
        if self._age == 0:
            micro = [replace(part, behaviour_logps=None) for part in micro]
        if self._age == self.num_iterations - 1:
            self.batch = None
        return micro

    @property
    def age(self) -> int:
        """Optimizer steps since the batch in use was made: 0 on the step that made it."""
        return self._age

    def record(self, index: int, token_logps: torch.Tensor) -> None:
        """First use of micro-batch `index`: keep the student's `(n,)` log-probs of its sampled tokens (detached)."""
        if not self.keep_logps or self.batch is None or self._age != 0 or index >= len(self._ranges):
            return
        lo, hi = self._ranges[index]
        mask = self.batch.completion_mask[lo:hi].bool()  # (b, C)
        self.batch.behaviour_logps[lo:hi][mask] = token_logps.detach().to(self.batch.behaviour_logps)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self, folder: str, process_index: int, step: int) -> None:
        """Write the buffer into checkpoint `folder` when step `step` (the next one) reuses it; atomically."""
        if not self.holds(step):
            return
        state = {"made_at": self.made_at, "stats": self.stats, "batch": self.batch.state_dict()}
        os.makedirs(folder, exist_ok=True)
        path = buffer_file(folder, process_index)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def restore(self, folder: str | None, accelerator, heads) -> None:
        """Empty the buffer, then load this process's from checkpoint `folder`, if it holds one. `heads()` gives the
        teacher's output heads (`Teacher.output_heads`), which full-distribution scores take again."""
        self.batch, self.made_at = None, -1
        if not folder:
            return
        path = buffer_file(folder, accelerator.process_index)
        # every process or none: a process reusing alone (or gathering a sharded head alone, a collective) would
        # leave the others in collectives it never joins
        if not on_every_process(accelerator, path, "rollout buffers", "the resumed run samples fresh rollouts"):
            return
        state = _to(torch.load(path, map_location="cpu", weights_only=True), accelerator.device)  # "cpu:0" won't map
        self.batch = StepBatch.from_state_dict(state["batch"], heads())
        self.made_at, self.stats = state["made_at"], state["stats"]
