"""Self-teachers: the student's own network as its teacher (TRL SDFT/SDPO's `teacher_model_kind`).

- `"base"`: the student as it was when the trainer was built. A LoRA student's base network is its adapters turned
  off (no copy); a full student keeps a copy of its trainable weights.
- `"live"`: the student as it is now (no copy). Useful with privileged context (on-policy self-distillation: the
  student with the answer in its prompt teaches the student without it); without one the teacher *is* the student
  and the divergence is zero, so the trainer refuses it.
- `"ema"`: an exponential moving average of the student's trainable weights (the adapters only, for a LoRA
  student), `ema <- ema + teacher_update_rate * (student - ema)` every `teacher_sync_steps` optimizer steps (rate 1:
  a hard copy every `teacher_sync_steps`). Kept in float32 whatever the student's dtype, so that small updates of a
  bf16 student are not rounded away, and saved in every checkpoint (`self_teacher.pt`), so resuming is exact.

A teacher with weights of its own (base of a full student, ema) scores by copying them into the student's parameters
for the scoring pass and copying the student's back after it (one call, however many row groups), so the teacher runs
through the student's module exactly as the student does: same placement, same precision, no second model. Its
output head, when it is one of the swapped weights, is copied into the scores (they outlive the swap).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import torch
from transformers import TrainerCallback

from .._compat import is_peft_model
from ..launchers import FSDP1, FSDP2, ZERO3, launcher
from .local import LocalTeacher

KINDS = ("separate", "base", "live", "ema")
STATE_FILE = "self_teacher.pt"
SHARDED_ERROR = (
    "`teacher_model_kind={kind!r}` keeps the teacher's own copy of the student's trainable weights and copies it into "
    "the student for each scoring pass, which the sharded parameters of {launcher} do not allow here. Use DDP or "
    "DeepSpeed ZeRO-1/2, a LoRA student (its base network is the 'base' teacher without a copy), or pass the student's "
    "initial checkpoint as `teacher_model` (a separate teacher, sharded like the student)."
)


class SelfTeacher(LocalTeacher):
    """
    The student's own network as its teacher (see the module docstring).

    Args:
        student ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]): The student, before any launcher wraps it.
        kind (`str`): `"base"`, `"live"` or `"ema"`.
        update_rate (`float`, *optional*, defaults to `0.05`): The EMA's rate (`teacher_update_rate`).
        sync_steps (`int`, *optional*, defaults to `1`): Optimizer steps between EMA updates (`teacher_sync_steps`).
        chunk_size, micro_batch_size: As for [`LocalTeacher`].
    """

    name = "self"

    def __init__(self, student, kind: str, update_rate: float = 0.05, sync_steps: int = 1, chunk_size: int = 1024,
                 micro_batch_size: int | None = None):  # fmt: skip
        if kind not in KINDS[1:]:
            raise ValueError(f"A self-teacher's kind must be one of {KINDS[1:]}, got {kind!r}.")
        lora_base = kind == "base" and is_peft_model(student)
        super().__init__(student, disable_adapters=lora_base, chunk_size=chunk_size, micro_batch_size=micro_batch_size,
                         own_student=True)  # fmt: skip
        self.kind, self.update_rate, self.sync_steps = kind, update_rate, sync_steps
        owns_weights = kind == "ema" or (kind == "base" and not lora_base)
        self.params = [p for p in student.parameters() if p.requires_grad] if owns_weights else []
        self.weights = [p.detach().to(torch.float32, copy=True) for p in self.params]  # the teacher's own weights
        self._swapped = False

    # ------------------------------------------------------------------------------------------------ its weights
    def prepare(self, accelerator) -> SelfTeacher:
        if self.params and launcher(accelerator) in (FSDP1, FSDP2, ZERO3):
            raise ValueError(SHARDED_ERROR.format(kind=self.kind, launcher=launcher(accelerator)))
        super().prepare(accelerator)
        self.weights = [w.to(p.device) for w, p in zip(self.weights, self.params)]
        return self

    def to(self, device) -> SelfTeacher:
        self.weights = [w.to(device) for w in self.weights]
        return self

    @contextlib.contextmanager
    def swapped_in(self):
        """The teacher's weights in the student's parameters for the block, the student's restored after it."""
        if not self.params or self._swapped:
            yield
            return
        kept = [p.detach().clone() for p in self.params]
        self._swapped = True
        try:
            with torch.no_grad():
                for p, w in zip(self.params, self.weights):
                    p.copy_(w)
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)
            self._swapped = False

    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): the EMA moves toward the student every `sync_steps` steps."""
        if self.kind != "ema" or step % self.sync_steps != 0:
            return
        with torch.no_grad():
            for w, p in zip(self.weights, self.params):
                w.lerp_(p.detach().to(w.dtype), self.update_rate)

    # ------------------------------------------------------------------------------------------------ scoring
    def _owns_head(self) -> bool:
        head = self._causal_lm().get_output_embeddings()
        weight = getattr(head, "weight", None)
        return weight is not None and any(weight is p for p in self.params)

    def _copied_head(self, head):
        """A head that outlives the swap: its tensors copied when they are the student's swapped weights."""
        if head is None or not self._owns_head():
            return head
        return replace(head, weight=head.weight.clone(), bias=None if head.bias is None else head.bias.clone())

    def score(self, batch, *, temperature=1.0, top_k=None, need="full", hidden_layers=None):
        """One swap for the whole call (every row group); the head in the scores comes from [`output_heads`], which
        copies it out of the swap."""
        with self.swapped_in():
            return super().score(batch, temperature=temperature, top_k=top_k, need=need, hidden_layers=hidden_layers)

    def generate(self, prompt_ids, generation_config, tokenizer=None):
        with self.swapped_in():
            return super().generate(prompt_ids, generation_config, tokenizer)

    def output_heads(self) -> list:
        with self.swapped_in():
            return [self._copied_head(head) for head in super().output_heads()]

    def describe(self) -> str:
        what = {"base": "its weights when training started", "live": "its current weights",
                "ema": f"an EMA of its weights (rate {self.update_rate:g} every {self.sync_steps} steps)"}[self.kind]  # fmt: skip
        return f"the student itself, {what}: self-distillation"

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_state(self, folder: str, process_index: int) -> None:
        """Write the EMA weights into checkpoint `folder` (each process its own: a sharded student's are shards)."""
        if self.kind != "ema":
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{process_index}-{STATE_FILE}")
        torch.save([w.cpu() for w in self.weights], path + ".tmp")
        os.replace(path + ".tmp", path)

    def restore_state(self, folder: str | None, process_index: int) -> None:
        """Load the EMA weights saved in checkpoint `folder`; a checkpoint without them is refused (the EMA would
        restart from the resumed student, silently another teacher)."""
        if self.kind != "ema" or not folder:
            return
        path = os.path.join(folder, f"{process_index}-{STATE_FILE}")
        if not os.path.isfile(path):
            raise ValueError(
                f"{folder} holds no EMA teacher weights ({os.path.basename(path)}): it was written by a run without "
                "`teacher_model_kind='ema'` or with another number of processes. Resume with the settings it was "
                "written with, or start a new run."
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if [tuple(s.shape) for s in saved] != [tuple(w.shape) for w in self.weights]:
            raise ValueError(f"The EMA teacher weights in {path} do not fit this student's trainable parameters.")
        self.weights = [s.to(w.device) for s, w in zip(saved, self.weights)]


class SelfTeacherUpdate(TrainerCallback):
    """Moves a [`SelfTeacher`]'s EMA after each optimizer step."""

    def __init__(self, teacher: SelfTeacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.update(state.global_step)
