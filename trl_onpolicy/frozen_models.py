"""The teacher and the reference model: frozen models, placed the way the launcher places the student.

[`place_frozen_model`] puts a frozen model (evaluation mode, `requires_grad=False`, in no optimizer) where the launcher
(see [`~trl_onpolicy.launchers`]) puts the student's weights:

| launcher | frozen model |
| --- | --- |
| one process, DDP, FSDP1, ZeRO-1/2 | whole on every device (refused up front when it is larger than one GPU) |
| FSDP2 | sharded with `fully_shard` (one unit per decoder layer, then the rest), in its own dtype |
| ZeRO-3 | partitioned by a DeepSpeed inference engine (ZeRO-3, no optimizer; `offload_param` as configured) |

Loading on the meta device: with `fsdp_cpu_ram_efficient_loading`, [`load_frozen_model`] reads the weights on the
main process only (the others hold `meta` tensors), and [`place_frozen_model`] broadcasts them from it, then shards
them (FSDP2) or keeps them whole (FSDP1).
Under ZeRO-3, `from_pretrained` already partitions a model it loads (`zero.Init`), and the engine takes it as it is.

A sharded frozen model's forward pass is a collective. Callers keep the count equal on every process (see
[`~trl_onpolicy.teachers.LocalTeacher`]), and read the vocabulary size from the config ([`vocab_size`]), since a
partitioned weight reads `shape == (0,)`.
"""

from __future__ import annotations

import copy
import logging

import torch

from ._compat import DTensor, fully_shard
from .launchers import FSDP2, ZERO3, any_process, launcher

logger = logging.getLogger(__name__)


def vocab_size(model) -> int:
    """Rows of the model's output head, from its config (a ZeRO-3 partitioned weight reads `shape == (0,)`)."""
    return int(model.config.get_text_config().vocab_size)


def load_frozen_model(path: str, **init_kwargs):
    """
    `AutoModelForCausalLM.from_pretrained(path, **init_kwargs)`, except under FSDP with `cpu_ram_efficient_loading`
    (examples/accelerate_configs/fsdp2.yaml): there the main process alone reads the weights and the others build the
    model on the meta device, as accelerate does for the student (transformers 5 reads them on every process: as many
    copies in host RAM at once as there are processes); [`place_frozen_model`] then broadcasts them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not _loads_on_meta():
        return AutoModelForCausalLM.from_pretrained(path, **init_kwargs)
    trust = init_kwargs.get("trust_remote_code", False)
    config = AutoConfig.from_pretrained(path, revision=init_kwargs.get("revision"), trust_remote_code=trust)
    dtype = init_kwargs.get("dtype", init_kwargs.get("torch_dtype"))
    kwargs = {"trust_remote_code": trust, "dtype": getattr(config, "dtype", None) if dtype == "auto" else dtype}
    if "attn_implementation" in init_kwargs:
        kwargs["attn_implementation"] = init_kwargs["attn_implementation"]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **{k: v for k, v in kwargs.items() if v is not None})


def _loads_on_meta() -> bool:
    """This process is not the main one of an FSDP run with `cpu_ram_efficient_loading` (the trainer's FSDP plugin,
    or, before it exists, the environment `accelerate launch` sets from an FSDP config)."""
    import os

    from accelerate.state import AcceleratorState, PartialState

    if not PartialState._shared_state:
        return False
    plugin = getattr(AcceleratorState(), "fsdp_plugin", None) if AcceleratorState._shared_state else None
    if plugin is not None:
        ram_efficient = bool(getattr(plugin, "cpu_ram_efficient_loading", False))
    else:
        flags = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")
        ram_efficient = all(os.environ.get(flag, "false").lower() == "true" for flag in flags)
    state = PartialState()
    return ram_efficient and state.num_processes > 1 and not state.is_main_process


def place_frozen_model(model, accelerator):
    """`model` frozen and placed for the launcher of `accelerator` (see the module docstring). Returns the model."""
    model.eval()
    model.requires_grad_(False)
    kind = launcher(accelerator)
    if kind == ZERO3:
        return _zero3_engine(model, accelerator)
    if kind != FSDP2:  # replicated: refused before anything is allocated on the device
        check_fits(model_bytes(model), device_memory(accelerator.device), kind)
    if any_process(accelerator, any(t.is_meta for t in model.state_dict().values())):
        _load_from_main(model, accelerator, shard=kind == FSDP2)
    elif kind == FSDP2:
        _fully_shard(model, accelerator)
    return model if kind == FSDP2 else model.to(accelerator.device)


# --------------------------------------------------------------------------------------------------- replicated
def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (whole, as a replicated copy holds them)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def device_memory(device) -> int | None:
    """Total memory of a GPU, None for other devices (nothing to compare against)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def check_fits(needed: int, available: int | None, kind: str) -> None:
    """Refuse a replicated frozen model larger than one device, naming the launchers that shard it."""
    if available is None or needed <= available:
        return
    launched = {"zero": "DeepSpeed ZeRO-1/2 replicates", "fsdp1": "FSDP1 keeps", "ddp": "DDP replicates"}
    how = launched.get(kind, "a single process holds")
    raise ValueError(
        f"The teacher (or reference model) needs {needed / 2**30:.1f} GiB and one device has {available / 2**30:.1f} "
        f"GiB, and {how} it whole on every device. Launch with DeepSpeed ZeRO-3 "
        "(examples/accelerate_configs/zero3.yaml) or FSDP2 (fsdp2.yaml), which shard it, or serve the teacher on its "
        "own machines (`trl-onpolicy serve-teacher`, or vLLM) and pass its URL as `teacher_model`."
    )


def _broadcast(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """The main process's `tensor` on every process (the others' may be on the meta device)."""
    import torch.distributed as dist

    local = tensor.to(accelerator.device) if accelerator.is_main_process else torch.empty(
        tensor.shape, dtype=tensor.dtype, device=accelerator.device
    )  # fmt: skip
    dist.broadcast(local, src=0)
    return local


def _non_persistent_buffers(model, accelerator) -> dict[str, torch.Tensor]:
    """The main process's non-persistent buffers (rotary frequencies...): computed in `__init__`, not in the state
    dict, so neither loaded nor broadcast with it."""
    names = {f"{m}.{b}" if m else b for m, module in model.named_modules() for b in module._non_persistent_buffers_set}
    return {name: _broadcast(buf, accelerator) for name, buf in model.named_buffers() if name in names}


def _restore_buffers(model, buffers: dict[str, torch.Tensor]) -> None:
    for name, buf in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attr, buf, persistent=False)


def _load_from_main(model, accelerator, shard: bool) -> None:
    """The main process's weights on every process: broadcast into the others' meta tensors (then sharded)."""
    if accelerator.is_main_process and any(t.is_meta for t in model.state_dict().values()):
        raise ValueError("The main process holds the teacher on the meta device: there are no weights to broadcast.")
    logger.info("The teacher's weights are broadcast from the main process%s.", " and sharded" if shard else "")
    buffers, full = _non_persistent_buffers(model, accelerator), model.state_dict()
    if shard:
        from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict

        model.to(torch.device("meta"))
        _fully_shard(model, accelerator)
        fsdp2_load_full_state_dict(accelerator, model, full)
    else:
        model.load_state_dict({name: _broadcast(tensor, accelerator) for name, tensor in full.items()}, assign=True)
    _restore_buffers(model, buffers)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.requires_grad_(False)


# ------------------------------------------------------------------------------------------------------- FSDP2
def _fully_shard(model, accelerator) -> None:
    """One FSDP2 unit per decoder layer (the model's `_no_split_modules`), then the root: every unit reshards after its
    forward pass (no backward pass follows). No mixed-precision policy: the model computes in its own dtype."""
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {"reshard_after_forward": True, "offload_policy": plugin.cpu_offload}
    if mesh is not None:
        kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in reversed(list(model.modules())[1:]):  # inner units before the ones that hold them
        if type(module).__name__ in layer_names:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    model._is_fsdp_managed_module = True  # transformers' `generate` then syncs the processes (`synced_gpus`)


# ------------------------------------------------------------------------------------------------------ ZeRO-3
def _zero3_engine(model, accelerator):
    """A DeepSpeed ZeRO-3 inference engine around `model` (partitioned now if `zero.Init` did not already); the
    student's config without its optimizer, scheduler and optimizer offload. Returns the engine's module."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "gradient_clipping", "train_batch_size"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"] = 1, 1
    engine, *_ = deepspeed.initialize(model=model, config=_without_auto(config))
    engine.module.eval()
    engine.module.__dict__["_deepspeed_engine"] = engine  # kept alive with the model, not registered as a submodule
    return engine.module


def _without_auto(config):
    """The config without the `"auto"` values the Trainer fills in only when it prepares the student."""
    if isinstance(config, dict):
        return {k: _without_auto(v) for k, v in config.items() if v != "auto"}
    return config


# ------------------------------------------------------------------------------------------------------- calls
def base_model_outputs(model, backbone, **kwargs):
    """
    `backbone(**kwargs)`: the final hidden states of `model`'s network without its head. An FSDP2-sharded `model`
    runs through its own forward instead (`model` is the outermost module, the FSDP root: its unit gathers the weights
    no inner unit holds), and the backbone's output is caught with a hook; the head then projects one position per row.
    """
    if DTensor is None or not any(isinstance(p, DTensor) for p in model.parameters()):
        return backbone(**kwargs)
    caught = []
    handle = backbone.register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        model(**kwargs, logits_to_keep=1)
    finally:
        handle.remove()
    return caught[0]
