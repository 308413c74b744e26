"""Divergences pinned against naive float64 references written straight from the definitions, and against TRL."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_onpolicy.divergences import (
    LOSS_TYPES,
    append_tail,
    divergence,
    entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sampled_reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    topk_buckets,
    truncated_importance_weights,
)


torch.set_num_threads(1)

N, V = 5, 7
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
ALPHAS = [0.0, 0.1, 0.5]
TEMPERATURES = [0.5, 1.0, 2.0]
# (loss_type, beta, skew_alpha) covering every divergence and parameter value
CASES = (
    [("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.1)]
    + [("jsd", b, 0.1) for b in BETAS]
    + [(t, 0.5, a) for t in ("skew_forward_kl", "skew_reverse_kl") for a in ALPHAS]
)


def make_logps(seed, n=N, v=V, temperature=1.0, scale=3.0):
    """What the caller does: log_softmax(logits / T), in float64."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, v, generator=g, dtype=torch.float64)  # (n, v)
    return F.log_softmax(logits / temperature, dim=-1)  # (n, v)


# ---------------------------------------------------------------------------------------------------------------
# Naive references: Python loops over rows and classes, float64, straight from the definitions


def ref_kl_row(a, b):
    return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)


def ref_divergence_row(q, p, loss_type, beta, alpha):
    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0):
        return ref_kl_row(p, q)
    if loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1):
        return ref_kl_row(q, p)
    if loss_type == "jsd":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * ref_kl_row(p, m) + (1 - beta) * ref_kl_row(q, m)
    if loss_type == "skew_forward_kl":
        return ref_kl_row(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)])
    if loss_type == "skew_reverse_kl":
        return ref_kl_row(q, [alpha * qi + (1 - alpha) * pi for pi, qi in zip(p, q)])
    raise AssertionError(loss_type)


def ref_divergence(student_logps, teacher_logps, loss_type, beta, alpha):
    q_rows, p_rows = student_logps.double().exp().tolist(), teacher_logps.double().exp().tolist()
    rows = [ref_divergence_row(q, p, loss_type, beta, alpha) for q, p in zip(q_rows, p_rows)]
    return torch.tensor(rows, dtype=torch.float64)


def ref_buckets(logps, ids):
    """Probabilities of the listed tokens, then everything else summed into one tail bucket."""
    rows = []
    for row, keep in zip(logps.double().exp().tolist(), ids.tolist()):
        kept = [row[i] for i in keep]
        rows.append(kept + [sum(x for i, x in enumerate(row) if i not in keep)])
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Values against the references


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("loss_type,beta,alpha", CASES)
def test_matches_naive_reference(loss_type, beta, alpha, temperature):
    student = make_logps(0, temperature=temperature).float()
    teacher = make_logps(1, temperature=temperature).float()
    got = divergence(student, teacher, loss_type, beta=beta, skew_alpha=alpha)
    assert got.shape == (N,) and got.dtype == torch.float32
    expected = ref_divergence(student, teacher, loss_type, beta, alpha)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, V - 1])
@pytest.mark.parametrize("loss_type,beta,alpha", CASES)
def test_topk_buckets_match_reference(loss_type, beta, alpha, k):
    student, teacher = make_logps(2).float(), make_logps(3).float()
    topk_logps, ids = teacher.topk(k, dim=-1)  # (N, k) each: what a top-k teacher backend returns
    student_b, teacher_b = topk_buckets(student, ids), append_tail(topk_logps)  # (N, k+1) each
    assert student_b.shape == teacher_b.shape == (N, k + 1)
    torch.testing.assert_close(student_b.double().exp(), ref_buckets(student, ids), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(teacher_b.double().exp(), ref_buckets(teacher, ids), atol=1e-6, rtol=1e-5)
    got = divergence(student_b, teacher_b, loss_type, beta=beta, skew_alpha=alpha)
    expected = ref_divergence(student_b, teacher_b, loss_type, beta, alpha)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
    # Merging tokens can only lose information (data processing inequality), up to float32 rounding of the tail ...
    full = divergence(student, teacher, loss_type, beta=beta, skew_alpha=alpha)
    assert (got <= full * (1 + 1e-5) + 2e-6).all()
    # ... and with K = V-1 the tail is exactly the one remaining token, so nothing is lost. Checked in float64: in
    # float32 a tail of 1e-5 carries ~1% relative error from 1 - sum(top-k), which is the price of a top-k teacher.
    if k == V - 1:
        student64, teacher64 = make_logps(2), make_logps(3)  # (N, V) each, float64
        topk64, ids64 = teacher64.topk(k, dim=-1)  # (N, k) each
        got64 = divergence(topk_buckets(student64, ids64), append_tail(topk64), loss_type, beta=beta, skew_alpha=alpha)
        full64 = divergence(student64, teacher64, loss_type, beta=beta, skew_alpha=alpha)
        torch.testing.assert_close(got64, full64, atol=1e-10, rtol=1e-9)
    elif k == 1:
        assert (got < full - 1e-3).any()


def test_buckets_sum_to_one():
    logps = make_logps(4, n=6, v=50)
    for k in (1, 10, 49):
        buckets = topk_buckets(logps.float(), logps.topk(k, dim=-1).indices)  # (6, k+1)
        torch.testing.assert_close(buckets.exp().sum(-1), torch.ones(6), atol=1e-6, rtol=0)


def test_append_tail_is_accurate_for_a_tiny_tail():
    # 1 - exp(log(1 - 1e-12)) loses ~4 digits when computed as log1p(-exp(.)); expm1 keeps them
    topk = torch.tensor([[math.log1p(-1e-12)], [math.log(0.3)]], dtype=torch.float64)  # (2, 1)
    tail = append_tail(topk)[:, -1]  # (2,)
    expected = torch.tensor([math.log(1e-12), math.log(0.7)], dtype=torch.float64)  # (2,)
    torch.testing.assert_close(tail, expected, rtol=1e-9, atol=0)


def test_append_tail_with_no_mass_left_is_minus_inf():
    topk = torch.log(torch.tensor([[0.5, 0.5], [0.6, 0.6], [0.25, 0.5]])).requires_grad_()  # (3, 2)
    buckets = append_tail(topk)  # (3, 3)
    assert buckets[0, -1] == -math.inf and buckets[1, -1] == -math.inf  # exactly 1, and > 1 through rounding
    torch.testing.assert_close(buckets[2, -1], torch.tensor(math.log(0.25)))
    # The -inf tail flows into every divergence (as teacher and as student) without NaN
    student = topk_buckets(make_logps(5, n=3, v=4).float(), torch.tensor([[0, 1]] * 3))  # (3, 3)
    for loss_type, beta, alpha in CASES:
        for s, t in ((student, buckets), (buckets, student)):
            value = divergence(s, t, loss_type, beta=beta, skew_alpha=alpha)
            (grad,) = torch.autograd.grad(value.sum(), topk, retain_graph=True)
            assert torch.isfinite(value).all() and torch.isfinite(grad).all(), loss_type


# ---------------------------------------------------------------------------------------------------------------
# TRL's own implementation


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_generalized_jsd_matches_trl():
    gkd = pytest.importorskip("trl.experimental.gkd")
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    g = torch.Generator().manual_seed(6)
    student_logits = 3 * torch.randn(2, 3, V, generator=g)  # (B, S, V)
    teacher_logits = 3 * torch.randn(2, 3, V, generator=g)  # (B, S, V)
    for temperature in TEMPERATURES:
        for beta in BETAS:
            trl_jsd = gkd.GKDTrainer.generalized_jsd_loss(
                student_logits, teacher_logits, beta=beta, temperature=temperature, reduction="none"
            ).sum(-1)  # (B, S)
            ours = generalized_jsd(
                F.log_softmax(student_logits / temperature, -1).flatten(0, 1),
                F.log_softmax(teacher_logits / temperature, -1).flatten(0, 1),
                beta,
            )  # (B*S,)
            torch.testing.assert_close(ours, trl_jsd.flatten(), atol=1e-6, rtol=1e-5)

            # The chunked kernel (torch fallback on CPU), identity LM heads: values and gradients agree too
            s_hidden = student_logits.flatten(0, 1).clone().requires_grad_()  # (N, V)
            eye = torch.eye(V)  # (V, V)
            chunked, _ = ChunkedDivergenceFunction.apply(
                s_hidden, eye, None, teacher_logits.flatten(0, 1), eye, None, beta, temperature
            )
            (chunked_grad,) = torch.autograd.grad(chunked.sum(), s_hidden)
            s_hidden = s_hidden.detach().requires_grad_()
            teacher_logps = F.log_softmax(teacher_logits / temperature, -1).flatten(0, 1)  # (N, V)
            ours = generalized_jsd(F.log_softmax(s_hidden / temperature, -1), teacher_logps, beta)  # (N,)
            (our_grad,) = torch.autograd.grad(ours.sum(), s_hidden)
            torch.testing.assert_close(ours, chunked, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(our_grad, chunked_grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Identities and invariants


def test_endpoints_are_the_plain_kls():
    student, teacher = make_logps(7).float(), make_logps(8).float()
    fkl, rkl = forward_kl(student, teacher), reverse_kl(student, teacher)
    assert not torch.allclose(fkl, rkl)
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.0), fkl)
    torch.testing.assert_close(generalized_jsd(student, teacher, 1.0), rkl)
    torch.testing.assert_close(skew_forward_kl(student, teacher, 0.0), fkl)
    torch.testing.assert_close(skew_reverse_kl(student, teacher, 0.0), rkl)
    # Skewing towards the other side shrinks the divergence monotonically, down to 0 at alpha = 1
    for fn, plain in ((skew_forward_kl, fkl), (skew_reverse_kl, rkl)):
        values = torch.stack([plain] + [fn(student, teacher, a) for a in (0.01, 0.1, 0.5, 0.99)])  # (5, N)
        assert (values.diff(dim=0) < 0).all()


@pytest.mark.parametrize("loss_type,beta,alpha", CASES)
def test_identical_distributions_give_zero(loss_type, beta, alpha):
    logps = make_logps(9).float()
    masked = logps.clone()
    masked[:, 0] = -math.inf  # (N, V) a masked vocabulary entry on both sides
    masked = masked.log_softmax(-1)
    for x in (logps, masked):
        torch.testing.assert_close(divergence(x, x, loss_type, beta, alpha), torch.zeros(N), atol=1e-6, rtol=0)


def test_divergence_dispatch_and_unknown_name():
    student, teacher = make_logps(10).float(), make_logps(11).float()
    torch.testing.assert_close(divergence(student, teacher, "jsd", beta=0.3), generalized_jsd(student, teacher, 0.3))
    torch.testing.assert_close(
        divergence(student, teacher, "skew_reverse_kl", skew_alpha=0.2), skew_reverse_kl(student, teacher, 0.2)
    )
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl"):
        divergence(student, teacher, "kl")
    with pytest.raises(ValueError, match="1.5"):
        generalized_jsd(student, teacher, 1.5)
    with pytest.raises(ValueError, match="1.0"):
        skew_forward_kl(student, teacher, 1.0)


def test_bf16_inputs_are_upcast():
    student, teacher = make_logps(12).bfloat16(), make_logps(13).bfloat16()
    for loss_type in LOSS_TYPES:
        got = divergence(student, teacher, loss_type)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, divergence(student.float(), teacher.float(), loss_type), atol=0, rtol=0)
    assert entropy(student).dtype == torch.float32 and append_tail(student[:, :2]).dtype == torch.float32


def test_entropy():
    logps = make_logps(14).float()
    expected = [-sum(x * math.log(x) for x in row) for row in logps.double().exp().tolist()]
    expected = torch.tensor(expected, dtype=torch.float64)  # (N,)
    torch.testing.assert_close(entropy(logps).double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(entropy(torch.full((2, V), -math.log(V))), torch.full((2,), math.log(V)))
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]], requires_grad=True)  # (1, 3)
    value = entropy(one_hot)
    value.sum().backward()
    assert value.item() == 0.0 and torch.isfinite(one_hot.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(
    "fn", [forward_kl, reverse_kl] + [lambda s, t, b=b: generalized_jsd(s, t, b) for b in (0.1, 0.5, 0.9)]
)
def test_gradcheck_wrt_student_logits(fn):
    teacher = make_logps(15, n=3, v=5)  # (3, 5) float64
    logits = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(16)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: fn(F.log_softmax(z / 0.7, -1), teacher), (logits,))


@pytest.mark.parametrize("loss_type,beta,alpha", CASES)
def test_masked_teacher_gives_finite_values_and_gradients(loss_type, beta, alpha):
    student_logits = make_logps(17).float().requires_grad_()  # (N, V)
    teacher_logits = make_logps(18).float()
    teacher_logits[:, -2:] = -math.inf  # (N, V) padded vocabulary the teacher masks
    teacher_logits[0, 1:] = -math.inf  # a one-hot teacher row
    teacher = F.log_softmax(teacher_logits, -1).requires_grad_()  # (N, V) a leaf, to check its gradient too
    value = divergence(F.log_softmax(student_logits, -1), teacher, loss_type, beta, alpha)
    student_grad, teacher_grad = torch.autograd.grad(value.sum(), (student_logits, teacher))
    assert torch.isfinite(value).all() and (value >= -1e-6).all()
    assert torch.isfinite(student_grad).all() and torch.isfinite(teacher_grad).all()
    # The student's mass on masked entries is penalised: the gradient pushes those logits down
    if loss_type in ("reverse_kl", "skew_reverse_kl") or (loss_type == "jsd" and beta > 0):
        assert (student_grad[:, -2:] > 0).all()


def test_sampled_reverse_kl_values_and_gradients():
    g = torch.Generator().manual_seed(19)
    z = torch.randn(6, V, dtype=torch.float64, generator=g).requires_grad_()  # (6, V) student logits
    y = torch.randint(V, (6,), generator=g)  # (6,) sampled tokens
    teacher_lp = make_logps(20, n=6).gather(-1, y[:, None]).squeeze(-1).requires_grad_()  # (6,)
    ref_lp = make_logps(21, n=6).gather(-1, y[:, None]).squeeze(-1)  # (6,)
    student_lp = F.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)  # (6,)
    lq, lp, lr = student_lp.detach(), teacher_lp.detach(), ref_lp
    for scale, ref, advantage in [
        (1.0, None, lp - lq),
        (1.5, None, 1.5 * (lp - lq)),
        (2.0, ref_lp, 2.0 * (lp - lr) - (lq - lr)),
    ]:
        loss = sampled_reverse_kl(student_lp, teacher_lp, reward_scale=scale, ref_token_logps=ref)
        torch.testing.assert_close(loss, -advantage)
        grad_z, grad_teacher = torch.autograd.grad(loss.sum(), (z, teacher_lp), allow_unused=True, retain_graph=True)
        expected = -advantage[:, None] * (F.one_hot(y, V) - F.softmax(z, -1))  # (6, V) by hand
        torch.testing.assert_close(grad_z, expected.detach())
        assert grad_teacher is None  # the teacher is a reward, not a path for gradients
    # Pinned: q = 1/2, p = 1/4 -> log 2; with ref = 1/8 and lambda = 3: A = 3 log 2 - 2 log 2
    half, quarter, eighth = (torch.tensor([math.log(x)]) for x in (0.5, 0.25, 0.125))
    torch.testing.assert_close(sampled_reverse_kl(half, quarter), torch.tensor([math.log(2)]))
    torch.testing.assert_close(sampled_reverse_kl(half, quarter, 3.0, eighth), torch.tensor([-math.log(2)]))
    torch.testing.assert_close(sampled_reverse_kl(half, half), torch.zeros(1))
    # A masked teacher token: large but finite, and a finite gradient
    lq = torch.tensor([math.log(0.5)], requires_grad=True)
    loss = sampled_reverse_kl(lq, torch.tensor([-math.inf]))
    loss.backward()
    assert torch.isfinite(loss).all() and loss.item() > 80 and torch.isfinite(lq.grad).all()


def test_truncated_importance_weights_against_the_definition():
    """w_t = min(pi_t / mu_t, C) token by token, written as a loop over Python floats; NaN mu -> 1; detached."""
    target = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2, -math.inf, -0.1], requires_grad=True)  # (N,) log pi
    sampler = torch.tensor([-1.0, -0.2, -2.5, -3.5, math.nan, -2.0, -math.inf])  # (N,) log mu
    for cap in (3.0, 1.0, None):
        weights = truncated_importance_weights(target, sampler, cap)  # (N,)
        assert not weights.requires_grad  # a weight, not a path for gradients
        expected = []
        for a, b in zip(target.tolist(), sampler.tolist()):
            ratio = 1.0 if math.isnan(b) else math.exp(a - b) if a - b < 700 else math.inf
            expected.append(ratio if cap is None else min(ratio, cap))
        torch.testing.assert_close(weights, torch.tensor(expected))
    # pinned: pi = 1/2, mu = 1/8 -> ratio 4, capped at 3; pi = mu -> 1 exactly
    half, eighth = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.125)])
    torch.testing.assert_close(truncated_importance_weights(half, eighth, 3.0), torch.tensor([3.0]))
    torch.testing.assert_close(truncated_importance_weights(half, eighth, None), torch.tensor([4.0]))
    assert truncated_importance_weights(half, half, 3.0).item() == 1.0


def test_sampled_reverse_kl_with_vllm_log_probs_values_and_gradients():
    """Fresh rollouts: loss_t = -A_t * w_t * exp(log q_t - sg log q_t), w_t = min(q_t / mu_t, C). Reused: the ratio
    q_t / q_old_t times w_t = min(q_old_t / mu_t, C). Value and gradient with respect to the logits by hand."""
    g = torch.Generator().manual_seed(23)
    z = torch.randn(8, V, dtype=torch.float64, generator=g).requires_grad_()  # (8, V) student logits
    y = torch.randint(V, (8,), generator=g)  # (8,) sampled tokens
    lp = make_logps(24, n=8).gather(-1, y[:, None]).squeeze(-1)  # (8,) teacher
    student_lp = F.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)  # (8,)
    lq = student_lp.detach()
    mu = lq + torch.tensor([0.3, -1.5, 0.0, -0.9, 2.0, math.nan, -0.05, -2.5], dtype=torch.float64)  # (8,) vLLM's
    lq_old = lq + 0.2 * torch.randn(8, dtype=torch.float64, generator=g)  # (8,) the student at the first use
    cap = 3.0
    for behaviour, first in [(None, lq), (lq_old, lq_old)]:
        weight = torch.where(torch.isnan(mu), 1.0, torch.exp(first - mu)).clamp(max=cap)  # (8,) TIS, by hand
        ratio = torch.exp(lq - first)  # (8,) 1 on fresh rollouts
        loss = sampled_reverse_kl(student_lp, lp, 1.0, None, behaviour, sampler_token_logps=mu, clip_max=cap)
        torch.testing.assert_close(loss, ratio * weight * (lq - lp))
        (grad_z,) = torch.autograd.grad(loss.sum(), z, retain_graph=True)
        expected = (ratio * weight * (lq - lp))[:, None] * (F.one_hot(y, V) - F.softmax(z, -1))  # (8, V)
        torch.testing.assert_close(grad_z, expected.detach())
        assert (weight == cap).sum() >= 2 and (weight < 1).any()  # some tokens are clipped, some down-weighted
    # no sampler log-probs: bit for bit the plain estimator
    assert torch.equal(sampled_reverse_kl(student_lp, lp, sampler_token_logps=None, clip_max=cap),
                       sampled_reverse_kl(student_lp, lp))  # fmt: skip


def test_importance_weight_formula():
    """The divergence alone: ratio 1 (bit for bit) when the behaviour policy is the current student; otherwise the
    value and gradient of ratio * (log q - log p) with the ratio's gradient, written from the definition."""
    torch.manual_seed(0)
    log_q = torch.log_softmax(torch.randn(7, 5), -1)[:, 0].requires_grad_()  # (N,)
    log_p = torch.log_softmax(torch.randn(7, 5), -1)[:, 0]  # (N,)
    plain = sampled_reverse_kl(log_q, log_p)  # (N,)
    (g_plain,) = torch.autograd.grad(plain.sum(), log_q)
    same = sampled_reverse_kl(log_q, log_p, behaviour_token_logps=log_q.detach())  # (N,)
    (g_same,) = torch.autograd.grad(same.sum(), log_q)
    assert torch.equal(same, plain) and torch.equal(g_same, g_plain)

    log_q_old = log_q.detach() + 0.3 * torch.randn(7)  # (N,) an older student
    loss = sampled_reverse_kl(log_q, log_p, behaviour_token_logps=log_q_old)  # (N,)
    (grad,) = torch.autograd.grad(loss.sum(), log_q)
    ratio = torch.exp(log_q.detach() - log_q_old)  # (N,)
    torch.testing.assert_close(loss.detach(), ratio * (log_q.detach() - log_p))
    torch.testing.assert_close(grad, ratio * (log_q.detach() - log_p))  # d/d log q of ratio * stopgrad(KL term)


# ---------------------------------------------------------------------------------------------------------------
# Property test


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    v=st.integers(2, 12),
    scale=st.floats(0.0, 30.0),
    temperature=st.floats(0.1, 5.0),
    n_masked=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_property_finite_and_nonnegative(n, v, scale, temperature, n_masked, seed):
    g = torch.Generator().manual_seed(seed)
    student = F.log_softmax(scale * torch.randn(n, v, generator=g) / temperature, -1)  # (n, v)
    teacher_logits = scale * torch.randn(n, v, generator=g) / temperature  # (n, v)
    teacher_logits[:, : min(n_masked, v - 1)] = -math.inf
    teacher = F.log_softmax(teacher_logits, -1)  # (n, v)
    k = int(torch.randint(1, v + 1, (1,), generator=g))
    topk_logps, ids = teacher.topk(k, dim=-1)  # (n, k)
    pairs = [(student, teacher), (teacher, student), (topk_buckets(student, ids), append_tail(topk_logps))]
    for s, t in pairs:
        for loss_type in LOSS_TYPES:
            for beta, alpha in ((0.0, 0.0), (0.3, 0.1), (1.0, 0.9)):
                value = divergence(s, t, loss_type, beta=beta, skew_alpha=alpha)
                assert value.shape == (n,) and torch.isfinite(value).all() and (value >= -1e-6).all()
        assert torch.isfinite(entropy(s)).all() and (entropy(s) >= -1e-6).all()
