"""The distillation loss over completion tokens, computed in chunks of tokens.

The student's final hidden states at the `N` completion positions are projected to the vocabulary `chunk_size`
tokens at a time, and each chunk's gradient (with respect to its hidden states and the output head's parameters) is
taken as soon as its loss is known, inside the forward pass ([`_ChunkwiseBackward`]). A chunk's `(n, V)` graph is gone
before the next chunk starts, and nothing is projected twice: the peak memory of the loss grows with `chunk_size`, not
with the number of completion tokens, what waits for the backward pass is `(N, H)` plus one gradient per head
parameter, and the `(B, C, V)` logits of the student and the teacher never exist (a head given without its parameters
falls back to activation checkpointing per chunk).

Normalisation: the per-token losses are summed and divided by `num_items`, the number of completion tokens of the
whole optimizer step on all processes, then multiplied by the number of processes (DDP averages gradients). So
gradient accumulation and multi-process runs give the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from . import divergences as D
from .teachers.base import TeacherScores


def logit_multiplier(config) -> float:
    """
    The factor an architecture applies to its head's output before any softcapping, under the name it uses:
    `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier` (Falcon-H1), or `logits_scaling` (a divisor for
    Granite and MiniCPM3, a multiplier for HyperCLOVA X). 1.0 when the config has none (or sets it to None).
    """
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """
    Logits from final hidden states through the model's output head, with the config's logit multiplier (see
    [`logit_multiplier`]) and `final_logit_softcapping` where the architecture has them.

    Args:
        model: A causal LM (`get_output_embeddings()` must return its head).
        hidden: `(n, H)` final hidden states.

    Returns:
        `(n, V)` logits in the head's dtype.
    """
    logits = model.get_output_embeddings()(hidden)  # (n, V)
    config = model.config.get_text_config()
    scale = logit_multiplier(config)
    if scale != 1.0:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class LossSums:
    """Sums over the local completion tokens (detached, for logging) and the differentiable loss."""

    loss: torch.Tensor
    divergence: float = 0.0
    student_entropy: float = 0.0
    teacher_entropy: float = 0.0
    teacher_entropy_tokens: int = 0
    tokens: int = 0
    student_token_logps: torch.Tensor | None = None  # (N,) detached, for completion logs
    teacher_token_logps: torch.Tensor | None = None  # (N,) detached; NaN where the teacher gave no distribution
    teacher_divergence: torch.Tensor | None = None  # (T,) divergence weighted by each teacher's share (several)
    teacher_tokens: torch.Tensor | None = None  # (T,) tokens counted by each teacher's share (several teachers)
    hidden_distance: float = 0.0  # sum over tokens of the hidden-state distance (hidden-state matching)


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
    vocab_size: int,
) -> tuple[torch.Tensor, ...]:
    """Per-token loss `(n,)` (differentiable); student and teacher entropy and sampled-token log-probs `(n,)`."""
    temperature = teacher.temperature
    s_logps = torch.log_softmax(student_head(student_hidden).float()[:, :vocab_size] / temperature, -1)  # (n, V)
    with torch.no_grad():
        s_entropy = D.entropy(s_logps.detach())  # (n,)
        if teacher.form == "full":
            t_logps = torch.log_softmax(teacher.logits(start, end) / temperature, -1)  # (n, V)
        elif teacher.form == "topk":
            t_logps = D.append_tail(teacher.topk_logps[start:end])  # (n, K + 1)
        else:
            t_logps = None
        t_entropy = D.entropy(t_logps) if t_logps is not None else torch.full_like(s_entropy, float("nan"))  # (n,)
        if teacher.token_logps is not None:
            t_token = teacher.token_logps[start:end]  # (n,)
        elif teacher.form == "full":
            t_token = t_logps.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
        else:
            t_token = torch.full_like(s_entropy, float("nan"))  # (n,)
    s_token = s_logps.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    if loss_type == "sampled_reverse_kl":
        ref = None if ref_token_logps is None else ref_token_logps[start:end]
        old = None if behaviour_logps is None else behaviour_logps[start:end]
        per_token = D.sampled_reverse_kl(s_token, t_token, reward_scale, ref, old)  # (n,)
    else:
        if teacher.form == "topk":
            s_logps = D.topk_buckets(s_logps, teacher.topk_ids[start:end])  # (n, K + 1)
        per_token = D.divergence(s_logps, t_logps, loss_type, beta=beta, skew_alpha=skew_alpha)  # (n,)
    return per_token, s_entropy, t_entropy, s_token.detach(), t_token


class _ChunkwiseBackward(torch.autograd.Function):
    """
    The loss over all chunks, with each chunk's gradient taken as soon as its loss is known.

    Forward runs `chunk_loss(hidden_chunk, start, end)` chunk by chunk with autograd on, and immediately takes the
    gradient of that chunk's (already normalised) loss with respect to the chunk's hidden states and the head's
    parameters; the chunk's `(n, V)` graph is freed before the next chunk starts. Backward only scales the stored
    gradients by the incoming one. So nothing vocabulary-wide outlives a chunk, and nothing is recomputed (activation
    checkpointing would project every chunk to the vocabulary twice). What is kept: `(N, H)` for the hidden states and
    one gradient per head parameter.
    """

    @staticmethod
    def forward(ctx, hidden, chunk_loss, bounds, *params):
        grad_hidden = torch.zeros_like(hidden)  # (N, H)
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in bounds:
            with torch.enable_grad():
                chunk = hidden[start:end].detach().requires_grad_()  # (n, H)
                value = chunk_loss(chunk, start, end)  # () float32
                grads = torch.autograd.grad(value, [chunk, *params], allow_unused=True)
            grad_hidden[start:end] = grads[0]
            for acc, g in zip(grad_params, grads[1:]):
                if g is not None:
                    acc.add_(g)
            total += value.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = ctx.saved_tensors
        return (grad_hidden * grad_output, None, None, *(g * grad_output for g in grad_params))


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
    vocab_size: int,
    num_items: float,
    scale: float = 1.0,
    chunk_size: int = 1024,
    head_params: list[torch.Tensor] | None = None,
) -> LossSums:
    """
    Sum of per-token divergences over the completion tokens, normalised by the global token count.

    Args:
        student_hidden: `(N, H)` student final hidden states predicting the `N` completion tokens.
        student_head: Maps `(n, H)` -> `(n, V_s)` logits (see [`output_logits`]).
        teacher: Flattened [`TeacherScores`] `(N, ...)` at the loss temperature.
        targets: `(N,)` the completion tokens.
        loss_type: A divergence of [`~trl_onpolicy.divergences`] or `"sampled_reverse_kl"`.
        ref_token_logps, behaviour_logps: `(N,)` reference-model log-probs and, on reused rollouts, the log-probs of
            the student that sampled the tokens (its importance weight); `"sampled_reverse_kl"` only.
        vocab_size: Logit columns compared (the tokenizer's real vocabulary when embeddings are padded).
        num_items: Divisor: completion tokens of the optimizer step, all processes (times 1/processes for DDP).
        scale: Multiplier of the loss (`T**2` gradient scaling).
        chunk_size: Tokens projected to the vocabulary at once.
        head_params: The parameters `student_head` uses that need gradients (those of `student_head` itself when it
            is an `nn.Module`). With them, each chunk's gradient is taken right after its loss (see
            [`_ChunkwiseBackward`]); without them, chunks run under activation checkpointing.
    """
    n_tokens = student_hidden.shape[0]
    divisor = max(float(num_items), 1e-8)
    stats = {"div": 0.0, "s_ent": 0.0, "t_ent": 0.0, "t_n": 0, "s_tok": [], "t_tok": []}
    shares = teacher.teacher_weights  # (N, T) or None
    per_teacher_div = None if shares is None else torch.zeros(shares.shape[-1], dtype=torch.float64)  # (T,)

    recorded = set()  # chunks whose statistics are in; a checkpoint's recomputation must not add them twice

    def chunk_loss(hidden, start, end):
        per_token, s_ent, t_ent, s_tok, t_tok = _chunk_terms(
            hidden, start, end, student_head, teacher, targets[start:end], loss_type, beta, skew_alpha, reward_scale,
            ref_token_logps, behaviour_logps, vocab_size,
        )  # fmt: skip
        if start in recorded:
            return per_token.sum() * scale / divisor
        recorded.add(start)
        stats["s_tok"].append(s_tok)
        stats["t_tok"].append(t_tok)
        stats["div"] += per_token.detach().sum().item()
        stats["s_ent"] += s_ent.sum().item()
        finite = ~torch.isnan(t_ent)
        stats["t_ent"] += t_ent[finite].sum().item()
        stats["t_n"] += int(finite.sum().item())
        if shares is not None:
            per_teacher_div.add_((shares[start:end] * per_token.detach()[:, None]).sum(0).double().cpu())  # (T,)
        return per_token.sum() * scale / divisor

    if head_params is None and isinstance(student_head, torch.nn.Module):
        head_params = [p for p in student_head.parameters() if p.requires_grad]
    bounds = [(start, min(start + chunk_size, n_tokens)) for start in range(0, n_tokens, chunk_size)]
    if torch.is_grad_enabled() and head_params is not None and (student_hidden.requires_grad or head_params):
        loss = _ChunkwiseBackward.apply(student_hidden, chunk_loss, bounds, *head_params)
    else:
        use_checkpoint = n_tokens > chunk_size and torch.is_grad_enabled()
        loss = student_hidden.new_zeros((), dtype=torch.float32)
        for start, end in bounds:
            hidden = student_hidden[start:end]
            if use_checkpoint:
                loss = loss + checkpoint(chunk_loss, hidden, start, end, use_reentrant=False)
            else:
                loss = loss + chunk_loss(hidden, start, end)
    sums = LossSums(loss, stats["div"], stats["s_ent"], stats["t_ent"], stats["t_n"], n_tokens,
                    torch.cat(stats["s_tok"]), torch.cat(stats["t_tok"]))  # fmt: skip
    if shares is not None:
        sums.teacher_divergence, sums.teacher_tokens = per_teacher_div, shares.sum(0).double().cpu()
    return sums
