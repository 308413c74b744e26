"""Part `training` of `gpu_check.py`: whole optimizer steps of our trainer against TRL's DistillationTrainer on the
Qwen-shaped models, timed with the device synchronised at step ends, with the peak device memory of the timed steps.
`train_block` is also what the `fsdp2` and `qlora` parts run."""

from __future__ import annotations

import gc
import statistics
import time
import traceback

from typing import TYPE_CHECKING

import torch
from _models import qwen2
from transformers import TrainerCallback

if TYPE_CHECKING:
    from gpu_check import Sizes

GiB = 2**30


# ------------------------------------------------------------------------------------------------- instruments
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """
    Before `vs_trl.Probe` in the callback list: synchronises the device at each step's end (so the probe's host clock
    holds the step's GPU work), takes the peak device memory over the timed steps, and stops the run at `deadline`
    (`time.perf_counter()`) once at least one step after the warm-up has been timed.
    """

    def __init__(self, device: str, warmup: int, deadline: float):
        self.device, self.warmup, self.deadline = device, warmup, deadline
        self.resting = self.peak = None
        self.stopped_early = False

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        if state.global_step == self.warmup and self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.resting = torch.cuda.memory_allocated()
        if state.global_step > self.warmup and time.perf_counter() > self.deadline:
            control.should_training_stop = self.stopped_early = state.global_step < state.max_steps

    def on_train_end(self, args, state, control, **kwargs):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()


def spread(values: list[float]) -> dict:
    """Median, min, quartiles and max of the timed values."""
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "q1": quartiles[0], "q3": quartiles[2],
            "max": max(values), "n": len(values)}  # fmt: skip


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ whole training steps
def train_block(name: str, sizes: Sizes, device: str, dtype, deadline: float, workdir: str, steps: int,
                make_student=None, callbacks=(), trainer_kwargs=None, **overrides) -> dict:  # fmt: skip
    """
    One run of `name` ("ours" or "trl"): `sizes.warmup_steps` + `steps` optimizer steps (fewer where `deadline`
    passes), through `vs_trl.build` with the Qwen-shaped models (`make_student()` builds another student). Returns
    the timed steps' clocks and memory.
    """
    from vs_trl import Probe, build

    free_memory(device)
    allocated_before = torch.cuda.memory_allocated() if device == "cuda" else None
    student = make_student() if make_student else qwen2(0, sizes.student, sizes.vocab, dtype, device)
    teacher = qwen2(1, sizes.teacher, sizes.vocab, dtype, device)
    warmup = sizes.warmup_steps
    clock, probe = StepClock(device, warmup, deadline), Probe()
    args = {"per_device_train_batch_size": sizes.batch, "use_cpu": device == "cpu", "bf16": dtype == torch.bfloat16,
            **overrides}  # fmt: skip
    trainer, teacher_model = build(name, sizes.vocab, sizes.completion, warmup + steps, f"{workdir}/{name}",
                                   [clock, probe, *callbacks], models=(student, teacher),
                                   trainer_kwargs=trainer_kwargs, **args)  # fmt: skip
    del student, teacher
    if device == "cuda":  # before the probe's hooks, so that they read the clock after the teacher's GPU work
        teacher_model.model.register_forward_pre_hook(lambda *_: torch.cuda.synchronize())
        teacher_model.model.register_forward_hook(lambda *_: torch.cuda.synchronize())
    probe.attach(trainer, teacher_model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    result = {
        "step_s": probe.step_times[warmup:], "generation_s": [g for g, _ in probe.phases[warmup:]],
        "teacher_s": [t for _, t in probe.phases[warmup:]], "completion_tokens": probe.tokens[warmup:],
        "warmup_step_s": probe.step_times[:warmup], "losses": [h["loss"] for h in logs],
        "stopped_early": clock.stopped_early, "allocated_before_GiB": none_or(allocated_before, GiB),
        "max_memory_allocated_GiB": none_or(clock.peak, GiB),
        # this run's own: what it allocated (models, optimizer state, the steps), not what an earlier block left
        "resting_GiB": none_or(clock.resting and clock.resting - allocated_before, GiB),
        "peak_GiB": none_or(clock.peak and clock.peak - allocated_before, GiB),
    }  # fmt: skip
    del trainer, teacher_model, probe
    free_memory(device)
    return result


def none_or(value, unit):
    return None if value is None else value / unit


def summarize(blocks: list[dict], batch: int) -> dict:
    """One trainer's blocks: the spread of every timed step, tokens/s at the median step, the largest peak."""
    keys = ("step_s", "generation_s", "teacher_s", "completion_tokens")
    pooled = {k: [v for b in blocks for v in b[k]] for k in keys}
    step = spread(pooled["step_s"])
    tokens = statistics.mean(pooled["completion_tokens"])
    peaks = [b["peak_GiB"] for b in blocks if b["peak_GiB"] is not None]
    return {
        "step_s": step, "all_step_s": pooled["step_s"],
        "generation_s_median": statistics.median(pooled["generation_s"]),
        "teacher_s_median": statistics.median(pooled["teacher_s"]),
        "update_s_median": statistics.median(s - g - t for s, g, t in zip(pooled["step_s"], pooled["generation_s"],
                                                                          pooled["teacher_s"])),
        "completion_tokens_per_step": tokens, "mean_completion_length": tokens / batch,
        "completion_tokens_per_s": tokens / step["median"], "peak_GiB": max(peaks) if peaks else None,
        "resting_GiB": blocks[0]["resting_GiB"], "stopped_early": any(b["stopped_early"] for b in blocks),
        "blocks": blocks,
    }  # fmt: skip


def part_training(sizes: Sizes, device: str, dtype, deadline: float, workdir: str) -> dict:
    """
    Ours against TRL's DistillationTrainer, in alternating blocks; each block gets an equal share of the time left. A
    trainer that fails is recorded with its error and not run again; the other goes on.
    """
    runs, errors = {"ours": [], "trl": []}, {}
    order = [name for _ in range(sizes.blocks) for name in runs]
    for i, name in enumerate(order):
        if name in errors:
            continue
        block_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(order) - i)
        block = recorded(train_block, name, sizes, device, dtype, block_deadline, workdir, sizes.timed_steps)
        free_memory(device)
        if "error" in block:
            errors[name] = block
        else:
            runs[name].append(block)
        print(f"  training: {name} block {i // 2 + 1}: " + (block["error"][:200] if "error" in block else
              f"median step {statistics.median(block['step_s']):.3f} s"), flush=True)  # fmt: skip
    result = {name: errors.get(name) or summarize(blocks, sizes.batch) for name, blocks in runs.items()}
    if not errors:
        result["ratios_ours_over_trl"] = ratios(result["ours"], result["trl"])
    return result


def recorded(fn, *args, **kwargs) -> dict:
    """`fn(*args, **kwargs)`, or its failure as a result: `{"error": "Type: message", "traceback": its end}`."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (a failure is a result to record; the run goes on)
        return {"error": f"{type(e).__name__}: {e}"[:4000], "traceback": traceback.format_exc()[-4000:]}


def ratios(ours: dict, trl: dict) -> dict:
    out = {"median_step_s": ours["step_s"]["median"] / trl["step_s"]["median"],
           "completion_tokens_per_s": ours["completion_tokens_per_s"] / trl["completion_tokens_per_s"]}  # fmt: skip
    if ours.get("peak_GiB") and trl.get("peak_GiB"):
        out["peak_memory"] = ours["peak_GiB"] / trl["peak_GiB"]
    return out


