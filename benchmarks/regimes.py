"""Where on-policy distillation wins: the regimes of issue 17, each designed (below) before its first run.

    OMP_NUM_THREADS=1 python benchmarks/regimes.py plateau            # regime (i): plateau, then 4 methods x 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/regimes.py big_teacher        # regime (ii); `recovering` is (iii), `long` (iv)
    OMP_NUM_THREADS=1 python benchmarks/regimes.py plateau --collect  # summarise what is in --workdir
    python benchmarks/regimes.py plateau --plot-only                  # redraw results/regime_plateau.png

`benchmarks/quality.py` is regime 0: a weak warm-started student, every method from it, 120-480 CPU-s. It found
offline distillation ahead per CPU-second (see benchmarks/README.md). The reports that find on-policy distillation
ahead start it elsewhere; the regimes here move one thing at a time toward those set-ups.

Shared settings (quality.py's, unchanged): the standard task (2-4 equations); the built-in 3 x 128 teacher (its
training not charged); the 2 x 128 student warm-started by 300 supervised steps; every trainer at batch 32 prompts,
AdamW, lr 1e-3 constant after 10 warm-up steps, sampling temperature 1, no top-k/top-p; charged compute is process
CPU time on one torch thread, split by phase with quality.py's `Meter`; evaluation (greedy exact match) not charged.

Regime (i), after an offline plateau. Settings fixed on 2026-12-03 before the first run:
- plateau phase: `offline_sft` (the teacher's greedy completions for 2,048 fresh train prompts, pool seed 0, then
  SFT on them) from the warm start for 960 CPU-s, scored on 500 eval problems at 120, 240, 480 and 960 CPU-s; the
  student's weights are saved at each point. The plateau is the first of 120, 240, 480 CPU-s where twice the
  compute adds under one point of exact match (the issue's definition); when none qualifies, 960 CPU-s is used and
  the table says the plateau was not shown. The plateau phase is not charged to the comparison. (Changed after
  the first run started, without changing what is chosen: the phase stops once the rule has decided, since later
  points cannot change the choice; the first run was stopped by hand at that point, 480 CPU-s.)
- comparison: from that checkpoint, 240 CPU-s per run, scored on the same 500 problems at 60, 120, 180, 240 CPU-s,
  seeds 100, 101, 102 (training seed and fresh-pool seed; 100+ so no fresh pool equals the plateau's pool):
    offline_same_pool   SFT continued on the plateau's own pool (already paid for: not charged again)
    offline_fresh_pool  the teacher writes 2,048 fresh completions (charged), SFT on them
    onpolicy_jsd        ours, lmbda 1, generalized JSD beta 0.5 (the package default)
    mixed_lmbda         ours, lmbda 0.5, the other half of the batches from a fresh teacher pool (charged)
- headline: final exact match at 240 CPU-s (mean and each seed), and CPU-s to 90% of the teacher's score as a
  ratio to the best offline method (when reached).

Designed, not yet run (their settings are fixed here so that a later run cannot tune them):
- (ii) a teacher >= 8x the student: 4 x 256 (the teacher recipe otherwise unchanged: 700 steps), offline_sft,
  onpolicy_jsd and mixed_lmbda from the warm start, 240 CPU-s, 200 eval problems, seeds 0-2. (Noted on 2026-12-03
  once it was trained, before any (ii) run finished: 4 x 256 has 4.36 M parameters, 7.2x the student's 0.61 M, not
  8x, and it scores 0.80 on the 200 problems against the standard teacher's 0.97: 700 steps at lr 3e-3 under-train
  it. Its first runs were stopped within minutes to give the cores to (iii) and (iv); (ii) was then run as
  designed, and its verdict is about an expensive teacher that is not a better one.)
- (iii) a teacher that recovers (`benchmarks/recovery.py` measures recovery): offline_sft and onpolicy_jsd with the
  standard teacher and with the recovering one, 480 CPU-s, 200 eval problems, seeds 0-2; with (ii) when a 4 x 256
  recovering teacher exists.
- (iii), as run (fixed on 2026-12-03 after `recovery.py` measured the fourth recovering teacher, before any
  (iii) run): no teacher met the recovery bar. The closest, "recovering_silent" (`recovery_style="silent"`:
  19.5% recovery after the student's first wrong line against the standard teacher's 8.1%; it copies the wrong
  value with p 0.53 against 0.99), is the teacher of regime `recovering`: offline_sft and onpolicy_jsd, 480 CPU-s,
  evaluations at 240 and 480 CPU-s, 200 eval problems, seeds 0-2. The standard-teacher arm is regime `long`'s
  runs at the same points (same seeds, student and settings), not run twice.
- (iv) long budgets: offline_sft, onpolicy_jsd and mixed_lmbda from the warm start, 1,800 CPU-s, 6 evaluations,
  200 eval problems, seeds 0-2. (Cut on 2026-12-03, before any run of (iv), to what one session's two cores can
  run: 1,200 CPU-s, offline_sft and onpolicy_jsd only, the two lines whose crossing is the question; mixed_lmbda
  was flat from the plateau in (i). 5 evaluations, every 240 CPU-s, so that the 480 CPU-s point is (iii)'s
  standard-teacher arm; seeds 0-2. The first start, at 6 evaluations, was stopped within its first minutes.)
- curriculum (the schedule of `lmbda`, issue 17 part 2; fixed on 2026-12-04 before its first run): from the warm
  start, 240 CPU-s, evaluations at 120 and 240 CPU-s, 200 eval problems, seeds 0-2, the standard teacher:
    offline_sft        the reference (as in every regime)
    offline_jsd_pool   ours at `lmbda` 0: JSD on the teacher's pool (charged), the live teacher scoring it
    onpolicy_jsd       ours at `lmbda` 1
    curriculum_linear  ours, `lmbda` linear 0 -> 1 over 400 steps (then 1), off-policy steps from the pool
  The horizon is the budget's expected step count at `lmbda` 0.5 (mixed_lmbda took 548 steps in 240 CPU-s in
  quality.py's long run, seed 0, and fewer on a loaded machine), so that the ramp ends near the budget's end. The
  run at (iv)'s 1,200 CPU-s was not made: it does not fit this session's two cores beside the other work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import quality  # benchmarks/quality.py: the meter, the pair, the trainers
import torch
from transformers import TrainerCallback

RESULTS = Path(__file__).parent / "results"
TASK = "standard"
PLATEAU_BUDGETS = (120.0, 240.0, 480.0, 960.0)
PLATEAU_POOL_SEED = 0
PLATEAU_METHODS = ["offline_same_pool", "offline_fresh_pool", "onpolicy_jsd", "mixed_lmbda"]
OFFLINE = ("offline_same_pool", "offline_fresh_pool")
SEEDS = (100, 101, 102)
BUDGET, EVALS, EVAL_PROBLEMS = 240.0, 4, 500
CURRICULUM_STEPS = 400


def settings(workdir: str) -> argparse.Namespace:
    """What quality.py's trainers read from its command line, at this regime's values."""
    return argparse.Namespace(workdir=workdir, lr=1e-3, pool=2048, sft_rows=16_384, rounds=1, rounds_steps=60,
                              curriculum_steps=CURRICULUM_STEPS, budget=BUDGET, evals=EVALS,
                              eval_problems=EVAL_PROBLEMS)  # fmt: skip


def setup():
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    teacher, student, tokenizer, _, _ = quality.load_pair(TASK)
    length = quality.completion_length(tokenizer, TASK)
    problems = quality.eval_problems(TASK, EVAL_PROBLEMS)
    return teacher, student, tokenizer, length, problems


def train_to_points(trainer, meter, checkpoints: list[float], evaluate) -> list[dict]:
    points: list[dict] = []
    trainer.add_callback(quality.budget_callback(meter, checkpoints, evaluate, points))
    trainer.train()
    return points


# ------------------------------------------------------------------------------------------------ regime (i)
def plateau_index(accuracy: list[float]) -> int | None:
    """The first scoring point where the next one (twice the compute) adds under one point, else None."""
    return next((i for i in range(len(accuracy) - 1) if accuracy[i + 1] - accuracy[i] < 0.01), None)


class StopAtPlateau(TrainerCallback):
    """Stops the plateau phase once `plateau_index` has an answer: later points cannot change it."""

    def __init__(self, points: list[dict]):
        self.points = points

    def on_step_end(self, args, state, control, **kwargs):
        if plateau_index([p["accuracy"] for p in self.points]) is not None:
            control.should_training_stop = True


def plateau_phase(workdir: Path) -> dict:
    """offline_sft from the warm start to 960 CPU-s; the student's weights saved at each scoring point."""
    from trl_onpolicy import toy

    teacher, student, tokenizer, length, problems = setup()
    args = settings(str(workdir))
    start = toy.evaluate_exact_match(student, tokenizer, problems, max_new_tokens=length)
    torch.manual_seed(PLATEAU_POOL_SEED)
    meter = quality.Meter(clock="process")  # CPU-seconds, as quality.py charges, on a GPU machine too
    quality.watch(meter, student, teacher)

    def evaluate(model):
        torch.save(model.state_dict(), workdir / f"plateau-{len(saved)}.pt")
        saved.append(True)
        return toy.evaluate_exact_match(model, tokenizer, problems, max_new_tokens=length)

    saved: list[bool] = []
    trainer, pool_correct = quality.build_trainer("offline_sft", meter, teacher, student, tokenizer, TASK,
                                                  PLATEAU_POOL_SEED, length, args)  # fmt: skip
    points: list[dict] = []
    trainer.add_callback(quality.budget_callback(meter, list(PLATEAU_BUDGETS), evaluate, points))
    trainer.add_callback(StopAtPlateau(points))
    trainer.train()
    chosen = plateau_index([p["accuracy"] for p in points])
    return {"start_accuracy": start, "points": points, "pool_exact_match": pool_correct,
            "plateau_index": len(points) - 1 if chosen is None else chosen, "plateau_shown": chosen is not None,
            "teacher_exact_match": toy.evaluate_exact_match(teacher, tokenizer, problems, max_new_tokens=length)}


def from_plateau(method: str, seed: int, workdir: Path) -> dict:
    """One method from the plateau checkpoint for `BUDGET` charged CPU-s."""
    from trl_onpolicy import toy

    plateau = json.loads((workdir / "plateau.json").read_text())
    teacher, student, tokenizer, length, problems = setup()
    student.load_state_dict(torch.load(workdir / f"plateau-{plateau['plateau_index']}.pt"))
    args = settings(str(workdir))
    torch.manual_seed(seed)
    meter = quality.Meter(clock="process")  # CPU-seconds, as quality.py charges, on a GPU machine too
    quality.watch(meter, student, teacher)
    if method == "offline_same_pool":  # the plateau's pool, paid for by the plateau phase: rebuilt uncharged
        import trl

        with meter.excluded():
            pool, pool_correct = quality.teacher_pool(meter, teacher, tokenizer, TASK, args.pool, PLATEAU_POOL_SEED,
                                                      length)  # fmt: skip
            config = trl.SFTConfig(**quality.common_args(f"{workdir}/out-{method}-{seed}", seed, args.lr),
                                   max_length=512)  # fmt: skip
            trainer = trl.SFTTrainer(student, args=config, train_dataset=pool, processing_class=tokenizer)
    else:
        name = "offline_sft" if method == "offline_fresh_pool" else method
        trainer, pool_correct = quality.build_trainer(name, meter, teacher, student, tokenizer, TASK, seed, length,
                                                      args)  # fmt: skip

    def evaluate(model):
        return toy.evaluate_exact_match(model, tokenizer, problems, max_new_tokens=length)

    started = time.perf_counter()
    points = train_to_points(trainer, meter, [BUDGET * (i + 1) / EVALS for i in range(EVALS)], evaluate)
    return {"method": method, "seed": seed, "points": points, "pool_exact_match": pool_correct,
            "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


# ------------------------------------------------------------------------------------------ regimes (ii)-(iv)
# The student starts from the warm start as in quality.py; only the teacher, the budget or the methods change.
WARM_REGIMES = {
    "big_teacher": {"teacher": {"num_layers": 4, "hidden_size": 256}, "budget": 240.0, "evals": 4,
                    "methods": ["offline_sft", "onpolicy_jsd", "mixed_lmbda"]},
    "long": {"teacher": {}, "budget": 1200.0, "evals": 5, "methods": ["offline_sft", "onpolicy_jsd"]},
    "recovering": {"teacher": {"correction_fraction": 0.25, "recovery_style": "silent"}, "budget": 480.0, "evals": 2,
                   "methods": ["offline_sft", "onpolicy_jsd"]},
    "curriculum": {"teacher": {}, "budget": 240.0, "evals": 2,
                   "methods": ["offline_sft", "offline_jsd_pool", "onpolicy_jsd", "curriculum_linear"]},
}  # fmt: skip
WARM_SEEDS, WARM_EVAL_PROBLEMS = (0, 1, 2), 200


def warm_settings(regime: str, workdir: Path) -> argparse.Namespace:
    """quality.py's settings at the regime's teacher, budget and evaluations (`run_one` and `prepare` read them)."""
    spec = WARM_REGIMES[regime]
    args = settings(str(workdir))
    args.teacher, args.budget, args.evals, args.eval_problems = spec["teacher"], spec["budget"], spec["evals"], \
        WARM_EVAL_PROBLEMS
    return args


def from_warm_start(regime: str, method: str, seed: int, workdir: Path) -> dict:
    """One method of a warm-start regime: quality.py's run with the regime's teacher and budget."""
    return {"regime": regime, **quality.run_one(method, TASK, seed, warm_settings(regime, workdir))}


def warm_prep(regime: str, workdir: Path) -> dict:
    """The regime's teacher and the warm start scored once on the eval problems (quality.py's `prepare`)."""
    return quality.prepare(TASK, warm_settings(regime, workdir))


# ------------------------------------------------------------------------------------------------ summary
def summarise_plateau(plateau: dict, runs: list[dict]) -> dict:
    """Per method: accuracy at each point (mean, min, max, per seed), CPU-s to 90% of the teacher per seed, and its
    ratio to the best offline method."""
    teacher = plateau["teacher_exact_match"]
    start = {"cpu_s": 0.0, "accuracy": plateau["points"][plateau["plateau_index"]]["accuracy"]}
    out = {}
    for method, mine, n in quality.runs_by_method(runs, PLATEAU_METHODS):
        finals = [r["points"][n - 1]["accuracy"] for r in mine]
        hits = [quality.reach([start] + r["points"], 0.9 * teacher) for r in mine]
        out[method] = {
            "seeds": [r["seed"] for r in mine],
            "points": [{"cpu_s": statistics.mean(r["points"][i]["cpu_s"] for r in mine),
                        "accuracy": quality.spread([r["points"][i]["accuracy"] for r in mine]),
                        "per_seed": [r["points"][i]["accuracy"] for r in mine]} for i in range(n)],
            "final_accuracy": quality.spread(finals), "final_per_seed": finals,
            "gain_over_plateau": statistics.mean(finals) - start["accuracy"],
            "cpu_s_to_90pct": {"per_seed": hits, "mean": statistics.mean(hits) if None not in hits else None},
            "phases_s": {k: statistics.mean(r["points"][n - 1]["phases"].get(k, 0.0) for r in mine)
                         for k in ("teacher_generation", "generation", "teacher", "update")},
            "steps": statistics.mean(r["points"][n - 1]["step"] for r in mine),
        }  # fmt: skip
    offline = [out[m]["cpu_s_to_90pct"]["mean"] for m in OFFLINE if m in out and out[m]["cpu_s_to_90pct"]["mean"]]
    best = min(offline) if offline else None
    for s in out.values():
        mine = s["cpu_s_to_90pct"]["mean"]
        s["cpu_s_to_90pct"]["ratio_to_best_offline"] = mine / best if mine and best else None
    return out


def print_plateau(result: dict) -> None:
    plateau = result["plateau"]
    print(f"teacher {plateau['teacher_exact_match']:.3f}; warm start {plateau['start_accuracy']:.3f}; offline_sft "
          "phase: " + ", ".join(f"{p['cpu_s']:.0f} CPU-s {p['accuracy']:.3f}" for p in plateau["points"]))
    index = plateau["plateau_index"]
    print(f"plateau checkpoint: {plateau['points'][index]['cpu_s']:.0f} CPU-s, exact match "
          f"{plateau['points'][index]['accuracy']:.3f}" + ("" if plateau["plateau_shown"] else " (plateau NOT shown: "
          "the curve still gained >= 1 point per doubling)"))  # fmt: skip
    print("method | " + " | ".join(f"@{p['cpu_s']:.0f} s" for p in next(iter(result["methods"].values()))["points"])
          + " | final per seed | gain | steps | s to 90% (vs best offline)")
    for method, s in result["methods"].items():
        hit = s["cpu_s_to_90pct"]
        reached = "not reached" if hit["mean"] is None else f"{hit['mean']:.0f}" + (
            f" ({hit['ratio_to_best_offline']:.2f}x)" if hit["ratio_to_best_offline"] else "")
        print(" | ".join([method, *[f"{p['accuracy']['mean']:.3f} [{p['accuracy']['min']:.3f}-"
                                    f"{p['accuracy']['max']:.3f}]" for p in s["points"]],
                          "/".join(f"{a:.3f}" for a in s["final_per_seed"]), f"{s['gain_over_plateau']:+.3f}",
                          f"{s['steps']:.0f}", reached]))  # fmt: skip


def plot_plateau(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plateau = result["plateau"]
    teacher = plateau["teacher_exact_match"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    xs = [0.0] + [p["cpu_s"] for p in plateau["points"]]
    left.plot(xs, [plateau["start_accuracy"]] + [p["accuracy"] for p in plateau["points"]], "-o", color="grey")
    chosen = plateau["points"][plateau["plateau_index"]]
    left.plot([chosen["cpu_s"]], [chosen["accuracy"]], "o", ms=10, mfc="none", color="k")
    left.set(title="offline_sft to its plateau (seed 0; circled: the checkpoint)", xlabel="CPU-seconds",
             ylabel="exact match (500 problems)", ylim=(0, 1.05))  # fmt: skip
    start = chosen["accuracy"]
    for method, s in result["methods"].items():
        xs = [0.0] + [p["cpu_s"] for p in s["points"]]
        ys = [start] + [p["accuracy"]["mean"] for p in s["points"]]
        lo = [start] + [p["accuracy"]["min"] for p in s["points"]]
        hi = [start] + [p["accuracy"]["max"] for p in s["points"]]
        line = right.plot(xs, ys, "-." if method in OFFLINE else "-", marker="o", ms=3, label=method)[0]
        right.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
    right.set(title="from the plateau checkpoint, equal compute (mean, min-max over 3 seeds)",
              xlabel="charged CPU-seconds after the checkpoint", ylabel="exact match (500 problems)")  # fmt: skip
    for ax in (left, right):
        ax.axhline(teacher, color="k", lw=1)
        ax.axhline(0.9 * teacher, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------ orchestration
def run_jobs(regime: str, jobs: list[tuple[str, int]], workdir: Path, workers: int) -> None:
    """Each (method, seed) in its own process, `workers` at a time; finished runs are kept in the workdir."""
    command = [sys.executable, __file__, regime, "--workdir", str(workdir), "--one"]
    quality.run_processes([((m, s), [*command, m, str(s)], workdir / f"run-{m}-{s}.json") for m, s in jobs], workers)


def plateau_main(args, workdir: Path) -> None:
    output = RESULTS / "regime_plateau.json"
    if not (workdir / "plateau.json").exists():
        (workdir / "plateau.json").write_text(json.dumps(plateau_phase(workdir), indent=1))
    if not args.collect:
        run_jobs("plateau", [(m, s) for s in SEEDS for m in PLATEAU_METHODS], workdir, args.workers)
    runs = [json.loads(p.read_text()) for p in sorted(workdir.glob("run-*.json"))]
    plateau = json.loads((workdir / "plateau.json").read_text())
    result = {"setup": {"budget": BUDGET, "evals": EVALS, "eval_problems": EVAL_PROBLEMS, "seeds": SEEDS,
                        "plateau_budgets": PLATEAU_BUDGETS}, "environment": quality.environment(),
              "plateau": plateau, "methods": summarise_plateau(plateau, runs), "runs": runs}  # fmt: skip
    output.write_text(json.dumps(result, indent=1))
    print_plateau(result)
    plot_plateau(result, output.with_suffix(".png"))


def warm_main(args, workdir: Path) -> None:
    """Regimes (ii)-(iv): quality.py's summary, table and plot, plus the ratio to the best offline method."""
    regime, spec = args.regime, WARM_REGIMES[args.regime]
    output = RESULTS / f"regime_{regime}.json"
    prep = warm_prep(regime, workdir)
    if not args.collect:
        run_jobs(regime, [(m, s) for s in WARM_SEEDS for m in spec["methods"]], workdir, args.workers)
    runs = [json.loads(p.read_text()) for p in sorted(workdir.glob("run-*.json"))]
    methods = quality.summarise(TASK, prep, runs)
    for frac in quality.THRESHOLDS:
        key = f"cpu_s_to_{round(frac * 100)}pct"
        offline = [s[key]["mean"] for m, s in methods.items() if m.startswith("offline") and s[key]["mean"]]
        for s in methods.values():
            s[key]["ratio_to_best_offline"] = s[key]["mean"] / min(offline) if s[key]["mean"] and offline else None
    result = {"setup": {"regime": regime, **spec, "seeds": WARM_SEEDS, "eval_problems": WARM_EVAL_PROBLEMS},
              "environment": quality.environment(),
              "tasks": {regime: {"prep": prep, "methods": methods, "runs": runs}}}  # fmt: skip
    output.write_text(json.dumps(result, indent=1))
    quality.print_table(result)
    quality.plot(result, output.with_suffix(".png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("regime", choices=["plateau", *WARM_REGIMES])
    parser.add_argument("--workdir", default="/tmp/trl_onpolicy_regimes", help="a folder per regime goes under it")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--collect", action="store_true", help="summarise the finished runs only")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot_only and args.regime == "plateau":
        result = json.loads((RESULTS / "regime_plateau.json").read_text())
        print_plateau(result)
        return plot_plateau(result, RESULTS / "regime_plateau.png")
    if args.plot_only:
        result = json.loads((RESULTS / f"regime_{args.regime}.json").read_text())
        quality.print_table(result)
        return quality.plot(result, RESULTS / f"regime_{args.regime}.png")
    workdir = Path(args.workdir) / args.regime if not args.one else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        method, seed = args.one[0], int(args.one[1])
        record = (from_plateau(method, seed, workdir) if args.regime == "plateau"
                  else from_warm_start(args.regime, method, seed, workdir))  # fmt: skip
        evals = EVALS if args.regime == "plateau" else WARM_REGIMES[args.regime]["evals"]
        if len(record["points"]) < evals:  # stopped early (SIGTERM stops the trainer gracefully): not a finished run,
            sys.exit(f"{method} seed {seed} stopped after {len(record['points'])} of {evals} evaluations; not saved.")
        return (workdir / f"run-{method}-{seed}.json").write_text(json.dumps(record, indent=1))
    (plateau_main if args.regime == "plateau" else warm_main)(args, workdir)


if __name__ == "__main__":
    main()
