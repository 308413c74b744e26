"""A teacher that runs in this process: a transformers causal LM (or the student itself with its adapters off)."""

from __future__ import annotations

import contextlib

import torch

from .._compat import is_peft_model
from ..frozen_models import base_model_outputs, frozen_head, place_frozen_model, vocab_size
from ..launchers import has_sharded_parameters
from ..loss import output_logits
from ..rollouts import position_kwargs, sample
from .base import Teacher, TeacherScores


class LocalTeacher(Teacher):
    """
    Scores completions with a local model: one forward pass over prompt + completion per generation batch, under
    `torch.inference_mode()`, in the teacher's own dtype, keeping only the completion positions.

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]): The teacher.
        disable_adapters (`bool`, *optional*, defaults to `False`): Run a PEFT model with its adapters disabled: the
            base network of a LoRA student serves as its own teacher (self-distillation) at no extra memory.
        vocab_size (`int`, *optional*): Compare only the first `vocab_size` logits (the tokenizer's vocabulary when
            the embedding matrices are padded to different sizes).
        chunk_size (`int`, *optional*, defaults to `1024`): Positions projected to the vocabulary at once when the
            top-k or sampled-token form is computed.
    """

    name = "local"

    def __init__(self, model, disable_adapters: bool = False, vocab_size: int | None = None, chunk_size: int = 1024):
        self.model = model
        self.disable_adapters = disable_adapters
        self.compare_vocab = vocab_size
        self.chunk_size = chunk_size
        self.sharded = False  # set by `prepare`: a forward pass is then a collective
        if not disable_adapters:
            model.eval()
            model.requires_grad_(False)

    @property
    def vocab_size(self) -> int | None:
        return vocab_size(self.model)

    def prepare(self, accelerator) -> LocalTeacher:
        """Place the model for the launcher (sharded under FSDP2 and ZeRO-3, see [`~trl_onpolicy.frozen_models`]);
        the student's own base network (`disable_adapters`) is where the student is."""
        if not self.disable_adapters:
            self.model = place_frozen_model(self.model, accelerator)
        self.sharded = has_sharded_parameters(self.model)
        return self

    def _context(self):
        if self.disable_adapters and is_peft_model(self.model):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _causal_lm(self):
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def completion_hidden(
        self, batch: dict[str, torch.Tensor], layers: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `(B, C, H_t)` final hidden states at the positions that predict the completion tokens, and, with `layers`,
        `(B, C, L, H_t)` those layers' hidden states there (index 0 is the embeddings, as in `hidden_states`).
        """
        lm = self._causal_lm()
        was_training = lm.training
        lm.eval()
        n_completion = batch["completion_ids"].shape[1]
        positions = slice(-n_completion - 1, -1)
        # a sharded model's weights are gathered into tensors that must outlive inference mode
        no_grad = torch.no_grad() if self.sharded else torch.inference_mode()
        try:
            with self._context(), no_grad:
                out = base_model_outputs(
                    lm,
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    **position_kwargs(lm.base_model, batch["attention_mask"]),
                    output_hidden_states=layers is not None,
                    use_cache=False,
                )
                hidden = out.last_hidden_state[:, positions]  # (B, C, H_t)
                layer_hidden = None
                if layers is not None:
                    layer_hidden = torch.stack(
                        [out.hidden_states[j][:, positions] for j in layers], 2
                    )  # (B, C, L, H_t)
        finally:
            lm.train(was_training)
        # clones are made out of inference mode, so autograd may use them as constants
        return hidden.clone(), None if layer_hidden is None else layer_hidden.clone()

    def to(self, device) -> LocalTeacher:
        if not self.disable_adapters:  # a LoRA student's base network moves with the student
            self.model.to(device)
        return self

    def describe(self) -> str:
        if self.disable_adapters:
            return "the student's own base network (LoRA adapters disabled): self-distillation"
        name = self._causal_lm().config._name_or_path or type(self._causal_lm()).__name__
        return f"`{name}` (in the training process)"

    @property
    def num_hidden_layers(self) -> int:
        return self._causal_lm().config.get_text_config().num_hidden_layers

    def score(self, batch, *, temperature=1.0, top_k=None, need="full", hidden_layers=None) -> TeacherScores:
        hidden, layer_hidden = self.completion_hidden(batch, hidden_layers)  # (B, C, H_t), (B, C, L, H_t)
        lm = self._causal_lm()

        def head(h):
            with self._context(), torch.no_grad():
                return output_logits(lm, h)

        head = frozen_head(lm) or head  # a plain linear head: the loss walks it tile by tile

        scores = TeacherScores(
            temperature, hidden=hidden, head=head, vocab_size=self.compare_vocab, layer_hidden=layer_hidden
        )
        if need == "full" and top_k is None:
            return scores
        return scores.reduce(batch["completion_ids"], top_k, self.chunk_size)

    def generate(self, prompt_ids, generation_config, tokenizer=None):
        with self._context():
            return sample(self._causal_lm(), prompt_ids, generation_config, tokenizer)
