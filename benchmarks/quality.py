"""Quality per unit of compute: what each distillation method buys, on the embedded GSM8K-format task.

    OMP_NUM_THREADS=1 python benchmarks/quality.py              # both tasks, every method, 3 seeds (~45 min, 2 idle cores)
    OMP_NUM_THREADS=1 python benchmarks/quality.py --quick      # standard task, 3 methods, 1 seed, 40 s budgets
    python benchmarks/quality.py --plot-only                    # redraw results/quality.png from the JSON

The regime of the on-policy distillation reports: the distillation methods see **prompts only**; the teacher is
their only source of knowledge. Supervised training on the task's ground truth is kept as a reference line.

- task: the toy GSM8K-format generator (`trl_onpolicy.toy`), "standard" (2-4 equations per answer) and "hard"
  (5-8 equations: a student's early mistake compounds over a longer chain, i.e. exposure bias);
- teacher: the built-in 3 x 128 recipe (standard), the same model trained 1,000 steps on the hard task (hard);
- student: Llama 2 x 128 (0.4 M parameters), warm-started by a short supervised run on the task so that it writes the
  format but often gets the arithmetic wrong; the same start for every method and seed;
- budget: `--budget` CPU-seconds of charged compute per run (process CPU time, one torch thread), the student
  scored by greedy exact match on `--eval-problems` held-out problems at `--evals` evenly spaced points of the
  budget (evaluation is not charged); every trainer uses batch 32 prompts, AdamW, lr `--lr` constant after 10 warm-up
  steps, sampling temperature 1 without top-k/top-p;
- charged compute, split by phase with the same instruments for every trainer: *teacher_generation* (offline methods:
  the teacher writing completions for fresh prompts, plus building the logit cache), *generation* (the student's
  `generate`), *teacher* (the teacher's forward passes while training), *update* (the rest: data, student forward,
  loss, backward, AdamW). FLOPs are estimated from the tokens each model's backbone processed: 2 N per token for a
  forward pass, 6 N for one with gradients (N: the model's parameters; attention's quadratic term left out).

Methods (the names in the JSON and the plot):
  sft_ground_truth   (a) trl.SFTTrainer on fresh ground-truth problems (the reference: free perfect labels)
  offline_sft        (b) the teacher writes greedy completions for `--pool` fresh prompts (charged), then SFT on them
  offline_kd_cache   (b) the same completions scored once into a top-20 teacher cache (charged), then supervised KD
                         (forward KL, `lmbda=0`) from the cache: no teacher in memory while training
  onpolicy_jsd       (c) ours, `lmbda=1`, generalized JSD beta 0.5 (the package default)
  onpolicy_reverse_kl, onpolicy_sampled_rkl   (c) ours, `lmbda=1`, full reverse KL / sampled-token reverse KL
  mixed_lmbda        (c) ours, `lmbda=0.5`: half the batches the student's rollouts, half the teacher's pool (charged)
  offline_jsd_pool   (c) ours, `lmbda=0`: JSD on the teacher's pool (charged), the live teacher scoring it; not in the
                         default list
  curriculum_linear  (c) ours, `lmbda_schedule="linear"` 0 -> 1 over `--curriculum-steps` steps (then 1), the
                         off-policy steps from the teacher's pool (charged); not in the default list
  onpolicy_jsd_reuse4 (c) ours, `lmbda=1`, JSD, each batch of rollouts and teacher scores used for 4 optimizer
                         steps (`num_iterations=4`)
  onpolicy_jsd_pool4  (c) ours, `lmbda=1`, JSD, rollout pools: `steps_per_generation=4`, `generation_batch_size=128`
                         (one generate call writes the rollouts of 4 steps); not in the default list
  rounds             (d) onpolicy_jsd for a fixed number of steps as 4 rounds and as 1 round: in this trainer a round
                         end is an evaluation and checkpoint boundary, so the check is that the parameters come out
                         identical and what the round ends cost (their checkpoints; the evaluations are not charged)
  trl_distillation   (e) trl.DistillationTrainer at its defaults (on-policy, reverse KL: beta=1)
  trl_gkd            (e) trl.experimental GKDTrainer, lmbda 0.5 on the teacher's pool, JSD beta 0.5

Headline: CPU-seconds to reach a fraction of the teacher's exact match (90%, 60% and 40%), per seed by linear
interpolation between evaluation points, as a ratio to onpolicy_jsd; "not reached" when no evaluation got there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch

# One meter for this benchmark and `trl-onpolicy compare` (`Meter`, `watch`, `reach` stay importable from here).
from trl_onpolicy.compute_meter import BudgetCallback, Meter, reach, watch

RESULTS = Path(__file__).parent / "results" / "quality.json"
TASKS = {  # difficulty, teacher recipe overrides, warm-start SFT steps of the student
    "standard": {"min_steps": 2, "max_steps": 4, "teacher": {}, "student_sft_steps": 300},
    "hard": {"min_steps": 5, "max_steps": 8, "teacher": {"steps": 1000}, "student_sft_steps": 400},
}
STUDENT = (2, 128)
METHODS = [
    "sft_ground_truth", "offline_sft", "offline_kd_cache", "onpolicy_jsd", "onpolicy_reverse_kl",
    "onpolicy_sampled_rkl", "mixed_lmbda", "onpolicy_jsd_reuse4", "trl_distillation", "trl_gkd",
]  # fmt: skip
HARD_METHODS = ["sft_ground_truth", "offline_sft", "onpolicy_jsd"]
REFERENCE = "onpolicy_jsd"
THRESHOLDS = (0.9, 0.6, 0.4)  # fractions of the teacher's score; 90% is the headline


# ------------------------------------------------------------------------------------------------ the runs
def load_pair(task: str, teacher: dict | None = None):
    """The task's teacher (its recipe with `teacher`'s fields overridden, e.g. a larger one) and warm-started student."""
    from trl_onpolicy import toy

    spec = TASKS[task]
    difficulty = {"min_steps": spec["min_steps"], "max_steps": spec["max_steps"]}
    teacher_overrides = {**spec["teacher"], **difficulty} if task != "standard" else {}
    teacher_overrides.update(teacher or {})
    teacher, tokenizer, teacher_info = toy.load_or_train_teacher(progress=False, **teacher_overrides)
    student, _, student_info = toy.load_or_train_student(
        *STUDENT, sft_steps=spec["student_sft_steps"], progress=False, **difficulty
    )
    return teacher, student, tokenizer, teacher_info, student_info


def eval_problems(task: str, n: int):
    from trl_onpolicy import toy

    spec = TASKS[task]
    return toy.generate_problems(n, "eval", seed=0, min_steps=spec["min_steps"], max_steps=spec["max_steps"])


def completion_length(tokenizer, task: str) -> int:
    from trl_onpolicy.toy.models import default_max_new_tokens

    return default_max_new_tokens(tokenizer, eval_problems(task, 256))


def teacher_pool(meter: Meter, teacher, tokenizer, task: str, n: int, seed: int, length: int, context: str = ""):
    """The teacher's greedy completions for `n` fresh train prompts (charged as teacher_generation); with `context`,
    the teacher writes after `context + prompt` (privileged.py's rule) and the rows keep the bare prompt."""
    from datasets import Dataset

    from trl_onpolicy import toy

    spec = TASKS[task]
    problems = toy.generate_problems(n, "train", seed=10_000 + seed, min_steps=spec["min_steps"],
                                     max_steps=spec["max_steps"])  # fmt: skip
    prompts = [toy.prompt_text(p["question"]) for p in problems]
    with meter.phase("teacher_generation"):
        completions = toy.generate_completions(teacher, tokenizer, [context + p for p in prompts], batch_size=64,
                                               max_new_tokens=length)  # fmt: skip
    correct = sum(toy.is_correct(c, p) for c, p in zip(completions, problems)) / n
    return Dataset.from_dict({"prompt": prompts, "completion": [" " + c.strip() for c in completions]}), correct


class GKDPoolCollator:
    """Prompt + completion rows -> what GKDTrainer reads: right-padded `input_ids`/`labels` (prompt masked) for its
    off-policy batches, left-padded `prompts` for the batches it generates."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict]) -> dict:
        from trl_onpolicy.toy.models import encode_rows

        batch = encode_rows(self.tokenizer, rows)
        ids = [self.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
        width, pad = max(len(i) for i in ids), self.tokenizer.pad_token_id
        prompts = torch.tensor([[pad] * (width - len(i)) + i for i in ids])  # (B, P)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])  # (B, P)
        return {**batch, "prompts": prompts, "prompt_attention_mask": mask}


def common_args(out_dir: str, seed: int, lr: float) -> dict:
    return dict(  # noqa: C408
        output_dir=out_dir, max_steps=100_000, per_device_train_batch_size=32, learning_rate=lr, optim="adamw_torch",
        lr_scheduler_type="constant_with_warmup", warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0, bf16=False,
        use_cpu=True, seed=seed, logging_steps=10, report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_pin_memory=False,
    )  # fmt: skip


def build_trainer(method: str, meter: Meter, teacher, student, tokenizer, task: str, seed: int, length: int, args):
    """The method's trainer (constructed outside the charged compute: data preparation), and the pool's accuracy."""
    import trl

    from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer, toy

    spec = TASKS[task]
    common = common_args(f"{args.workdir}/out-{task}-{method}-{seed}", seed, args.lr)
    pool, pool_correct = None, None
    pooled = ("offline_sft", "offline_kd_cache", "mixed_lmbda", "offline_jsd_pool", "curriculum_linear", "trl_gkd")
    if method in pooled:
        pool, pool_correct = teacher_pool(meter, teacher, tokenizer, task, args.pool, seed, length)
    teacher_model = teacher
    if method == "offline_kd_cache":  # scoring the pool into the cache is the teacher's work: charged
        from trl_onpolicy.teachers import build_teacher_cache

        with meter.phase("teacher_generation"):
            teacher_model = build_teacher_cache(teacher, pool, tokenizer, f"{common['output_dir']}-cache", top_k=20,
                                                max_completion_length=length, batch_size=64, overwrite=True)
    ours = dict(max_completion_length=length, max_length=512, temperature=1.0, top_k=0, top_p=1.0)  # noqa: C408
    with meter.excluded():
        if method in ("sft_ground_truth", "offline_sft"):
            data = pool if pool is not None else toy.make_dataset(
                args.sft_rows, "train", seed=20_000 + seed, min_steps=spec["min_steps"], max_steps=spec["max_steps"]
            ).select_columns(["prompt", "completion"])
            config = trl.SFTConfig(**common, max_length=512)
            return trl.SFTTrainer(student, args=config, train_dataset=data, processing_class=tokenizer), pool_correct
        if method == "trl_distillation":
            config = trl.DistillationConfig(**common, max_completion_length=length, temperature=1.0, top_k=0,
                                            top_p=1.0, gradient_checkpointing=False)  # fmt: skip
            return trl.DistillationTrainer(student, teacher, args=config, train_dataset=prompts(task, seed),
                                           processing_class=tokenizer), pool_correct  # fmt: skip
        if method == "trl_gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            config = GKDConfig(**common, lmbda=0.5, beta=0.5, temperature=1.0, max_new_tokens=length,
                               remove_unused_columns=False)
            trainer = GKDTrainer(student, teacher, args=config, train_dataset=pool, processing_class=tokenizer,
                                 data_collator=GKDPoolCollator(tokenizer))  # fmt: skip
            return trainer, pool_correct
        data = prompts(task, seed)
        kw = dict(lmbda=1.0, loss_type="jsd", beta=0.5)  # noqa: C408
        if method == "offline_kd_cache":
            data, kw = pool, dict(lmbda=0.0, loss_type="forward_kl", teacher_top_k=20)  # noqa: C408
        elif method == "onpolicy_reverse_kl":
            kw["loss_type"] = "reverse_kl"
        elif method == "onpolicy_sampled_rkl":
            kw["loss_type"] = "sampled_reverse_kl"
        elif method == "mixed_lmbda":
            data, kw["lmbda"] = pool, 0.5
        elif method == "offline_jsd_pool":
            data, kw["lmbda"] = pool, 0.0
        elif method == "curriculum_linear":
            data = pool
            kw.update(lmbda_schedule="linear", lmbda_start=0.0, lmbda_end=1.0,
                      lmbda_schedule_steps=args.curriculum_steps)  # fmt: skip
        elif method == "onpolicy_jsd_pool4":
            kw.update(steps_per_generation=4, generation_batch_size=128)
        elif method == "onpolicy_jsd_reuse4":
            kw["num_iterations"] = 4
        elif method == "rounds":  # (d): a fixed number of steps, split into `args.rounds` rounds
            common.update(max_steps=args.rounds_steps, save_strategy="steps", save_steps=10**9)
            kw["num_rounds"] = args.rounds
        config = OnPolicyDistillConfig(**common, **ours, **kw)
        trainer = OnPolicyDistillTrainer(student, teacher_model=teacher_model, args=config, train_dataset=data,
                                         processing_class=tokenizer)  # fmt: skip
        return trainer, pool_correct


def prompts(task: str, seed: int, n: int = 16_384):
    from trl_onpolicy import toy

    spec = TASKS[task]
    data = toy.make_dataset(n, "train", seed=30_000 + seed, min_steps=spec["min_steps"], max_steps=spec["max_steps"])
    return data.select_columns(["prompt"])


def budget_callback(meter: Meter, checkpoints: list[float], evaluate, points: list):
    """At the first step end past each checkpoint of charged compute: score the student (not charged); past the last
    one: stop (see `trl_onpolicy.compute_meter.BudgetCallback`)."""

    def describe(p: dict) -> str:
        return f"  step {p['step']:5d}  {p['cpu_s']:7.1f} CPU-s  exact match {p['accuracy']:.3f}  {p['phases']}"

    return BudgetCallback(meter, checkpoints, evaluate, points, describe)


def rounds_check(task: str, seed: int, args) -> dict:
    """(d): the same steps as `args.rounds` rounds and as one round; parameters compared, compute of each."""
    records = []
    for rounds in (4, 1):
        args.rounds = rounds
        record = run_one("rounds", task, seed, args)
        records.append(record)
    (a, b), (r4, r1) = [r.pop("state") for r in records], records
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    return {"method": "rounds", "task": task, "seed": seed, "steps": args.rounds_steps, "max_abs_param_diff": diff,
            "four_rounds": r4, "one_round": r1}


def run_one(method: str, task: str, seed: int, args) -> dict:
    """One method, one task, one seed: train until the budget is spent, evaluating along the way."""
    import transformers

    from trl_onpolicy import toy

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    teacher, student, tokenizer, _, _ = load_pair(task, getattr(args, "teacher", None))
    problems = eval_problems(task, args.eval_problems)
    length = completion_length(tokenizer, task)
    torch.manual_seed(seed)
    meter = Meter(clock="process")  # CPU-seconds, on a GPU machine too
    watch(meter, student, teacher)

    def evaluate(model):
        return toy.evaluate_exact_match(model, tokenizer, problems, max_new_tokens=length)

    trainer, pool_correct = build_trainer(method, meter, teacher, student, tokenizer, task, seed, length, args)
    if method == "offline_kd_cache":
        teacher = None  # the cache is the teacher: no forward passes of it while training
    points: list[dict] = []
    checkpoints = [args.budget * (i + 1) / args.evals for i in range(args.evals)]
    started = time.perf_counter()
    if method == "rounds":
        trainer.train()
        points.append({**meter.snapshot(), "step": trainer.state.global_step, "accuracy": evaluate(student)})
        return {"points": points, "rounds": args.rounds, "wall_s": round(time.perf_counter() - started, 1),
                "state": {k: v.detach().clone() for k, v in student.state_dict().items()}}
    trainer.add_callback(budget_callback(meter, checkpoints, evaluate, points))
    trainer.train()
    return {
        "method": method, "task": task, "seed": seed, "points": points, "pool_exact_match": pool_correct,
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ aggregation
def runs_by_method(runs: list[dict], methods: list[str]):
    """`(method, its runs in seed order, the evaluation points they all have)` for each method with runs."""
    for method in methods:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        if mine:
            yield method, mine, min(len(r["points"]) for r in mine)


def last_point_means(runs: list[dict], n: int, phases: tuple[str, ...]) -> dict:
    """Over `runs` (one method's seeds): the mean steps made by evaluation `n - 1` and the mean CPU-s of each phase."""
    last = [r["points"][n - 1] for r in runs]
    return {"steps": statistics.mean(p["step"] for p in last),
            "phases_s": {k: statistics.mean(p["phases"].get(k, 0.0) for p in last) for k in phases}}  # fmt: skip


def seed_points(runs: list[dict], n: int) -> list[dict]:
    """Over `runs` (one method's seeds, each with `n` points of a scalar `accuracy`): per point the mean CPU-s, the
    exact match's spread and each seed's value."""
    return [{"cpu_s": statistics.mean(r["points"][i]["cpu_s"] for r in runs),
             "exact_match": spread([r["points"][i]["accuracy"] for r in runs]),
             "per_seed": [r["points"][i]["accuracy"] for r in runs]} for i in range(n)]  # fmt: skip


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}  # fmt: skip


def summarise(task: str, prep: dict, runs: list[dict]) -> dict:
    """Per method: accuracy at each evaluation point, final accuracy, phase split, FLOPs, compute to thresholds."""
    teacher = prep["teacher_exact_match"]
    start = {"cpu_s": 0.0, "accuracy": prep["student_exact_match"]}
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        n_points = min(len(r["points"]) for r in mine)
        finals = [r["points"][n_points - 1] for r in mine]
        summary = {
            "seeds": [r["seed"] for r in mine],
            "points": [
                {"cpu_s": spread([r["points"][i]["cpu_s"] for r in mine]),
                 "accuracy": spread([r["points"][i]["accuracy"] for r in mine])}
                for i in range(n_points)
            ],
            "accuracy_at": {  # by the evaluation's nominal budget point (CPU-s rounded to 10)
                str(10 * round(r0["cpu_s"] / 10)): spread([r["points"][i]["accuracy"] for r in mine])
                for i, r0 in enumerate(mine[0]["points"][:n_points])
            },
            "budget": 10 * round(finals[0]["cpu_s"] / 10),
            "final_accuracy": spread([f["accuracy"] for f in finals]),
            "final_fraction_of_teacher": spread([f["accuracy"] / teacher for f in finals]),
            "phases_s": {k: statistics.mean(f["phases"].get(k, 0.0) for f in finals)
                         for k in ("teacher_generation", "generation", "teacher", "update")},
            "flops": statistics.mean(sum(f["flops"].values()) for f in finals),
            "steps": statistics.mean(f["step"] for f in finals),
        }
        for frac in THRESHOLDS:
            hits = [reach([start] + r["points"], frac * teacher) for r in mine]
            summary[f"cpu_s_to_{round(frac * 100)}pct"] = {
                "per_seed": hits,
                "mean": statistics.mean(hits) if all(h is not None for h in hits) else None,
                "reached": sum(h is not None for h in hits),
            }
        out[method] = summary
    ref = out.get(REFERENCE)
    for method, summary in out.items():
        for frac in THRESHOLDS:
            key = f"cpu_s_to_{round(frac * 100)}pct"
            mine, theirs = summary[key]["mean"], ref[key]["mean"] if ref else None
            summary[key]["ratio_to_" + REFERENCE] = mine / theirs if mine and theirs else None
    return out


def print_table(result: dict):
    for task, block in result["tasks"].items():
        prep = block["prep"]
        print(f"\n{task} task: teacher {prep['teacher_exact_match']:.3f}, student start "
              f"{prep['student_exact_match']:.3f}, {result['setup']['eval_problems']} eval problems; exact match "
              "as mean [min-max] over seeds; phases in CPU-s at the last evaluation")  # fmt: skip
        marks = sorted({int(k) for s in block["methods"].values() for k in s["accuracy_at"]})
        head = ["method", "seeds", *[f"@{m} s" for m in marks], "of teacher", "steps", "teacher gen", "gen",
                "teacher", "update", "TFLOP", *[f"s to {round(f * 100)}% (vs jsd)" for f in THRESHOLDS]]  # fmt: skip
        print(" | ".join(head))
        for method, s in block["methods"].items():
            def acc(mark, s=s):
                a = s["accuracy_at"].get(str(mark))
                return "-" if a is None else f"{a['mean']:.3f}" + (f" [{a['min']:.3f}-{a['max']:.3f}]" if a["n"] > 1
                                                                      else "")  # fmt: skip

            def hit(frac, s=s):
                h = s[f"cpu_s_to_{round(frac * 100)}pct"]
                if h["mean"] is None:
                    return f"{h['reached']}/{len(h['per_seed'])} seeds"
                ratio = h["ratio_to_" + REFERENCE]
                return f"{h['mean']:.0f}" + (f" ({ratio:.2f}x)" if ratio else "")

            ph = s["phases_s"]
            print(" | ".join([
                method, str(len(s["seeds"])), *[acc(m) for m in marks],
                f"{s['final_fraction_of_teacher']['mean']:.0%} @{s['budget']} s", f"{s['steps']:.0f}",
                f"{ph['teacher_generation']:.1f}", f"{ph['generation']:.1f}", f"{ph['teacher']:.1f}",
                f"{ph['update']:.1f}", f"{s['flops'] / 1e12:.0f}", *[hit(f) for f in THRESHOLDS],
            ]))  # fmt: skip
    for task, block in result["tasks"].items():
        for r in block["runs"]:
            if r["method"] == "rounds":
                four, one = r["four_rounds"]["points"][-1], r["one_round"]["points"][-1]
                print(f"\n{task}, rounds check (d): {r['steps']} steps as 4 rounds and as 1 round: largest parameter "
                      f"difference {r['max_abs_param_diff']:.1e}, exact match {four['accuracy']:.3f} / "
                      f"{one['accuracy']:.3f}, {four['cpu_s']:.1f} / {one['cpu_s']:.1f} CPU-s")  # fmt: skip


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 5.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        block = result["tasks"][task]
        teacher, start = block["prep"]["teacher_exact_match"], block["prep"]["student_exact_match"]
        for method, s in block["methods"].items():
            xs = [0.0] + [p["cpu_s"]["mean"] for p in s["points"]]
            ys = [start] + [p["accuracy"]["mean"] for p in s["points"]]
            lo = [start] + [p["accuracy"]["min"] for p in s["points"]]
            hi = [start] + [p["accuracy"]["max"] for p in s["points"]]
            style = "--" if method.startswith(("sft_", "trl_")) else ("-." if method.startswith("offline") else "-")
            line = ax.plot(xs, ys, style, marker="o", ms=3, label=method)[0]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        ax.axhline(teacher, color="k", lw=1)
        ax.text(0, teacher + 0.01, f"teacher {teacher:.2f}", fontsize=8)
        ax.axhline(0.9 * teacher, color="grey", lw=0.8, ls=":")
        ax.text(0, 0.9 * teacher + 0.01, "90% of teacher", fontsize=8, color="grey")
        ax.set(title=f"{task} task: exact match vs charged compute (mean, min-max over seeds)",
               xlabel="CPU-seconds (1 thread)", ylabel="exact match", ylim=(0, 1.05))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.83), ncol=2)  # below the 90% line
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------ orchestration
def prepare(task: str, args) -> dict:
    """Train (first time) or load the task's teacher and student; score both once on the eval problems."""
    from trl_onpolicy import toy

    path = Path(args.workdir) / f"prep-{task}-{args.eval_problems}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    teacher, student, tokenizer, teacher_info, student_info = load_pair(task, getattr(args, "teacher", None))
    problems = eval_problems(task, args.eval_problems)
    length = completion_length(tokenizer, task)
    prep = {
        "teacher_exact_match": toy.evaluate_exact_match(teacher, tokenizer, problems, max_new_tokens=length),
        "student_exact_match": toy.evaluate_exact_match(student, tokenizer, problems, max_new_tokens=length),
        "teacher": {k: teacher_info[k] for k in ("name", "num_parameters", "recipe")},
        "student": {k: student_info[k] for k in ("name", "num_parameters", "recipe")},
        "completion_length": length,
    }
    path.write_text(json.dumps(prep, indent=2))
    return prep


def run_processes(jobs: list[tuple[tuple, list[str], Path]], workers: int) -> None:
    """Each `(label, command, result path)` in its own process, `workers` at a time, its log beside its result; a job
    whose result exists is skipped, and one that ends without writing it is reported as FAILED. Shared by
    quality.py, regimes.py and privileged.py."""
    pending = [j for j in jobs if not j[2].exists()]
    running: list[tuple[subprocess.Popen, tuple]] = []
    print(f"{len(jobs) - len(pending)} runs found, {len(pending)} to do", flush=True)
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            log = open(job[2].with_suffix(".log"), "w")  # noqa: SIM115
            running.append((subprocess.Popen(job[1], stdout=log, stderr=subprocess.STDOUT), job))
            print(f"started {job[0]}", flush=True)
        time.sleep(2)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                print(f"{'done' if job[2].exists() else 'FAILED'} {job[0]} (log: {job[2].with_suffix('.log')})",
                      flush=True)


def study_main(doc: str, script: str, workdir: str, output: Path, methods: list[str], seeds, study) -> None:
    """
    The command line of a study of (method, seed) runs at a compute budget (tools.py, cross_tokenizer.py,
    specialists.py): the runs not
    yet in `--workdir`, `--workers` at a time, each in its own process (`--one METHOD SEED`), then the summary, table
    and plot; `--collect` summarises the finished runs, `--plot-only` redraws from `output`.

    `study` holds the script's functions: `run_one(method, seed, workdir) -> record`, `evaluations(method) -> int` (the
    points a finished run has; without it, the script's `EVALS` for every method), `prepare() -> prep` (the scores
    before training, computed once and kept in `--workdir`'s prep.json), `summarise(prep, runs)`, `print_table(result)`
    and `plot(result, path)`.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--collect", action="store_true")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot_only:
        result = json.loads(output.read_text())
        study.print_table(result)
        return study.plot(result, output.with_suffix(".png"))
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.one:
        method, seed = args.one[0], int(args.one[1])
        record = study.run_one(method, seed, folder)
        wanted = study.evaluations(method) if hasattr(study, "evaluations") else study.EVALS
        if len(record["points"]) < wanted:
            sys.exit(f"{method} seed {seed} stopped after {len(record['points'])} of {wanted} evaluations; not saved.")
        return (folder / f"run-{method}-{seed}.json").write_text(json.dumps(record, indent=1))
    prep_path = folder / "prep.json"  # the teachers' and students' scores before training, computed once
    prep = json.loads(prep_path.read_text()) if prep_path.exists() else study.prepare()
    prep_path.write_text(json.dumps(prep, indent=1))
    if not args.collect:
        command = [sys.executable, script, "--workdir", str(folder), "--one"]
        run_processes([((m, s), [*command, m, str(s)], folder / f"run-{m}-{s}.json") for s in seeds for m in methods],
                      args.workers)  # fmt: skip
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("run-*.json"))]
    result = study.summarise(prep, runs)
    output.write_text(json.dumps(result, indent=1))
    study.print_table(result)
    study.plot(result, output.with_suffix(".png"))


def run_all(jobs: list[tuple[str, str, int]], args) -> None:
    """Each (method, task, seed) in its own process, `--workers` at a time; finished runs are kept in the workdir."""
    run_processes([(job, [sys.executable, __file__, "--one", *map(str, job), *forwarded(args)], run_path(args, *job))
                   for job in jobs], args.workers)  # fmt: skip


def run_path(args, method: str, task: str, seed: int) -> Path:
    return Path(args.workdir) / f"run-{task}-{method}-{seed}-b{args.budget:g}.json"


def forwarded(args) -> list[str]:
    return ["--budget", str(args.budget), "--evals", str(args.evals), "--eval-problems", str(args.eval_problems),
            "--pool", str(args.pool), "--lr", str(args.lr), "--rounds-steps", str(args.rounds_steps), "--sft-rows", str(args.sft_rows),
            "--curriculum-steps", str(args.curriculum_steps), "--workdir", args.workdir]  # fmt: skip


def environment() -> dict:
    import transformers
    import trl

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    return {"commit": commit, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version(), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "torch_threads": 1}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=None, help="default: all on standard, a subset on hard")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=120.0, help="charged CPU-seconds per run")
    parser.add_argument("--evals", type=int, default=4, help="evaluations per run, evenly spaced over the budget")
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--pool", type=int, default=2048, help="teacher completions written for offline methods")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds-steps", type=int, default=60, help="steps of the rounds check (d)")
    parser.add_argument("--curriculum-steps", type=int, default=400, help="curriculum_linear's 0 -> 1 horizon")
    parser.add_argument("--sft-rows", type=int, default=16_384, help="ground-truth rows for sft_ground_truth")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "trl_onpolicy_quality"))
    parser.add_argument("--quick", action="store_true", help="standard task, 3 methods, 1 seed, 40 s budgets")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--collect", action="store_true", help="summarise every finished run in --workdir")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "TASK", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    output = Path(args.output)
    if args.plot_only:
        result = json.loads(output.read_text())
        print_table(result)
        return plot(result, output.with_suffix(".png"))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.one:
        method, task, seed = args.one[0], args.one[1], int(args.one[2])
        record = rounds_check(task, seed, args) if method == "rounds" else run_one(method, task, seed, args)
        return run_path(args, method, task, seed).write_text(json.dumps(record, indent=1))
    if args.quick:
        args.tasks, args.seeds, args.budget, args.evals, args.eval_problems = ["standard"], [0], 40.0, 2, 100
        args.methods = args.methods or ["sft_ground_truth", "offline_sft", "onpolicy_jsd"]
        output = output.with_name("quality-quick.json")
    if args.collect:  # every finished run in the workdir, whatever its budget (methods may differ in budget)
        runs = [json.loads(p.read_text()) for p in sorted(Path(args.workdir).glob("run-*.json"))]
        args.tasks = [t for t in TASKS if any(r["task"] == t for r in runs)]
        return write_result(args, {task: prepare(task, args) for task in args.tasks}, runs, output)
    preps = {task: prepare(task, args) for task in args.tasks}
    jobs = [(m, task, s) for s in args.seeds for task in args.tasks for m in (args.methods or (METHODS
            if task == "standard" else HARD_METHODS))]  # fmt: skip  (every method's first seed first)
    run_all(jobs, args)
    runs = [json.loads(run_path(args, *j).read_text()) for j in jobs if run_path(args, *j).exists()]
    write_result(args, preps, runs, output)


def write_result(args, preps: dict, runs: list[dict], output: Path) -> None:
    budgets = sorted({r["points"][-1]["cpu_s"] // 1 for r in runs if r["method"] != "rounds"})
    result = {
        "setup": {"budget": args.budget, "evals": args.evals, "eval_problems": args.eval_problems, "pool": args.pool,
                  "lr": args.lr, "student": f"{STUDENT[0]}x{STUDENT[1]}", "tasks": TASKS, "budgets_seen": budgets},
        "environment": environment(),
        "tasks": {task: {"prep": preps[task], "methods": summarise(task, preps[task], [r for r in runs
                  if r["task"] == task and r["method"] != "rounds"]), "runs": [r for r in runs if r["task"] == task]}
                  for task in args.tasks},
    }  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print_table(result)
    plot(result, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
