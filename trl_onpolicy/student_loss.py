"""The student's side of the loss: its forward pass over a micro-batch, then the divergence on completion tokens.

[`StudentLoss`] runs the student's network without its head (the loss projects the hidden states itself, in chunks),
takes the final hidden states at the positions that predict the completion tokens, and hands them with the teacher's
scores to [`~trl_onpolicy.loss.distillation_loss`], the head gathered once where it is sharded; with hidden-state
matching it adds that term. It returns the loss and the step's sums ([`~trl_onpolicy.loss.LossSums`]) and writes
nothing anywhere: the trainer decides what to keep of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import hidden_states, precision
from ._compat import hidden_states_request, is_peft_model
from .heads import student_head
from .launchers import call_with_whole_head
from .loss import LossSums, distillation_loss
from .rollouts import position_kwargs
from .temperature import grad_scale

if TYPE_CHECKING:
    from .step_batch import StepBatch


class StudentLoss:
    """
    The distillation loss of one micro-batch, as the trainer's `compute_loss` takes it.

    Args:
        args ([`OnPolicyDistillConfig`]): The loss settings (`loss_type`, `beta`, `skew_alpha`, `reward_scale`,
            `loss_chunk_size`, `loss_vocab_tile`, `temperature_grad_scale`, the importance-sampling cap).
        accelerator (`accelerate.Accelerator`): Its autocast is the run's mixed precision.
        vocab_size (`int`): Logit columns compared.
        pad_token_id (`int`): The token of the stand-in pass of an empty micro-batch.
        hidden_pairs (`list[tuple[int, int]]`, *optional*): `(student layer, teacher layer)` pairs of hidden-state
            matching.
        weigh_sampler (`bool`): Weigh the tokens by the sampler's (vLLM's) log-probs (importance-sampling correction).
        span_loss ([`~trl_onpolicy.span_loss.SpanLoss`], *optional*): The loss against a teacher of another tokenizer.
    """

    def __init__(self, args, accelerator, vocab_size: int, pad_token_id: int, hidden_pairs=None, weigh_sampler=False,
                 span_loss=None):  # fmt: skip
        self.args, self.accelerator = args, accelerator
        self.vocab_size, self.pad_token_id = vocab_size, pad_token_id
        self.hidden_pairs, self.weigh_sampler, self.span_loss = hidden_pairs, weigh_sampler, span_loss

    def __call__(self, student, batch: StepBatch, num_items: float, temperature: float) -> tuple[torch.Tensor, LossSums]:
        """Runs inside the wrapper's forward (DDP/FSDP see the whole computation): student pass + chunked loss."""
        causal_lm = student.get_base_model() if is_peft_model(student) else student
        if batch.size == 0:  # `on_rollouts` kept fewer rollouts than there are micro-batches
            sums = self._empty_loss(causal_lm)
            return sums.loss, sums
        out = self._backbone(causal_lm, batch)
        n_completion = batch.completion_ids.shape[1]
        hidden = out.last_hidden_state[:, -n_completion - 1 : -1]  # (B, C, H)
        mask = batch.completion_mask.bool()  # (B, C)
        teacher = batch.teacher.flatten(mask)  # (N, ...)
        sums = call_with_whole_head(  # a sharded head gathered once
            causal_lm, lambda h: self._divergence(causal_lm, h, teacher, batch, num_items, temperature), hidden[mask]
        )
        if self.hidden_pairs:
            term, sums.hidden_distance = hidden_states.matching_term(
                out.hidden_states, mask, teacher.layer_hidden, self.hidden_pairs, student, self.args, num_items
            )
            sums.loss = sums.loss + term
        return sums.loss, sums

    def _backbone(self, causal_lm, batch: StepBatch):
        """The network without its head: the loss projects the hidden states itself."""
        backbone = causal_lm.base_model
        with self.accelerator.autocast():  # as accelerate runs the model's forward, without casting outputs to float32
            return backbone(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                **position_kwargs(backbone, batch.attention_mask),
                output_hidden_states=hidden_states_request([i for i, _ in self.hidden_pairs or []]),
                use_cache=False,
            )

    def _divergence(self, causal_lm, hidden, teacher, batch: StepBatch, num_items: float, temperature: float) -> LossSums:
        args = self.args
        autocast = precision.autocast_dtype(self.accelerator)
        return distillation_loss(
            hidden,  # (N, H)
            student_head(causal_lm, autocast),
            teacher,
            batch.flat("completion_ids"),  # (N,)
            loss_type=args.loss_type,
            beta=args.beta,
            skew_alpha=args.skew_alpha,
            reward_scale=args.reward_scale,
            ref_token_logps=batch.flat("reference_logps"),
            behaviour_logps=batch.flat("behaviour_logps"),  # a reused batch's
            sampler_logps=batch.flat("sampling_logps") if self.weigh_sampler else None,  # vLLM's
            importance_sampling_clip_max=args.vllm_importance_sampling_clip_max,
            advantages=batch.flat("advantages"),  # the task reward's (reward_funcs)
            vocab_size=self.vocab_size,
            num_items=num_items,
            scale=grad_scale(temperature, args.temperature_grad_scale),
            chunk_size=args.loss_chunk_size,
            head_params=[p for p in causal_lm.get_output_embeddings().parameters() if p.requires_grad],
            vocab_tile=args.loss_vocab_tile,
            span_loss=self.span_loss,
        )

    def _empty_loss(self, causal_lm) -> LossSums:
        """A zero loss over one pad token, making the module calls of any micro-batch (backbone, then the head through
        `call_with_whole_head`): DDP reduces every weight's gradient, and under FSDP2 / ZeRO-3 this process gathers
        the weights the others gather (ZeRO-3 also checks that the processes call the same submodules)."""
        pad = torch.full((1, 1), self.pad_token_id, device=self.accelerator.device)  # (1, 1)
        hidden = causal_lm.base_model(input_ids=pad, use_cache=False).last_hidden_state[:, -1]  # (1, H)

        def zero(h):
            loss = student_head(causal_lm)(h).float().sum() * 0.0
            return LossSums(loss, student_token_logps=loss.new_zeros(0), teacher_token_logps=loss.new_zeros(0))

        return call_with_whole_head(causal_lm, zero, hidden)
