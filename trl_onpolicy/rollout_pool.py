"""Rollout pools: the rollouts of several optimizer steps generated at once (TRL GRPO's `steps_per_generation`).

With `steps_per_generation = K`, the first step of a pool draws the raw batches of the pool's K steps from the data
loader together (`K` times the step's micro-batches; fewer steps when the epoch ends first, never past `max_steps`),
and the student (or, for a step whose completion source is the teacher or the dataset, that source) writes the
completions of all of them in batched sampler calls (`generation_batch_size` rows per call; by default one call per
step). The pool's later steps draw nothing: each trains on its own slice of the pool, in the data loader's order, so
every step still sees the prompts it would have seen without a pool. `"round"` makes one pool per round (`num_rounds`):
the seed's iterative distillation, where each round generates its data with the student as the previous round left
it. `num_iterations` is the per-batch way to reuse rollouts; the two are exclusive.

What it trades: fewer, larger generation calls (a GPU sampler, vLLM above all, is far more efficient on one large
batch than on several small ones, and its weights are synced once per pool) against staler rollouts: the pool's last
step trains on completions sampled by a student `K - 1` updates older.

Scoring stays per step. The teacher is frozen, so scoring a step's rollouts when the step trains gives the same scores
as scoring the whole pool at its start, while only one step's scores are ever held (bounded memory; the scores are at
the step's loss temperature, as without a pool). `on_rollouts` callbacks, too, see each step's rollouts at that step.

Resume. A checkpoint written inside a pool holds its remaining steps (`rollout_pool_<process>.pt`, one per process:
each step's rollouts, token ids, rows and truncation flags, and how many raw batches the pool drew for it). The Trainer
skips only the batches of the steps it trained (`global_step * gradient_accumulation_steps` in the epoch), so the first
draw after the resume first discards those the pool had drawn ahead: the data loader is then where it was in the run
that was not interrupted.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from .launchers import on_every_process
from .rollouts import Rollouts

logger = logging.getLogger(__name__)


def pool_file(folder: str, process_index: int) -> str:
    return os.path.join(folder, f"rollout_pool_{process_index}.pt")


def concat(parts: list[Rollouts]) -> Rollouts:
    """Several sampler calls' rollouts of one source as one, in order."""
    logps, masks = [p.sampling_logps for p in parts], [p.tool_mask for p in parts]
    if any(m is not None for m in masks):  # single-turn parts drew every token
        masks = [m if m is not None else [[1] * len(c) for c in p.completion_ids] for m, p in zip(masks, parts)]
    return Rollouts(
        prompt_ids=[ids for p in parts for ids in p.prompt_ids],
        completion_ids=[ids for p in parts for ids in p.completion_ids],
        source=parts[0].source,
        truncated=[t for p in parts for t in p.truncated],
        rows=[row for p in parts for row in p.rows],
        sampling_logps=None if any(lp is None for lp in logps) else [x for lp in logps for x in lp],
        tool_mask=None if all(m is None for m in masks) else [x for m in masks for x in m],
    )


def split_evenly(items: list, parts: int) -> list[list]:
    """`items` cut into `parts` consecutive pieces whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [0, *itertools.accumulate(size + (i < extra) for i in range(parts))]
    return [items[lo:hi] for lo, hi in itertools.pairwise(bounds)]


@dataclass
class PooledStep:
    """
    One optimizer step of a pool.

    Args:
        step (`int`): The 0-based global step that trains on it.
        batches (`list[list[dict]]`): Its raw batches (rows), as the data loader gave them: one per micro-batch.
        rollouts ([`~trl_onpolicy.rollouts.Rollouts`], *optional*): Its rollouts, once the pool is generated.
    """

    step: int
    batches: list[list[dict]]
    rollouts: Rollouts | None = None

    @property
    def rows(self) -> list[dict]:
        return [row for rows in self.batches for row in rows]


class RolloutPool:
    """
    The rollouts of the steps of the current pool, drawn and generated at its first step (see the module docstring).

    Args:
        steps_per_generation (`int` or `str`): Steps per pool (`1`: every step is a pool of its own), or `"round"`.
        generation_batch_size (`int`, *optional*): Rows per sampler call; `None`: one call per step.
        rows_per_batch (`int`): Rows of a full raw batch (`per_device_train_batch_size`). The number of sampler calls
            is reckoned from it, not from the rows a process holds, so that every process makes the same number (a
            ZeRO-3 or FSDP student generates in lockstep).
    """

    def __init__(self, steps_per_generation: int | str, generation_batch_size: int | None, rows_per_batch: int):
        self.steps_per_generation = steps_per_generation
        self.generation_batch_size = generation_batch_size
        self.rows_per_batch = rows_per_batch
        self._steps: deque[PooledStep] = deque()  # the pool's steps still to train
        self._current: PooledStep | None = None
        self._discard = 0  # raw batches a resumed checkpoint's pool had drawn ahead: skipped at the first draw
        self.made_at = -1  # the 0-based step that drew (and generated) the pool in use

    def size(self, step: int, max_steps: int, round_ends: list[int]) -> int:
        """Steps of a pool starting at `step`: `steps_per_generation`, or to the end of the round; never past
        `max_steps`."""
        if self.steps_per_generation == "round":
            end = next((e for e in round_ends if e > step), max_steps)
        else:
            end = step + self.steps_per_generation
        return max(1, min(end, max_steps) - step)

    def draw(self, epoch_iterator: Iterator, num_batches: int, step: int, size: int) -> list[list[dict]]:
        """
        Step `step`'s raw batches: those the pool drew for it, or, when the pool holds no step, the next `size` steps'
        (`size * num_batches` batches, fewer at the epoch's end), drawn now. Empty when the epoch has no batch left.
        """
        if self._discard:
            for _ in itertools.islice(epoch_iterator, self._discard):
                pass
            self._discard = 0
        if not self._steps:
            raw = list(itertools.islice(epoch_iterator, size * num_batches))
            chunks = [raw[i : i + num_batches] for i in range(0, len(raw), num_batches)]
            self._steps.extend(PooledStep(step + j, chunk) for j, chunk in enumerate(chunks))
            self.made_at = step
        if not self._steps:
            self._current = None
            return []
        self._current = self._steps.popleft()
        if self._current.step != step:
            raise RuntimeError(f"The rollout pool holds step {self._current.step + 1} where step {step + 1} trains.")
        return self._current.batches

    @property
    def age(self) -> int:
        """Optimizer steps since the pool in use was drawn: 0 at its first step."""
        return self._current.step - self.made_at if self._current is not None else 0

    def rollouts(self, step: int, rows: list[dict], make_rollouts: Callable, source_of: Callable) -> Rollouts:
        """
        Step `step`'s rollouts. The first step of a pool that needs them generates those of all the pool's steps
        ([`generate`]); a step not drawn through the pool is made from `rows` alone.

        Args:
            make_rollouts (`Callable[[list[dict], str], Rollouts]`): Completions for rows from a source (the trainer's
                `make_rollouts`).
            source_of (`Callable[[int], str]`): The completion source of a step (the trainer's `_completion_source`).
        """
        current = self._current
        if current is None or current.step != step:
            return make_rollouts(rows, source_of(step))
        if current.rollouts is None:
            self.generate([current, *self._steps], make_rollouts, source_of)
        rollouts, current.rollouts = current.rollouts, None  # the pool lets them go once the step has them
        return rollouts

    def generate(self, steps: list[PooledStep], make_rollouts: Callable, source_of: Callable) -> None:
        """The rollouts of `steps` without them: the steps of each source together, cut into sampler calls of
        `generation_batch_size` rows (one call per step without it), then handed back to each step in order."""
        steps = [s for s in steps if s.rollouts is None]
        sources = [source_of(s.step) for s in steps]
        for source in dict.fromkeys(sources):
            group = [s for s, src in zip(steps, sources) if src == source]
            if source == "dataset" or self.generation_batch_size is None:
                calls = [s.rows for s in group]
            else:
                nominal = sum(len(s.batches) for s in group) * self.rows_per_batch
                calls = split_evenly([row for s in group for row in s.rows],
                                     math.ceil(nominal / self.generation_batch_size))  # fmt: skip
            made = concat([make_rollouts(rows, source) for rows in calls if rows])
            per_row = len(made) // max(sum(len(s.rows) for s in group), 1)  # `num_generations` (1 for the dataset)
            start = 0
            for s in group:
                end = start + per_row * len(s.rows)
                s.rollouts = made.select(list(range(start, end)))
                start = end

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save(self, folder: str, process_index: int) -> None:
        """Write the pool's remaining steps into checkpoint `folder`, if it holds any; atomically."""
        if not self._steps:
            return
        if any(s.rollouts is None for s in self._steps):
            raise RuntimeError("A checkpoint was written between drawing a rollout pool and generating it.")
        state = {
            "made_at": self.made_at,
            "steps": [
                {"step": s.step, "batches": len(s.batches), "rollouts": asdict(s.rollouts)} for s in self._steps
            ],
        }
        os.makedirs(folder, exist_ok=True)
        path = pool_file(folder, process_index)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def restore(self, folder: str | None, accelerator, skip_data: bool = True) -> None:
        """Empty the pool, then load this process's remaining steps from checkpoint `folder`, if it holds them, and
        arrange for the batches they were drawn from to be discarded at the next draw (unless `skip_data` is False:
        the Trainer's `ignore_data_skip`, which starts the epoch over)."""
        self._steps, self._current, self._discard, self.made_at = deque(), None, 0, -1
        if not folder:
            return
        path = pool_file(folder, accelerator.process_index)
        # every process or none: the draws must agree
        if not on_every_process(accelerator, path, "rollout pools", "the resumed run generates its rollouts afresh"):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        for saved in state["steps"]:
            # the raw batches are gone; only their number is kept (the step's micro-batch count)
            batches = [[] for _ in range(saved["batches"])]
            self._steps.append(PooledStep(saved["step"], batches, Rollouts(**saved["rollouts"])))
        self.made_at = state["made_at"]
        self._discard = sum(saved["batches"] for saved in state["steps"]) if skip_data else 0
