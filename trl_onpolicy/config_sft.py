"""Where `OnPolicyDistillConfig` meets `trl.SFTConfig`: the defaults it changes, the `loss_type` both declare, and the
conversion of an SFT script's `SFTConfig` (or a `TrainingArguments`, or nothing) into an `OnPolicyDistillConfig`.

`loss_type` is the one field whose meaning differs. SFT's names SFT's loss (`"nll"` or `"dft"`); ours names a
divergence (`"jsd"`, ...). `SFTConfig.__post_init__` and `SFTTrainer.__init__` read it and refuse anything but
`"nll"`/`"dft"` (trl 1.16: `sft_trainer.py` also reads it for `compute_loss_func`, label smoothing and DeepSpeed
sequence parallelism, all in `__init__`, and in `SFTTrainer.compute_loss`, which `OnPolicyDistillTrainer`
overrides), so both run inside [`sft_loss_type`], which shows them SFT's `"nll"` and restores ours afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from trl import SFTConfig

logger = logging.getLogger(f"{__package__}.config")  # the config's warnings, under the config's name

SFT_LOSS_TYPES = ("nll", "dft")  # `SFTConfig.loss_type`'s values; the first is what SFT is shown


@contextmanager
def sft_loss_type(config) -> Iterator[None]:
    """Inside the block, `config.loss_type` is SFT's own `"nll"`; on leaving it, even by an exception, it is ours again.

    Wraps `SFTConfig.__post_init__` (in `OnPolicyDistillConfig.__post_init__`) and `SFTTrainer.__init__` (in
    `OnPolicyDistillTrainer.__init__`), the code that validates and reads SFT's loss type.
    """
    ours, config.loss_type = config.loss_type, SFT_LOSS_TYPES[0]
    try:
        yield
    finally:
        config.loss_type = ours


def set_device_defaults(config) -> None:
    """The defaults that differ from `SFTConfig`'s: bf16 and activation checkpointing only on a CUDA device, and no
    search for unused parameters in DDP."""
    on_cuda = torch.cuda.is_available() and not config.use_cpu
    if config.bf16 is None:
        config.bf16 = bool(on_cuda and torch.cuda.is_bf16_supported()) and not config.fp16
    # TRL's default on GPUs; on a CPU it only costs time. Older transformers (5.17, the GPU machines' image) have
    # only `gradient_checkpointing`, not its newer name.
    name = "activation_checkpointing" if hasattr(config, "activation_checkpointing") else "gradient_checkpointing"
    if getattr(config, name) is None and config.gradient_checkpointing is None:
        setattr(config, name, on_cuda)
    if config.ddp_find_unused_parameters is None:
        config.ddp_find_unused_parameters = False  # every trainable weight is used each step: skip DDP's extra pass


def from_args(cls, args, model):
    """`args` as a `cls` (an `OnPolicyDistillConfig`): returned as is if it is one; built with the output folder
    `<model name>-OnPolicyDistill` if None; else an `SFTConfig` or `TrainingArguments` whose settings carry over (its
    fields' own values, not `to_dict`'s masked tokens). SFT's `loss_type` is dropped (ours defaults to `"jsd"`); other
    settings with no counterpart here are dropped with a warning if they differ from their defaults."""
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path or "model"
        return cls(f"{name.split('/')[-1]}-OnPolicyDistill")
    if isinstance(args, cls):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    if isinstance(args, SFTConfig) and values.get("loss_type") in SFT_LOSS_TYPES:
        values.pop("loss_type")  # SFT's loss type has no meaning here
    known = cls.__dataclass_fields__
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    dropped = sorted(k for k, v in values.items() if (k not in known or not known[k].init) and v != defaults[k])
    if dropped:
        logger.warning("%s settings with no counterpart here are ignored: %s.", type(args).__name__, dropped)
    return cls(**{k: v for k, v in values.items() if k in known and known[k].init})
