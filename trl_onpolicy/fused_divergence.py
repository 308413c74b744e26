"""The full-distribution divergences of [`~trl_onpolicy.divergences`], walked tile by tile over the vocabulary, with
the gradient of the student's logits written in closed form.

For one chunk of `n` tokens, the student's logits are `z_s = k (h W^T + b)` with `k = logit multiplier / T` (one
matmul per tile of `tile` vocabulary columns), the teacher's `z_t` likewise (or sliced from the `(n, V)` logits an
opaque teacher head computed); neither model's `(n, V)` logits exist, and every float32 temporary is `(n, tile)`:

- pass 1: the per-row log-normalisers `A = logsumexp_v z` of both models, with an online log-sum-exp over the tiles
  (running maximum and sum, [`OnlineLogSumExp`]).
- pass 2: `log q = z_s - A_s`, `log p = z_t - A_t`; per-row sums of the divergence, of `q log q` and `p log p` (the
  entropies), the sampled tokens' log-probs, and `c = sum_v a_v` with `a = d(div) / d(log q)`.
- pass 3 (reverse KL and JSD; the forward KL knows `c` in advance and does this in pass 2): the gradient of each tile
  of logits, `dz = a - q c` (the softmax Jacobian applied to `a`), chained at once into `grad_h += dz W[tile]` and
  `grad_W[tile] += dz^T h` (and `grad_b[tile] += sum_n dz`). The scalars (`k`, the loss scale) ride on the matmuls.
  A third pass because `c` is a sum over the whole vocabulary: accumulating `a W` and `q W` in pass 2 and subtracting
  `c (q W)` at the end would still need `q` again for `grad_W`, and in bfloat16 the difference of the two would cancel.

Closed forms, with `q`, `p` the student's and the teacher's probabilities at the loss temperature:

- forward KL(p || q) = sum p (log p - log q):  a = -p,  c = -1,  dz = q - p.
- reverse KL(q || p) = sum q (log q - log p):  a = q (log q - log p) + q,  c = KL + 1,  dz = q (log q - log p - KL).
- generalized JSD, `m = beta p + (1 - beta) q` (divergences.py's and TRL's convention; `beta = 0` is the forward KL,
  `beta = 1` the reverse KL, routed to those): JSD = beta KL(p || m) + (1 - beta) KL(q || m),
  a = (1 - beta) q (log q - log m) (the terms in `q / m` cancel), c = (1 - beta) KL(q || m),
  dz = (1 - beta) q (log q - log m - KL(q || m)).
- skew forward KL(p || m), `m = alpha p + (1 - alpha) q` (DistiLLM):  a = -(1 - alpha) p q / m,
  dz = -(1 - alpha) q (p / m - sum_v p q / m).
- skew reverse KL(q || m), `m = alpha q + (1 - alpha) p`:  a = q (log q - log m + 1 - alpha q / m),
  dz = q (log q - log m - alpha q / m - c'),  c' = KL(q || m) - alpha sum_v q^2 / m.
  (`alpha = 0` routes both to the plain KLs.)

Numerics follow divergences.py: a teacher logit of -inf is a token with no mass (0 log 0 = 0, no NaN), the log-prob
that is divided by is floored at `LOG_FLOOR` (a large finite penalty where the teacher has no mass and the student
has), and the mixtures `m` are floored at float32 `tiny`. Departure: the forward KL's value floors `log q` at
`LOG_FLOOR` like divergences.py, but its gradient is the closed form `q - p` of the unfloored divergence, where
autograd of divergences.py gives no gradient to an entry with `q < 1.2e-38`; everywhere else the two agree to
rounding.
Precision ([`~trl_onpolicy.precision`]): the matmuls run in the head's dtype ([`~trl_onpolicy.heads.LinearHead`]`.dtype`: bfloat16 for
bfloat16 weights), every tile leaves them in float32, and the row sums, `grad_h` and `grad_W` accumulate in float32;
a float64 head and float64 hidden states (the tests' references) keep everything in float64.
The top-k and the sampled-token forms stay on the whole-vocabulary path of [`~trl_onpolicy.loss`].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import precision
from .divergences import LOG_FLOOR
from .heads import LinearHead


TILED_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
TINY = torch.finfo(torch.float32).tiny


@dataclass
class TiledTerms:
    """Per-token results of one chunk `(n,)` each, and the gradient of the chunk's loss w.r.t. its hidden states."""

    per_token: Tensor
    student_entropy: Tensor
    teacher_entropy: Tensor
    student_token_logps: Tensor
    teacher_token_logps: Tensor
    grad_hidden: Tensor | None = None  # (n, H) float32 (float64 for float64 inputs)


# ---------------------------------------------------------------------------------------------- the math of a tile
class OnlineLogSumExp:
    """Per-row `logsumexp` over column tiles seen one at a time: a running maximum `m` and sum `s` of `exp(z - m)`
    (one rounding of the result at the end, where a `logaddexp` of the tiles' own `logsumexp` would round per tile)."""

    def __init__(self, rows: int, dtype: torch.dtype, device):
        self.max = torch.full((rows,), -math.inf, dtype=dtype, device=device)  # (n,)
        self.sum = torch.zeros(rows, dtype=dtype, device=device)  # (n,)

    def add(self, logits: Tensor) -> None:
        """Fold in a tile `(n, t)` (consumed)."""
        new_max = torch.maximum(self.max, logits.amax(-1))  # (n,)
        shift = torch.where(new_max == -math.inf, 0.0, new_max)  # (n,) rows with no finite logit yet stay at 0 / -inf
        self.sum = self.sum * (self.max - shift).exp() + logits.sub_(shift[:, None]).exp_().sum(-1)  # (n,)
        self.max = new_max

    def value(self) -> Tensor:
        """`(n,)` log sum_v exp(z_v); -inf for a row of -inf only."""
        return self.max + self.sum.log()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a_v b_v per row: `(n, t)`, `(n, t)` -> `(n,)` (on CPU much faster than `torch.linalg.vecdot`)."""
    return (a * b).sum(-1)


def _mixture(q: Tensor, p: Tensor, w: float) -> Tensor:
    """m = w p + (1 - w) q, floored at float32 tiny: `(n, t)`, `(n, t)` -> `(n, t)` (torch.lerp is slower on CPU)."""
    return q.mul(1.0 - w).add_(p, alpha=w).clamp_(min=TINY)  # (n, t)


def tile_sums(
    log_q: Tensor, log_p: Tensor, loss_type: str, w: float, with_grad: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """
    One vocabulary tile's share of the per-token sums.

    Args:
        log_q: `(n, t)` student log-probabilities on the tile (finite); consumed (overwritten).
        log_p: `(n, t)` teacher log-probabilities on the tile (-inf where the teacher has no mass); consumed.
        loss_type: One of `TILED_LOSS_TYPES`.
        w: The teacher's weight in the mixture `m = w p + (1 - w) q` (JSD: beta, skew forward KL: alpha, skew reverse
            KL: 1 - alpha), in `(0, 1)`; unused by the plain KLs.
        with_grad: Also return the forward KL's gradient w.r.t. the tile's logits (it needs no row sum first).

    Returns:
        Partial sums `(n,)`: the divergence, `sum q log q`, `sum p log p`, and the tile's share of `c` (see
        [`tile_logit_grad`]; None for the forward KL); then `dz` `(n, t)` (forward KL, with_grad) or None.
    """
    q = log_q.exp()  # (n, t)
    p = log_p.exp()  # (n, t) 0 where the teacher's logit is -inf
    log_p = log_p.clamp_(min=LOG_FLOOR)  # (n, t) 0 * floor = 0 where p = 0; finite penalty where q > 0 = p
    q_log_q = _dot(q, log_q)  # (n,)
    p_log_p = _dot(p, log_p)  # (n,)
    if loss_type == "forward_kl":  # p (log p - log q), log q floored like divergences.py
        value = log_p.sub_(log_q.clamp_(min=LOG_FLOOR)).mul_(p).sum(-1)  # (n,)
        return value, q_log_q, p_log_p, None, q.sub_(p) if with_grad else None
    if loss_type == "reverse_kl":  # q (log q - log p)
        value = log_q.sub_(log_p).mul_(q).sum(-1)  # (n,)
        return value, q_log_q, p_log_p, value, None
    m = _mixture(q, p, w)  # (n, t)
    log_m = m.log()  # (n, t)
    if loss_type == "skew_forward_kl":  # KL(p || m); c = sum p q / m
        value = log_p.sub_(log_m).mul_(p).sum(-1)  # (n,)
        return value, q_log_q, p_log_p, p.div_(m).mul_(q).sum(-1), None
    if loss_type == "skew_reverse_kl":  # KL(q || m); c = KL(q || m) - (1 - w) sum q^2 / m
        value = log_q.sub_(log_m).mul_(q).sum(-1)  # (n,)
        return value, q_log_q, p_log_p, value - (1.0 - w) * q.square_().div_(m).sum(-1), None
    kl_q = log_q.sub_(log_m).mul_(q).sum(-1)  # (n,) KL(q || m) on the tile: c
    kl_p = log_p.sub_(log_m).mul_(p).sum(-1)  # (n,) KL(p || m) on the tile
    return w * kl_p + (1.0 - w) * kl_q, q_log_q, p_log_p, kl_q, None


def tile_logit_grad(log_q: Tensor, log_p: Tensor, loss_type: str, w: float, c: Tensor) -> Tensor:
    """
    The gradient of the per-token divergence w.r.t. the student's logits at the loss temperature, on one tile, up to
    the constant [`grad_weight`] (which the caller folds into its matmuls).

    Args:
        log_q: `(n, t)` student log-probabilities; consumed (overwritten).
        log_p: `(n, t)` teacher log-probabilities (-inf where no mass); consumed (overwritten).
        loss_type: One of `TILED_LOSS_TYPES` but `"forward_kl"` (its gradient comes from [`tile_sums`]).
        w: The teacher's weight in the mixture `m` (see [`tile_sums`]).
        c: `(n,)` the row sums of pass 2.

    Returns:
        `(n, t)`: reverse KL `q (log q - log p - c)`; JSD `q (log q - log m - c)`; skew forward KL `q (p / m - c)`;
        skew reverse KL `q (log q - log m - (1 - w) q / m - c)`.
    """
    q = log_q.exp()  # (n, t)
    if loss_type == "reverse_kl":
        return log_q.sub_(log_p.clamp_(min=LOG_FLOOR)).sub_(c[:, None]).mul_(q)  # (n, t)
    p = log_p.exp_()  # (n, t)
    m = _mixture(q, p, w)  # (n, t)
    if loss_type == "skew_forward_kl":
        return p.div_(m).sub_(c[:, None]).mul_(q)  # (n, t)
    if loss_type == "skew_reverse_kl":
        log_q.sub_(q.div(m).mul_(1.0 - w))
    return log_q.sub_(m.log_()).sub_(c[:, None]).mul_(q)  # (n, t)


def grad_weight(loss_type: str, w: float) -> float:
    """The constant factor [`tile_logit_grad`] leaves out."""
    return {"jsd": 1.0 - w, "skew_forward_kl": w - 1.0}.get(loss_type, 1.0)


def _canonical(loss_type: str, beta: float, skew_alpha: float) -> tuple[str, float]:
    """The loss and the teacher's weight `w` in its mixture; the JSD at beta 0 / 1 and the skew KLs at alpha 0 are
    the plain KLs."""
    if loss_type == "jsd":
        return {0.0: ("forward_kl", 0.0), 1.0: ("reverse_kl", 1.0)}.get(beta, ("jsd", beta))
    if loss_type.startswith("skew_") and skew_alpha == 0.0:
        return loss_type[len("skew_") :], 0.0
    return loss_type, skew_alpha if loss_type == "skew_forward_kl" else 1.0 - skew_alpha


# -------------------------------------------------------------------------------------------------- one chunk
def _pick(values: Tensor, targets: Tensor, start: int, end: int, out: Tensor) -> Tensor:
    """`out` with `values[i, targets[i] - start]` where the target falls in the tile `[start, end)`: `(n,)`."""
    index = targets - start  # (n,)
    inside = (index >= 0) & (index < end - start)  # (n,)
    picked = values.gather(1, index.clamp(0, end - start - 1)[:, None]).squeeze(1)  # (n,)
    return torch.where(inside, picked, out)


class _TileWalk:
    """One chunk's student and teacher log-probabilities, a vocabulary tile at a time; pass 1 (the log-normalisers)
    runs on construction."""

    def __init__(
        self, hidden: Tensor, head: LinearHead, teacher_tile: Callable[[int, int], Tensor], temperature: float,
        vocab_size: int, tile: int,
    ):  # fmt: skip
        self.hidden, self.head, self.teacher_tile, self.k = hidden, head, teacher_tile, 1.0 / temperature
        self.dtype = precision.sum_dtype(head.dtype)  # of the math and results: float32 (float64 for a float64 head)
        self.tiles = [(start, min(start + tile, vocab_size)) for start in range(0, vocab_size, tile)]
        lse_s, lse_t = (OnlineLogSumExp(hidden.shape[0], self.dtype, hidden.device) for _ in range(2))
        for start, end in self.tiles:  # pass 1: log-normalisers
            lse_s.add(self.head.tile(hidden, start, end, self.k))
            lse_t.add(self.teacher_logits(start, end))
        self.log_z_s, self.log_z_t = lse_s.value(), lse_t.value()  # (n,) each

    def teacher_logits(self, start: int, end: int) -> Tensor:
        """`(n, t)` the teacher's logits / T in the math's dtype (a no-op cast in the same dtype)."""
        return self.teacher_tile(start, end).to(self.dtype)

    def log_probs(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """`(n, t)` log q and `(n, t)` log p of the tile `[start, end)`."""
        log_q = self.head.tile(self.hidden, start, end, self.k).sub_(self.log_z_s[:, None])  # (n, t)
        return log_q, self.teacher_logits(start, end).sub_(self.log_z_t[:, None])


class _Backprop:
    """Chains a tile's logit gradient `dz` into `grad_hidden` `(n, H)` and the head's gradient accumulators."""

    def __init__(self, walk: _TileWalk, alpha: float, grad_w: Tensor | None, grad_b: Tensor | None):
        self.hidden, self.head, self.alpha, self.grad_w, self.grad_b = walk.hidden, walk.head, alpha, grad_w, grad_b
        self.grad_hidden = walk.hidden.new_zeros(walk.hidden.shape, dtype=walk.dtype)  # (n, H)

    def __call__(self, dz: Tensor, start: int, end: int) -> None:
        """grad_h += alpha dz W[tile], grad_W[tile] += alpha dz^T h, grad_b[tile] += alpha sum_n dz: the matmuls in the
        head's dtype, the sums in the accumulators' (float32)."""
        head, alpha = self.head, self.alpha
        if self.grad_b is not None:
            self.grad_b[start:end].add_(dz.sum(0), alpha=alpha)
        precision.add_matmul(self.grad_hidden, dz, head.weight[start:end], alpha, head.dtype)  # (n, H)
        if self.grad_w is not None:
            precision.add_matmul(self.grad_w[start:end], dz.t(), self.hidden, alpha, head.dtype)  # (t, H)


def _sums_pass(walk: _TileWalk, targets: Tensor, loss_type: str, w: float, backprop: _Backprop | None):
    """Pass 2: the per-row divergence, `sum q log q`, `sum p log p`, `c` and the sampled tokens' log-probs, `(n,)`
    each; the forward KL's gradient goes to `backprop` on the way (None: values only)."""
    zeros = walk.log_z_s.new_zeros(walk.hidden.shape[0])  # (n,)
    value, q_log_q, p_log_p, c = zeros, zeros, zeros, zeros
    s_token = t_token = torch.full_like(zeros, math.nan)  # (n,)
    for start, end in walk.tiles:
        log_q, log_p = walk.log_probs(start, end)
        s_token = _pick(log_q, targets, start, end, s_token)
        t_token = _pick(log_p, targets, start, end, t_token)
        sums = tile_sums(log_q, log_p, loss_type, w, with_grad=backprop is not None)
        value, q_log_q, p_log_p = value + sums[0], q_log_q + sums[1], p_log_p + sums[2]
        if sums[3] is not None:
            c = c + sums[3]
        if sums[4] is not None:
            backprop(sums[4], start, end)
    return value, q_log_q, p_log_p, c, s_token, t_token


def tiled_divergence(
    hidden: Tensor,
    head: LinearHead,
    teacher_tile: Callable[[int, int], Tensor],
    targets: Tensor,
    *,
    loss_type: str,
    beta: float,
    skew_alpha: float = 0.1,
    temperature: float,
    vocab_size: int,
    tile: int,
    grad_scale: float | None = None,
    grad_w: Tensor | None = None,
    grad_b: Tensor | None = None,
) -> TiledTerms:
    """
    Per-token divergence of one chunk, walking the vocabulary in tiles (see the module docstring).

    Args:
        hidden: `(n, H)` the student's final hidden states, any floating dtype (cast to the head's for its matmuls).
        head: The student's [`~trl_onpolicy.heads.LinearHead`].
        teacher_tile: `(start, end)` -> `(n, end - start)` float32 (or float64) teacher logits divided by the
            temperature, a fresh tensor (it is overwritten).
        targets: `(n,)` the sampled tokens.
        loss_type: One of `TILED_LOSS_TYPES`; `"jsd"` at `beta` 0 or 1 is the forward or reverse KL, a skew KL at
            `skew_alpha` 0 the plain one.
        vocab_size: Columns compared (`[0, vocab_size)`).
        tile: Vocabulary columns per tile.
        grad_scale: d(loss) / d(per-token divergence), the same for every token; None: values only.
        grad_w, grad_b: Accumulators of the head's weight `(V_w, H)` and bias `(V_w,)` gradients, float32 for a
            low-precision head (None: not wanted).

    Returns:
        [`TiledTerms`], float32 (float64 for a float64 head); `grad_hidden` `(n, H)` in the same dtype when
        `grad_scale` is given.
    """
    loss_type, w = _canonical(loss_type, beta, skew_alpha)
    walk = _TileWalk(hidden, head, teacher_tile, temperature, vocab_size, tile)  # pass 1
    backprop = None
    if grad_scale is not None:  # alpha: dz -> d(loss)/d(h W^T + b)
        backprop = _Backprop(walk, grad_scale * walk.k * head.multiplier * grad_weight(loss_type, w), grad_w, grad_b)
    value, q_log_q, p_log_p, c, s_token, t_token = _sums_pass(walk, targets, loss_type, w, backprop)  # pass 2
    if backprop is not None and loss_type != "forward_kl":
        for start, end in walk.tiles:  # pass 3: the gradient, now that c is known
            backprop(tile_logit_grad(*walk.log_probs(start, end), loss_type, w, c), start, end)
    grad_hidden = None if backprop is None else backprop.grad_hidden  # (n, H)
    return TiledTerms(value, -q_log_q, -p_log_p, s_token, t_token, grad_hidden)
