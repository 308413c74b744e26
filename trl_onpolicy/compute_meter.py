"""Charged compute: one meter for `trl-onpolicy compare` and `benchmarks/quality.py`.

[`Meter`] charges the seconds of a training run by phase and estimates its FLOPs from the tokens that pass through each
model's backbone; [`watch`] attaches it to a student and a teacher with forward hooks and a wrapped `generate`, and
[`Meter.close`] takes every hook off again. [`BudgetCallback`] stops a `Trainer` at the first step end past a budget of
charged seconds, scoring the model at evenly spaced points on the way (not charged), and [`reach`] interpolates the
compute a run needed to reach a score.

Two clocks, one rule for every method:

- `"process"` (the default on CPU): the process's CPU time (`time.process_time`, every thread), "CPU-seconds". Waiting
  is free under this clock: a teacher behind an HTTP server costs the run nothing here.
- `"cuda"` (the default when CUDA is available): wall time with `torch.cuda.synchronize()` at every phase edge, so
  that queued kernels are charged to the phase that launched them, "GPU-seconds".

Phases nest: time inside nested phases counts for the outermost one only (the teacher's forward passes while it
writes completions are *teacher_generation*, not *teacher*), and the time no phase claims is *update* (data, the
student's forward and backward, the optimizer). `excluded()` blocks (evaluation, data preparation) are not charged
and count for no phase. FLOPs: 2 N per token for a forward pass, 6 N for one under autograd (forward and backward;
N: the backbone's parameters plus an untied output head); attention's quadratic term is left out.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import TrainerCallback

CLOCKS = ("process", "cuda")
UNITS = {"process": "cpu_s", "cuda": "gpu_s"}  # the key of the charged seconds in a snapshot


class Meter:
    """
    Charged seconds split into phases, and FLOPs estimated from tokens through backbones (see the module docstring).

    Args:
        clock (`str`, *optional*): `"process"` (CPU time) or `"cuda"` (synchronized wall time); default: `"cuda"` when
            CUDA is available, else `"process"`.

    `snapshot()` gives `{<unit>: charged seconds, "phases": {...}, "flops": {...}, "tokens": {...}}` with the unit
    `cpu_s` or `gpu_s` (`meter.unit`).
    """

    def __init__(self, clock: str | None = None):
        clock = clock or ("cuda" if torch.cuda.is_available() else "process")
        if clock not in CLOCKS:
            raise ValueError(f"Unknown clock {clock!r}: use one of {CLOCKS}.")
        if clock == "cuda" and not torch.cuda.is_available():
            raise ValueError("The 'cuda' clock needs a CUDA device; on a CPU use clock='process' (CPU-seconds).")
        self.clock, self.unit = clock, UNITS[clock]
        self.t0 = self._now()
        self.excluded_s = 0.0
        self.phases = defaultdict(float)
        self.flops = defaultdict(float)
        self.tokens = defaultdict(int)
        self._stack: list[tuple[str, float]] = []
        self.paused = False
        self._handles: list = []  # forward hooks
        self._wrapped: list = []  # objects whose `generate` this meter replaced

    def _now(self) -> float:
        if self.clock == "process":
            return time.process_time()
        torch.cuda.synchronize()  # kernels queued so far belong to the phase that ends here
        return time.perf_counter()

    def charged(self) -> float:
        return self._now() - self.t0 - self.excluded_s

    def begin(self, name: str):
        self._stack.append((name, self._now()))

    def end(self):
        name, t = self._stack.pop()
        if not self._stack and not self.paused:
            self.phases[name] += self._now() - t

    @contextlib.contextmanager
    def phase(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    @contextlib.contextmanager
    def excluded(self):
        t, self.paused = self._now(), True
        try:
            yield
        finally:
            self.paused = False
            self.excluded_s += self._now() - t

    def snapshot(self) -> dict:
        charged = self.charged()
        phases = {k: round(v, 2) for k, v in self.phases.items()}
        phases["update"] = round(charged - sum(self.phases.values()), 2)
        return {self.unit: round(charged, 2), "phases": phases, "flops": dict(self.flops), "tokens": dict(self.tokens)}

    def watch_backbone(self, backbone, role: str, head_params: int = 0, phase: str | None = None):
        """Count tokens and FLOPs through `backbone` (2 N per token, 6 N under autograd); with `phase`, time it."""
        n_params = sum(p.numel() for p in backbone.parameters())

        def pre(module, args, kwargs):
            if phase:
                self.begin(phase)
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs["inputs_embeds"][..., 0]
            if not self.paused:
                tokens = ids.numel()
                mult = 6 if torch.is_grad_enabled() else 2
                key = f"{role}_{'train' if mult == 6 else 'forward'}"
                self.tokens[key] += tokens
                self.flops[key] += mult * (n_params + head_params) * tokens

        def post(module, args, kwargs, output):
            if phase:
                self.end()

        self._handles.append(backbone.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(backbone.register_forward_hook(post, with_kwargs=True))

    def watch_generate(self, model, phase: str = "generation"):
        """Time every `model.generate(...)` call as `phase` (`model`: a causal LM or a teacher backend)."""
        generate = model.generate

        def timed(*args, **kwargs):
            with self.phase(phase):
                return generate(*args, **kwargs)

        model.generate = timed
        self._wrapped.append(model)

    def close(self):
        """Remove every hook and `generate` wrapper this meter put on; the counts stay readable."""
        for handle in self._handles:
            handle.remove()
        for model in self._wrapped:
            with contextlib.suppress(AttributeError):
                del model.generate  # the instance attribute: the class's method shows again
        self._handles, self._wrapped = [], []


def _head_params(model) -> int:
    """An untied head is not in the backbone; a tied one is its embedding matrix, counted once."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "tie_word_embeddings", False):
        return 0
    head = model.get_output_embeddings()
    return 0 if head is None else head.weight.numel()


def watch(meter: Meter, student, teacher=None):
    """Meter a student (its backbone's tokens and FLOPs, its `generate` as *generation*) and a teacher model (its
    backbone's tokens and FLOPs, timed as *teacher*). Models are transformers causal LMs (a PEFT model too)."""
    meter.watch_backbone(student.get_decoder(), "student", head_params=_head_params(student))
    meter.watch_generate(student)
    if teacher is not None:
        meter.watch_backbone(teacher.get_decoder(), "teacher", head_params=_head_params(teacher), phase="teacher")


# ------------------------------------------------------------------------------------------------ budgets


def evenly_spaced(budget: float, evals: int) -> list[float]:
    """`evals` checkpoints of charged seconds, the last at `budget`."""
    return [budget * (i + 1) / evals for i in range(evals)]


class BudgetCallback(TrainerCallback):
    """
    At the first step end past each checkpoint of charged seconds: score the model (not charged) and append a point
    to `points`; past the last checkpoint: stop training. A run so ends within one step of its budget.

    Args:
        meter ([`Meter`]): The run's meter.
        checkpoints (`list[float]`): Charged seconds at which to score, increasing ([`evenly_spaced`]).
        evaluate (`Callable[[model], Any]`): The score of the live model, stored under `score_key`.
        points (`list[dict]`): Filled with `{**meter.snapshot(), "step", score_key: score}` per checkpoint.
        describe (`Callable[[dict], str]`, *optional*): A log line for a point; None prints nothing.
        score_key (`str`, *optional*, defaults to `"accuracy"`).

    `step_ends` holds the charged seconds at every step end (the cost of each step, for checking the overshoot).
    """

    def __init__(self, meter: Meter, checkpoints: list[float], evaluate: Callable, points: list,
                 describe: Callable[[dict], str] | None = None, score_key: str = "accuracy"):  # fmt: skip
        self.meter, self.checkpoints, self.evaluate, self.points = meter, checkpoints, evaluate, points
        self.describe, self.score_key = describe, score_key
        self.step_ends: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_ends.append(self.meter.charged())
        while len(self.points) < len(self.checkpoints) and self.step_ends[-1] >= self.checkpoints[len(self.points)]:
            snap = self.meter.snapshot()
            with self.meter.excluded():
                score = self.evaluate(model)
            self.points.append({**snap, "step": state.global_step, self.score_key: score})
            if self.describe is not None:
                print(self.describe(self.points[-1]), flush=True)
        if len(self.points) == len(self.checkpoints):
            control.should_training_stop = True


def reach(points: list[dict], target: float, x: str = "cpu_s", y: str = "accuracy") -> float | None:
    """Compute (`x`) at which the score (`y`) first reaches `target`, linearly interpolated between evaluations (the
    first point is usually the start: 0 s at the starting score); None when no evaluation reaches it."""
    previous = None
    for p in points:
        if p[y] >= target:
            if previous is None or previous[y] >= target:
                return p[x]
            frac = (target - previous[y]) / (p[y] - previous[y])
            return previous[x] + frac * (p[x] - previous[x])
        previous = p
    return None
