"""Version-sensitive imports, in one place.

TRL exposes these helpers only from internal modules, which move between releases; each import has a fallback that
does the same job in the simple (single-process, unsharded) case. The bitsandbytes helpers at the end touch its
4-bit layers' internals (bitsandbytes 0.50), used by [`~trl_onpolicy.quantized`] and [`~trl_onpolicy.merge`].
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch


try:  # routes a method call through a DDP/FSDP/DeepSpeed wrapper's forward, so sharded weights are gathered
    from trl.models.utils import _ForwardRedirection as ForwardRedirection
except ImportError:  # pragma: no cover - older/newer TRL

    class ForwardRedirection:
        def __call__(self, wrapper_module, original_module, method, *args, **kwargs):
            return method(*args, **kwargs)


try:  # gathers ZeRO-3 / FSDP parameters for generation
    from trl.models.utils import unwrap_model_for_generation
except ImportError:  # pragma: no cover

    @contextlib.contextmanager
    def unwrap_model_for_generation(model, accelerator, **kwargs):
        yield accelerator.unwrap_model(model)

# TRL 1.16's `unwrap_model_for_generation` reads transformers 5's deprecated `is_gradient_checkpointing` at every
# generation; its FutureWarning is nothing a user can act on, and it printed again after every checkpoint save (saving
# resets the warnings registry). That one message is ignored; every other warning is left as it is.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


try:  # FSDP2 (torch >= 2.6; earlier in torch.distributed._composable.fsdp)
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover
    try:
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = fully_shard = None

try:  # the sharded parameters of FSDP2 (public from torch 2.5)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def vllm_generation_class():
    """TRL's `VLLMGeneration` (colocate and server modes, weight sync), or an ImportError that names the fix."""
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ImportError(
            "`use_vllm=True` needs vLLM, which is not installed: `pip install 'trl-onpolicy[vllm]'` (a CUDA machine), "
            "or set `use_vllm=False` to generate with transformers (KV cache on)."
        )
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration


def hidden_states_request(layers: list[int]):
    """`output_hidden_states` asking for `layers` only: transformers that record hidden states by hooks take the list
    and keep just those (the others come back as None); older ones take True and keep every layer. No layers: False."""
    if not layers:
        return False
    try:
        from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401
    except ImportError:  # pragma: no cover - older transformers
        return True
    return sorted(set(layers))


# ------------------------------------------------------------------------------------------- bitsandbytes (QLoRA)
def linear4bit_layers(model) -> list:
    """bitsandbytes' `Linear4bit` layers of `model` (none when bitsandbytes was never imported: none can exist)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_linear4bit_differentiable(layer) -> bool:
    """
    Stop bitsandbytes (0.50) from repacking `layer`'s weights for its CPU inference kernel, and say whether they were
    already repacked.

    On a CPU with avx512_bf16, a `Linear4bit` forward in eval mode on an input that needs no gradient (generation, a
    teacher or eval pass) repacks the 4-bit weights once and for all (`Linear4bit.forward`, guarded by
    `support_avx512bf16_for_cpu`); from then on every matmul, in training too, goes through `gemv_4bit`, which has no
    autograd formula: no gradient flows back through the layer, so LoRA adapters before it stop learning, silently.
    Repacking back (`_convert_weight_packed_for_cpu_inverse`) is lossy (absmax rounded to bf16), so it is not undone.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def dequantize_4bit(weight: torch.Tensor, quant_entries: dict[str, torch.Tensor]) -> torch.Tensor:
    """
    A bitsandbytes 4-bit weight as a float tensor, from its state-dict entries (`Linear4bit` saves the packed weight
    as `<name>.weight` and its quantisation state as `<name>.weight.absmax`, `.quant_map`, ...,
    `.quant_state.bitsandbytes__nf4`; `quant_entries` holds those with the `<name>.weight.` prefix removed).
    Returns the `(out_features, in_features)` weight in the dtype it was quantised from.
    """
    from bitsandbytes.functional import QuantState
    from bitsandbytes.functional import dequantize_4bit as dequantize

    state = QuantState.from_dict(dict(quant_entries), device=weight.device)  # from_dict pops entries: a copy
    return dequantize(weight, state)


def effective_generation_config(model, config):
    """`config` with the model's generation defaults (then transformers' global ones) filled in where it leaves a field
    unset, as `generate` fills them (transformers 5.x `_prepare_generation_config`); `config` itself where the model
    has no such method."""
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is None:  # pragma: no cover - other transformers versions
        return config
    return prepare(config)[0]  # it works on a copy


try:  # tool calling: whether a chat template renders a tool-calling conversation, and parsers for known families
    from trl.chat_template_utils import add_response_schema, supports_tool_calling
except ImportError:  # pragma: no cover - TRL before tool support

    def supports_tool_calling(processing_class) -> bool:
        """The tool call's name and the tool's answer must both appear in a rendered tool-calling exchange."""
        if getattr(processing_class, "chat_template", None) is None:
            return False
        calls = [{"type": "function", "function": {"name": "toolname", "arguments": {"key": "value"}}}]
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls},
                    {"role": "tool", "name": "toolname", "content": "toolanswer"}]  # fmt: skip
        try:
            text = processing_class.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 (a template that cannot render the exchange does not support tools)
            return False
        return "toolname" in text and "toolanswer" in text

    def add_response_schema(processing_class):
        raise ValueError("This TRL has no response templates for known chat templates.")
