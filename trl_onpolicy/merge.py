"""`save_merged_model`: a LoRA or QLoRA student saved as one plain float model, its adapters merged into the weights.

The merged model is built apart from the one in training, on the CPU, from the student's state dict: a float copy of
the base network (a 4-bit base is dequantised, in the 4-bit layers' compute dtype), wrapped with the same adapters,
merged by PEFT (`merge_and_unload`). The result loads with `AutoModelForCausalLM.from_pretrained` without
bitsandbytes or PEFT (no `quantization_config` in its `config.json`), and computes what the trained student computes:
with a 4-bit base, the merged weights are the dequantised ones the student's forward uses, so only the order of the
float additions differs. (Merging a QLoRA student into its *original* float base instead, as some QLoRA recipes do,
gives a model the adapters were not trained against; `from peft import PeftModel` on the saved adapters does that.)

Sharded students: the Trainer gathers the full state dict on every process (FSDP `FULL_STATE_DICT`; under ZeRO-3 it
passes the adapters only, so the 16-bit consolidated state dict is gathered here, with
`stage3_gather_16bit_weights_on_model_save: true`) and only the main process builds and writes the merged model. No
sharded module is copied. This path has not been run sharded in this repository's tests (CPU only); a quantized
student under FSDP or ZeRO-3 is refused at start (see [`check_merge`]).
"""

from __future__ import annotations

import copy
import logging
import os

import torch

from . import hidden_states
from ._compat import dequantize_4bit, is_peft_model
from .quantized import is_quantized

logger = logging.getLogger(__name__)

QUANT_STATE = ".quant_state.bitsandbytes__"  # the state-dict key that marks a bitsandbytes 4-bit weight


def _zero3(trainer) -> bool:
    plugin = trainer.accelerator.state.deepspeed_plugin
    return bool(trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)


def check_merge(trainer, student) -> None:
    """At the start of training: say that `save_merged_model` does nothing for a student without adapters, and refuse
    what cannot be merged (a quantized student whose parameters are sharded across processes)."""
    if not trainer.args.save_merged_model:
        return
    if not is_peft_model(student):
        logger.warning(
            "`save_merged_model=True` has no effect: the student has no LoRA adapters, so its saves are already plain "
            "checkpoints. Pass `peft_config` to train adapters, or drop `save_merged_model`."
        )
    elif (trainer.is_fsdp_enabled or _zero3(trainer)) and is_quantized(student):
        raise ValueError(
            "`save_merged_model=True` is not supported for a quantized (QLoRA) student under FSDP or DeepSpeed "
            "ZeRO-3: set `save_merged_model=False` (the adapters are saved), then merge on one process: load the "
            "base with the same `quantization_config`, `PeftModel.from_pretrained(base, adapter_folder)`, and "
            "`trl_onpolicy.merge.merged_model(peft_model).save_pretrained(folder)`."
        )


def float_dtype(model) -> torch.dtype:
    """The merged model's dtype: a 4-bit base's compute dtype (`bnb_4bit_compute_dtype`), else the model's own."""
    quantizer = getattr(model, "hf_quantizer", None)
    compute = getattr(getattr(quantizer, "quantization_config", None), "bnb_4bit_compute_dtype", None)
    if compute is not None:
        return getattr(torch, compute) if isinstance(compute, str) else compute
    return model.dtype


def float_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """
    `state_dict` as plain float tensors on the CPU, copied (merging writes into them): every bitsandbytes 4-bit
    weight dequantised and its quantisation entries dropped, every floating tensor cast to `dtype`.
    """
    quantized = [key.split(QUANT_STATE)[0] for key in state_dict if QUANT_STATE in key]  # "....weight"
    entries = {name: {} for name in quantized}
    for key, value in state_dict.items():
        name, _, rest = key.rpartition(".weight.")
        if rest and name + ".weight" in entries:
            entries[name + ".weight"][rest] = value
    out = {}
    for key, value in state_dict.items():
        if key in entries:
            out[key] = dequantize_4bit(value, entries[key]).to("cpu", dtype)
        elif key.rpartition(".weight.")[0] + ".weight" in entries:
            continue  # a quantisation entry (absmax, quant_map, ...)
        elif value.is_floating_point():
            out[key] = value.detach().to("cpu", dtype, copy=True)
        elif key.endswith("weight"):
            raise ValueError(
                f"Cannot merge the adapters into `{key}`: it is stored as {value.dtype} without a bitsandbytes 4-bit "
                "quantisation state (an 8-bit student, or a quantized weight gathered without its state). Save the "
                "adapters instead (`save_merged_model=False`)."
            )
        else:
            out[key] = value.detach().to("cpu", copy=True)
    return out


def merged_model(peft_model, state_dict: dict[str, torch.Tensor] | None = None):
    """
    A plain float causal LM with `peft_model`'s active adapters merged in, on the CPU; `peft_model` is left as it was.

    Args:
        peft_model ([`~peft.PeftModel`]): The student (not copied; only its config, adapter config and non-persistent
            buffers such as rotary frequencies are read from it).
        state_dict (`dict`, *optional*): Its full state dict, gathered when it is sharded; defaults to its own.
    """
    from peft import get_peft_model

    base = peft_model.get_base_model()
    dtype = float_dtype(base)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):  # no memory and no init; `_from_config` would also enter ZeRO-3's `zero.Init`
        float_base = type(base)(config).to(dtype)
    adapter = peft_model.active_adapter
    float_peft = get_peft_model(float_base, copy.deepcopy(peft_model.peft_config[adapter]), adapter_name=adapter)
    state_dict = hidden_states.without_projector(state_dict if state_dict is not None else peft_model.state_dict())
    missing, unexpected = float_peft.load_state_dict(float_state_dict(state_dict, dtype), strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"The student's state dict does not fit a float copy of its network: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Under DeepSpeed ZeRO-3 set `stage3_gather_16bit_weights_on_model_save: true`."
        )
    float_base.tie_weights()  # tied weights arrive as two copies: tie them again, as they are in the student
    buffers = dict(peft_model.named_buffers())  # non-persistent buffers are not in a state dict: take the student's
    for name, buffer in list(float_peft.named_buffers()):
        if buffer.is_meta:
            module_name, _, attribute = name.rpartition(".")
            float_peft.get_submodule(module_name)._buffers[attribute] = buffers[name].detach().to("cpu", copy=True)
    merged = float_peft.merge_and_unload()
    merged.generation_config = copy.deepcopy(base.generation_config)
    return merged.eval()


def save_merged(trainer, folder: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """
    The trainer's LoRA / QLoRA student saved to `folder` with its adapters merged (see the module docstring), with the
    tokenizer and a learned hidden-state projector beside it; the model in training keeps its adapters.

    Called on every process (`Trainer._save`); `state_dict` is what the Trainer gathered, if it did.
    """
    if _zero3(trainer):
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)  # a collective: the base weights too
    if not trainer.args.should_save:
        return
    student = trainer.accelerator.unwrap_model(trainer.model)
    os.makedirs(folder, exist_ok=True)
    merged_model(student, state_dict).save_pretrained(folder)
    trainer.processing_class.save_pretrained(folder)
    hidden_states.save_projector(student, folder)
    logger.info("Saved the student with its adapters merged into a float model in %s.", folder)
