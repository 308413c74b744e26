"""Per-step time of the same training run with each teacher backend, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/teacher_backends.py           # writes benchmarks/results/teacher_backends.json
    OMP_NUM_THREADS=1 python benchmarks/teacher_backends.py --quick   # fewer steps, for a smoke check

One script, one dataset, one student; only `teacher_model_name_or_path` changes (a path, a server URL, a cache folder,
a dict of two paths):

- local: the teacher in this process (full distribution, or `teacher_top_k=20`);
- server: `trl-onpolicy serve-teacher` on 127.0.0.1 in another process, top-20 over HTTP;
- cache: top-20 log-probs precomputed by `build_teacher_cache` (its build time is reported separately);
- two teachers: routed by a column, and a weighted token-level mixture;
- hidden-state matching on top of the local teacher.

Models: the toy recipe's shapes, randomly initialised (timing does not depend on what they learned): teacher Llama
3 x 128, student 2 x 64, the toy BPE tokenizer (627 tokens); batch 16 of the toy task's dataset completions
(`lmbda=0`, so every backend scores the very same tokens and the comparison is of the teacher alone). Each backend
runs `--repeats` times in rotation; a backend's figure is the best of its repeats' medians (steps after the warm-up).
Times are comparable within one run of this script, not across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
import trl
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

import trl_onpolicy
from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer, toy
from trl_onpolicy.teachers import build_teacher_cache

RESULTS = Path(__file__).parent / "results" / "teacher_backends.json"
BATCH, TOP_K = 16, 20


class StepClock(TrainerCallback):
    def __init__(self):
        self.times = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trl_onpolicy.commands.cli", "serve-teacher", model_dir, "--port", str(port)]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("serve-teacher did not start")


def run(name, spec, tokenizer, dataset, steps, workdir, **overrides) -> dict:
    """The same training run, with `spec` as the teacher; returns its median step and teacher times."""
    torch.manual_seed(0)
    student = toy.build_model(toy.STUDENT_LAYERS, toy.STUDENT_HIDDEN, tokenizer, seed=0)
    values = dict(
        output_dir=str(Path(workdir) / name), max_steps=steps, per_device_train_batch_size=BATCH, lmbda=0.0,
        max_completion_length=96, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=True, teacher_model_name_or_path=spec, seed=0,
    )  # fmt: skip
    values.update(overrides)
    clock = StepClock()
    trainer = OnPolicyDistillTrainer(
        student, args=OnPolicyDistillConfig(**values), train_dataset=dataset, processing_class=tokenizer,
        callbacks=[clock],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # one line per backend, not one per step
    trainer.train()
    steps_s = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # the first step warms up
    logs = [h for h in trainer.state.log_history if "loss" in h][1:]
    return {
        "step_s": statistics.median(steps_s),
        "teacher_s": statistics.median(h["time/teacher"] for h in logs),
        "loss_first": [h for h in trainer.state.log_history if "loss" in h][0]["loss"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    cli = parser.parse_args()
    steps, repeats = (4, 1) if cli.quick else (12, cli.repeats)
    torch.set_num_threads(1)
    workdir = tempfile.mkdtemp(prefix="bench-teachers-")
    tokenizer = toy.build_tokenizer()
    data = toy.make_dataset(BATCH * steps, split="train").select_columns(["prompt", "completion"])
    data = Dataset.from_dict({**data.to_dict(), "teacher": ["a", "b"] * (len(data) // 2)})
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        paths[name] = str(Path(workdir) / f"teacher-{name}")
        toy.build_model(3, 128, tokenizer, seed=seed).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])

    t0 = time.perf_counter()
    teacher = transformers.AutoModelForCausalLM.from_pretrained(paths["a"])
    cache_dir = str(Path(workdir) / "cache")
    build_teacher_cache(teacher, data, tokenizer, cache_dir, top_k=TOP_K, max_completion_length=96, batch_size=BATCH)
    cache_build_s = time.perf_counter() - t0
    del teacher
    server, url = start_server(paths["a"])
    backends = {
        "local (full distribution)": (paths["a"], {}),
        "local (top-20)": (paths["a"], {"teacher_top_k": TOP_K}),
        "server (top-20, HTTP)": (url, {"teacher_top_k": TOP_K}),
        "cache (top-20, from disk)": (cache_dir, {"teacher_top_k": TOP_K}),
        "two teachers, routed": (dict(paths), {}),
        "two teachers, weighted mixture": (dict(paths), {"teacher_mixture": "weighted"}),
        "local + hidden-state matching": (paths["a"], {"hidden_state_weight": 1.0}),
    }
    results = {name: [] for name in backends}
    try:
        for r in range(repeats):
            for name, (spec, overrides) in backends.items():
                results[name].append(run(name, spec, tokenizer, data, steps, workdir, **overrides))
                print(f"repeat {r + 1}/{repeats} {name}: {results[name][-1]['step_s'] * 1000:.1f} ms/step", flush=True)
    finally:
        server.kill()
    base = min(x["step_s"] for x in results["local (full distribution)"])
    rows = []
    for name, runs in results.items():
        step, teacher_s = min(x["step_s"] for x in runs), min(x["teacher_s"] for x in runs)
        rows.append({"backend": name, "step_ms": step * 1000, "teacher_ms": teacher_s * 1000,
                     "step_vs_local": step / base, "first_loss": runs[0]["loss_first"]})  # fmt: skip
    print(f"\n| backend | ms/step | teacher ms/step | step vs local | first loss |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['backend']} | {row['step_ms']:.1f} | {row['teacher_ms']:.1f} | {row['step_vs_local']:.2f}x | "
              f"{row['first_loss']:.4f} |")  # fmt: skip
    print(f"\ncache build: {cache_build_s:.2f} s for {len(data)} rows")
    if not cli.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({
            "benchmark": "teacher_backends", "batch": BATCH, "steps": steps, "repeats": repeats, "top_k": TOP_K,
            "cache_build_s": cache_build_s, "rows": rows,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                         "trl_onpolicy": trl_onpolicy.__version__, "python": platform.python_version()},
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        }, indent=2))  # fmt: skip
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
