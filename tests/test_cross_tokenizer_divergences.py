"""The cross-tokenizer divergences (`cross_tokenizer_divergences.py`) against references written from their definitions
with Python loops in float64: the span measures, ULD (full and top-k), hybrid ULD, their gradients, and the matched
vocabulary of two real tokenizers (the toy's byte-level BPE and a character-level one)."""

import math

import pytest
import torch

from trl_onpolicy.cross_tokenizer_divergences import hybrid_uld, merge_spans, uld
from trl_onpolicy.token_alignment import matched_vocabulary, token_texts
from trl_onpolicy.toy import build_tokenizer, char_tokenizer


def logps(rows, cols, seed, scale=2.0):
    torch.manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(rows, cols, dtype=torch.float64), -1)


def naive_span_measures(lp, ids, spans):
    """Q_k(v) = q_a(v) * prod_{i=a+1}^{b-1} q_i(y_i), probabilities, as lists."""
    out = []
    for a, b in spans:
        rest = 1.0
        for i in range(a + 1, b):
            rest *= math.exp(lp[i][ids[i]])
        out.append([math.exp(x) * rest for x in lp[a]])
    return out


def naive_uld(q, p, top_k=None):
    """sum_r |sort(q)_r - sort(p)_r|, decreasing, zero-padded; only the top_k largest of each side when given."""
    q, p = sorted(q, reverse=True), sorted(p, reverse=True)
    if top_k is not None:
        q, p = q[:top_k], p[:top_k]
    width = max(len(q), len(p))
    q, p = q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))
    return sum(abs(a - b) for a, b in zip(q, p))


def naive_jsd(q, p, beta):
    """beta * sum p log(p/m) + (1 - beta) * sum q log(q/m), m = beta p + (1 - beta) q, 0 log 0 = 0."""
    total = 0.0
    for qi, pi in zip(q, p):
        m = beta * pi + (1 - beta) * qi
        total += beta * (pi * math.log(pi / m) if pi > 0 else 0.0) + (1 - beta) * (qi * math.log(qi / m) if qi > 0 else 0.0)
    return total


SPANS = [[0, 1], [1, 4], [4, 5], [5, 7]]


def test_span_measures_are_the_first_distribution_times_the_rest_as_written():
    lp, ids = logps(7, 11, seed=0), torch.tensor([3, 1, 4, 1, 5, 9, 2])
    got = merge_spans(lp, ids, torch.tensor(SPANS)).exp()
    assert torch.allclose(got, torch.tensor(naive_span_measures(lp.tolist(), ids.tolist(), SPANS), dtype=torch.float64))
    assert torch.allclose(got[0].sum(), torch.tensor(1.0, dtype=torch.float64))  # a one-token span is a distribution


@pytest.mark.parametrize("top_k", [None, 3, 50])
def test_uld_is_the_l1_distance_of_sorted_values_across_vocabulary_sizes(top_k):
    q, p = logps(4, 9, seed=1), logps(4, 13, seed=2)  # the student's vocabulary is the smaller one
    expected = [naive_uld(a, b, top_k) for a, b in zip(q.exp().tolist(), p.exp().tolist())]
    assert torch.allclose(uld(q, p, top_k), torch.tensor(expected, dtype=torch.float64))


def test_uld_is_zero_for_a_permuted_vocabulary_and_positive_otherwise():
    """It compares shapes, not tokens: a teacher that is the student with its ids shuffled costs nothing."""
    q = logps(3, 8, seed=3)
    assert torch.allclose(uld(q, q[:, torch.randperm(8)]), torch.zeros(3, dtype=torch.float64))
    assert (uld(q, logps(3, 8, seed=4)) > 0).all()


def test_hybrid_uld_is_jsd_on_the_matched_columns_and_uld_on_the_rest():
    q, p = logps(4, 9, seed=5), logps(4, 12, seed=6)
    s_ids, t_ids = torch.tensor([0, 2, 5, 8]), torch.tensor([11, 0, 3, 7])
    got = hybrid_uld(q, p, s_ids, t_ids, beta=0.3, matched_weight=0.7, unmatched_weight=0.2)
    for k, (qk, pk) in enumerate(zip(q.exp().tolist(), p.exp().tolist())):
        matched = naive_jsd([qk[i] for i in s_ids.tolist()], [pk[i] for i in t_ids.tolist()], 0.3)
        rest = naive_uld([v for i, v in enumerate(qk) if i not in s_ids.tolist()],
                         [v for i, v in enumerate(pk) if i not in t_ids.tolist()])  # fmt: skip
        assert got[k].item() == pytest.approx(0.7 * matched + 0.2 * rest, rel=1e-12)


def test_hybrid_uld_is_zero_when_the_teacher_is_the_student_relabelled():
    q = logps(3, 6, seed=7)
    perm = torch.tensor([4, 0, 5, 1, 3, 2])  # student id i is teacher id perm[i]
    p = torch.empty_like(q)
    p[:, perm] = q
    got = hybrid_uld(q, p, torch.arange(3), perm[:3], beta=0.5, matched_weight=0.5, unmatched_weight=0.5)
    assert torch.allclose(got, torch.zeros(3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_hybrid_uld_refuses_the_jsd_endpoints(beta):
    q = logps(1, 4, seed=8)
    with pytest.raises(ValueError, match=r"^hybrid_uld needs 0 < beta < 1 \(its JSD compares sub-probability "
                                         rf"measures\), got {beta}$"):  # fmt: skip
        hybrid_uld(q, q, torch.tensor([0]), torch.tensor([0]), beta, 0.5, 0.5)


def test_gradients_flow_through_the_spans_the_sort_and_the_matched_columns():
    ids, spans = torch.tensor([1, 0, 2, 3, 1]), torch.tensor([[0, 2], [2, 3], [3, 5]])
    teacher = merge_spans(logps(5, 7, seed=9), torch.tensor([2, 2, 0, 1, 4]), spans).detach()

    def loss(logits):
        student = merge_spans(torch.log_softmax(logits, -1), ids, spans)
        return uld(student, teacher).sum() + hybrid_uld(student, teacher, torch.tensor([0, 3]), torch.tensor([1, 2]),
                                                        0.5, 0.6, 0.4).sum()  # fmt: skip

    torch.manual_seed(10)
    assert torch.autograd.gradcheck(loss, (torch.randn(5, 5, dtype=torch.float64, requires_grad=True),))


def test_the_matched_vocabulary_pairs_the_same_strings_once_each():
    bpe, chars = build_tokenizer(), char_tokenizer()
    s_ids, t_ids = matched_vocabulary(bpe, chars)
    s_texts, t_texts = token_texts(bpe), token_texts(chars)
    pairs = dict(zip(s_ids, t_ids))
    assert pairs[bpe.eos_token_id] == chars.eos_token_id
    assert all(s_texts[s] == t_texts[t] for s, t in pairs.items() if s != bpe.eos_token_id)
    assert len(set(t_ids)) == len(t_ids) and s_ids == sorted(s_ids)
    # every character of the character-level vocabulary that the BPE has as a token of its own is matched
    singles = {t for t in t_texts if t is not None and len(t) == 1}
    assert {t_texts[t] for t in t_ids if t_texts[t] in singles} == {c for c in singles if c in s_texts}
    assert None not in (s_texts[s] for s in s_ids if s != bpe.eos_token_id)  # no byte of a character is matched
    assert token_texts(bpe)[bpe(" 12", add_special_tokens=False)["input_ids"][0]] == " 12"  # the space is kept
