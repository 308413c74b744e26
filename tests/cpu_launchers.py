"""FSDP2 and DeepSpeed ZeRO-3 on CPU processes over gloo, for the two-process tests (ARCHITECTURE.md, "Launchers on CPU").

- FSDP2: accelerate switches to FSDP only for GPU kinds of `MULTI_*`, so an FSDP plugin on CPU silently gives DDP.
  [`enable_fsdp2_on_cpu`] wraps `AcceleratorState.__init__` so that a state built with an FSDP plugin whose kind came
  out `MULTI_CPU` becomes `DistributedType.FSDP`: `fully_shard` itself runs on CPU (parameters become `DTensor`s).
- ZeRO-3: DeepSpeed runs on CPU with `DS_ACCELERATOR=cpu`; accelerate finds no default backend for CPU and would count
  one process, so the state is built first with `backend="gloo"` and the Trainer uses it (`use_configured_state`).
  The first start compiles DeepSpeed's shared-memory comm op (~100 s, cached under ~/.cache/torch_extensions); the
  SGD optimizer of the tests is a torch one, so DeepSpeed's fused Adam is never built.

[`config_kwargs`] returns the `OnPolicyDistillConfig` fields of a launcher (after setting up the process state);
[`full_parameters`] the whole weights of a trained student on every process, whatever shards them.
"""

from __future__ import annotations

import functools
import os

import torch

LAUNCHERS = ("ddp", "fsdp2", "zero3")


def enable_fsdp2_on_cpu() -> None:
    """Make an FSDP plugin give real FSDP on CPU processes (idempotent)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, "_fsdp_on_cpu", False):
        return

    @functools.wraps(init)
    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    patched._fsdp_on_cpu = True
    AcceleratorState.__init__ = patched


def zero3_config() -> dict:
    """ZeRO-3 with every parameter partitioned (tiny models sit below DeepSpeed's persistence threshold otherwise)."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }


def config_kwargs(launcher: str) -> dict:
    """`OnPolicyDistillConfig` fields for `launcher` (`"ddp"`, `"fsdp2"` or `"zero3"`), process state set up first."""
    if launcher == "ddp":
        return {"use_cpu": True}
    if launcher == "fsdp2":
        enable_fsdp2_on_cpu()
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # as `accelerate launch --config_file fsdp2.yaml` sets them
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
        layers = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "cpu_ram_efficient_loading": True}
        return {"use_cpu": True, "ddp_backend": "gloo", "fsdp": "full_shard", "fsdp_config": layers}
    if launcher == "zero3":
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state()  # a second trainer in the process (resuming) may bring its own DeepSpeed plugin
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.pop("ACCELERATE_USE_CPU", None)  # DeepSpeed is chosen only for a state that is not "cpu"
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        return {"deepspeed": zero3_config(), "accelerator_config": {"use_configured_state": True}}
    raise ValueError(f"unknown launcher {launcher!r}: one of {LAUNCHERS}")


def is_sharded(model) -> bool:
    """Every parameter of `model` is held in part: an FSDP2 `DTensor`, or a ZeRO-3 partition (`ds_id`)."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return bool(params) and all(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in params)


def full_parameters(model) -> dict[str, torch.Tensor]:
    """`{name: whole tensor}` on every process (a collective under FSDP2 and ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    named = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: p.detach().full_tensor() if isinstance(p, DTensor) else p.detach().clone() for n, p in named}
