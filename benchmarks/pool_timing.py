"""Wall time per optimizer step with rollout pools (`steps_per_generation`), on the toy task, CPU.

    OMP_NUM_THREADS=1 python benchmarks/pool_timing.py                  # 16 steps x 3 repeats per setting (~10 min)
    OMP_NUM_THREADS=1 python benchmarks/pool_timing.py --steps 12 --repeats 2

The standard toy task of `quality.py`: the built-in 3 x 128 teacher, the 2 x 128 student warm-started on the task,
batch 32 prompts, on-policy JSD, AdamW. Settings: fresh rollouts every step (`1`); pools of 4 steps generated one
step's rows per sampler call (`4`, the default `generation_batch_size`) and all 128 rows in one call (`4x128`); one
pool per round (`round`, `num_rounds = steps / 8`: pools of 8 steps, 128 rows per call). The settings take turns in
each repeat. A step's wall time is from one `on_step_end` to the next (the first from `on_train_begin`); a pool's
generation falls on its first step, so the mean over whole pools is the cost per step at equal work, and the median
step of a pooled run is one that generated nothing. Writes `results/pool_timing.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
import quality  # the toy pair, prompts and the completion length of the quality benchmark)

RESULTS = Path(__file__).parent / "results" / "pool_timing.json"
SETTINGS = {  # name -> config overrides
    "1": {},
    "4": {"steps_per_generation": 4},
    "4x128": {"steps_per_generation": 4, "generation_batch_size": 128},
    "round": {"steps_per_generation": "round", "generation_batch_size": 128},
}


class StepClock(TrainerCallback):
    """Seconds of each optimizer step, from the previous step's end (or the start of training)."""

    def __init__(self):
        self.seconds, self._last = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


def one_run(name: str, steps: int, pair, length: int, workdir: str) -> dict:
    from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer

    teacher, student, tokenizer = pair
    torch.manual_seed(0)
    clock = StepClock()
    extra = dict(SETTINGS[name])
    if name == "round":
        extra["num_rounds"] = max(2, steps // 8)
    common = quality.common_args(f"{workdir}/out-{name}", seed=0, lr=1e-3)
    common.update(max_steps=steps, logging_steps=1)
    config = OnPolicyDistillConfig(**common, lmbda=1.0, loss_type="jsd", beta=0.5, max_completion_length=length,
                                   temperature=1.0, **extra)  # fmt: skip
    trainer = OnPolicyDistillTrainer(
        copy.deepcopy(student),  # every run starts from the same warm-started student
        teacher_model=teacher, args=config, train_dataset=quality.prompts("standard", 0, n=32 * steps),
        processing_class=tokenizer, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "step_seconds": clock.seconds,
        "generation_seconds": [h["time/generation"] for h in logs],
        "teacher_seconds": [h["time/teacher"] for h in logs],
        "ages": [h.get("rollouts/age", 0.0) for h in logs],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    cli = parser.parse_args()
    torch.set_num_threads(1)
    teacher, student, tokenizer, _, _ = quality.load_pair("standard")
    length = quality.completion_length(tokenizer, "standard")
    runs = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(cli.repeats):
            for name in SETTINGS:
                run = one_run(name, cli.steps, (teacher, student, tokenizer), length, workdir)
                runs[name].append(run)
                print(f"repeat {repeat} {name:>6}: mean {statistics.mean(run['step_seconds']):.3f} s/step, "
                      f"generation {sum(run['generation_seconds']):.2f} s", flush=True)  # fmt: skip
    summary = {}
    for name, done in runs.items():
        means = [statistics.mean(r["step_seconds"]) for r in done]
        summary[name] = {
            "mean_step_seconds_median_over_repeats": statistics.median(means),
            "median_step_seconds": statistics.median(s for r in done for s in r["step_seconds"]),
            "generation_seconds_per_step": statistics.median(statistics.mean(r["generation_seconds"]) for r in done),
            "teacher_seconds_per_step": statistics.median(statistics.mean(r["teacher_seconds"]) for r in done),
        }
        print(name, json.dumps(summary[name]))
    result = {
        "steps": cli.steps, "repeats": cli.repeats, "batch": 32, "max_completion_length": length,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1},
        "summary": summary, "runs": runs,
    }  # fmt: skip
    Path(cli.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
