"""
Divergences between a teacher and a student whose vocabularies differ, per aligned span, as pure tensor functions.

Two tokenizations of one completion are aligned into spans of the same characters
([`~trl_onpolicy.token_alignment.align`]); span `k` covers student tokens `[a, b)` and teacher tokens `[c, d)`. With
`q_i` the student's next-token distribution that predicts token `i` and `y_i` the token written there:

- `merge_spans` (GOLD's "observed" strategy, its default): the span's student measure is the distribution of its
  first token scaled by the probability of the rest of the span as written, Q_k(v) = q_a(v) * prod_{i=a+1}^{b-1}
  q_i(y_i); the teacher's P_k likewise. (GOLD reads each distribution one position late in this strategy, the one
  after the token it is paired with; here `q_i` is the distribution that predicts token `i`.) A one-token span is that token's distribution; a longer one is a sub-probability
  measure whose mass is the probability of finishing the span as written.
- `uld` (Universal Logit Distillation, Boizard et al. 2024, arXiv 2402.12030): the L1 distance between the two
  measures' values sorted in decreasing order, the shorter vector padded with zeros, sum_r |sort(Q_k)_r - sort(P_k)_r|
  (the closed form of a Wasserstein distance when every token is one unit from every other). With `top_k`, only the
  k largest values of each side are compared (what a teacher that returns its top-k allows); the tails are left out.
- `hybrid_uld` (GOLD's `uld_use_hybrid_loss`): on the tokens whose strings are the same in both vocabularies
  ([`~trl_onpolicy.token_alignment.matched_vocabulary`]), the generalized JSD of the two measures restricted to them, column against column; on the
  rest, `uld`: w_m * JSD_beta(P_k|M, Q_k|M) + w_u * ULD(P_k|rest, Q_k|rest). The restricted measures are not
  renormalised (GOLD's choice); for 0 < beta < 1 the JSD of two sub-probability measures is still >= 0 and 0 only where
  they agree (convexity of x log x), which is why the endpoints beta = 0 and 1 (plain KLs, negative on such measures)
  are refused.

Every function takes LOG-probabilities (log-measures for spans), returns one value per span `(K,)`, unreduced, in
float32 (float64 stays float64); the caller reduces them (`trl_onpolicy.span_loss`: the sum over spans, divided by
the step's completion tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .divergences import _upcast, generalized_jsd


def merge_spans(logps: Tensor, token_ids: Tensor, spans: Tensor) -> Tensor:
    """
    The log-measure of each span, "observed" strategy: log q_a(v) + sum_{i=a+1}^{b-1} log q_i(y_i).

    Args:
        logps: Next-token log-probabilities of one sequence's completion, `(T, V)`: row `i` predicts token `i`.
        token_ids: The tokens written, long `(T,)`.
        spans: `[start, end)` of each span, long `(K, 2)`, every span non-empty.

    Returns:
        Log-measures `(K, V)`.
    """
    written = _upcast(logps).gather(-1, token_ids[:, None])[:, 0]  # (T,) log q_i(y_i)
    before = torch.cat([written.new_zeros(1), written.cumsum(0)])  # (T + 1,) before[i] = sum of written[:i]
    start, end = spans[:, 0], spans[:, 1]  # (K,) each
    rest = before[end] - before[start + 1]  # (K,) the span's tokens after its first, as written
    return _upcast(logps)[start] + rest[:, None]  # (K, V)


def _sorted_values(log_measure: Tensor, top_k: int | None) -> Tensor:
    """`(K, V)` log-measure -> its values `(K, min(V, top_k))`, decreasing."""
    values = log_measure.exp()  # (K, V)
    if top_k is not None and top_k < values.shape[-1]:
        return values.topk(top_k, dim=-1).values  # (K, top_k), decreasing
    return values.sort(dim=-1, descending=True).values  # (K, V)


def uld(student_logps: Tensor, teacher_logps: Tensor, top_k: int | None = None) -> Tensor:
    """
    ULD per span: sum_r |sort(Q)_r - sort(P)_r|, the shorter side padded with zeros.

    Args:
        student_logps: Student span log-measures `log Q`, `(K, Vs)`.
        teacher_logps: Teacher span log-measures `log P`, `(K, Vt)`; `Vt` may differ from `Vs`.
        top_k: Compare only the `top_k` largest values of each side (None: all).

    Returns:
        Per-span distance `(K,)`, float32.
    """
    q = _sorted_values(_upcast(student_logps), top_k)  # (K, kq)
    p = _sorted_values(_upcast(teacher_logps), top_k)  # (K, kp)
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))  # (K, width)
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))  # (K, width)
    return (q - p).abs().sum(-1)  # (K,)


def hybrid_uld(
    student_logps: Tensor,
    teacher_logps: Tensor,
    student_ids: Tensor,
    teacher_ids: Tensor,
    beta: float,
    matched_weight: float,
    unmatched_weight: float,
    top_k: int | None = None,
) -> Tensor:
    """
    Hybrid ULD per span: `matched_weight * JSD_beta` on the matched columns, `unmatched_weight * uld` on the others.

    Args:
        student_logps: Student span log-measures `(K, Vs)`.
        teacher_logps: Teacher span log-measures `(K, Vt)`.
        student_ids, teacher_ids: The matched vocabulary, long `(M,)` each: `student_ids[m]` is the same string as
            `teacher_ids[m]` ([`~trl_onpolicy.token_alignment.matched_vocabulary`]).
        beta: JSD interpolation, in `(0, 1)`.
        matched_weight, unmatched_weight: The two terms' weights.
        top_k: As for [`uld`], on the unmatched columns.

    Returns:
        Per-span loss `(K,)`, float32.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"hybrid_uld needs 0 < beta < 1 (its JSD compares sub-probability measures), got {beta}")
    q, p = _upcast(student_logps), _upcast(teacher_logps)  # (K, Vs), (K, Vt)
    matched = generalized_jsd(q[:, student_ids], p[:, teacher_ids], beta)  # (K,)
    q_rest = q.index_fill(-1, student_ids, float("-inf"))  # (K, Vs) matched columns hold no mass: sorted last
    p_rest = p.index_fill(-1, teacher_ids, float("-inf"))  # (K, Vt)
    return matched_weight * matched + unmatched_weight * uld(q_rest, p_rest, top_k)  # (K,)
