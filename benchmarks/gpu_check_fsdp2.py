"""Part `fsdp2` of `gpu_check.py`, which launches it: a few steps of our trainer under accelerate's FSDP2 plugin.

    python3 -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_check_fsdp2.py --out fsdp2.json

The plugin's fields are those of `examples/accelerate_configs/fsdp2.yaml` (read from it; transformers drops their
`fsdp_` prefix), its `mixed_precision` as `bf16`, and the Qwen2 decoder layer as the unit to wrap. The same models,
batch and completion length as the `training` part, `gpu_check.Sizes.few_steps` timed steps after a warm-up. Writes
the timed steps (as `training` does), accelerate's distributed type, and whether every parameter of the student is a
`DTensor` (what FSDP2's `fully_shard` makes of them) after training.

On CPU (`--device cpu`, the smoke test) accelerate switches to FSDP only for GPU kinds of launch; `fsdp_on_cpu`
patches that (../shared/ARCHITECTURE.md, "Launchers on CPU").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from _gpu_training import summarize, train_block  # benchmarks/ is on sys.path (the script's folder)
from gpu_check import FULL, QUICK
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "accelerate_configs" / "fsdp2.yaml"


def fsdp_on_cpu() -> None:
    """
    Make accelerate's state take an FSDP plugin on CPU: after `AcceleratorState.__init__`, a run with an FSDP plugin
    whose distributed type came out `MULTI_CPU` (the CPU's torchrun launch) is set to `FSDP`, in `PartialState`'s
    shared state too, as `state.py` does for GPU kinds.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = patched


def training_arguments(device: str) -> dict:
    """`fsdp` and `fsdp_config` as `examples/accelerate_configs/fsdp2.yaml` declares them."""
    config = yaml.safe_load(CONFIG.read_text())
    fsdp_config = {**config["fsdp_config"], "fsdp_transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}
    args = {"fsdp": "full_shard", "fsdp_config": fsdp_config, "bf16": config["mixed_precision"] == "bf16"}
    if device == "cpu":
        args["ddp_backend"] = "gloo"
    return args


class ShardCheck(TrainerCallback):
    """At the end of training: how many of the student's parameters are `DTensor`s."""

    result: dict = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = list(model.parameters())
        dtensors = sum(isinstance(p, DTensor) for p in params)
        self.result = {"parameters": len(params), "dtensor_parameters": dtensors,
                       "all_parameters_dtensor": dtensors == len(params) > 0}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seconds", type=float, default=120.0, help="stop after the first timed step past this")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default="/tmp/gpu-check-fsdp2")
    parser.add_argument("--trainer", choices=("ours", "trl"), default="ours", help="TRL's, to tell a launch problem "
                        "from one of our trainer")  # fmt: skip
    cli = parser.parse_args()
    deadline = time.perf_counter() + cli.seconds
    sizes = QUICK if cli.quick else FULL
    if cli.device == "cpu":
        torch.set_num_threads(1)
        fsdp_on_cpu()
    from accelerate.state import PartialState

    check = ShardCheck()
    args = training_arguments(cli.device)
    dtype = getattr(torch, cli.dtype)
    block = train_block(cli.trainer, sizes, cli.device, dtype, deadline, cli.workdir, sizes.few_steps,
                        callbacks=[check], **args)  # fmt: skip
    state = PartialState()
    result = {**summarize([block], sizes.batch), **check.result, "distributed_type": str(state.distributed_type),
              "num_processes": state.num_processes, "trainer": cli.trainer,
              "fsdp_config": args["fsdp_config"]}  # fmt: skip
    if state.is_main_process:
        Path(cli.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
