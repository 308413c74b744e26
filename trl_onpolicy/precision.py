"""The precision policy of a step: which dtype each matmul of the loss runs in, and which dtype each sum keeps.

Users load students and teachers in bfloat16 and train with `bf16=True`; the same step must be right in every
combination of these:

- **weights**: the student in float32, bfloat16 or float16; the teacher in its own dtype (never cast here);
- **autocast** (`bf16=True` / `fp16=True`): the student's forward runs under it (accelerate hands its outputs back in
  float32); the loss runs after the forward, outside it;
- **matmuls of the loss** (the output heads projected onto the vocabulary): in the head weight's dtype, so bfloat16
  weights give bfloat16 matmuls; float32 weights under autocast run in the autocast dtype, as autocast would run them
  inside the model ([`matmul_dtype`]). The hidden states are cast to that dtype first, whatever dtype they arrive in;
- **sums**: logits leave every matmul in float32, and every sum (log-normalisers, divergences, entropies, and the
  gradients of the head and of the hidden states across vocabulary tiles and token chunks) accumulates in float32
  ([`sum_dtype`]); a gradient is cast to its parameter's dtype once, when it is handed to autograd. float64 inputs
  (the tests' references) stay float64 throughout.

This module is the one place that decides; the loss ([`~trl_onpolicy.loss`], [`~trl_onpolicy.fused_divergence`]) and
the teachers import it.
"""

from __future__ import annotations

import contextlib

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def autocast_dtype(accelerator) -> torch.dtype | None:
    """The dtype accelerate's autocast runs the student's forward in: bfloat16 (`bf16=True`) or float16 (`fp16=True`)
    where autocast is really on (`native_amp`), else None."""
    if not getattr(accelerator, "native_amp", False):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))


def check_teacher_dtype(
    student_dtype: torch.dtype, teacher_dtype: torch.dtype, autocast: torch.dtype | None, what: str
) -> None:
    """
    Refuse a float16 model beside a bfloat16 run (or the reverse): two half-precision formats in one step is almost
    always a loading mistake, and a model trained in bfloat16 often overflows float16's range (inf activations).
    float32 on either side is fine.

    Args:
        student_dtype: The student's weight dtype.
        teacher_dtype: The teacher's (or reference model's) weight dtype.
        autocast: The run's mixed-precision dtype, or None.
        what: `"teacher"` or `"reference model"`, for the message.
    """
    run = autocast or student_dtype
    pair = {run, teacher_dtype}
    if pair == {torch.bfloat16, torch.float16}:
        name = str(run).removeprefix("torch.")
        raise ValueError(
            f"The {what} is loaded in {str(teacher_dtype).removeprefix('torch.')} and the student trains in {name}: "
            f"two half-precision formats in one run. Load the {what} in {name} too (for a model loaded by name: "
            f"`teacher_model_init_kwargs={{'dtype': '{name}'}}`; for a model you pass: `.to(torch.{name})`), or in "
            "float32."
        )


def matmul_dtype(weight_dtype: torch.dtype, autocast: torch.dtype | None = None) -> torch.dtype:
    """
    The dtype a head's matmul runs in: the weight's own for bfloat16, float16 and float64 weights; for float32 weights,
    the autocast dtype when autocast is on (what autocast would do inside the model), else float32. A weight that is
    not floating point (a quantised head) runs in the autocast dtype, else float32.
    """
    if weight_dtype in LOW_PRECISION or weight_dtype == torch.float64:
        return weight_dtype
    return autocast if autocast in LOW_PRECISION else torch.float32


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums accumulate in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def project(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """
    `scale * (hidden @ weight.T + bias)` with the matmul in `dtype`, returned in [`sum_dtype`].

    Args:
        hidden: `(n, H)` hidden states, any floating dtype.
        weight: `(t, H)` rows of an output matrix.
        bias: `(t,)` or None.
        dtype: The matmul's dtype (see [`matmul_dtype`]).

    Returns:
        `(n, t)` float32 (float64 for a float64 matmul).
    """
    a, w = hidden.to(dtype), weight.to(dtype).t()  # (n, H), (H, t)
    if bias is not None:
        logits = torch.addmm(bias.to(dtype), a, w, beta=scale, alpha=scale)  # (n, t)
    elif scale != 1.0:
        logits = torch.addmm(a.new_zeros(()), a, w, beta=0.0, alpha=scale)  # (n, t)
    else:
        logits = a @ w  # (n, t)
    return logits.to(sum_dtype(dtype))


def add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, dtype: torch.dtype) -> None:
    """`out += alpha * a @ b` with the matmul in `dtype` and the sum in `out`'s dtype (a float32 accumulator)."""
    a, b = a.to(dtype), b.to(dtype)
    if out.dtype == dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_(a @ b, alpha=alpha)


def weight_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of a head module's weight (a LoRA or `modules_to_save` wrapper's base weight), or None when it has
    no floating-point weight (a quantised layer casts its input itself)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return None


def head_context(device: torch.device, autocast: torch.dtype | None):
    """The context a head module runs in outside the model's forward: autocast in the run's low-precision dtype (a
    module whose parts have different dtypes, a float32 LoRA adapter on a bfloat16 layer, then just works), else
    nothing."""
    if autocast in LOW_PRECISION:
        return torch.autocast(device_type=device.type, dtype=autocast)
    return contextlib.nullcontext()
