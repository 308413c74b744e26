"""Memory at scale: the local teacher scores in micro-batches cut to their own lengths and keeps only the mapped hidden
layers (the student's micro-batches, cut the same way, are tested in `test_rollout_buffer.py`)."""

import pytest
import tiny_models as tm
import torch
from test_step_batch import batch

from trl_onpolicy.teachers import LocalTeacher


def spy_widths(model) -> list[tuple[int, int]]:
    """The `(rows, columns)` of every forward pass of `model`'s backbone, and the hidden states each one asked for."""
    seen = []
    model.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((tuple(kwargs["input_ids"].shape), kwargs["output_hidden_states"])),
        with_kwargs=True,
    )
    return seen


@pytest.mark.parametrize("layers", [None, [0, 2]])
def test_micro_batched_trimmed_scores_equal_one_pass(layers):
    tok = tm.tokenizer()
    model = tm.model(tok, layers=3, hidden=16, seed=1)
    inputs = batch(tok)
    whole, whole_layers = LocalTeacher(model).completion_hidden(inputs, layers)
    seen = spy_widths(model)
    grouped, grouped_layers = LocalTeacher(model, micro_batch_size=2).completion_hidden(inputs, layers)
    # three passes: rows (0, 1), (2, 3), (4,), each as wide as its longest prompt + longest completion
    assert [shape for shape, _ in seen] == [(2, 9 + 2), (2, 6 + 7), (1, 1 + 4)]
    assert all(request == (False if layers is None else layers) for _, request in seen)
    mask = inputs["completion_mask"].bool()  # (B, C)
    assert grouped.shape == whole.shape == (5, 7, 16)
    torch.testing.assert_close(grouped[mask], whole[mask], rtol=1e-5, atol=1e-6)
    assert grouped[0, 2:].abs().sum() == 0  # past its group's longest completion: never computed
    if layers is not None:
        assert grouped_layers.shape == whole_layers.shape == (5, 7, 2, 16)
        torch.testing.assert_close(grouped_layers[mask], whole_layers[mask], rtol=1e-5, atol=1e-6)


def test_teacher_scores_one_student_micro_batch_per_forward_pass(tmp_path):
    """In training: batch 2 x 2 accumulation steps, so the step's 4 rollouts are scored in 2 passes of 2 rows."""
    tok = tm.tokenizer()
    teacher = tm.model(tok, seed=1)
    seen = spy_widths(teacher)
    tr = tm.trainer(tmp_path, teacher=teacher, tok=tok, lmbda=0.0, gradient_accumulation_steps=2, max_steps=1)
    assert tr.teacher.micro_batch_size == 2
    tr.train()
    assert [shape[0] for shape, _ in seen] == [2, 2]
