"""The precision policy (`trl_onpolicy/precision.py`): bf16 and fp16 weights, autocast on and off, every divergence.

Tolerances are stated in bfloat16 units: a bfloat16 value carries 8 significant bits, so one rounding is a relative
error of up to 2**-9 and one unit in the last place (ulp) is 2**-8 of the value.
"""

import math
import re
import tempfile

import pytest
import tiny_models as tm
import torch

from trl_onpolicy import OnPolicyDistillConfig, precision
from trl_onpolicy.heads import LinearHead
from trl_onpolicy.loss import distillation_loss
from trl_onpolicy.teachers.base import TeacherScores

BF16_ULP = 2.0**-8
LOSS_TYPES = ["jsd", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "sampled_reverse_kl"]


# ------------------------------------------------------------------------------------------------ the policy
@pytest.mark.parametrize(
    "weight, autocast, expected",
    [
        (torch.bfloat16, None, torch.bfloat16), (torch.bfloat16, torch.float16, torch.bfloat16),
        (torch.float16, None, torch.float16), (torch.float32, None, torch.float32),
        (torch.float32, torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16, torch.float16),
        (torch.float64, torch.bfloat16, torch.float64), (torch.uint8, None, torch.float32),
        (torch.uint8, torch.bfloat16, torch.bfloat16),
    ],
)  # fmt: skip
def test_matmul_dtype(weight, autocast, expected):
    assert precision.matmul_dtype(weight, autocast) == expected


def test_linear_head_runs_bf16_matmuls_and_returns_float32():
    """Hidden states of any dtype are cast to the head's dtype; the logits are the bf16 matmul's, in float32."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=g).bfloat16()  # (V, H)
    hidden = torch.randn(5, 8, generator=g)  # (n, H) float32, as autocast hands them back
    head = LinearHead(weight)
    assert head.dtype == torch.bfloat16
    logits = head.tile(hidden, 8, 24, 0.5)  # (5, 16)
    assert logits.dtype == torch.float32
    expected = (hidden.bfloat16() @ weight[8:24].t() * 0.5).float()  # (5, 16) the bf16 matmul's own result
    torch.testing.assert_close(logits, expected, rtol=BF16_ULP, atol=0)
    assert head(hidden).shape == (5, 40) and head(hidden).dtype == torch.float32


@pytest.mark.parametrize("vocab_tile", [8, 0], ids=["tiles", "whole-vocabulary"])
def test_head_gradient_accumulates_in_float32_across_chunks(vocab_tile):
    """
    1,024 chunks of one token each add the same -0.875 / 1024 to the head's gradient: summed in float32 the result is
    the exact -0.875 (to one final bf16 rounding); summed in the bf16 parameter's dtype it stalls where the addend
    falls below half a bf16 ulp of the running sum (-0.25 was measured before the accumulators were float32).

    Forward KL with a uniform student (q = 1/8) and a teacher sure of token 0 (p_0 = 1 - 7e-18): the gradient of the
    token-0 row of the head is (q_0 - p_0) * h = -0.875 per token, divided by the token count.
    """
    n, vocab, width = 1024, 8, 4
    weight = torch.nn.Parameter(torch.zeros(vocab, width, dtype=torch.bfloat16))  # (V, H)
    hidden = torch.ones(n, width, dtype=torch.bfloat16, requires_grad=True)  # (N, H)
    teacher_weight = torch.zeros(vocab, width)  # (V, H)
    teacher_weight[0] = 10.0  # logit 40 for token 0, 0 elsewhere
    teacher = TeacherScores(1.0, hidden=torch.ones(n, width), head=LinearHead(teacher_weight))
    sums = distillation_loss(
        hidden, LinearHead(weight), teacher, torch.zeros(n, dtype=torch.long), loss_type="forward_kl",
        vocab_size=vocab, num_items=n, chunk_size=1, vocab_tile=vocab_tile,
    )  # fmt: skip
    sums.loss.backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(weight.grad[0].float(), torch.full((width,), -0.875), rtol=BF16_ULP, atol=0)
    torch.testing.assert_close(weight.grad[1:].float(), torch.full((vocab - 1, width), 0.125), rtol=BF16_ULP, atol=0)


def test_the_loss_makes_no_host_sync_per_chunk(monkeypatch):
    """The statistics of 64 chunks stay on the device: no `.item()` / `.tolist()` inside the loss (one sync per step
    happens later, in the trainer)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 8, generator=g))
    hidden = torch.randn(64, 8, generator=g, requires_grad=True)
    teacher_head = LinearHead(torch.randn(32, 8, generator=g))
    teacher = TeacherScores(1.0, hidden=torch.randn(64, 8, generator=g), head=teacher_head)
    calls = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: calls.append(_n) or _o(self))
    for tile in (8, 0):
        targets = torch.zeros(64, dtype=torch.long)
        sums = distillation_loss(hidden, LinearHead(weight), teacher, targets, loss_type="jsd", vocab_size=32,
                                 num_items=64, chunk_size=1, vocab_tile=tile)  # fmt: skip
        sums.loss.backward()
    assert calls == []
    assert isinstance(sums.divergence, torch.Tensor) and sums.divergence.dim() == 0


# ------------------------------------------------------------------------------------------------ whole steps
def _step(loss_type, vocab_tile, weights, teacher_weights=None, bf16=False, steps=1, **extra):
    """One optimizer step on dataset completions (the same tokens in every precision) from the same starting values:
    both models are rounded to bf16 first, so the float32 run differs from the others only in how it computes."""
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, layers=2, hidden=32, seed=0), tm.model(tok, layers=2, hidden=32, seed=1)
    for model in (student, teacher):
        for p in model.parameters():
            p.data = p.data.bfloat16().float()
    student, teacher = student.to(weights), teacher.to(teacher_weights or weights)
    before = {n: p.detach().float().clone() for n, p in student.named_parameters()}
    tr = tm.trainer(
        tempfile.mkdtemp(), student=student, teacher=teacher, tok=tok, bf16=bf16, max_steps=steps, lmbda=0.0,
        loss_type=loss_type, loss_vocab_tile=vocab_tile, learning_rate=1e-2, per_device_train_batch_size=4, **extra,
    )  # fmt: skip
    tr.train()
    moved = [n for n, p in student.named_parameters() if not torch.equal(p.detach().float(), before[n])]
    return tm.step_logs(tr), moved, student


_REFERENCES = {}


def _float32_reference(loss_type, vocab_tile):
    key = (loss_type, vocab_tile)
    if key not in _REFERENCES:
        _REFERENCES[key] = _step(loss_type, vocab_tile, torch.float32)[0][0]
    return _REFERENCES[key]


MATRIX = [(lt, tile) for lt in LOSS_TYPES for tile in ((None, 0) if lt != "sampled_reverse_kl" else (None,))]
PRECISIONS = {  # student and teacher weights, bf16 autocast
    "bf16-weights": (torch.bfloat16, False),
    "bf16-weights-autocast": (torch.bfloat16, True),
    "fp32-weights-autocast": (torch.float32, True),
    "fp16-weights": (torch.float16, False),
}


MATRIX_IDS = [f"{lt}-{'tiles' if t is None else 'whole'}" for lt, t in MATRIX]


@pytest.mark.parametrize("precision_name", list(PRECISIONS))
@pytest.mark.parametrize("loss_type, vocab_tile", MATRIX, ids=MATRIX_IDS)
def test_a_step_in_low_precision_matches_float32(loss_type, vocab_tile, precision_name):
    """Every divergence, tiles on and off: the step trains in each precision (its weights move, the loss is finite),
    and its loss and gradient norm are those of the float32 step within bf16 rounding: the loss within one bf16 ulp
    (2**-8 relative; measured: at most 3.3e-4), the gradient norm within four (2**-6; measured: at most 4.8e-3, a sum
    of squares of bf16-rounded gradients)."""
    weights, bf16 = PRECISIONS[precision_name]
    reference = _float32_reference(loss_type, vocab_tile)
    (log,), moved, student = _step(loss_type, vocab_tile, weights, bf16=bf16)
    assert math.isfinite(log["loss"]) and moved, "the step did not train"
    assert student.lm_head.weight.dtype == weights  # nothing was upcast behind the user's back
    assert log["loss"] == pytest.approx(reference["loss"], rel=BF16_ULP)
    assert log["grad_norm"] == pytest.approx(reference["grad_norm"], rel=4 * BF16_ULP)


def test_hidden_state_matching_in_bf16_with_autocast(tmp_path):
    """Hidden-state matching with a learned projection (teacher wider than the student) in bf16 under autocast."""
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, layers=2, hidden=32, seed=0), tm.model(tok, layers=2, hidden=48, seed=1)
    tr = tm.trainer(tmp_path, student=student.bfloat16(), teacher=teacher.bfloat16(), tok=tok, bf16=True, lmbda=0.0,
                    hidden_state_weight=0.5, learning_rate=1e-2, max_steps=2)  # fmt: skip
    tr.train()
    logs = tm.step_logs(tr)
    assert all(math.isfinite(h["loss"]) and h["hidden_state_distance"] > 0 for h in logs)


# ------------------------------------------------------------------------------------------------ fp16 and the scaler
@pytest.fixture
def fp16_amp(monkeypatch):
    """fp16 mixed precision as accelerate runs it on a GPU (autocast in float16 + a `GradScaler`), on the CPU:
    accelerate itself turns fp16 off on a CPU, so the state is set by hand before `train()` prepares the model and the
    optimizer."""

    def install(trainer, init_scale=2.0**16):
        accelerator = trainer.accelerator
        monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")
        monkeypatch.setattr(accelerator, "native_amp", True)
        monkeypatch.setattr(accelerator, "scaler", torch.amp.GradScaler("cpu", init_scale=init_scale))
        return accelerator.scaler

    return install


def test_fp16_overflow_is_skipped_by_the_scaler_and_training_continues(tmp_path, fp16_amp):
    """An inf gradient at step 1 (a routine fp16 overflow): the scaler skips that update and halves its scale; the
    step is not counted as non-finite, nothing raises, and step 2 updates the weights."""
    tr = tm.trainer(tmp_path, max_steps=2, lmbda=0.0, learning_rate=1e-2)
    scaler = fp16_amp(tr)
    weight = tr.model.lm_head.weight
    seen = []

    def overflow_once(grad):
        seen.append(weight.detach().clone())
        return grad * float("inf") if len(seen) == 1 else grad

    weight.register_hook(overflow_once)
    tr.train()
    logs = tm.step_logs(tr)
    assert len(logs) == 2 and [h["nonfinite_skipped"] for h in logs] == [0, 0]
    assert torch.equal(seen[1], seen[0]), "step 1 overflowed and must not have updated the weights"
    assert not torch.equal(weight.detach(), seen[1]), "step 2 must update the weights"
    assert scaler.get_scale() == 2.0**15  # halved once, by the overflow


def test_fp16_nonfinite_loss_is_skipped_without_crashing_the_scaler(tmp_path, fp16_amp):
    """A NaN loss under a GradScaler: the update is skipped through the scaler (setting gradients to None made
    `scaler.step` raise "No inf checks were recorded for this optimizer") and counted."""
    from test_trainer_bad_input import NaNTeacher

    tok = tm.tokenizer()
    tr = tm.trainer(tmp_path, teacher=NaNTeacher(tm.model(tok, seed=1)), tok=tok, max_steps=2, lmbda=0.0)
    fp16_amp(tr)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    logs = tm.step_logs(tr)
    assert [h["nonfinite_skipped"] for h in logs] == [1, 2]
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.model.named_parameters())


# ------------------------------------------------------------------------------------------------ bad input
def test_fp16_on_a_cpu_is_refused(tmp_path):
    message = (
        "`fp16=True` needs a GPU: on a CPU accelerate has no float16 mixed precision and would quietly train in "
        "float32. Set `bf16=True` (bfloat16 autocast runs on CPUs) or `fp16=False`."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OnPolicyDistillConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True)


@pytest.mark.parametrize("student_dtype, teacher_dtype, bf16", [(torch.bfloat16, torch.float16, False),
                                                                 (torch.float32, torch.float16, True),
                                                                 (torch.float16, torch.bfloat16, False)])  # fmt: skip
def test_a_teacher_in_the_other_half_precision_is_refused(tmp_path, student_dtype, teacher_dtype, bf16):
    tok = tm.tokenizer()
    run = "bfloat16" if bf16 or student_dtype == torch.bfloat16 else "float16"
    other = str(teacher_dtype).removeprefix("torch.")
    message = (
        f"The teacher is loaded in {other} and the student trains in {run}: two half-precision formats in one run. "
        f"Load the teacher in {run} too (for a model loaded by name: "
        f"`teacher_model_init_kwargs={{'dtype': '{run}'}}`; for a model you pass: `.to(torch.{run})`), or in float32."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tm.trainer(tmp_path, student=tm.model(tok, seed=0).to(student_dtype),
                   teacher=tm.model(tok, seed=1).to(teacher_dtype), tok=tok, bf16=bf16)  # fmt: skip


def test_a_float32_teacher_beside_a_bf16_student_is_fine(tmp_path):
    tok = tm.tokenizer()
    tr = tm.trainer(tmp_path, student=tm.model(tok, seed=0).bfloat16(), teacher=tm.model(tok, seed=1), tok=tok,
                    bf16=True, lmbda=0.0)  # fmt: skip
    tr.train()
    assert math.isfinite(tm.step_logs(tr)[0]["loss"])


# ------------------------------------------------------------------------------------------------ defaults
def test_activation_checkpointing_is_off_on_a_cpu_unless_asked(tmp_path):
    assert OnPolicyDistillConfig(output_dir=str(tmp_path), use_cpu=True).activation_checkpointing is False
    asked = OnPolicyDistillConfig(output_dir=str(tmp_path), use_cpu=True, gradient_checkpointing=True)
    assert asked.gradient_checkpointing and asked.activation_checkpointing


def test_rollouts_keep_the_kv_cache_under_activation_checkpointing(tmp_path):
    """With activation checkpointing on, the student still generates with its KV cache: after the prompt, every
    decoding forward pass sees one new token per row."""
    tr = tm.trainer(tmp_path, gradient_checkpointing=True, lmbda=1.0, max_steps=1)
    backbone = tr.model.model
    widths = []  # of the forward passes in eval mode: sampling (the training pass runs in train mode)

    def record(module, args, kwargs):
        if not module.training:
            widths.append(kwargs["input_ids"].shape[1])

    hook = backbone.register_forward_pre_hook(record, with_kwargs=True)
    try:
        tr.train()
    finally:
        hook.remove()
    assert tr.model.is_gradient_checkpointing
    assert len(widths) >= 2 and widths[0] > 1 and set(widths[1:]) == {1}, widths
