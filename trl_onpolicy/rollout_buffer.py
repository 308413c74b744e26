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
written before the Trainer's state file (so a checkpoint killed while writing it is not whole). Tensors are saved as
they are. A full-distribution teacher score holds the teacher's output head, which is code, not data: it is saved
without its tensors, with the dataset rows, and on resume the teacher scores the saved batch again (the same call on
the same inputs as the first time, so the same scores from a deterministic teacher).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable

import torch

from .launchers import processes_with
from .rollouts import Rollouts
from .teachers.base import TeacherScores

logger = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "completion_ids", "completion_mask")  # what a teacher scores
# (B, C) tensors; `sampling_logps`: vLLM's log-probs of its tokens
COMPLETION_ALIGNED = ("completion_ids", "completion_mask", "reference", "behaviour_logps", "sampling_logps")


def buffer_file(folder: str, process_index: int) -> str:
    return os.path.join(folder, f"rollout_buffer_{process_index}.pt")


def trim(part: dict) -> dict:
    """A micro-batch cut to its own longest prompt and completion: the columns that are padding in all of its rows
    (left of the prompts, right of the completions) go, so the student computes nothing over them (views)."""
    n_completion = part["completion_ids"].shape[1]
    n_prompt = part["input_ids"].shape[1] - n_completion
    if part["input_ids"].shape[0] == 0:
        return part
    lengths = torch.stack([part["attention_mask"][:, :n_prompt].sum(1), part["completion_mask"].sum(1)])  # (2, b)
    p, c = (max(int(v), 1) for v in lengths.amax(1).tolist())
    trimmed = {}
    for key, value in part.items():
        if key in ("input_ids", "attention_mask"):
            trimmed[key] = value[:, n_prompt - p : n_prompt + c]  # (b, p + c)
        elif key == "teacher":
            trimmed[key] = value.first_columns(c)
        elif key in COMPLETION_ALIGNED:
            trimmed[key] = value[:, :c]  # (b, c)
        else:
            trimmed[key] = value
    return trimmed


def split(batch: dict, n_micro: int) -> tuple[list[dict], list[tuple[int, int]]]:
    """Cut a scored batch into `n_micro` micro-batches of consecutive rollouts, each trimmed to its own lengths
    ([`trim`]; views, not copies); and their rows."""
    n_rollouts = batch["input_ids"].shape[0]
    bounds = [round(i * n_rollouts / n_micro) for i in range(n_micro + 1)]
    ranges = list(itertools.pairwise(bounds))
    micro = []
    for lo, hi in ranges:
        part = {k: v[lo:hi] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        part["teacher"] = batch["teacher"].select(slice(lo, hi))
        micro.append(trim(part))
    return micro, ranges


def rollout_stats(rollouts: Rollouts, batch: dict, accelerator) -> dict[str, float]:
    """Completion length, truncated fraction and completion tokens of a scored batch, over all processes (a reuse
    step logs its batch's again). Processes may hold different numbers of rollouts (an `on_rollouts` filter): each
    pads its rows to the longest count before the gather, and the padding rows are dropped after it."""
    lengths = batch["completion_mask"].sum(1).float()  # (B,)
    truncated = torch.tensor(rollouts.truncated, dtype=torch.float32, device=lengths.device)  # (B,)
    rows = torch.stack([lengths, truncated, torch.ones_like(lengths)], 1)  # (B, 3): the last column marks real rows
    rows = accelerator.gather(accelerator.pad_across_processes(rows, dim=0))  # (P * B_max, 3)
    lengths, truncated, _ = rows[rows[:, 2] > 0].unbind(1)  # (B_all,) each
    return {
        "completion_length": lengths.mean().item(),
        "truncated_fraction": truncated.mean().item(),
        "tokens": lengths.sum().item(),
    }


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
        keep_logps (`bool`): Store the student's log-probs of the sampled tokens at the first use (the behaviour
            policy of `sampled_reverse_kl`'s importance weight) and hand them to the reuse steps' micro-batches as
            `behaviour_logps` `(b, C)`.
    """

    def __init__(self, num_iterations: int, keep_logps: bool = False):
        self.num_iterations = num_iterations
        self.keep_logps = keep_logps and num_iterations > 1
        self.batch = None  # collated inputs `(B, ...)`, "teacher", maybe "reference", "rows"
        self.made_at = -1  # the 0-based global step that sampled and scored it
        self.num_items = None  # completion tokens of the batch on all processes
        self.stats: dict[str, float] = {}  # completion length, truncated fraction, tokens (all processes)
        self.behaviour = None  # (B, C) student log-probs of the sampled tokens at the first use; NaN elsewhere
        self._age, self._ranges = 0, []

    def holds(self, step: int) -> bool:
        """Whether step `step` (0-based) trains on the buffered batch rather than a fresh one."""
        return self.batch is not None and 0 < step - self.made_at < self.num_iterations

    def put(self, step: int, batch: dict, num_items: torch.Tensor, stats: dict[str, float]) -> None:
        """Keep the scored batch that step `step` made (it trains this step and the next `num_iterations - 1`)."""
        self.batch, self.made_at, self.num_items, self.stats = batch, step, num_items, stats
        self.behaviour = None
        if self.keep_logps:
            mask = batch["completion_mask"]  # (B, C)
            self.behaviour = torch.full(mask.shape, float("nan"), device=mask.device)  # (B, C)

    def micro_batches(self, step: int, n_micro: int) -> list[dict]:
        """The buffered batch cut for step `step` into `n_micro` micro-batches; the batch is let go at its last use."""
        self._age = step - self.made_at
        micro, self._ranges = split(self.batch, n_micro)
        if self._age > 0 and self.behaviour is not None:
            for part, (lo, hi) in zip(micro, self._ranges):
                part["behaviour_logps"] = self.behaviour[lo:hi, : part["completion_ids"].shape[1]]  # (b, c)
        if self._age == self.num_iterations - 1:
            self.batch = self.behaviour = None
        return micro

    @property
    def age(self) -> int:
        """Optimizer steps since the batch in use was made: 0 on the step that made it."""
        return self._age

    def record(self, index: int, token_logps: torch.Tensor) -> None:
        """First use of micro-batch `index`: keep the student's `(n,)` log-probs of its sampled tokens (detached)."""
        if self.behaviour is None or self._age != 0 or index >= len(self._ranges):
            return
        lo, hi = self._ranges[index]
        mask = self.batch["completion_mask"][lo:hi].bool()  # (b, C)
        self.behaviour[lo:hi][mask] = token_logps.detach().to(self.behaviour)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self, folder: str, process_index: int, step: int) -> None:
        """Write the buffer into checkpoint `folder` when step `step` (the next one) reuses it; atomically."""
        if not self.holds(step):
            return
        scores = self.batch["teacher"]
        rescore = scores.head is not None  # a full-form score: its head is code, so the teacher scores again
        teacher = {"temperature": scores.temperature, "vocab_size": scores.vocab_size, "names": scores.teacher_names}
        if not rescore:
            teacher.update({name: getattr(scores, name) for name in TeacherScores._TENSORS})
        state = {
            "made_at": self.made_at,
            "num_items": self.num_items,
            "stats": self.stats,
            "behaviour": self.behaviour,
            "batch": {k: v for k, v in self.batch.items() if isinstance(v, torch.Tensor)},
            "rows": self.batch.get("rows") if rescore else None,
            "teacher": teacher,
        }
        os.makedirs(folder, exist_ok=True)
        path = buffer_file(folder, process_index)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def restore(self, folder: str | None, accelerator, rescore: Callable) -> None:
        """Empty the buffer, then load this process's from checkpoint `folder`, if it holds one. `rescore(batch,
        temperature)` gives the teacher's scores of a batch whose full-form scores were not saved."""
        self.batch, self.made_at, self.behaviour = None, -1, None
        if not folder:
            return
        path = buffer_file(folder, accelerator.process_index)
        # every process or none: a process rescoring (a sharded teacher's forward is a collective) or reusing alone
        # would leave the others in collectives it never joins
        found = processes_with(accelerator, os.path.isfile(path))
        if found < accelerator.num_processes:
            if found > 0:
                logger.warning(
                    "%s holds the rollout buffers of %d of %d processes (written with another number of processes?): "
                    "they are ignored, and the resumed run samples fresh rollouts.", folder, found,
                    accelerator.num_processes,
                )  # fmt: skip
            return
        state = _to(torch.load(path, map_location="cpu", weights_only=True), accelerator.device)  # "cpu:0" won't map
        batch, teacher = state["batch"], state["teacher"]
        if state["rows"] is not None:
            inputs = {**{k: batch[k] for k in INPUTS}, "rows": state["rows"]}
            batch["teacher"] = rescore(inputs, teacher["temperature"])
            batch["rows"] = state["rows"]
        else:
            tensors = {name: teacher[name] for name in TeacherScores._TENSORS}
            batch["teacher"] = TeacherScores(
                teacher["temperature"], vocab_size=teacher["vocab_size"], teacher_names=teacher["names"], **tensors
            )
        self.batch, self.made_at, self.num_items = batch, state["made_at"], state["num_items"]
        self.stats, self.behaviour = state["stats"], state["behaviour"]
