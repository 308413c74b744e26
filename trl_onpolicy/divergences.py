"""
Per-token divergences between a teacher `p` and a student `q`, as pure tensor functions.

Every dense function takes LOG-probabilities `(N, C)` over one shared support (N completion tokens, already
flattened; C the vocabulary, or K+1 top-k buckets from [`topk_buckets`]) that the caller has already
temperature-scaled and normalised (`log_softmax(logits / T)`), and returns one value per token `(N,)`, unreduced:
the caller sums and divides by the global token count. Inputs are upcast, so the work and the result are float32
(float64 stays float64).

- `forward_kl`: KL(p || q) = sum_c p_c (log p_c - log q_c). Mode-covering; the usual word-level KD (Hinton et al.).
- `reverse_kl`: KL(q || p) = sum_c q_c (log q_c - log p_c). Mode-seeking; MiniLLM and on-policy distillation.
- `generalized_jsd` (GKD, Agarwal et al. 2024, arXiv 2306.13649), with TRL's exact convention
  (`GKDTrainer.generalized_jsd_loss`, `trl.kernels.chunked_divergence`):
  m = beta p + (1 - beta) q,  JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m).
  Departure from the paper: the endpoints are the plain KLs, beta = 0 -> KL(p || q), beta = 1 -> KL(q || p),
  whereas the formula itself tends to 0 there (only JSD_beta / beta tends to a KL), so the loss scale jumps at 0 and 1.
- `skew_forward_kl` (DistiLLM SKL, Ko et al. 2024): KL(p || alpha p + (1 - alpha) q); alpha = 0 is `forward_kl`.
- `skew_reverse_kl` (DistiLLM SRKL): KL(q || alpha q + (1 - alpha) p); alpha = 0 is `reverse_kl`.
- `sampled_reverse_kl` (Thinking Machines on-policy distillation; Generalized OPD / ExOPD, arXiv 2602.12125):
  the one-sample estimate of the reverse KL on the token the student sampled, used as a per-token policy gradient.
  Departure: the advantage of token t is its own reward only (discount 0, no sum over future tokens), and on fresh
  rollouts there is no PPO ratio or clip, because the loss is taken on the very samples the current student generated.
  Rollouts reused for later optimizer steps (`num_iterations > 1`) were sampled by an older student: there each token
  is weighted by the per-token importance ratio q / q_old, unclipped (see `sampled_reverse_kl`). Rollouts sampled by
  vLLM (a separate, often bf16, copy of the student with its own kernels) carry vLLM's log-probs mu of the sampled
  tokens, and each token is weighted by the truncated importance-sampling (TIS) weight min(q_old / mu, C) of
  `truncated_importance_weights`, as TRL's GRPO does with `vllm_importance_sampling_correction`.
- The full-distribution divergences take no such weight: see `truncated_importance_weights`.

Numerics. Terms follow 0 log 0 = 0 through `torch.where` on sanitised inputs, so a log-prob of -inf (masked
vocabulary, an empty tail bucket) gives no NaN in values or gradients. Where a distribution with mass is compared
against one with none (the teacher masked a token the student still likes), the exact divergence is +inf; here the
log-prob being divided by is floored at `LOG_FLOOR = log(float32 tiny) ~= -87.3`, which gives a large finite
penalty instead. This floor is also a departure from the papers, and it only changes values that involve
probabilities below 1.2e-38.
"""

import math

import torch
from torch import Tensor


LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # ~ -87.34: floor for a log-prob that is divided by
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_c a_c (log a_c - log b_c) over the last dim: `(N, C)`, `(N, C)` -> `(N,)`, with 0 log 0 = 0."""
    support = log_a > -math.inf  # (N, C) entries where a has mass
    # Sanitise first: where() alone would still backpropagate 0 * inf = NaN through the unused branch
    log_a = torch.where(support, log_a, 0.0)  # (N, C)
    log_b = log_b.clamp(min=LOG_FLOOR)  # (N, C) a > 0 against b = 0 costs a large finite penalty, not inf
    terms = torch.where(support, log_a.exp() * (log_a - log_b), 0.0)  # (N, C)
    return terms.sum(-1)  # (N,)


def _log_mix(log_x: Tensor, log_y: Tensor, weight: float) -> Tensor:
    """log(weight * x + (1 - weight) * y) for 0 < weight < 1: `(N, C)`, `(N, C)` -> `(N, C)`."""
    # Flooring keeps logaddexp(-inf, -inf) out, whose backward is NaN; it adds at most 1.2e-38 to the mixture
    log_x = log_x.clamp(min=LOG_FLOOR) + math.log(weight)  # (N, C)
    log_y = log_y.clamp(min=LOG_FLOOR) + math.log1p(-weight)  # (N, C)
    return torch.logaddexp(log_x, log_y)  # (N, C)


def forward_kl(student_logps: Tensor, teacher_logps: Tensor) -> Tensor:
    """
    Forward KL(p || q) = sum_c p_c (log p_c - log q_c) per token.

    Args:
        student_logps: Student log-probabilities `log q`, shape `(N, C)`.
        teacher_logps: Teacher log-probabilities `log p`, shape `(N, C)`.

    Returns:
        Per-token divergence, shape `(N,)`, float32.
    """
    return _kl(_upcast(teacher_logps), _upcast(student_logps))


def reverse_kl(student_logps: Tensor, teacher_logps: Tensor) -> Tensor:
    """
    Reverse KL(q || p) = sum_c q_c (log q_c - log p_c) per token.

    Args:
        student_logps: Student log-probabilities `log q`, shape `(N, C)`.
        teacher_logps: Teacher log-probabilities `log p`, shape `(N, C)`.

    Returns:
        Per-token divergence, shape `(N,)`, float32.
    """
    return _kl(_upcast(student_logps), _upcast(teacher_logps))


def generalized_jsd(student_logps: Tensor, teacher_logps: Tensor, beta: float) -> Tensor:
    """
    Generalized Jensen-Shannon divergence with TRL's convention: m = beta p + (1 - beta) q and
    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m); beta = 0 gives KL(p || q), beta = 1 gives KL(q || p).

    Args:
        student_logps: Student log-probabilities `log q`, shape `(N, C)`.
        teacher_logps: Teacher log-probabilities `log p`, shape `(N, C)`.
        beta: Interpolation coefficient in `[0, 1]`.

    Returns:
        Per-token divergence, shape `(N,)`, float32.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logps, teacher_logps)
    if beta == 1.0:
        return reverse_kl(student_logps, teacher_logps)
    log_q, log_p = _upcast(student_logps), _upcast(teacher_logps)  # (N, C) each
    log_m = _log_mix(log_p, log_q, beta)  # (N, C)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)  # (N,)


def skew_forward_kl(student_logps: Tensor, teacher_logps: Tensor, alpha: float) -> Tensor:
    """
    DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q); alpha = 0 is [`forward_kl`].

    Args:
        student_logps: Student log-probabilities `log q`, shape `(N, C)`.
        teacher_logps: Teacher log-probabilities `log p`, shape `(N, C)`.
        alpha: Skew coefficient in `[0, 1)` (DistiLLM uses 0.1).

    Returns:
        Per-token divergence, shape `(N,)`, float32.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return forward_kl(student_logps, teacher_logps)
    log_q, log_p = _upcast(student_logps), _upcast(teacher_logps)  # (N, C) each
    return _kl(log_p, _log_mix(log_p, log_q, alpha))  # (N,)


def skew_reverse_kl(student_logps: Tensor, teacher_logps: Tensor, alpha: float) -> Tensor:
    """
    DistiLLM skew reverse KL: KL(q || alpha q + (1 - alpha) p); alpha = 0 is [`reverse_kl`].

    Args:
        student_logps: Student log-probabilities `log q`, shape `(N, C)`.
        teacher_logps: Teacher log-probabilities `log p`, shape `(N, C)`.
        alpha: Skew coefficient in `[0, 1)` (DistiLLM uses 0.1).

    Returns:
        Per-token divergence, shape `(N,)`, float32.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return reverse_kl(student_logps, teacher_logps)
    log_q, log_p = _upcast(student_logps), _upcast(teacher_logps)  # (N, C) each
    return _kl(log_q, _log_mix(log_q, log_p, alpha))  # (N,)


def divergence(
    student_logps: Tensor, teacher_logps: Tensor, loss_type: str, beta: float = 0.5, skew_alpha: float = 0.1
) -> Tensor:
    """
    Dispatch to one divergence by name.

    Args:
        student_logps: Student log-probabilities, shape `(N, C)`.
        teacher_logps: Teacher log-probabilities, shape `(N, C)`.
        loss_type: One of `"forward_kl"`, `"reverse_kl"`, `"jsd"`, `"skew_forward_kl"`, `"skew_reverse_kl"`.
        beta: JSD interpolation coefficient (only for `"jsd"`).
        skew_alpha: Skew coefficient (only for the skew KLs).

    Returns:
        Per-token divergence, shape `(N,)`, float32.
    """
    if loss_type == "forward_kl":
        return forward_kl(student_logps, teacher_logps)
    elif loss_type == "reverse_kl":
        return reverse_kl(student_logps, teacher_logps)
    elif loss_type == "jsd":
        return generalized_jsd(student_logps, teacher_logps, beta)
    elif loss_type == "skew_forward_kl":
        return skew_forward_kl(student_logps, teacher_logps, skew_alpha)
    elif loss_type == "skew_reverse_kl":
        return skew_reverse_kl(student_logps, teacher_logps, skew_alpha)
    raise ValueError(f"Unknown loss_type {loss_type!r}; valid values are {', '.join(LOSS_TYPES)}")


def append_tail(topk_logps: Tensor) -> Tensor:
    """
    Add one bucket holding the mass outside the top-k: log(1 - sum_k exp(topk_logps)).

    Computed as log(-expm1(s)) when s = logsumexp > -log 2 and log1p(-exp(s)) otherwise (both accurate where they
    are used); a tail below float32 `tiny`, or mass >= 1 through rounding, gives -inf, never NaN.

    Args:
        topk_logps: Log-probabilities of the K retained tokens, shape `(N, K)`.

    Returns:
        Log-probabilities over K+1 buckets (the K tokens then the tail), shape `(N, K+1)`, float32.
    """
    topk_logps = _upcast(topk_logps)
    log_mass = torch.logsumexp(topk_logps, dim=-1, keepdim=True)  # (N, 1)
    with torch.no_grad():
        empty = -torch.expm1(log_mass) < torch.finfo(torch.float32).tiny  # (N, 1) no mass left for the tail
    safe = torch.where(empty, -1.0, log_mass)  # (N, 1) keeps the log of 0 out of both branches' backward
    near_one = safe > -math.log(2.0)  # (N, 1)
    tail = torch.where(near_one, torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))  # (N, 1)
    tail = torch.where(empty, -math.inf, tail)  # (N, 1)
    return torch.cat([topk_logps, tail], dim=-1)  # (N, K+1)


def topk_buckets(logps: Tensor, topk_ids: Tensor) -> Tensor:
    """
    Collapse a full distribution onto someone else's top-k support: the K given tokens plus one tail bucket.

    This is how the student's full distribution is compared with a teacher that only returned its top-k + tail.

    Args:
        logps: Full log-probabilities, shape `(N, V)`.
        topk_ids: Token ids to keep, long, shape `(N, K)`.

    Returns:
        Log-probabilities over K+1 buckets, shape `(N, K+1)`, float32.
    """
    return append_tail(_upcast(logps).gather(-1, topk_ids))  # (N, K+1)


def sampled_reverse_kl(
    student_token_logps: Tensor,
    teacher_token_logps: Tensor,
    reward_scale: float = 1.0,
    ref_token_logps: Tensor | None = None,
    behaviour_token_logps: Tensor | None = None,
    sampler_token_logps: Tensor | None = None,
    clip_max: float | None = None,
) -> Tensor:
    """
    Per-token policy-gradient loss of (generalized) on-policy distillation on the sampled tokens.

    Objective: J = E_{y ~ q}[lambda log(p / ref) - log(q / ref)], maximised token by token with the detached advantage
    A_t = lambda (log p_t - log ref_t) - (log q_t - log ref_t). Without a reference, ref is the student itself
    (detached), so A_t = lambda (log p_t - log q_t), and lambda = 1 is standard on-policy distillation. The returned
    loss_t = -A_t * exp(log q_t - stopgrad(log q_t)) has value -A_t (the sampled-token reverse KL log q_t - log p_t
    when lambda = 1 and ref = None) and gradient -A_t with respect to log q_t.

    Reused rollouts (`num_iterations > 1`): the tokens were sampled by an older student q_old, whose log-probs of them
    (`behaviour_token_logps`, stored when the tokens were first trained on) replace stopgrad(log q_t) in the ratio:
    loss_t = -A_t * rho_t with rho_t = exp(log q_t - log q_old_t), of value -rho_t A_t and gradient
    -rho_t A_t grad log q_t. Since E_{y ~ q_old}[rho f(y)] = E_{y ~ q}[f(y)], this is the importance-sampled estimate of
    the same gradient. At the first use q_old = q and rho_t = 1 exactly.

    Args:
        student_token_logps: Student log-prob of each sampled token, shape `(N,)`; gradients flow through it.
        teacher_token_logps: Teacher log-prob of the same tokens, shape `(N,)`; detached.
        reward_scale: lambda, the weight of the teacher reward (ExOPD uses lambda > 1 to extrapolate).
        ref_token_logps: Optional reference-model log-probs, shape `(N,)`; detached.
        behaviour_token_logps: Optional log-probs of the student that sampled the tokens (q_old), shape `(N,)`;
            detached. `None`: the tokens are the current student's own samples (ratio 1).
        sampler_token_logps: Optional log-probs mu that the engine which actually drew the tokens (vLLM) gave them,
            shape `(N,)`; NaN where it gave none. Each token is then also weighted by the truncated importance weight
            w_t = min(q_old_t / mu_t, clip_max) of [`truncated_importance_weights`] (q_old = the current student on
            fresh rollouts), so the loss is -A_t * (q_t / q_old_t) * w_t: without the cap, the ratio q_t / mu_t
            from the real sampler to the current student. Only the sampler mismatch is truncated; the reuse ratio
            stays unclipped, as above (TRL's GRPO composes its PPO ratio and its TIS weight the same way).
        clip_max: The cap C of the truncated weight (`None`: no cap).

    Returns:
        Per-token loss, shape `(N,)`, float32.
    """
    log_q = _upcast(student_token_logps).clamp(min=LOG_FLOOR)  # (N,)
    log_p = _upcast(teacher_token_logps).detach().clamp(min=LOG_FLOOR)  # (N,)
    log_q_now = log_q.detach()  # (N,)
    log_ref = log_q_now if ref_token_logps is None else _upcast(ref_token_logps).detach().clamp(min=LOG_FLOOR)  # (N,)
    # The advantage is taken at the current student even on reused rollouts: its reward contains log q itself, so it is
    # the current objective's; only the distribution the tokens were drawn from is old, and the ratio corrects for that.
    advantage = reward_scale * (log_p - log_ref) - (log_q_now - log_ref)  # (N,)
    return policy_gradient(log_q, advantage, behaviour_token_logps, sampler_token_logps, clip_max)


def policy_gradient(
    student_token_logps: Tensor,
    advantages: Tensor,
    behaviour_token_logps: Tensor | None = None,
    sampler_token_logps: Tensor | None = None,
    clip_max: float | None = None,
) -> Tensor:
    """
    Per-token REINFORCE loss `-A_t * rho_t * w_t` on the sampled tokens, of value `-A_t rho_t w_t` and gradient
    `-A_t rho_t w_t grad log q_t` (rho_t = q_t / q_old_t: 1 on fresh rollouts, the reuse ratio on a reused batch; w_t:
    the sampler's truncated importance weight, 1 without one): see [`sampled_reverse_kl`], whose advantage this is
    given, and the task-reward term beside a full-distribution divergence (`reward_funcs`).

    Args:
        student_token_logps: `(N,)` the student's log-probs of the sampled tokens; gradients flow through them.
        advantages: `(N,)` detached.
        behaviour_token_logps, sampler_token_logps, clip_max: As for [`sampled_reverse_kl`].
    """
    log_q = _upcast(student_token_logps).clamp(min=LOG_FLOOR)  # (N,)
    log_q_now = log_q.detach()  # (N,)
    advantage = _upcast(advantages).detach()  # (N,)
    # PPO's form of the ratio, exp(log q - log q_old) with the gradient through log q, has the same value and gradient
    # as stopgrad(rho) * exp(log q - stopgrad(log q)), the detached ratio times the on-policy estimator. It is per token
    # (it corrects the choice of y_t given its prefix, not the prefix's own probability, as in PPO and GRPO), and
    # unclipped: PPO's clip keeps a surrogate objective within a trust region, whereas this is meant to be the unbiased
    # gradient of the reverse KL. rho stays near 1 while the student moves little between uses (few reuse steps, small
    # learning rates); where it does not, fewer `num_iterations` is the remedy, as a clip would trade the drift for bias.
    log_q_old = log_q_now if behaviour_token_logps is None else _upcast(behaviour_token_logps).clamp(min=LOG_FLOOR)
    loss = -advantage * torch.exp(log_q - log_q_old.detach())  # (N,)
    if sampler_token_logps is None:
        return loss
    return loss * truncated_importance_weights(log_q_old, sampler_token_logps, clip_max)  # (N,)


def truncated_importance_weights(
    target_token_logps: Tensor, sampler_token_logps: Tensor, clip_max: float | None
) -> Tensor:
    """
    Truncated importance sampling (TIS; Yao et al. 2025, TRL's GRPO `vllm_importance_sampling_mode="token_truncate"`):
    the per-token weight w_t = min(pi_t / mu_t, C), detached, that re-weights tokens drawn by a sampler mu (vLLM)
    toward the policy pi the loss assumes drew them (the student). The cap trades the ratio's unbounded variance for a
    small bias; ratios below 1 are kept as they are. A token the sampler gave no log-prob for (NaN) gets weight 1.

    Why only the sampled-token loss takes it. `sampled_reverse_kl` is a policy gradient: the sampled token y_t is the
    estimator itself (its advantage log q(y_t) - log p(y_t) is a one-sample estimate of KL(q || p) only when y_t ~ q),
    so a token drawn from mu != q biases every term, and the per-token ratio removes that (up to the cap). The
    full-distribution divergences (KLs, JSD, skews, top-k) do not depend on y_t at position t: they compare the two
    whole distributions at the state y_{<t}, exactly. The sampler only chose which states are visited; correcting that
    needs the ratio of the whole prefix, prod_{s<t} q(y_s) / mu(y_s), whose variance grows exponentially with length,
    while a per-token weight of y_t would only add noise (its expectation under mu, given the prefix, is 1). The state
    distribution is also not what the minimiser depends on (q = p at every state visited), which is why GKD trains
    on teacher- or dataset-written sequences uncorrected. So those losses are left unweighted, as with reused
    rollouts.

    Args:
        target_token_logps: log pi of each sampled token, shape `(N,)`; detached here.
        sampler_token_logps: log mu of the same tokens, shape `(N,)`; NaN where unknown.
        clip_max: The cap C (`None`: no cap).

    Returns:
        Per-token weights, shape `(N,)`, float32, detached.
    """
    log_ratio = _upcast(target_token_logps).detach() - _upcast(sampler_token_logps).detach()  # (N,)
    ratio = torch.exp(torch.nan_to_num(log_ratio, nan=0.0, posinf=math.inf, neginf=-math.inf))  # (N,) NaN -> 1
    return ratio if clip_max is None else ratio.clamp(max=clip_max)  # (N,)


def entropy(logps: Tensor) -> Tensor:
    """
    Entropy -sum_c q_c log q_c per token, with 0 log 0 = 0.

    Args:
        logps: Log-probabilities, shape `(N, C)`.

    Returns:
        Per-token entropy, shape `(N,)`, float32.
    """
    logps = _upcast(logps)
    support = logps > -math.inf  # (N, C)
    safe = torch.where(support, logps, 0.0)  # (N, C)
    return -torch.where(support, safe.exp() * safe, 0.0).sum(-1)  # (N,)
