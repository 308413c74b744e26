"""The loss over aligned spans (`span_loss.py`): chunks hold whole spans. (Its values against the definitions are
tested with the teacher that produces the spans, in `tests/teachers/test_cross_tokenizer.py`.)"""

import torch

from trl_onpolicy.span_loss import span_bounds


def test_chunks_hold_whole_spans():
    length = torch.tensor([2, 0, 1, 3, 0, 0, 1, 0, 0, 0])  # spans at 0, 2, 3, 6 (the tail 7-9: a partial character)
    assert span_bounds(length, 1) == [(0, 2), (2, 3), (3, 6), (6, 10)]
    assert span_bounds(length, 4) == [(0, 6), (6, 10)]
    assert span_bounds(length, 100) == [(0, 10)]
