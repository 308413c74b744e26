"""The loss against a teacher of another tokenizer: ULD or hybrid ULD over aligned spans, one chunk of tokens at a time.

The teacher's scores are in the spans form ([`~trl_onpolicy.teachers.base.TeacherScores`], from
[`~trl_onpolicy.teachers.CrossTokenizerTeacher`]): at the first student token of each span, the top-k of the teacher's
span measure (its own token ids) and the span's length. The student's span measure is built from its next-token
log-probs over the span's tokens ([`~trl_onpolicy.cross_tokenizer_divergences.merge_spans`]), so a chunk of the loss
must hold whole spans: [`span_bounds`] cuts the tokens at span starts. The span's loss is put on its first token, so
the loss is the sum over spans divided by the step's completion tokens, as every other loss here (accumulation- and
process-invariant); TRL's GOLD averages per group, then per sequence.

ULD compares the top-k of the two measures (k: the teacher's). With `loss_type="sampled_reverse_kl"` the loss is
instead the sampled reverse KL of each span's text, which both models give a probability to whatever their tokens:
the advantage `reward_scale * log p(span) - log q(span)` on the student's log-prob of the span as written (the
per-token loss of `divergences.sampled_reverse_kl`, one span at a time). Unlike ULD it says which text is right. The
hybrid loss compares, on the teacher's top-k tokens
that have a twin in the student's vocabulary, the two measures column by column (generalized JSD with `beta`), and
ULD on the rest; the teacher's matched mass outside its top-k is not seen (exact as k reaches the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cross_tokenizer_divergences import merge_spans, uld
from .divergences import generalized_jsd, sampled_reverse_kl


def span_bounds(span_length: Tensor, size: int) -> list[tuple[int, int]]:
    """`(start, end)` chunks of about `size` tokens that hold whole spans: each end is a span start or the end."""
    n = span_length.shape[0]
    starts = torch.nonzero(span_length > 0)[:, 0].tolist() + [n]  # every span start, then the end
    bounds, start = [], 0
    for s in starts:
        if s - start >= size or s == n:
            if s > start:
                bounds.append((start, s))
            start = s
    return bounds


@dataclass
class SpanLoss:
    """
    ULD (default) or hybrid ULD per span.

    Args:
        hybrid (`bool`): JSD on the matched vocabulary, ULD on the rest (GOLD's `uld_use_hybrid_loss`).
        beta (`float`): The JSD's interpolation, in `(0, 1)`.
        matched_weight, unmatched_weight (`float` or `None`): The two terms' weights; None for both: the matched
            vocabulary's share of the teacher's (GOLD's default).
        student_ids, teacher_ids (`list[int]`): The matched vocabulary.
        teacher_vocab (`int`): The teacher's vocabulary size.
        sampled (`bool`): The sampled reverse KL of each span's text instead (`loss_type="sampled_reverse_kl"`).
        reward_scale (`float`): Its weight of the teacher's log-prob (`reward_scale`).
        crossentropy_weight, distillation_weight (`float`): GOLD's `uld_crossentropy_weight` and
            `uld_distillation_weight`: the per-token loss is `distillation_weight` times the span loss plus
            `crossentropy_weight` times the student's negative log-likelihood of each token written.
    """

    hybrid: bool = False
    beta: float = 0.5
    matched_weight: float | None = None
    unmatched_weight: float | None = None
    student_ids: list[int] | None = None
    teacher_ids: list[int] | None = None
    teacher_vocab: int = 0
    sampled: bool = False
    reward_scale: float = 1.0
    crossentropy_weight: float = 0.0
    distillation_weight: float = 1.0

    def weights(self) -> tuple[float, float]:
        if self.matched_weight is not None:
            return self.matched_weight, self.unmatched_weight
        share = len(self.teacher_ids or []) / max(self.teacher_vocab, 1)
        return share, 1.0 - share

    def per_token(self, student_logps: Tensor, targets: Tensor, topk_ids: Tensor, topk_logps: Tensor,
                  span_length: Tensor, text_logps: Tensor | None = None) -> Tensor:  # fmt: skip
        """
        The chunk's per-token loss `(n,)`: each span's at its first token, 0 elsewhere.

        Args:
            student_logps: `(n, V_s)` the student's next-token log-probs at the chunk's tokens (whole spans).
            targets: `(n,)` the tokens written.
            topk_ids, topk_logps: `(n, K)` the teacher's span measures at span starts.
            span_length: `(n,)` spans' lengths at their starts, 0 elsewhere.
            text_logps: `(n,)` the teacher's log-prob of each span's text at its start (the sampled loss).
        """
        per_token = self._span_loss(student_logps, targets, topk_ids, topk_logps, span_length, text_logps)  # (n,)
        per_token = self.distillation_weight * per_token
        if self.crossentropy_weight:  # GOLD's anchor: the NLL of every token written
            written = student_logps.gather(-1, targets[:, None])[:, 0].float()  # (n,)
            per_token = per_token - self.crossentropy_weight * written
        return per_token

    def _span_loss(self, student_logps: Tensor, targets: Tensor, topk_ids: Tensor, topk_logps: Tensor,
                   span_length: Tensor, text_logps: Tensor | None) -> Tensor:  # fmt: skip
        """The span loss alone, `(n,)`: each span's at its first token."""
        starts = torch.nonzero(span_length > 0)[:, 0]  # (S,)
        spans = torch.stack([starts, starts + span_length[starts]], -1)  # (S, 2)
        if self.sampled:
            written = student_logps.gather(-1, targets[:, None])[:, 0].float()  # (n,)
            before = torch.cat([written.new_zeros(1), written.cumsum(0)])  # (n + 1,)
            student_text = before[spans[:, 1]] - before[starts]  # (S,) log q(span), differentiable
            per_span = sampled_reverse_kl(student_text, text_logps[starts], self.reward_scale)  # (S,)
            return torch.zeros_like(written).index_put((starts,), per_span)  # (n,)
        student = merge_spans(student_logps, targets, spans)  # (S, V_s)
        teacher_ids, teacher = topk_ids[starts], topk_logps[starts].float()  # (S, K) each
        if self.hybrid:
            per_span = self._hybrid(student, teacher_ids, teacher)  # (S,)
        else:
            per_span = uld(student, teacher, top_k=teacher.shape[-1])  # (S,)
        return torch.zeros_like(targets, dtype=per_span.dtype).index_put((starts,), per_span)  # (n,)

    def _hybrid(self, student: Tensor, teacher_ids: Tensor, teacher: Tensor) -> Tensor:
        """`(S, V_s)` student measures, `(S, K)` teacher ids and log-values -> `(S,)`."""
        twin = torch.full((max(self.teacher_vocab, int(teacher_ids.max()) + 1),), -1, dtype=torch.long,
                          device=student.device)  # fmt: skip
        twin[torch.tensor(self.teacher_ids, device=student.device)] = torch.tensor(self.student_ids,
                                                                                   device=student.device)  # fmt: skip
        mapped = twin[teacher_ids]  # (S, K) the student's twin of each teacher token, -1 for none
        matched = mapped >= 0  # (S, K)
        student_matched = torch.where(matched, student.gather(-1, mapped.clamp(min=0)), float("-inf"))  # (S, K)
        teacher_matched = torch.where(matched, teacher, float("-inf"))  # (S, K)
        jsd = generalized_jsd(student_matched, teacher_matched, self.beta)  # (S,) unmatched columns add 0
        student_rest = student.index_fill(-1, torch.tensor(self.student_ids, device=student.device), float("-inf"))
        teacher_rest = torch.where(matched, float("-inf"), teacher)  # (S, K)
        w_m, w_u = self.weights()
        return w_m * jsd + w_u * uld(student_rest, teacher_rest, top_k=teacher.shape[-1])  # (S,)
