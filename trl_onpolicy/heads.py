"""Output heads: how a causal LM's final hidden states become logits, for the student, the teacher and the loss.

- [`output_logits`]: `(n, H)` -> `(n, V)` through the model's head, with its architecture's logit multiplier
  ([`logit_multiplier`]) and `final_logit_softcapping`: the one definition every other head here agrees with.
- [`LinearHead`]: a head that is one affine map (weights as tensors), which the tiled loss
  ([`~trl_onpolicy.fused_divergence`]) projects one vocabulary tile at a time; [`linear_head`] makes one from a model
  where it can.
- [`frozen_head`]: the head of a frozen model (a teacher, the reference model) as a `LinearHead` of tensors, gathered
  once where the model is sharded, or read out of a head module that is not a plain `nn.Linear` (a quantised or
  wrapped layer): the teacher's scores are then data, which a checkpoint saves and the loss walks in tiles.

The dtypes the matmuls run in come from [`~trl_onpolicy.precision`]. The loss, the teachers and the frozen models
import their heads from here; this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import precision
from ._compat import DTensor
from .launchers import is_fsdp_module_of, is_partitioned

CHUNK_SIZE = 1024  # default positions projected to the whole vocabulary at once (the loss's chunks, a teacher's)


@dataclass
class LinearHead:
    """
    An output head that is one affine map, `logits = multiplier * (hidden @ weight.T + bias)`, optionally soft-capped
    (`softcap * tanh(logits / softcap)`, Gemma 2): what the tiled loss can project one vocabulary tile at a time.
    Callable like the head it describes (`(n, H)` -> `(n, V_w)`). A student's head has no cap (the tiled gradient is
    that of the affine map); a teacher's may.

    Args:
        weight (`torch.Tensor`): `(V_w, H)` the output matrix (a parameter of the student, detached for a teacher).
        bias (`torch.Tensor`, *optional*): `(V_w,)`.
        multiplier (`float`, *optional*, defaults to `1.0`): The architecture's logit multiplier (see
            [`logit_multiplier`]).
        dtype (`torch.dtype`, *optional*): The dtype its matmuls run in; defaults to the weight's (see
            [`~trl_onpolicy.precision.matmul_dtype`]). Hidden states are cast to it; logits come out in float32.
        softcap (`float`, *optional*): The architecture's `final_logit_softcapping`, applied after the multiplier.
    """

    weight: Tensor
    bias: Tensor | None = None
    multiplier: float = 1.0
    dtype: torch.dtype | None = None
    softcap: float | None = None

    def __post_init__(self):
        if self.dtype is None:
            self.dtype = precision.matmul_dtype(self.weight.dtype)

    def __call__(self, hidden: Tensor) -> Tensor:
        """`(n, H)` -> `(n, V_w)` logits in float32 (float64 stays)."""
        return self.tile(hidden, 0, self.weight.shape[0], 1.0)

    def parameters(self) -> list[Tensor]:
        """The head's tensors that need gradients."""
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]

    def tile(self, hidden: Tensor, start: int, end: int, scale: float) -> Tensor:
        """`(n, end - start)` float32 (float64 stays): `scale` times this head's logits of columns `start:end`."""
        bias = None if self.bias is None else self.bias[start:end]
        if self.softcap is None:
            return precision.project(hidden, self.weight[start:end], bias, scale * self.multiplier, self.dtype)
        logits = precision.project(hidden, self.weight[start:end], bias, self.multiplier / self.softcap, self.dtype)
        return logits.tanh_().mul_(self.softcap * scale)  # (n, end - start)

    def fingerprint(self) -> list[float]:
        """Shape and float64 sums of the tensors: tells a checkpoint whether a head is the one it was saved with."""
        sums = [float(t.detach().double().sum()) for t in (self.weight, self.bias) if t is not None]
        return [*map(float, self.weight.shape), self.multiplier, self.softcap or 0.0, *sums]


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


def output_logits(model, hidden: torch.Tensor, autocast: torch.dtype | None = None) -> torch.Tensor:
    """
    Logits from final hidden states through the model's output head, with the config's logit multiplier (see
    [`logit_multiplier`]) and `final_logit_softcapping` where the architecture has them.

    Args:
        model: A causal LM (`get_output_embeddings()` must return its head).
        hidden: `(n, H)` final hidden states, any floating dtype: cast to the head weight's dtype (a quantised head
            casts them itself), under autocast in `autocast` when given (see [`~trl_onpolicy.precision`]).
        autocast: The run's mixed-precision dtype, or None.

    Returns:
        `(n, V)` logits in the head's (or autocast's) dtype.
    """
    head = model.get_output_embeddings()
    dtype = precision.weight_dtype(head)
    with precision.head_context(hidden.device, autocast):
        logits = head(hidden if dtype is None else hidden.to(dtype))  # (n, V)
    config = model.config.get_text_config()
    scale = logit_multiplier(config)
    if scale != 1.0:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def linear_head(model, detach: bool = False, autocast: torch.dtype | None = None) -> LinearHead | None:
    """
    The model's output head as a [`LinearHead`] (the same function as
    [`output_logits`]), or None where the tiled loss cannot walk it: a head that is not a plain `nn.Linear` (a LoRA or
    `modules_to_save` wrapper, a quantised layer) or that has accelerate hooks (offloading), `final_logit_softcapping`,
    or a weight that is not all here (a sharded FSDP2 DTensor, a ZeRO-3 partition not gathered, the meta device). An
    `nn.Linear` that FSDP2 wrapped (`FSDPLinear`) counts as plain: after the forward pass its weight is unsharded.

    Args:
        model: A causal LM.
        detach: Detach the weights (a teacher's head).
        autocast: The run's mixed-precision dtype: a float32 head's matmuls then run in it (see
            [`~trl_onpolicy.precision.matmul_dtype`]); None for a teacher, which runs in its own dtype.
    """
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    if not _whole_linear(head) or getattr(config, "final_logit_softcapping", None) is not None:
        return None
    weight, bias = head.weight, head.bias
    if detach:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    return LinearHead(weight, bias, logit_multiplier(config), precision.matmul_dtype(weight.dtype, autocast))


def frozen_head(model) -> LinearHead:
    """
    The output head of a frozen model (a teacher, the reference model) as a [`LinearHead`] of detached tensors, with
    its logit multiplier and soft cap: the same function as [`output_logits`]. A whole plain linear head lends its
    weights; a sharded one is gathered once here (a collective) into copies that live as long as the scores; any other
    head module (a quantised layer, a PEFT wrapper, offloaded weights behind accelerate hooks) is read out as a dense
    matrix by projecting the identity through it ([`dense_weights`]): the head of an LM is affine.
    """
    module = model.get_output_embeddings()
    config = model.config.get_text_config()
    multiplier, cap = logit_multiplier(config), getattr(config, "final_logit_softcapping", None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    params = [p for p in (weight, bias) if isinstance(p, torch.Tensor)]
    if any(hasattr(p, "ds_id") for p in params) or (DTensor is not None and isinstance(weight, DTensor)):
        if not is_fsdp_module_of(module, torch.nn.Linear):
            raise ValueError(
                f"The teacher's output head is a sharded {type(module).__name__}, which the loss cannot gather; a "
                "sharded teacher needs a plain linear head. Serve the teacher instead (`trl-onpolicy serve-teacher`)."
            )
        weight, bias = _gathered_copies(params)
    elif _whole_linear(module):
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    else:
        weight, bias = dense_weights(module, config.hidden_size)
    return LinearHead(weight, bias, multiplier, precision.matmul_dtype(weight.dtype), cap)


def _whole_linear(module) -> bool:
    """A plain `nn.Linear` (FSDP2's wrapper of one counts) without accelerate hooks, whose weight is a whole dense
    tensor here (not a quantised parameter, a ZeRO-3 partition or on the meta device)."""
    if not is_fsdp_module_of(module, torch.nn.Linear) or hasattr(module, "_hf_hook"):
        return False
    weight = module.weight
    return type(weight.data) is torch.Tensor and weight.numel() > 0 and not weight.is_meta and not is_partitioned(weight)


@torch.no_grad()
def dense_weights(module, hidden_size: int, block: int = 256) -> tuple[Tensor, Tensor | None]:
    """
    `(V, H)` weight and `(V,)` bias (None if zero) of an affine head module, read out by calling it: `module(0)` is the
    bias and `module(e_i) - bias` column `i` of the weight, `block` unit vectors at a time. Exact for a quantised layer
    (the identity picks its dequantised weights) and for any wrapper that calls the module's own matmul.
    """
    weight = getattr(module, "weight", None)
    device = weight.device if weight is not None and not weight.is_meta else None
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    device = device or next((p.device for p in module.parameters() if not p.is_meta), torch.device("cpu"))
    bias = module(torch.zeros(1, hidden_size, dtype=dtype, device=device))[0]  # (V,)
    out = torch.empty(bias.shape[0], hidden_size, dtype=bias.dtype, device=bias.device)  # (V, H)
    eye = torch.eye(hidden_size, dtype=dtype, device=device)  # (H, H)
    for lo in range(0, hidden_size, block):
        out[:, lo : lo + block] = (module(eye[lo : lo + block]) - bias).t()  # (V, b)
    return out, None if not bias.any() else bias


def _gathered_copies(params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if DTensor is not None and isinstance(params[0], DTensor):
        copies = [p.detach().full_tensor() for p in params]
    else:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            copies = [p.detach().clone() for p in params]
    return copies[0], copies[1] if len(copies) > 1 else None


def student_head(model, autocast: torch.dtype | None = None):
    """
    The student's head as the loss takes it: a [`LinearHead`] over its parameters where the tiled loss can walk it
    ([`linear_head`]), else a function through the head module ([`output_logits`]).
    """
    return linear_head(model, autocast=autocast) or (lambda hidden: output_logits(model, hidden, autocast))
