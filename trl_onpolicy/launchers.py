"""What each launcher shards, and the decisions every process must take together.

`accelerate launch` runs the trainer under one of these (accelerate's `distributed_type`, see [`launcher`]):

| launcher | the student's weights | what a forward pass is |
| --- | --- | --- |
| one process, DDP | whole on every process | local |
| FSDP2 (`fully_shard`) | `DTensor` shards, 1/N per process | an all-gather per FSDP unit (per decoder layer) |
| DeepSpeed ZeRO-3 | partitioned (`p.ds_id`, `p.shape == (0,)`) | an all-gather per submodule call |
| DeepSpeed ZeRO-1/2 | whole (optimizer state sharded) | local |

Two rules follow, and the package keeps them:

- a forward pass through a sharded model is a collective: every process makes the same number of them, in the same
  order (generation with `synced_gpus`, teacher passes counted and equalised, the eval hook run on every process);
- a decision one process could take alone (a SIGTERM seen, a checkpoint file found, a non-finite gradient in its
  shard) is reduced over the processes first ([`any_process`], `trl_onpolicy.nonfinite`), so that they all take the
  same branch.
"""

from __future__ import annotations

import logging
import os

import torch

from ._compat import DTensor, FSDPModule

logger = logging.getLogger(__name__)

SINGLE, DDP, FSDP1, FSDP2, ZERO, ZERO3 = "single", "ddp", "fsdp1", "fsdp2", "zero", "zero3"
SHARDED = (FSDP2, ZERO3)  # the launchers whose forward passes are collectives


def launcher(accelerator) -> str:
    """`"single"`, `"ddp"`, `"fsdp1"`, `"fsdp2"`, `"zero"` (DeepSpeed ZeRO stage 0-2) or `"zero3"`."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "DEEPSPEED":
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return ZERO3 if stage == 3 else ZERO
    if kind == "FSDP":
        return FSDP2 if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2 else FSDP1
    return SINGLE if accelerator.num_processes == 1 else DDP


def is_partitioned(param: torch.Tensor) -> bool:
    """A parameter only part of which is in this process: an FSDP2 `DTensor`, or a ZeRO-3 parameter not gathered."""
    if DTensor is not None and isinstance(param.data, DTensor):
        return True
    if hasattr(param, "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        return param.ds_status != ZeroParamStatus.AVAILABLE
    return False


def has_sharded_parameters(model) -> bool:
    """Whether any of `model`'s parameters is sharded by FSDP2 or ZeRO-3 (gathered or not)."""
    return any(hasattr(p, "ds_id") or (DTensor is not None and isinstance(p, DTensor)) for p in model.parameters())


def needs_synced_generation(model) -> bool:
    """Generation must keep every process stepping until all are done (`synced_gpus`): several processes, and weights
    a forward pass gathers (FSDP2 `DTensor`s, ZeRO-3 partitions not gathered beforehand). transformers 5.24 sets it
    itself for ZeRO-3 and for the modules torch 2.13's `fully_shard` marks; this says it whatever the versions."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(is_partitioned(p) for p in model.parameters())


def is_fsdp_module_of(module, cls: type) -> bool:
    """`module` is a `cls` (exactly), possibly as FSDP2 made it: `fully_shard` swaps the class for `FSDP<cls>`."""
    if type(module) is cls:
        return True
    return FSDPModule is not None and isinstance(module, FSDPModule) and type(module).__bases__[-1] is cls


def call_with_whole_head(model, loss_fn, hidden: torch.Tensor):
    """
    `loss_fn(hidden)` with the output head of `model` whole. Under ZeRO-3 it runs as the head's own forward, so that
    DeepSpeed gathers the head's parameters before it (on every process, once) and again for the backward pass, as
    for any submodule call; elsewhere it runs directly. Under FSDP2, accelerate 1.16 puts the head in a unit with the
    final norm that stays unsharded after the forward pass preceding this call (`reshard_after_forward=False`); a head
    still sharded there is refused.

    `loss_fn` returns an object whose `loss` is the differentiable loss ([`~trl_onpolicy.loss.LossSums`]).
    """
    head = model.get_output_embeddings()
    params = list(head.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        forward = head.forward

        def redirected(h):
            head.forward = forward
            sums = loss_fn(h)
            return sums.loss, sums  # DeepSpeed hooks the backward pass onto the tensors a forward returns

        head.forward = redirected
        try:
            loss, sums = head(hidden)
        finally:
            head.forward = forward
        sums.loss = loss
        return sums
    if DTensor is not None and any(isinstance(p.data, DTensor) for p in params):
        raise RuntimeError(
            "The student's output head is still sharded (FSDP2 DTensor) after its forward pass, so the loss cannot "
            "walk its vocabulary. accelerate 1.16 keeps the head's FSDP unit (with the final norm) unsharded after the "
            "forward pass (`reshard_after_forward=False`): use accelerate 1.16, or train with DeepSpeed ZeRO-3."
        )
    return loss_fn(hidden)


def processes_with(accelerator, flag: bool) -> int:
    """How many processes have `flag` set (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return int(bool(flag))
    value = torch.tensor([float(bool(flag))], device=accelerator.device)
    return int(accelerator.reduce(value, reduction="sum").item())


def on_every_process(accelerator, path: str, what: str, otherwise: str) -> bool:
    """Whether every process has its own file `path` (a collective). A process resuming alone from its file would
    leave the others out of collectives, so the files are used only when all are there; when only some are, a
    warning says `folder` holds `what` of some processes only and that `otherwise` happens instead."""
    found = processes_with(accelerator, os.path.isfile(path))
    if 0 < found < accelerator.num_processes:
        logger.warning(
            "%s holds the %s of %d of %d processes (written with another number of processes?): they are ignored, "
            "and %s.", os.path.dirname(path), what, found, accelerator.num_processes, otherwise,
        )  # fmt: skip
    return found == accelerator.num_processes


def any_process(accelerator, flag: bool) -> bool:
    """`flag` or-ed over the processes (a collective: every process must call it)."""
    return processes_with(accelerator, flag) > 0


def max_over_processes(accelerator, value: int) -> int:
    """The largest `value` of any process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return int(value)
    local = torch.tensor([int(value)], dtype=torch.long, device=accelerator.device)
    return int(accelerator.gather(local).max().item())
