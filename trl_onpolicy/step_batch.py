"""`StepBatch`: one optimizer step's rollouts with everything the loss reads about them, as data.

The trainer makes one per optimizer step (sample -> `on_rollouts` -> score, see
[`~trl_onpolicy.trainer.OnPolicyDistillTrainer.make_step_batch`]), keeps it for `num_iterations` steps
([`~trl_onpolicy.rollout_buffer.RolloutBuffer`]) and cuts it into its micro-batches ([`StepBatch.split`]). Every field
is a tensor, a number or a list of plain values, so a batch saves into a checkpoint and restores from it as it was; the
teacher's scores too (their output heads are the teacher's frozen weights, taken from the teacher again on restore).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .rollouts import Rollouts, collate
from .teachers.base import TeacherScores

COMPLETION_ALIGNED = ("completion_ids", "completion_mask", "reference_logps", "behaviour_logps", "sampling_logps",
                      "advantages")  # fmt: skip


@dataclass
class StepBatch:
    """
    Scored rollouts: prompts padded on the left to `P`, completions on the right to `C` (see
    [`~trl_onpolicy.rollouts.collate`]).

    Args:
        input_ids (`torch.Tensor`): `(B, P + C)` prompt then completion ids.
        attention_mask (`torch.Tensor`): `(B, P + C)`.
        completion_ids (`torch.Tensor`): `(B, C)` the completion tokens, the loss's targets.
        completion_mask (`torch.Tensor`): `(B, C)` 1 on the completion tokens in the loss: every real one, less the
            context a multi-turn rollout added between turns ([`~trl_onpolicy.rollouts.Rollouts.tool_mask`]).
        teacher ([`~trl_onpolicy.teachers.TeacherScores`]): The teacher's scores `(B, C, ...)` (None until scored).
        source (`str`): Who wrote the completions: `"student"`, `"teacher"` or `"dataset"`.
        truncated (`list[bool]`): Whether each completion ran to `max_completion_length` without stopping.
        rows (`list[dict]`): The dataset row of each rollout (routing to several teachers, logs).
        reference_logps (`torch.Tensor`, *optional*): `(B, C)` the reference model's log-probs of the completion
            tokens (`sampled_reverse_kl`'s reward-scaled form).
        behaviour_logps (`torch.Tensor`, *optional*): `(B, C)` the student's log-probs of the completion tokens when
            the batch first trained (NaN before), the behaviour policy of a reused batch's importance weight.
        sampling_logps (`torch.Tensor`, *optional*): `(B, C)` the sampler's own log-probs of its tokens (vLLM; NaN on
            padding), for the importance-sampling correction.
        advantages (`torch.Tensor`, *optional*): `(B, C)` the task reward's group advantage of each rollout times
            `reward_weight`, on its completion tokens (0 on padding): see [`~trl_onpolicy.rewards.Rewards`].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    teacher: TeacherScores | None = None
    source: str = "student"
    truncated: list[bool] | None = None
    rows: list[dict[str, Any]] | None = None
    reference_logps: torch.Tensor | None = None
    behaviour_logps: torch.Tensor | None = None
    sampling_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    @classmethod
    def collate(cls, rollouts: Rollouts, pad_id: int, device=None, **scores) -> StepBatch:
        """The model inputs of `rollouts` (see [`~trl_onpolicy.rollouts.collate`]) with their scores (`teacher`,
        `reference_logps`)."""
        inputs = collate(rollouts, pad_id, device)
        return cls(**inputs, source=rollouts.source, truncated=rollouts.truncated, rows=rollouts.rows, **scores)

    @property
    def size(self) -> int:
        """Rollouts in the batch (`B`). (No `__len__`: the Trainer takes a batch of length 0 for an empty dict.)"""
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict[str, Any]:
        """What a teacher scores: `input_ids`, `attention_mask`, `completion_ids`, `completion_mask` and `rows`."""
        names = ("input_ids", "attention_mask", "completion_ids", "completion_mask")
        return {**{name: getattr(self, name) for name in names}, "rows": self.rows}

    def __contains__(self, key: str) -> bool:  # the Trainer's token counter (`include_num_input_tokens_seen`)
        return key in ("input_ids", "attention_mask")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def rows_between(self, lo: int, hi: int) -> StepBatch:
        """Rollouts `lo:hi` (views)."""
        lists = {name: None if getattr(self, name) is None else getattr(self, name)[lo:hi] for name in ("truncated", "rows")}
        tensors = {name: value[lo:hi] for name, value in self._tensors().items()}
        return replace(self, **tensors, **lists, teacher=self.teacher.select(slice(lo, hi)))

    def trim(self) -> StepBatch:
        """Cut to its own longest prompt and completion: the columns that are padding in all of its rows (left of the
        prompts, right of the completions) go, so the student computes nothing over them (views)."""
        if self.size == 0:
            return self
        n_completion = self.completion_ids.shape[1]
        n_prompt = self.input_ids.shape[1] - n_completion
        # real tokens from the attention mask: a multi-turn completion has context tokens outside `completion_mask`
        lengths = torch.stack([self.attention_mask[:, :n_prompt].sum(1), self.attention_mask[:, n_prompt:].sum(1)])
        p, c = (max(int(v), 1) for v in lengths.amax(1).tolist())
        columns = slice(n_prompt - p, n_prompt + c)
        aligned = {name: getattr(self, name)[:, :c] for name in COMPLETION_ALIGNED if getattr(self, name) is not None}
        return replace(self, input_ids=self.input_ids[:, columns], attention_mask=self.attention_mask[:, columns],
                       teacher=self.teacher.first_columns(c), **aligned)  # fmt: skip

    def split(self, n_micro: int) -> tuple[list[StepBatch], list[tuple[int, int]]]:
        """`n_micro` micro-batches of consecutive rollouts, each trimmed to its own lengths ([`trim`]; views), and
        the `(lo, hi)` rollouts of each."""
        bounds = [round(i * self.size / n_micro) for i in range(n_micro + 1)]
        ranges = list(itertools.pairwise(bounds))
        return [self.rows_between(lo, hi).trim() for lo, hi in ranges], ranges

    def flat(self, name: str) -> torch.Tensor | None:
        """The completion-aligned `(B, C)` field `name` over the real completion tokens, `(N,)`; None if unset."""
        value = getattr(self, name)
        return None if value is None else value[self.completion_mask.bool()]

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every field as data (the teacher's scores without their heads' tensors, see
        [`~trl_onpolicy.teachers.TeacherScores.state_dict`])."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["teacher"] = self.teacher.state_dict()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], heads: list) -> StepBatch:
        """The batch [`state_dict`] saved; `heads`: the teacher's output heads (`Teacher.output_heads()`)."""
        return cls(**{**state, "teacher": TeacherScores.from_state_dict(state["teacher"], heads)})
