"""Tensor-memory counters shared by the benchmarks (`chunking.py`, `vs_trl.py`).

`LiveTensorBytes` is a `TorchDispatchMode` that sees the output of every ATen op (forward, backward, optimizer,
generation; CPU or any device), adds the bytes of each new tensor storage and subtracts them when the storage is
freed (a weakref finalizer). Its `peak` over a block is the block's "working" memory; `resting_bytes` counts what was
live before (weights, gradients, optimizer state). Tensor bytes only: not the allocator's slack, not Python objects,
not process RSS (whose high-water mark on a shared CPU machine is dominated by the allocator and by noise).
`torch.distributed._tools.mem_tracker.MemTracker` does the same with categories, but in torch 2.13 it fails on frozen
modules (it registers a gradient hook on every parameter of every module that runs, the teacher's too).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the `with` block and still alive: `live` now, `peak` at most."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __enter__(self):
        self.peak = self.live
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), inputs)
        return out

    def _track(self, storage, inputs: set[int]):
        key = storage.data_ptr()
        # empty, a storage already counted, or a view / in-place result of an input (a slice of a weight that was
        # live before the block is not new memory)
        if key == 0 or key in self._sizes or key in inputs:
            return
        self._sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int):
        self.live -= self._sizes.pop(key, 0)


def resting_bytes(modules, optimizer) -> int:
    """Weights (and any gradients) of `modules` plus the optimizer's state tensors, each storage once."""
    storages = {}
    tensors = [t for m in modules for p in m.parameters() for t in (p, p.grad) if t is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())
