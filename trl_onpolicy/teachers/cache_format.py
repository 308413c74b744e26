"""The teacher cache's format: its file layout, the names it gives a teacher, a tokenizer and a row, and its error.

A cache folder holds `shard-00000.safetensors`, ... and `manifest.json` (written last). Each shard holds, per row, a
16-byte [`row_key`], offsets into its tokens, and per completion token the teacher's top-k ids and log-probs and the
token's own log-prob. [`~trl_onpolicy.teachers.cache_build.build_teacher_cache`] writes this format and
[`~trl_onpolicy.teachers.cache.TeacherCache`] reads it.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from .._compat import is_peft_model

FORMAT = "trl-onpolicy-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
_SEPARATOR = np.array([-1], dtype="<i8").tobytes()  # token ids are >= 0, so -1 cannot occur inside a row
# Config entries that name or place a model rather than define what it computes
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                         "_attn_implementation_autoset", "use_cache", "output_attentions", "output_hidden_states",
                         "return_dict", "architectures"}  # fmt: skip


class CacheError(ValueError):
    """A teacher cache that cannot serve this run: damaged, incomplete, or made for another teacher or tokenizer."""


# ------------------------------------------------------------------------------------------------- identities
def tokenizer_fingerprint(tokenizer) -> str:
    """
    sha256 of the vocabulary (sorted by id), the special tokens and the chat template. The pad token is left out: the
    trainer may set it after the cache was made, and rows are stored without padding.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"}
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special": special,
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model, include_adapters: bool = True) -> str:
    """
    sha256 of a model's config (without its name, dtype and runtime switches), every parameter's shape and 64 evenly
    spaced values of each parameter rounded to bfloat16 (so a float32 and a bfloat16 copy of the same weights agree).
    Reads 64 values per tensor, so it takes milliseconds even for large models. A PEFT model is unwrapped; with
    `include_adapters=False` its LoRA weights are skipped (the base network, as a self-distillation teacher sees it).
    """
    if is_peft_model(model):
        model = model.get_base_model()
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    samples = []
    for name, param in model.named_parameters():
        if not include_adapters and "lora_" in name:
            continue
        digest.update(f"{tuple(param.shape)};".encode())
        if param.device.type == "meta" or param.numel() == 0:  # offloaded: the shape is all there is to read
            continue
        flat = param.detach().reshape(-1)  # (n,)
        n = min(64, flat.numel())
        index = torch.arange(n) * (flat.numel() - 1) // max(n - 1, 1)  # (n,) first to last, exact in int64
        samples.append(flat[index.to(flat.device)].to(torch.bfloat16).float().cpu())
    if samples:
        digest.update(torch.cat(samples).numpy().tobytes())
    return digest.hexdigest()


def row_key(prompt_ids, completion_ids) -> bytes:
    """128-bit blake2b of prompt ids + a separator + completion ids (int64 little-endian): a row's name in the cache."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(prompt_ids, dtype="<i8").tobytes())
    digest.update(_SEPARATOR)
    digest.update(np.asarray(completion_ids, dtype="<i8").tobytes())
    return digest.digest()


def is_teacher_cache(path) -> bool:
    """Whether `path` is a teacher cache folder (complete or not: an incomplete one is refused with a message)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return os.path.isfile(os.path.join(path, SHARD_PATTERN.format(0)))
    try:
        with open(manifest, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):  # damaged: a cache that `TeacherCache` refuses with the reason
        return True
    return isinstance(content, dict) and content.get("format") == FORMAT
