"""A teacher that runs in this process: a transformers causal LM (or the student itself with its adapters off)."""

from __future__ import annotations

import contextlib

import torch

from .._compat import hidden_states_request, is_peft_model
from ..frozen_models import base_model_outputs, place_frozen_model, vocab_size
from ..heads import frozen_head
from ..launchers import has_sharded_parameters, max_over_processes
from ..rollouts import position_kwargs, sample
from .base import Teacher, TeacherScores


class LocalTeacher(Teacher):
    """
    Scores completions with a local model, under `torch.inference_mode()`, in the teacher's own dtype, keeping only the
    completion positions. The rows are scored `micro_batch_size` at a time, each group cut to its own longest prompt
    and completion, so the teacher's transient memory follows the student's micro-batch, not the whole optimizer step,
    and no forward pass runs over columns that are padding in every row of its group.

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]): The teacher.
        disable_adapters (`bool`, *optional*, defaults to `False`): Run a PEFT model with its adapters disabled: the
            base network of a LoRA student serves as its own teacher (self-distillation) at no extra memory.
        vocab_size (`int`, *optional*): Compare only the first `vocab_size` logits (the tokenizer's vocabulary when
            the embedding matrices are padded to different sizes).
        chunk_size (`int`, *optional*, defaults to `1024`): Positions projected to the vocabulary at once when the
            top-k or sampled-token form is computed.
        micro_batch_size (`int`, *optional*): Rows per forward pass; None scores the whole batch in one pass. The
            trainer passes its micro-batch (`per_device_train_batch_size * num_generations` rollouts).
        own_student (`bool`, *optional*, defaults to `False`): `model` is the student being trained (a self-teacher,
            see [`~trl_onpolicy.teachers.SelfTeacher`]): it is neither frozen nor placed here (implied by
            `disable_adapters`).

    Under FSDP2 and ZeRO-3 the model is sharded ([`~LocalTeacher.prepare`]) and each forward pass gathers its weights
    from every process: every process then makes as many passes as the one with the most row groups (the others run
    passes on one token whose result is dropped), and the head is gathered once per call of [`~LocalTeacher.score`].
    """

    name = "local"

    def __init__(
        self,
        model,
        disable_adapters: bool = False,
        vocab_size: int | None = None,
        chunk_size: int = 1024,
        micro_batch_size: int | None = None,
        own_student: bool = False,
    ):
        self.model = model
        self.disable_adapters = disable_adapters
        # the student's own network (its base network, or itself: `SelfTeacher`): neither frozen nor placed here
        self.own_student = own_student or disable_adapters
        self.compare_vocab = vocab_size
        self.chunk_size = chunk_size
        self.micro_batch_size = micro_batch_size
        self.sharded, self.accelerator = False, None  # set by `prepare`: a forward pass is then a collective
        if not self.own_student:
            model.eval()
            model.requires_grad_(False)

    @property
    def vocab_size(self) -> int | None:
        return vocab_size(self.model)

    def prepare(self, accelerator) -> LocalTeacher:
        """Place the model for the launcher (sharded under FSDP2 and ZeRO-3, see [`~trl_onpolicy.frozen_models`]);
        the student's own base network (`disable_adapters`) is where the student is."""
        if not self.own_student:
            self.model = place_frozen_model(self.model, accelerator)
        self.sharded, self.accelerator = has_sharded_parameters(self.model), accelerator
        return self

    def _context(self):
        if self.disable_adapters and is_peft_model(self.model):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _causal_lm(self):
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def row_groups(self, n_rows: int) -> list[tuple[int, int]]:
        """`(start, end)` of the row groups scored one forward pass each."""
        size = self.micro_batch_size or max(n_rows, 1)
        return [(lo, min(lo + size, n_rows)) for lo in range(0, n_rows, size)]

    def _forward(self, input_ids, attention_mask, n_completion: int, layers: list[int] | None):
        """One pass over `(b, p + c)` inputs: `(b, c, H_t)` final hidden states at the positions predicting the `c`
        completion tokens, and `(b, c, L, H_t)` of `layers` (or None)."""
        lm = self._causal_lm()
        out = base_model_outputs(  # `lm.base_model(...)`; through the outermost module's forward when FSDP2 shards it
            self.model,
            lm.base_model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **position_kwargs(lm.base_model, attention_mask),
            output_hidden_states=hidden_states_request(layers or []),
            use_cache=False,
        )
        positions = slice(-n_completion - 1, -1)
        hidden = out.last_hidden_state[:, positions]  # (b, c, H_t)
        if layers is None:
            return hidden, None
        return hidden, torch.stack([out.hidden_states[j][:, positions] for j in layers], 2)  # (b, c, L, H_t)

    def completion_hidden(
        self, batch: dict[str, torch.Tensor], layers: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `(B, C, H_t)` final hidden states at the positions that predict the completion tokens, and, with `layers`,
        `(B, C, L, H_t)` those layers' hidden states there (index 0 is the embeddings, as in `hidden_states`); zeros
        past each row's completion.
        """
        lm = self._causal_lm()
        was_training = lm.training
        lm.eval()
        n_rows, n_completion = batch["completion_ids"].shape
        n_prompt = batch["input_ids"].shape[1] - n_completion
        prompt_lengths = batch["attention_mask"][:, :n_prompt].sum(1).tolist()
        completion_lengths = batch["attention_mask"][:, n_prompt:].sum(1).tolist()  # real tokens, context too
        hidden = layer_hidden = None
        groups = self.row_groups(n_rows)
        # a sharded model's weights are gathered into tensors that must outlive inference mode (the student's base
        # network is sharded only once training starts)
        sharded = self.sharded or (self.own_student and has_sharded_parameters(self.model))
        no_grad = torch.no_grad if sharded else torch.inference_mode
        try:
            if sharded:  # every process makes as many passes as the busiest one
                self._idle_passes(batch, max_over_processes(self.accelerator, len(groups)) - len(groups), no_grad)
            for lo, hi in groups:
                p, c = max(max(prompt_lengths[lo:hi]), 1), max(max(completion_lengths[lo:hi]), 1)
                columns = slice(n_prompt - p, n_prompt + c)  # the group's own longest prompt and completion
                with self._context(), no_grad():
                    part, part_layers = self._forward(
                        batch["input_ids"][lo:hi, columns], batch["attention_mask"][lo:hi, columns], c, layers
                    )  # (b, c, H_t), (b, c, L, H_t)
                if hidden is None:  # made out of inference mode, so autograd may use them as constants
                    hidden = part.new_zeros((n_rows, n_completion, *part.shape[2:]))  # (B, C, H_t)
                    if part_layers is not None:
                        layer_hidden = part_layers.new_zeros((n_rows, n_completion, *part_layers.shape[2:]))
                hidden[lo:hi, :c] = part
                if part_layers is not None:
                    layer_hidden[lo:hi, :c] = part_layers  # (b, c, L, H_t)
        finally:
            lm.train(was_training)
        if hidden is None:  # no rows
            config = lm.config.get_text_config()
            hidden = batch["input_ids"].new_zeros((0, n_completion, config.hidden_size), dtype=lm.dtype)
        return hidden, layer_hidden

    def _idle_passes(self, batch: dict[str, torch.Tensor], n: int, no_grad) -> None:
        """`n` passes over one token whose results are dropped: they join the other processes' gathers."""
        ids = batch["input_ids"][:1, -1:] if batch["input_ids"].shape[0] else batch["input_ids"].new_zeros((1, 1))
        for _ in range(n):
            with self._context(), no_grad():
                self._forward(ids, torch.ones_like(ids), 1, None)  # (1, 1)

    def to(self, device) -> LocalTeacher:
        if not self.own_student:  # the student's own network moves with the student
            self.model.to(device)
        return self

    def describe(self) -> str:
        if self.disable_adapters:
            return "the student's own base network (LoRA adapters disabled): self-distillation"
        name = self._causal_lm().config._name_or_path or type(self._causal_lm()).__name__
        return f"`{name}` (in the training process)"

    @property
    def text_config(self):
        return self._causal_lm().config.get_text_config()

    @property
    def num_hidden_layers(self) -> int:
        return self.text_config.num_hidden_layers

    def output_heads(self) -> list:
        with self._context():  # the student's own base network: the head as it is with the adapters off
            return [frozen_head(self._causal_lm())]  # gathered once if sharded

    def score(self, batch, *, temperature=1.0, top_k=None, need="full", hidden_layers=None) -> TeacherScores:
        hidden, layer_hidden = self.completion_hidden(batch, hidden_layers)  # (B, C, H_t), (B, C, L, H_t)
        scores = TeacherScores(
            temperature, hidden=hidden, head=self.output_heads()[0], vocab_size=self.compare_vocab,
            layer_hidden=layer_hidden,
        )  # fmt: skip
        if need == "full" and top_k is None:
            return scores
        return scores.reduce(batch["completion_ids"], top_k, self.chunk_size)

    def generate(self, prompt_ids, generation_config, tokenizer=None):
        with self._context():
            return sample(self._causal_lm(), prompt_ids, generation_config, tokenizer)
