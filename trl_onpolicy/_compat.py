"""Version-sensitive imports, in one place.

TRL exposes these helpers only from internal modules, which move between releases; each import has a fallback that
does the same job in the simple (single-process, unsharded) case.
"""

from __future__ import annotations

import contextlib


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
