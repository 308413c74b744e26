"""A teacher that runs in this process: a transformers causal LM (or the student itself with its adapters off)."""

from __future__ import annotations

import contextlib

import torch

from .._compat import is_peft_model
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
        if not disable_adapters:
            model.eval()
            model.requires_grad_(False)

    @property
    def vocab_size(self) -> int | None:
        return self.model.get_output_embeddings().weight.shape[0]

    def _context(self):
        if self.disable_adapters and is_peft_model(self.model):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _causal_lm(self):
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def completion_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`(B, C, H_t)` final hidden states at the positions that predict the completion tokens."""
        lm = self._causal_lm()
        was_training = lm.training
        lm.eval()
        try:
            with self._context(), torch.inference_mode():
                out = lm.base_model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    **position_kwargs(lm.base_model, batch["attention_mask"]),
                    use_cache=False,
                )
                n_completion = batch["completion_ids"].shape[1]
                hidden = out.last_hidden_state[:, -n_completion - 1 : -1]  # (B, C, H_t)
        finally:
            lm.train(was_training)
        return hidden.clone()  # out of inference mode, so autograd may use it as a constant

    def score(self, batch, *, temperature=1.0, top_k=None, need="full") -> TeacherScores:
        hidden = self.completion_hidden(batch)  # (B, C, H_t)
        lm = self._causal_lm()

        def head(h):
            with self._context(), torch.no_grad():
                return output_logits(lm, h)

        if need == "full" and top_k is None:
            return TeacherScores(temperature, hidden=hidden, head=head, vocab_size=self.compare_vocab)
        batch_size, n_completion = hidden.shape[:2]
        flat = hidden.reshape(batch_size * n_completion, -1)  # (B*C, H_t)
        targets = batch["completion_ids"].reshape(-1)  # (B*C,)
        token_logps, topk_ids, topk_logps = [], [], []
        for start in range(0, flat.shape[0], self.chunk_size):
            logits = head(flat[start : start + self.chunk_size]).float()  # (n, V)
            if self.compare_vocab is not None:
                logits = logits[:, : self.compare_vocab]
            logps = torch.log_softmax(logits / temperature, -1)  # (n, V)
            token_logps.append(logps.gather(-1, targets[start : start + self.chunk_size, None]).squeeze(-1))
            if top_k is not None:
                values, ids = logps.topk(min(top_k, logps.shape[-1]), dim=-1)  # (n, K)
                topk_logps.append(values)
                topk_ids.append(ids)
        scores = TeacherScores(
            temperature, token_logps=torch.cat(token_logps).view(batch_size, n_completion), vocab_size=self.compare_vocab
        )
        if top_k is not None:
            scores.topk_ids = torch.cat(topk_ids).view(batch_size, n_completion, -1)  # (B, C, K)
            scores.topk_logps = torch.cat(topk_logps).view(batch_size, n_completion, -1)  # (B, C, K)
        return scores

    def generate(self, prompt_ids, generation_config, tokenizer=None):
        with self._context():
            return sample(self._causal_lm(), prompt_ids, generation_config, tokenizer)
