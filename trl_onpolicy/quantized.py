"""Quantized (QLoRA) students: a 4-bit base that stays frozen, LoRA adapters that train.

A student loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)` (or `--load_in_4bit` on the command line) trains
only through adapters: `peft_config` is required, as in [`~trl.SFTTrainer`]. Its head and embeddings stay in float
(transformers does not quantize them).

On CPU, bitsandbytes 0.50 has a trap on processors with avx512_bf16: the first eval-mode forward without gradients
(rollout generation, the self-distillation teacher pass, an evaluation) repacks each 4-bit layer's weights for an
inference kernel that passes no gradient, and LoRA adapters stop learning without any error (see
[`~trl_onpolicy._compat.keep_linear4bit_differentiable`]). The trainer calls [`keep_trainable`] on the student before
any forward; call it yourself if you run the model in eval mode before handing it to the trainer.
"""

from __future__ import annotations

from ._compat import is_peft_model, keep_linear4bit_differentiable, linear4bit_layers


def is_quantized(model) -> bool:
    """Whether `model` (or a PEFT model's base) was loaded quantized by transformers (bitsandbytes 4-bit or 8-bit)."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False))


def check_student(model, peft_config, quantization_config=None, model_init_kwargs=None) -> None:
    """
    Refuse a quantized student without adapters (its weights cannot be trained), naming the fix. `model` is the
    trainer's `model` argument: a loaded model, or a name loaded with `quantization_config` (the trainer argument or
    `args.model_init_kwargs["quantization_config"]`).
    """
    if isinstance(model, str):
        quantized = (quantization_config or (model_init_kwargs or {}).get("quantization_config")) is not None
    else:
        quantized = is_quantized(model) and not is_peft_model(model) and not getattr(model, "peft_config", None)
    if quantized and peft_config is None:
        raise ValueError(
            "The student is quantized (bitsandbytes 4-bit or 8-bit), so its own weights cannot be trained: pass "
            "`peft_config=LoraConfig(...)` to the trainer (QLoRA: the quantized base stays frozen, the adapters "
            "train), or `--use_peft` on the command line; or load the student without `quantization_config`."
        )


def keep_trainable(model) -> None:
    """
    Keep every bitsandbytes 4-bit layer of `model` differentiable on CPU (no repacking for the CPU inference kernel;
    see the module docstring). Raises if a layer was already repacked (the model ran in eval mode before), since
    repacking back is lossy.
    """
    repacked = [layer for layer in linear4bit_layers(model) if keep_linear4bit_differentiable(layer)]
    if repacked:
        raise ValueError(
            f"{len(repacked)} 4-bit layers of the student were already repacked by bitsandbytes for its CPU inference "
            "kernel (an eval-mode forward without gradients ran on a CPU with avx512_bf16 before the trainer got the "
            "model); through them no gradient flows, so the adapters would not learn. Load the student again and call "
            "`trl_onpolicy.quantized.keep_trainable(model)` right after loading (or give it to the trainer before any "
            "eval-mode forward)."
        )
