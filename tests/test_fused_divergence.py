"""The tiled loss (vocabulary tiles, closed-form logit gradient) against the definitions and the whole-vocabulary loss.

- float64: loss, statistics and gradients (hidden states, head weight and bias) equal autograd of the divergences
  written from their definitions, for the forward / reverse KL and the JSD at beta 0, 0.5, 0.9, 1, at T = 1 and 2,
  with a logit multiplier, a bias, padded head rows, several chunks and a tile width that does not divide V;
- the same for the skewed KLs (alpha 0, 0.1, 0.6);
- float32: the same against the whole-vocabulary path (`vocab_tile=0`, autograd of `divergences.py`), also with
  teacher logits of -inf (no mass where the student has some), without gradients, with a frozen head;
- memory: no `(N, V)` float32 tensor, the tile sets the peak;
- the trainer: one step's loss and grad norm equal the whole-vocabulary path's (untied and tied heads).
"""

import math

import pytest
import torch

import tiny_models as tm
from test_loss import PeakLiveBytes
from trl_onpolicy import loss as loss_module
from trl_onpolicy.fused_divergence import tiled_divergence
from trl_onpolicy.heads import LinearHead
from trl_onpolicy.loss import distillation_loss
from trl_onpolicy.teachers.base import TeacherScores


N, H, H_T, V, PAD = 40, 12, 20, 1000, 24  # the student's head has V + PAD rows (padded embeddings)
TILE, CHUNK = 96, 7  # 96 does not divide 1000; 7 does not divide 40
NUM_ITEMS = 50.0  # the step's token count (other micro-batches), not this batch's
# (loss_type, beta or skew alpha)
CASES = [
    ("jsd", 0.0), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0), ("forward_kl", 0.5), ("reverse_kl", 0.5),
    ("skew_forward_kl", 0.1), ("skew_forward_kl", 0.0), ("skew_reverse_kl", 0.1), ("skew_reverse_kl", 0.6),
]  # fmt: skip


def problem(dtype=torch.float64, seed=0, masked=False):
    """A student `LinearHead` (bias, multiplier 1.5, V + PAD rows), hidden states, targets and teacher scores. With
    `masked`, the teacher's head is a function whose logits are -inf on a third of the vocabulary, one whole tile, and
    the first tokens' targets (the student still gives them mass)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(V + PAD, H, generator=g, dtype=dtype) / 2).requires_grad_()  # (V + PAD, H)
    bias = torch.randn(V + PAD, generator=g, dtype=dtype).requires_grad_()  # (V + PAD,)
    head = LinearHead(weight, bias, multiplier=1.5)
    hidden = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)  # (N, H)
    targets = torch.randint(0, V, (N,), generator=g)  # (N,)
    t_weight = torch.randn(V, H_T, generator=g, dtype=dtype)  # (V, H_t)
    t_hidden = torch.randn(N, H_T, generator=g, dtype=dtype)  # (N, H_t)
    if not masked:
        return head, hidden, targets, TeacherScores(1.0, hidden=t_hidden, head=LinearHead(t_weight))
    mask = torch.rand(N, V, generator=g) < 1 / 3  # (N, V)
    mask[:, TILE : 2 * TILE] = True
    mask[torch.arange(5), targets[:5]] = True
    t_hidden = torch.cat([t_hidden, torch.arange(N, dtype=dtype)[:, None]], -1)  # (N, H_t + 1): the row index

    def t_head(h):
        logits = h[:, :-1] @ t_weight.T  # (n, V)
        return logits.masked_fill(mask[h[:, -1].long()], -math.inf)

    return head, hidden, targets, TeacherScores(1.0, hidden=t_hidden, head=t_head)


def naive(log_q, log_p, loss_type, beta):
    """Per-token divergence `(N,)` straight from the definition (log p finite here); `beta` is the skew alpha of the
    skewed KLs."""
    q, p = log_q.exp(), log_p.exp()

    def kl(a, log_a, log_b):
        return (a * (log_a - log_b)).sum(-1)

    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0.0):
        return kl(p, log_p, log_q)
    if loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1.0):
        return kl(q, log_q, log_p)
    if loss_type == "skew_forward_kl":  # KL(p || alpha p + (1 - alpha) q)
        return kl(p, log_p, (beta * p + (1 - beta) * q).log())
    if loss_type == "skew_reverse_kl":  # KL(q || alpha q + (1 - alpha) p)
        return kl(q, log_q, (beta * q + (1 - beta) * p).log())
    log_m = (beta * p + (1 - beta) * q).log()
    return beta * kl(p, log_p, log_m) + (1 - beta) * kl(q, log_q, log_m)


def run(head, hidden, targets, teacher, loss_type, beta, temperature, **kwargs):
    """The loss, then its gradients w.r.t. the hidden states, the head's weight and bias."""
    teacher.temperature = temperature
    sums = distillation_loss(hidden, head, teacher, targets, loss_type=loss_type, beta=beta, skew_alpha=beta,
                             vocab_size=V, num_items=NUM_ITEMS, scale=temperature**2, chunk_size=CHUNK,
                             **kwargs)  # fmt: skip
    if sums.loss.requires_grad:
        sums.loss.backward()
    grads = [t.grad for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    return sums, grads


# ------------------------------------------------------------------------------------------ against definitions
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss_type, beta", CASES)
def test_tiled_equals_definition_float64(loss_type, beta, temperature):
    head, hidden, targets, teacher = problem()
    sums, grads = run(head, hidden, targets, teacher, loss_type, beta, temperature, vocab_tile=TILE)

    z_s = 1.5 * (hidden @ head.weight[:V].T + head.bias[:V]) / temperature  # (N, V)
    log_q = torch.log_softmax(z_s, -1)  # (N, V)
    log_p = torch.log_softmax(teacher.hidden @ teacher.head.weight.T / temperature, -1)  # (N, V)
    per_token = naive(log_q, log_p, loss_type, beta)  # (N,)
    loss = per_token.sum() * temperature**2 / NUM_ITEMS
    expected = torch.autograd.grad(loss, [hidden, head.weight, head.bias])

    assert sums.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert float(sums.divergence) == pytest.approx(per_token.sum().item(), rel=1e-9)
    assert float(sums.student_entropy) == pytest.approx(-(log_q.exp() * log_q).sum().item(), rel=1e-9)
    assert float(sums.teacher_entropy) == pytest.approx(-(log_p.exp() * log_p).sum().item(), rel=1e-9)
    torch.testing.assert_close(sums.student_token_logps, log_q.detach().gather(1, targets[:, None]).squeeze(1))
    torch.testing.assert_close(sums.teacher_token_logps, log_p.gather(1, targets[:, None]).squeeze(1))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert grads[1][V:].abs().sum() == 0  # padded rows take no part
    assert per_token.min() > 1e-3  # far from zero: the relative checks mean something


# ------------------------------------------------------------------------------------------ against autograd
def to_float32(head, hidden, targets, teacher):
    """The same problem in float32 (a teacher head that is a function keeps its float64 logits, which the loss
    rounds to float32 in every path)."""
    head = LinearHead(*(t.detach().float().requires_grad_() for t in (head.weight, head.bias)), head.multiplier)
    if isinstance(teacher.head, LinearHead):
        teacher = TeacherScores(1.0, hidden=teacher.hidden.float(), head=LinearHead(teacher.head.weight.float()))
    return head, hidden.detach().float().requires_grad_(), targets, teacher


def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss_type, beta", CASES)
def test_tiled_equals_whole_vocabulary_float32(loss_type, beta, temperature, masked):
    """Values as the whole-vocabulary path's; gradients about as close to float64 as the whole-vocabulary path's."""
    problem64 = problem(masked=masked)
    _, exact_grads = run(*problem64, loss_type, beta, temperature, vocab_tile=TILE)
    problem32 = to_float32(*problem64)
    whole, whole_grads = run(*problem32, loss_type, beta, temperature, vocab_tile=0)
    tiled, tiled_grads = run(*problem32, loss_type, beta, temperature, vocab_tile=TILE)
    assert math.isfinite(tiled.loss.item()) and tiled.loss.dtype == torch.float32
    torch.testing.assert_close(tiled.loss, whole.loss, rtol=1e-6, atol=0)
    for name in ("divergence", "student_entropy", "teacher_entropy"):
        assert float(getattr(tiled, name)) == pytest.approx(float(getattr(whole, name)), rel=1e-6), name
    torch.testing.assert_close(tiled.student_token_logps, whole.student_token_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled.teacher_token_logps, whole.teacher_token_logps, rtol=1e-5, atol=1e-5)
    if masked:  # targets the teacher masked, a student that still likes them: a large finite penalty, no NaN
        assert tiled.teacher_token_logps[:5].eq(-math.inf).all()
    for got, whole_grad, want in zip(tiled_grads, whole_grads, exact_grads):
        assert torch.isfinite(got).all() and got.dtype == torch.float32
        assert relative_error(got, want) < max(3 * relative_error(whole_grad, want), 1e-5)


def test_without_gradients_and_with_a_frozen_head():
    head, hidden, targets, teacher = problem(torch.float32)
    whole, whole_grads = run(head, hidden, targets, teacher, "jsd", 0.5, 1.0, vocab_tile=0)
    with torch.no_grad():
        values, _ = run(head, hidden, targets, teacher, "jsd", 0.5, 1.0, vocab_tile=TILE)
    assert values.loss.grad_fn is None
    torch.testing.assert_close(values.loss, whole.loss, rtol=1e-5, atol=0)
    head.weight.requires_grad_(False)  # a LoRA student's head: gradients for the hidden states only
    _, grads = run(head, hidden, targets, teacher, "jsd", 0.5, 1.0, vocab_tile=TILE)
    assert grads[1] is None
    torch.testing.assert_close(grads[0], whole_grads[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[2], whole_grads[2], rtol=1e-4, atol=1e-7)


def test_the_top_k_and_sampled_token_forms_stay_on_the_whole_vocabulary_path(monkeypatch):
    head, hidden, targets, teacher = problem(torch.float32)
    monkeypatch.setattr(loss_module, "tiled_divergence", None)  # called: a TypeError
    topk_logps, topk_ids = torch.log_softmax(teacher.hidden @ teacher.head.weight.T, -1).topk(5)  # (N, 5) each
    topk = TeacherScores(1.0, topk_ids=topk_ids, topk_logps=topk_logps)
    token = TeacherScores(1.0, token_logps=topk_logps[:, 0])
    for form, loss_type in ((topk, "jsd"), (topk, "reverse_kl"), (token, "sampled_reverse_kl")):
        sums, grads = run(head, hidden, targets, form, loss_type, 0.5, 1.0, vocab_tile=TILE)
        assert math.isfinite(sums.loss.item()) and grads[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------ memory
def test_no_vocabulary_wide_tensor_the_tile_sets_the_peak():
    n, vocab, hidden_size, width = 256, 32768, 8, 512
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(n, hidden_size, generator=g, requires_grad=True)  # (N, H)
    t_head = LinearHead(torch.randn(vocab, hidden_size, generator=g))
    teacher = TeacherScores(1.0, hidden=torch.randn(n, hidden_size, generator=g), head=t_head)
    targets = torch.randint(0, vocab, (n,), generator=g)  # (N,)

    def peak(**kwargs):
        with PeakLiveBytes() as tracker:
            sums = distillation_loss(hidden, head, teacher, targets, loss_type="jsd", vocab_size=vocab, num_items=n,
                                     **kwargs)  # fmt: skip
            sums.loss.backward()
        return tracker.peak

    one_logits, one_tile = n * vocab * 4, n * width * 4  # one (N, V) and one (N, tile) float32 tensor
    tiled = peak(vocab_tile=width)
    assert tiled < one_logits / 2, (tiled, one_logits)
    assert 4 * one_tile < peak(vocab_tile=2 * width) - tiled < 12 * one_tile  # the tile, not V, sets the peak
    assert peak(vocab_tile=0) > 5 * one_logits  # the whole-vocabulary path holds several (N, V) tensors


# ------------------------------------------------------------------------------------------ models and the trainer
@pytest.mark.parametrize(
    "loss_type, temperature, tied",
    [("jsd", 1.0, False), ("reverse_kl", 2.0, True), ("forward_kl", 2.0, False), ("skew_reverse_kl", 1.0, True)],
)
def test_trainer_step_equals_whole_vocabulary_path(tmp_path, monkeypatch, loss_type, temperature, tied):
    calls = []
    monkeypatch.setattr(loss_module, "tiled_divergence", lambda *a, **k: calls.append(1) or tiled_divergence(*a, **k))
    logs = {}
    for tile in (0, None):
        tok = tm.tokenizer()
        student, teacher = tm.model(tok, seed=0), tm.model(tok, seed=1, layers=2, hidden=32)
        with torch.no_grad():  # a peaked teacher: a divergence of O(1), far above float32 round-off
            teacher.lm_head.weight.mul_(30.0)
        if tied:
            student.lm_head.weight = student.model.embed_tokens.weight
        tr = tm.trainer(
            tmp_path / str(tile), student, teacher, tok, lmbda=0.0, loss_type=loss_type, temperature_start=temperature,
            loss_vocab_tile=tile, per_device_train_batch_size=4,
        )  # fmt: skip
        tr.train()
        logs[tile] = tm.step_logs(tr)[0]
    assert logs[0]["divergence"] > 0.05 and calls  # the default run took the tiled path
    for key in ("loss", "grad_norm", "divergence", "student_entropy", "teacher_entropy"):
        assert logs[None][key] == pytest.approx(logs[0][key], rel=1e-5), key
