"""The loss over aligned spans (`span_loss.py`): chunks hold whole spans. (Its values against the definitions are
tested with the teacher that produces the spans, in `tests/teachers/test_cross_tokenizer.py`.)"""

import torch

from trl_onpolicy.span_loss import span_bounds


def test_chunks_hold_whole_spans():
    length = torch.tensor([2, 0, 1, 3, 0, 0, 1, 0, 0, 0])  # spans at 0, 2, 3, 6 (the tail 7-9: a partial character)
    assert span_bounds(length, 1) == [(0, 2), (2, 3), (3, 6), (6, 10)]
    assert span_bounds(length, 4) == [(0, 6), (6, 10)]
    assert span_bounds(length, 100) == [(0, 10)]


def test_gold_weights_add_the_completions_cross_entropy():
    """`uld_distillation_weight * span loss + uld_crossentropy_weight * NLL of every token written` (GOLD), the NLL
    from its definition; with the distillation weight 0 the gradient is plain SFT's on the tokens written."""
    import torch

    from trl_onpolicy.span_loss import SpanLoss

    torch.manual_seed(0)
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)  # (n, V_s)
    targets = torch.tensor([3, 1, 4, 1, 5])
    span_length = torch.tensor([2, 0, 1, 2, 0])
    topk_ids = torch.randint(0, 9, (5, 4))
    topk_logps = torch.log_softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    args = (targets, topk_ids, topk_logps, span_length)
    nll = torch.stack([-torch.log_softmax(logits[i], -1)[t] for i, t in enumerate(targets.tolist())])  # (n,)
    plain = SpanLoss().per_token(torch.log_softmax(logits, -1), *args)
    weighted = SpanLoss(crossentropy_weight=0.3, distillation_weight=0.5).per_token(torch.log_softmax(logits, -1), *args)
    torch.testing.assert_close(weighted, 0.5 * plain + 0.3 * nll)
    ce_only = SpanLoss(crossentropy_weight=1.0, distillation_weight=0.0).per_token(torch.log_softmax(logits, -1), *args)
    (grad,) = torch.autograd.grad(ce_only.sum(), logits)
    (reference,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), logits)
    torch.testing.assert_close(grad, reference)
