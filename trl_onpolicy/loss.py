"""The distillation loss over completion tokens, computed in chunks of tokens.

The student's final hidden states at the `N` completion positions are projected to the vocabulary `chunk_size`
tokens at a time, and each chunk's gradient (with respect to its hidden states and the output head's parameters) is
taken as soon as its loss is known, inside the forward pass ([`_ChunkwiseBackward`]). What a chunk built is gone
before the next chunk starts, and the backward pass recomputes nothing: the peak memory of the loss grows with
`chunk_size`, not with the number of completion tokens, what waits for the backward pass is `(N, H)` plus one
gradient per head parameter, and the `(B, C, V)` logits of the student and the teacher never exist (a head given
without its parameters falls back to activation checkpointing per chunk).

Two ways to compute a chunk: the KLs, skewed KLs and the JSD against a full teacher distribution, with a plain
linear student head ([`~trl_onpolicy.heads.linear_head`]), walk the vocabulary in tiles of `vocab_tile` columns and write the gradient in
closed form ([`~trl_onpolicy.fused_divergence.tiled_divergence`]: nothing wider than one `(n, tile)` tile); everything
else projects the chunk to the whole vocabulary and differentiates [`~trl_onpolicy.divergences`] with autograd.

Normalisation: the per-token losses are summed and divided by `num_items`, the number of completion tokens of the
whole optimizer step on all processes, then multiplied by the number of processes (DDP averages gradients). So
gradient accumulation and multi-process runs give the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from . import divergences as D
from . import precision
from .fused_divergence import TILED_LOSS_TYPES, tiled_divergence
from .heads import CHUNK_SIZE, LinearHead
from .span_loss import SpanLoss, span_bounds

if TYPE_CHECKING:  # annotations only
    from .teachers.base import TeacherScores


TILED_CHUNK_SIZE = 4096  # default tokens per chunk where the vocabulary is walked in tiles
# Default elements (chunk tokens x tile columns) of one vocabulary tile: on CPU, float32 tiles that stay in cache (at
# N = 512, V = 152k, tiles of 0.25-0.5 M elements ran 1.3-2x faster than 1-4 M); GPUs want large matmuls.
CPU_TILE_ELEMENTS, GPU_TILE_ELEMENTS = 2**19, 2**24


def default_vocab_tile(chunk_tokens: int, device: torch.device | str) -> int:
    """Vocabulary columns per tile: the device's tile elements over the chunk's tokens, a multiple of 256."""
    budget = CPU_TILE_ELEMENTS if torch.device(device).type == "cpu" else GPU_TILE_ELEMENTS
    return max(256, budget // max(chunk_tokens, 1) // 256 * 256)


@dataclass
class LossSums:
    """The differentiable loss, and sums over the local completion tokens for logging: detached 0-dim tensors on the
    loss's device, read once per optimizer step (no host sync per chunk)."""

    loss: torch.Tensor
    divergence: torch.Tensor | float = 0.0
    student_entropy: torch.Tensor | float = 0.0
    teacher_entropy: torch.Tensor | float = 0.0
    teacher_entropy_tokens: torch.Tensor | float = 0.0
    tokens: int = 0
    student_token_logps: torch.Tensor | None = None  # (N,) detached, for completion logs
    teacher_token_logps: torch.Tensor | None = None  # (N,) detached; NaN where the teacher gave no distribution
    teacher_divergence: torch.Tensor | None = None  # (T,) divergence weighted by each teacher's share (several)
    teacher_tokens: torch.Tensor | None = None  # (T,) tokens counted by each teacher's share (several teachers)
    hidden_distance: torch.Tensor | float = 0.0  # sum over tokens of the hidden-state distance (hidden-state matching)


def _chunk_terms(
    student_hidden: torch.Tensor,
    start: int,
    end: int,
    student_head,
    teacher: TeacherScores,
    targets: torch.Tensor,
    loss_type: str,
    beta: float,
    skew_alpha: float,
    reward_scale: float,
    ref_token_logps: torch.Tensor | None,
    behaviour_logps: torch.Tensor | None,
    sampler_logps: torch.Tensor | None,
    clip_max: float | None,
    vocab_size: int,
    advantages: torch.Tensor | None = None,
    span_loss: SpanLoss | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-token loss `(n,)` (differentiable: the divergence, plus the task-reward term when `advantages` are given;
    against a teacher of another tokenizer, `span_loss`'s per span); the per-token divergence, student and teacher
    entropy and sampled-token log-probs `(n,)`, detached."""
    temperature = teacher.temperature
    s_logps = torch.log_softmax(student_head(student_hidden).float()[:, :vocab_size] / temperature, -1)  # (n, V)
    with torch.no_grad():
        s_entropy = D.entropy(s_logps.detach())  # (n,)
        if teacher.form == "full":
            t_logps = torch.log_softmax(teacher.logits(start, end) / temperature, -1)  # (n, V)
        elif teacher.form == "topk":
            t_logps = D.append_tail(teacher.topk_logps[start:end])  # (n, K + 1)
        else:  # sampled tokens only, or spans of another tokenizer: no distribution per student token
            t_logps = None
        t_entropy = D.entropy(t_logps) if t_logps is not None else torch.full_like(s_entropy, float("nan"))  # (n,)
        if teacher.token_logps is not None:
            t_token = teacher.token_logps[start:end]  # (n,)
        elif teacher.form == "full":
            t_token = t_logps.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
        else:
            t_token = torch.full_like(s_entropy, float("nan"))  # (n,)
    s_token = s_logps.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    old = None if behaviour_logps is None else behaviour_logps[start:end]
    mu = None if sampler_logps is None else sampler_logps[start:end]
    if teacher.form == "spans":
        per_token = (span_loss or SpanLoss()).per_token(s_logps, targets, teacher.topk_ids[start:end],
                                                        teacher.topk_logps[start:end], teacher.span_length[start:end],
                                                        teacher.token_logps[start:end])  # fmt: skip
    elif loss_type == "sampled_reverse_kl":
        ref = None if ref_token_logps is None else ref_token_logps[start:end]
        per_token = D.sampled_reverse_kl(s_token, t_token, reward_scale, ref, old, mu, clip_max)  # (n,)
    else:
        if teacher.form == "topk":
            s_logps = D.topk_buckets(s_logps, teacher.topk_ids[start:end])  # (n, K + 1)
        per_token = D.divergence(s_logps, t_logps, loss_type, beta=beta, skew_alpha=skew_alpha)  # (n,)
    divergence = per_token.detach()  # (n,)
    if advantages is not None:  # the task reward's policy-gradient term (see docs/divergences.md)
        per_token = per_token + D.policy_gradient(s_token, advantages[start:end], old, mu, clip_max)  # (n,)
    return per_token, divergence, s_entropy, t_entropy, s_token.detach(), t_token


class _ChunkwiseBackward(torch.autograd.Function):
    """
    The loss over all chunks, with each chunk's gradient taken as soon as its loss is known.

    Forward runs `step(hidden_chunk, start, end, grad_params)` chunk by chunk: it returns the chunk's (already
    normalised) loss and its gradient with respect to the chunk's hidden states, and adds its gradient with respect to
    the head's parameters into `grad_params`; whatever vocabulary-wide it built is freed before the next chunk starts
    ([`_autograd_step`] takes the gradient with autograd, the tiled loss writes it in closed form). Backward only
    scales the stored gradients by the incoming one. So nothing vocabulary-wide outlives a chunk, and nothing is
    recomputed in the backward pass (activation checkpointing would project every chunk to the vocabulary twice).
    What is kept: `(N, H)` for the hidden states and one gradient per head parameter, both accumulated in float32
    ([`~trl_onpolicy.precision.sum_dtype`]) and cast to the input's and the parameter's dtype in the backward pass.
    """

    @staticmethod
    def forward(ctx, hidden, step, bounds, *params):
        grad_hidden = torch.zeros_like(hidden, dtype=precision.sum_dtype(hidden.dtype))  # (N, H)
        grad_params = [torch.zeros_like(p, dtype=precision.sum_dtype(p.dtype)) for p in params]
        ctx.dtypes = (hidden.dtype, *(p.dtype for p in params))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in bounds:
            value, grad_chunk = step(hidden[start:end], start, end, grad_params)
            grad_hidden[start:end] = grad_chunk
            total += value
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = [(g * grad_output).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (grads[0], None, None, *grads[1:])


def _autograd_step(chunk_loss, params):
    """A step of [`_ChunkwiseBackward`] that differentiates `chunk_loss(hidden_chunk, start, end)` with autograd."""

    def step(hidden, start, end, grad_params):
        with torch.enable_grad():
            chunk = hidden.detach().requires_grad_()  # (n, H)
            value = chunk_loss(chunk, start, end)  # () float32
            grads = torch.autograd.grad(value, [chunk, *params], allow_unused=True)
        for acc, g in zip(grad_params, grads[1:]):
            if g is not None:
                acc.add_(g)
        return value.detach(), grads[0]

    return step


def _walks_in_tiles(teacher: TeacherScores) -> bool:
    """One teacher whose head is a `LinearHead`: its logits are projected one vocabulary tile at a time (a mixture of
    several teachers, or a head given as a function, is projected to the whole vocabulary once per chunk)."""
    return teacher.members is None and isinstance(teacher.head, LinearHead)


def _teacher_tiles(teacher: TeacherScores, start: int, end: int, vocab_size: int):
    """`(t0, t1)` -> `(n, t1 - t0)` float32 teacher logits / T of positions `start:end`: a matmul per tile for a
    [`~trl_onpolicy.heads.LinearHead`], else slices of the `(n, V)` logits the teacher's head computes once for the chunk."""
    width = teacher.vocab_size or (teacher.head.weight.shape[0] if _walks_in_tiles(teacher) else None)
    if width is not None and width != vocab_size:
        raise ValueError(f"The teacher compares {width} logit columns and the student {vocab_size}.")
    k = 1.0 / teacher.temperature
    if _walks_in_tiles(teacher):
        hidden = teacher.hidden[start:end]  # (n, H_t)
        return lambda t0, t1: teacher.head.tile(hidden, t0, t1, k)
    logits = teacher.logits(start, end)  # (n, V)
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"The teacher's head gives {logits.shape[-1]} logit columns and the student {vocab_size}.")
    return lambda t0, t1: logits[:, t0:t1] * k


class _Statistics:
    """The detached per-chunk statistics of [`LossSums`], summed on the device (no host sync), each chunk counted once
    (a checkpoint's recomputation in the backward pass must not add a chunk twice)."""

    def __init__(self, shares: torch.Tensor | None):
        self.shares = shares  # (N, T) each teacher's share of each token, or None
        self.per_teacher = None  # (T,)
        self.sums = {"div": 0.0, "s_ent": 0.0, "t_ent": 0.0, "t_n": 0.0}  # 0-dim tensors once a chunk is recorded
        self.s_tok, self.t_tok, self.seen = [], [], set()

    def record(self, start, per_token, s_ent, t_ent, s_tok, t_tok):
        """Per-token divergence, entropies and sampled-token log-probs `(n,)` of the chunk starting at `start`."""
        if start in self.seen:
            return
        self.seen.add(start)
        self.s_tok.append(s_tok)
        self.t_tok.append(t_tok)
        finite = ~torch.isnan(t_ent)  # (n,) NaN: the teacher gave no distribution (sampled-token form)
        per_token = per_token.detach()
        t_ent = torch.where(finite, t_ent, 0.0)  # (n,)
        values = {"div": per_token.sum(), "s_ent": s_ent.sum(), "t_ent": t_ent.sum(), "t_n": finite.sum()}
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value
        if self.shares is not None:
            shares = self.shares[start : start + per_token.shape[0]]  # (n, T)
            part = (shares * per_token[:, None]).sum(0).double()  # (T,)
            self.per_teacher = part if self.per_teacher is None else self.per_teacher + part

    def result(self, loss: torch.Tensor, n_tokens: int) -> LossSums:
        s = self.sums
        sums = LossSums(loss, s["div"], s["s_ent"], s["t_ent"], s["t_n"], n_tokens, torch.cat(self.s_tok),
                        torch.cat(self.t_tok))  # fmt: skip
        if self.shares is not None:
            sums.teacher_divergence, sums.teacher_tokens = self.per_teacher, self.shares.sum(0).double()
        return sums


@dataclass
class _ChunkLoss:
    """The settings of one [`distillation_loss`] call and the loss of a chunk of tokens `start:end`: projected to the
    whole vocabulary and differentiated with autograd ([`autograd_chunk`]), or walked in vocabulary tiles with a
    closed-form gradient ([`tiled_chunk`])."""

    hidden: torch.Tensor  # (N, H)
    head: Any  # a LinearHead (an nn.Linear is made one), an nn.Module or a function
    teacher: TeacherScores
    targets: torch.Tensor  # (N,)
    loss_type: str
    beta: float
    skew_alpha: float
    reward_scale: float
    ref_token_logps: torch.Tensor | None  # (N,)
    behaviour_logps: torch.Tensor | None  # (N,)
    sampler_logps: torch.Tensor | None  # (N,)
    clip_max: float | None
    vocab_size: int
    advantages: torch.Tensor | None  # (N,) the task reward's advantage of each token's completion, times its weight
    num_items: float
    scale: float
    chunk_size: int | None
    params: list[torch.Tensor] | None  # the head's parameters that need gradients
    vocab_tile: int | None
    span_loss: SpanLoss | None = None  # ULD / hybrid ULD against a teacher of another tokenizer

    def __post_init__(self):
        if type(self.head) is torch.nn.Linear:
            self.head = LinearHead(self.head.weight, self.head.bias)
        self.tiled = (self.vocab_tile != 0 and isinstance(self.head, LinearHead) and self.teacher.form == "full"
                      and self.loss_type in TILED_LOSS_TYPES and self.advantages is None)  # fmt: skip
        n_tokens = self.hidden.shape[0]
        walks = self.tiled and _walks_in_tiles(self.teacher)
        self.chunk_size = self.chunk_size or (TILED_CHUNK_SIZE if walks else CHUNK_SIZE)
        self.vocab_tile = self.vocab_tile or default_vocab_tile(min(self.chunk_size, n_tokens), self.hidden.device)
        self.divisor = max(float(self.num_items), 1e-8)
        self.stats = _Statistics(self.teacher.teacher_weights)
        if self.params is None and isinstance(self.head, (torch.nn.Module, LinearHead)):
            self.params = [p for p in self.head.parameters() if p.requires_grad]
        size = self.chunk_size
        self.bounds = [(start, min(start + size, n_tokens)) for start in range(0, n_tokens, size)]
        if self.teacher.form == "spans":  # a chunk holds whole spans
            self.bounds = span_bounds(self.teacher.span_length, size)

    def chunkwise_backward(self) -> bool:
        """A gradient is wanted and the head's parameters are known: each chunk's gradient is taken in the forward pass
        ([`_ChunkwiseBackward`]); else the chunks' losses are summed ([`summed`])."""
        return torch.is_grad_enabled() and self.params is not None and bool(self.hidden.requires_grad or self.params)

    def autograd_chunk(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """The chunk's normalised loss `()` float32, differentiable, from the whole-vocabulary divergence."""
        per_token, divergence, *terms = _chunk_terms(
            hidden, start, end, self.head, self.teacher, self.targets[start:end], self.loss_type, self.beta,
            self.skew_alpha, self.reward_scale, self.ref_token_logps, self.behaviour_logps, self.sampler_logps,
            self.clip_max, self.vocab_size, self.advantages, self.span_loss,
        )  # fmt: skip
        self.stats.record(start, divergence, *terms)
        return per_token.sum() * self.scale / self.divisor

    def tiled_chunk(self, hidden: torch.Tensor, start: int, end: int, grad_params=None):
        """`autograd_chunk` tile by tile: `()` loss and `(n, H)` float32 `grad_hidden`; the gradient of the head's
        parameters too (into `grad_params`) when `grad_params` is given, else values only (`grad_hidden` None)."""
        grads = dict(zip(map(id, self.params), grad_params)) if grad_params is not None else {}
        head, teacher, bias = self.head, self.teacher, self.head.bias
        terms = tiled_divergence(
            hidden, head, _teacher_tiles(teacher, start, end, self.vocab_size), self.targets[start:end],
            loss_type=self.loss_type, beta=self.beta, skew_alpha=self.skew_alpha, temperature=teacher.temperature,
            vocab_size=self.vocab_size, tile=self.vocab_tile,
            grad_scale=None if grad_params is None else self.scale / self.divisor, grad_w=grads.get(id(head.weight)),
            grad_b=None if bias is None else grads.get(id(bias)),
        )  # fmt: skip
        t_token = terms.teacher_token_logps if teacher.token_logps is None else teacher.token_logps[start:end]
        self.stats.record(start, terms.per_token, terms.student_entropy, terms.teacher_entropy,
                          terms.student_token_logps, t_token)  # fmt: skip
        return terms.per_token.sum() * self.scale / self.divisor, terms.grad_hidden  # (), (n, H) float32

    def summed(self) -> torch.Tensor:
        """The loss `()` float32 summed chunk by chunk: tiled values only (no gradient wanted), or autograd chunks,
        under activation checkpointing when a gradient is wanted over more than one chunk."""
        use_checkpoint = self.hidden.shape[0] > self.chunk_size and torch.is_grad_enabled() and not self.tiled
        loss = self.hidden.new_zeros((), dtype=torch.float32)
        for start, end in self.bounds:
            hidden = self.hidden[start:end]  # (n, H)
            if self.tiled:  # no gradient wanted: values only
                with torch.no_grad():
                    loss = loss + self.tiled_chunk(hidden, start, end)[0]
            elif use_checkpoint:
                loss = loss + checkpoint(self.autograd_chunk, hidden, start, end, use_reentrant=False)
            else:
                loss = loss + self.autograd_chunk(hidden, start, end)
        return loss


def distillation_loss(
    student_hidden: torch.Tensor,
    student_head,
    teacher: TeacherScores,
    targets: torch.Tensor,
    *,
    loss_type: str,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    reward_scale: float = 1.0,
    ref_token_logps: torch.Tensor | None = None,
    behaviour_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    importance_sampling_clip_max: float | None = None,
    advantages: torch.Tensor | None = None,
    vocab_size: int,
    num_items: float,
    scale: float = 1.0,
    chunk_size: int | None = None,
    head_params: list[torch.Tensor] | None = None,
    vocab_tile: int | None = None,
    span_loss: SpanLoss | None = None,
) -> LossSums:
    """
    Sum of per-token divergences over the completion tokens, normalised by the global token count.

    A chunk is walked in vocabulary tiles with a closed-form gradient where it can be, else projected to the whole
    vocabulary and differentiated with autograd (see the module docstring).

    Args:
        student_hidden: `(N, H)` student final hidden states predicting the `N` completion tokens.
        student_head: Maps `(n, H)` -> `(n, V_s)` logits: a `LinearHead` (a plain `nn.Linear` is taken as one), an
            `nn.Module` or a function (see [`~trl_onpolicy.heads.output_logits`]).
        teacher: Flattened [`TeacherScores`] `(N, ...)` at the loss temperature.
        targets: `(N,)` the completion tokens.
        loss_type: A divergence of [`~trl_onpolicy.divergences`] or `"sampled_reverse_kl"`.
        ref_token_logps, behaviour_logps: `(N,)` reference-model log-probs and, on reused rollouts, the log-probs of
            the student that sampled the tokens (its importance weight); `"sampled_reverse_kl"` only.
        sampler_logps, importance_sampling_clip_max: `(N,)` the log-probs the engine that drew the tokens (vLLM)
            gave them, and the cap of their truncated importance weight (see
            [`~trl_onpolicy.divergences.sampled_reverse_kl`]); `"sampled_reverse_kl"` only.
        advantages: `(N,)` the task reward's group-normalised advantage of each token's completion, times
            `reward_weight`: adds the policy-gradient term `-A * q / stopgrad(q_old)` per token (see
            [`~trl_onpolicy.divergences.policy_gradient`]); the chunk is then projected to the whole vocabulary
            (no tiles). None: no task reward.
        vocab_size: Logit columns compared (the tokenizer's real vocabulary when embeddings are padded).
        num_items: Divisor: completion tokens of the optimizer step, all processes (times 1/processes for DDP).
        scale: Multiplier of the loss (`T**2` gradient scaling).
        chunk_size: Tokens per chunk; None: `TILED_CHUNK_SIZE` (4096) for the tiled loss with a `LinearHead` teacher,
            else `CHUNK_SIZE` (1024): a teacher with any other head is projected to the whole vocabulary per chunk.
        head_params: The parameters `student_head` uses that need gradients (those of `student_head` itself when it
            is an `nn.Module` or a `LinearHead`). With them, each chunk's gradient is taken right after its loss (see
            [`_ChunkwiseBackward`]); without them, chunks run under activation checkpointing.
        vocab_tile: Vocabulary columns per tile of the tiled loss; 0 turns it off; None: [`default_vocab_tile`].
        span_loss: With a teacher of another tokenizer (spans form): ULD or hybrid ULD ([`~trl_onpolicy.span_loss`]);
            None: plain ULD.
    """
    chunks = _ChunkLoss(student_hidden, student_head, teacher, targets, loss_type, beta, skew_alpha, reward_scale,
                        ref_token_logps, behaviour_logps, sampler_logps, importance_sampling_clip_max, vocab_size,
                        advantages, num_items, scale, chunk_size, head_params, vocab_tile, span_loss)  # fmt: skip
    if chunks.chunkwise_backward():
        step = chunks.tiled_chunk if chunks.tiled else _autograd_step(chunks.autograd_chunk, chunks.params)
        loss = _ChunkwiseBackward.apply(student_hidden, step, chunks.bounds, *chunks.params)
    else:
        loss = chunks.summed()
    return chunks.stats.result(loss, student_hidden.shape[0])
