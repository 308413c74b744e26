"""The pilots of `trl-onpolicy compare`: one short training run per (method, seed), metered and scored on the way.

A pilot is built with `distill`'s own [`~trl_onpolicy.commands.distill.build_trainer`] from its parsed flags (so the
student is loaded again from the recipe's `model_name_or_path` for every pilot), scored once before training, then
trained under a [`~trl_onpolicy.compute_meter.Meter`] until [`~trl_onpolicy.compute_meter.BudgetCallback`] stops it
at the first step end past the budget. The meter watches the student (its backbone and `generate`) and a local
teacher (its backbone; its `generate` as *teacher_generation* when it writes the completions, `seq_kd`); a teacher
behind a server or a cache is charged only by the clock (see the meter's clocks). The hooks come off after each pilot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from ..compute_meter import BudgetCallback, Meter, evenly_spaced, watch
from ..pilot_report import format_recommendation, format_table, make_figure, recommend, summarise


def fingerprint(model) -> str:
    """A hash of every parameter's bytes: equal for equal starting weights."""
    digest = hashlib.blake2b(digest_size=8)
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def eval_examples(hook) -> int | None:
    """Examples of the primary eval task (for the sampling error of its score): the toy tasks' size or `eval_limit`;
    None when unknown (a fraction of a task of unknown size, or no limit)."""
    limit = hook.limit
    if hook.tasks[0].startswith("toy_"):
        size = hook.toy_eval_size
        return size if limit is None else (min(int(limit), size) if limit >= 1 else round(limit * size))
    return int(limit) if limit is not None and limit >= 1 else None


def _describe(label: str, seed: int, unit: str, budget: float):
    seconds = "CPU-s" if unit == "cpu_s" else "GPU-s"

    def line(point: dict) -> str:
        scores = ", ".join(f"{t} {v:.3f}" for t, v in point["scores"].items())
        phases = " ".join(f"{k} {v:.1f}" for k, v in point["phases"].items())
        return (f"  [{label}, seed {seed}] step {point['step']:5d} | {point[unit]:7.1f}/{budget:g} {seconds} | "
                f"{scores} | {phases}")  # fmt: skip

    return line


def run_pilot(label: str, seed: int, argv: list[str], recipe, dataset, hook, args, clock: str | None) -> dict:
    """One pilot (see the module docstring): `{"method", "seed", "initial_param_checksum", "points", ...}`."""
    from transformers import PrinterCallback, set_seed

    from ..eval import unwrap_model
    from .distill import build_trainer

    started = time.perf_counter()
    script_args, training_args, model_args = recipe.parse_args_and_config(args=argv)
    set_seed(seed)  # LoRA adapters and any other fresh weights: the same in every pilot of this seed
    trainer = build_trainer(script_args, training_args, model_args, callbacks=[], train_dataset=dataset)
    trainer.pop_callback(PrinterCallback)  # one line per evaluation point instead of the Trainer's dicts
    student = unwrap_model(trainer.model, trainer)
    tokenizer = trainer.processing_class

    def evaluate(model):
        return hook.evaluate(model, tokenizer, output_dir=args.output_dir, trainer=trainer)["scores"]

    checksum, start_scores = fingerprint(student), evaluate(student)
    scores = ", ".join(f"{t} {v:.3f}" for t, v in start_scores.items())
    print(f"  [{label}, seed {seed}] start: {scores} (parameters {checksum})", flush=True)
    meter = Meter(clock)  # charged from here: the trainer's set-up in `train()`, then the steps
    teacher = getattr(trainer.teacher, "model", None)
    watch(meter, student, teacher if teacher is not None and teacher is not student else None)
    if training_args.seq_kd:
        meter.watch_generate(trainer.teacher, phase="teacher_generation")
    points = []
    budget = BudgetCallback(meter, evenly_spaced(args.budget, args.evals), evaluate, points,
                            describe=_describe(label, seed, meter.unit, args.budget), score_key="scores")  # fmt: skip
    trainer.add_callback(budget)
    try:
        trainer.train()
    finally:
        meter.close()
    start = {meter.unit: 0.0, "step": 0, "scores": start_scores, "phases": {}, "flops": {}, "tokens": {}}
    ends = budget.step_ends
    return {
        "method": label, "seed": seed, "initial_param_checksum": checksum, "points": [start, *points],
        "last_step_s": round(ends[-1] - (ends[-2] if len(ends) > 1 else 0.0), 3),
        "wall_s": round(time.perf_counter() - started, 1), "argv": argv,
    }  # fmt: skip


def run_pilots(plan: list[tuple[str, int, list[str]]], recipe, script_args, dataset, args) -> dict:
    """Every pilot of `plan` ((method, seed, flags) each), one after the other; the result without the environment."""
    import datasets
    from transformers.utils import logging as hf_logging

    from .distill import eval_callbacks

    hf_logging.set_verbosity_error()  # the pilots' own lines, not every model load's
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    hook = eval_callbacks(script_args)[0]
    clock = None if args.clock == "auto" else args.clock
    pilots = []
    for i, (label, seed, argv) in enumerate(plan):
        print(f"[compare] pilot {i + 1}/{len(plan)}: {label}, seed {seed}", flush=True)
        pilots.append(run_pilot(label, seed, argv, recipe, dataset, hook, args, clock))
        last = pilots[-1]["points"][-1]
        print(f"  [{label}, seed {seed}] done: {last['step']} steps, {pilots[-1]['wall_s']:.0f} s wall", flush=True)
    unit = next(k for k in pilots[0]["points"][0] if k in ("cpu_s", "gpu_s"))
    task = hook.tasks[0]
    n_eval = eval_examples(hook)
    summary = summarise(pilots, task, unit, args.target)
    setup = {"methods": list(dict.fromkeys(p["method"] for p in pilots)), "seeds": sorted({p["seed"] for p in pilots}),
             "budget": args.budget, "evals": args.evals, "checkpoints": evenly_spaced(args.budget, args.evals),
             "clock": "process" if unit == "cpu_s" else "cuda", "unit": unit, "target": args.target,
             "primary_task": task, "eval_tasks": hook.tasks, "eval_examples": n_eval}  # fmt: skip
    return {"setup": setup, "pilots": pilots, "summary": summary,
            "recommendation": recommend(summary, task, unit, args.target, n_eval)}  # fmt: skip


def write_outputs(result: dict, output_dir: str) -> None:
    """`compare.json`, `compare.md` (the table and the recommendation) and `compare.png`; print the table and the
    recommendation."""
    setup = result["setup"]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    table = format_table(result["summary"], setup["primary_task"], setup["unit"], setup["checkpoints"], setup["target"])
    text = table + "\n" + format_recommendation(result["recommendation"])
    with open(os.path.join(output_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(text)
    make_figure(result["summary"], setup["primary_task"], setup["unit"], setup["target"]).savefig(
        os.path.join(output_dir, "compare.png"), dpi=110
    )
    print("\n" + text + f"\nWrote compare.json, compare.md and compare.png to {output_dir}.")
