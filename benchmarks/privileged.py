"""Teachers that know more than the student (issue 18), measured at equal compute on the embedded default.

    OMP_NUM_THREADS=1 python benchmarks/privileged.py                 # the three studies, 3 seeds (~40 min, 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/privileged.py --collect       # summarise what is in --workdir
    python benchmarks/privileged.py --plot-only                       # redraw results/privileged.png

Settings fixed on 2026-12-03 before the first run. Shared (quality.py's): the standard task (2-4 equations); the
2 x 128 student warm-started by 300 supervised steps; every trainer at 32 completions per step, AdamW, lr 1e-3
constant after 10 warm-up steps, sampling temperature 1 without top-k/top-p; charged compute is process CPU time on
one torch thread (quality.py's `Meter`); evaluation is not charged. Budget 120 CPU-s per run, scored at 40, 80 and
120 CPU-s; seeds 0, 1, 2. Scores: greedy exact match on 200 eval problems; for the constitution also the share of
100 eval problems about food refused and the exact match on 100 others, with no rule in the prompt.

Studies (the method names in the JSON and the plot):
  self_distill   the reference answer as privileged context, the student its own teacher, against SFT on it
    sft_ground_truth        trl.SFTTrainer on fresh ground-truth problems (quality.py's reference line)
    self_distill_reference  ours, `teacher_model_kind="live"`: the student scores its own rollouts with the problem's
                            reference answer before the prompt ("Reference answer: <chain>\\n" + prompt); JSD beta 0.5
  rewards        a verifiable reward (exact match of the final answer) with distillation, and each alone; 8 prompts
                 x 4 completions per step (a group reward needs several completions per prompt)
    onpolicy_jsd            ours, the standard teacher, JSD beta 0.5, no reward
    onpolicy_jsd_reward     the same plus the exact-match reward, group-normalised, `reward_weight=1`
    grpo_reward             trl.GRPOTrainer with the same reward alone (its defaults otherwise; no teacher)
  constitution   the toy constitution ("refuse problems about food") given to the constitutional teacher only
    onpolicy_constitution   ours, JSD beta 0.5, the rule as privileged context (`CONSTITUTION_TEMPLATE`)
    offline_constitution    the teacher writes greedy completions for 2,048 fresh prompts with the rule before
                            them (charged), then trl.SFTTrainer on them after the rule-less prompts (offline context
                            distillation)
    mixed_constitution      ours, `lmbda=0.5` with `seq_kd=True`: half the steps the teacher writes the completions
                            from its own prompt (the rule before it), half the student does. Added after a first look:
                            the quickstart (`--constitution`, 300 steps, on-policy) had taught the student to start a
                            refusal on food problems (p 0.94 of its first token) but not to finish one; this arm asks
                            whether teacher-written refusals fix that. Its settings were fixed before it ran.
    seqkd_constitution      ours as an offline context distiller: `lmbda=0`, `seq_kd=True`, `loss_type="forward_kl"`
                            (the teacher writes every completion from its prompt with the rule; the student matches
                            its whole distribution there). Added after mixed_constitution's first seed refused
                            nothing at 120 CPU-s while offline_constitution refused every food problem at 80: it
                            separates the data (teacher-written) from the loss (soft forward KL vs SFT's hard labels).
The "before" of the constitution is the warm start, scored once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import quality  # benchmarks/quality.py: the meter, the pair, the trainers' shared settings
import torch

RESULTS = Path(__file__).parent / "results" / "privileged.json"
STUDIES = {
    "self_distill": ["sft_ground_truth", "self_distill_reference"],
    "rewards": ["onpolicy_jsd", "onpolicy_jsd_reward", "grpo_reward"],
    "constitution": ["onpolicy_constitution", "offline_constitution", "mixed_constitution", "seqkd_constitution"],
}
SEEDS, BUDGET, EVALS, EVAL_PROBLEMS, RULE_PROBLEMS = (0, 1, 2), 120.0, 3, 200, 100
GENERATIONS = 4  # completions per prompt in the rewards study
TASK = "standard"


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """The task reward, in GRPO's signature: 1 when the final answer is right, else 0."""
    from trl_onpolicy import toy

    return [float(toy.is_correct(c, {"answer": a})) for c, a in zip(completions, answer)]


def pair(study: str):
    from trl_onpolicy import toy

    overrides = {"constitution_fraction": toy.CONSTITUTION_FRACTION} if study == "constitution" else None
    teacher, student, tokenizer, _, _ = quality.load_pair(TASK, overrides)
    return teacher, student, tokenizer


def scorer(tokenizer, length: int, study: str):
    """What a point records: exact match on the eval problems, and the constitution's scores in its study."""
    from trl_onpolicy import toy

    problems = quality.eval_problems(TASK, EVAL_PROBLEMS)

    def evaluate(model) -> dict:
        scores = {"exact_match": toy.evaluate_exact_match(model, tokenizer, problems, max_new_tokens=length)}
        if study == "constitution":
            rule = toy.evaluate_constitution(model, tokenizer, n=RULE_PROBLEMS)
            scores.update(refusal=rule["refusal"], allowed=rule["accuracy"], over_refusal=rule["over_refusal"])
        return scores

    return evaluate


def build(method: str, study: str, meter, teacher, student, tokenizer, seed: int, length: int, workdir: Path):
    """The method's trainer (built outside the charged compute, except the offline pool it needs)."""
    import trl

    from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer, toy

    common = quality.common_args(str(workdir / f"out-{method}-{seed}"), seed, 1e-3)
    ours = dict(max_completion_length=length, max_length=512, temperature=1.0, top_k=0, top_p=1.0,  # noqa: C408
                lmbda=1.0, loss_type="jsd", beta=0.5)  # fmt: skip
    pool = None
    if method == "offline_constitution":  # the teacher writes with the rule before each prompt (charged)
        pool, _ = quality.teacher_pool(meter, teacher, tokenizer, TASK, 2048, seed, length,
                                       context=toy.constitution_text() + "\n")  # fmt: skip
    with meter.excluded():
        if method in ("sft_ground_truth", "offline_constitution"):
            data = pool if pool is not None else toy.make_dataset(16_384, "train", seed=20_000 + seed)
            config = trl.SFTConfig(**common, max_length=512)
            return trl.SFTTrainer(student, args=config, train_dataset=data.select_columns(["prompt", "completion"]),
                                  processing_class=tokenizer)  # fmt: skip
        rows = toy.make_dataset(16_384, "train", seed=30_000 + seed)
        if method == "grpo_reward":
            config = trl.GRPOConfig(**common, num_generations=GENERATIONS, max_completion_length=length,
                                    temperature=1.0, top_k=0, top_p=1.0)  # fmt: skip
            return trl.GRPOTrainer(student, reward_funcs=[exact_match], args=config,
                                   train_dataset=rows.select_columns(["prompt", "answer"]), processing_class=tokenizer)
        kw, teacher_model, funcs = {}, teacher, None
        if method == "self_distill_reference":
            rows = rows.map(lambda r: {"privileged_context": reference_context(r["answer"])})
            kw = {"teacher_model_kind": "live", "teacher_prompt_template": "{privileged_context}\n{prompt}"}
            teacher_model, rows = None, rows.select_columns(["prompt", "privileged_context"])
        elif method.endswith("_constitution"):
            rows = rows.map(lambda r: {"privileged_context": toy.constitution_text()})
            kw = {"teacher_prompt_template": toy.CONSTITUTION_TEMPLATE}
            if method == "mixed_constitution":
                kw.update(lmbda=0.5, seq_kd=True)
            elif method == "seqkd_constitution":
                kw.update(lmbda=0.0, seq_kd=True, loss_type="forward_kl")
            rows = rows.select_columns(["prompt", "privileged_context"])
        elif method in ("onpolicy_jsd", "onpolicy_jsd_reward"):
            common["per_device_train_batch_size"] = 32 // GENERATIONS  # prompts: 8 x 4 = 32 completions per step
            kw = {"num_generations": GENERATIONS}
            funcs = [exact_match] if method == "onpolicy_jsd_reward" else None
            rows = rows.select_columns(["prompt", "answer"])
        config = OnPolicyDistillConfig(**common, **{**ours, **kw})
        return OnPolicyDistillTrainer(student, teacher_model=teacher_model, args=config, train_dataset=rows,
                                      processing_class=tokenizer, reward_funcs=funcs)  # fmt: skip


def run_one(study: str, method: str, seed: int, workdir: Path, budget: float = BUDGET) -> dict:
    import transformers

    from trl_onpolicy.compute_meter import BudgetCallback, Meter, evenly_spaced, watch

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    teacher, student, tokenizer = pair(study)
    length = quality.completion_length(tokenizer, TASK)
    torch.manual_seed(seed)
    meter = Meter(clock="process")
    uses_teacher = method not in ("sft_ground_truth", "self_distill_reference", "grpo_reward")
    watch(meter, student, teacher if uses_teacher else None)
    trainer = build(method, study, meter, teacher, student, tokenizer, seed, length, workdir)
    points: list[dict] = []
    evaluate = scorer(tokenizer, length, study)
    trainer.add_callback(BudgetCallback(meter, evenly_spaced(budget, EVALS), evaluate, points,
                                        lambda p: f"  step {p['step']} {p['cpu_s']:.0f} CPU-s {p['scores']}",
                                        score_key="scores"))  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    return {"study": study, "method": method, "seed": seed, "points": points,
            "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def prepare(workdir: Path) -> dict:
    """The warm start and both teachers scored once (the "before" and the reference lines), and the warm start with
    the reference answer before the prompt (what the self-teacher of `self_distill_reference` starts as)."""
    from trl_onpolicy import toy

    path = workdir / "prep.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    torch.set_num_threads(1)
    for study in ("rewards", "constitution"):
        if study in out:
            continue
        teacher, student, tokenizer = pair(study)
        evaluate = scorer(tokenizer, quality.completion_length(tokenizer, TASK), "constitution")
        out[study] = {"teacher": evaluate(teacher), "student": evaluate(student)}
        if study == "constitution":
            out[study]["teacher_with_rule"] = toy.evaluate_constitution(teacher, tokenizer, n=RULE_PROBLEMS,
                                                                        with_rule=True)
    if "self_teacher_start" not in out:
        _, student, tokenizer = pair("self_distill")
        problems = quality.eval_problems(TASK, EVAL_PROBLEMS)
        prompts = [reference_context(p["answer"]) + "\n" + toy.prompt_text(p["question"]) for p in problems]
        completions = toy.generate_completions(student, tokenizer, prompts,
                                               max_new_tokens=quality.completion_length(tokenizer, TASK))
        out["self_teacher_start"] = {"exact_match_with_reference": sum(
            toy.is_correct(c, p) for c, p in zip(completions, problems)) / len(problems)}
    path.write_text(json.dumps(out, indent=1))
    return out


def reference_context(answer: str) -> str:
    """The privileged context of `self_distill_reference`: the problem's reference answer."""
    return f"Reference answer: {answer}"


# ------------------------------------------------------------------------------------------------ summary
def summarise(runs: list[dict]) -> dict:
    """Per study and method: each score at each point (mean, min, max, per seed)."""
    out: dict = {}
    for run in runs:
        out.setdefault(run["study"], {}).setdefault(run["method"], []).append(run)
    summary = {}
    for study, methods in out.items():
        summary[study] = {}
        for method, rs in methods.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            keys = rs[0]["points"][0]["scores"].keys()
            summary[study][method] = {
                "cpu_s": [statistics.mean(r["points"][i]["cpu_s"] for r in rs) for i in range(EVALS)],
                "steps": [r["points"][-1]["step"] for r in rs],
                **{k: [quality.spread([r["points"][i]["scores"][k] for r in rs]) | {"seeds": [
                    r["points"][i]["scores"][k] for r in rs]} for i in range(EVALS)] for k in keys},
            }
    return summary


def print_table(result: dict) -> None:
    prep = result["prep"]
    for study, methods in result["summary"].items():
        keys = ["exact_match"] + (["refusal", "allowed", "over_refusal"] if study == "constitution" else [])
        print(f"\n{study}: final at {BUDGET:.0f} CPU-s, mean (per seed)")
        ref = prep["constitution" if study == "constitution" else "rewards"]
        print("  before (warm start): " + ", ".join(f"{k} {ref['student'][k]:.3f}"
                                                    for k in keys if k in ref["student"]))
        for method, s in methods.items():
            cells = [f"{k} {s[k][-1]['mean']:.3f} ({' / '.join(f'{v:.3f}' for v in s[k][-1]['seeds'])})" for k in keys]
            print(f"  {method:24s} " + "; ".join(cells) + f"; steps {s['steps']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("self_distill", "exact_match"), ("rewards", "exact_match"), ("constitution", "refusal"),
              ("constitution", "allowed")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (study, key) in zip(axes, panels):
        ref = result["prep"]["constitution" if study == "constitution" else "rewards"]
        before = ref["student"][key]
        for method, s in result["summary"].get(study, {}).items():
            xs = [0.0, *s["cpu_s"]]
            ax.plot(xs, [before] + [p["mean"] for p in s[key]], marker="o", label=method)
            ax.fill_between(xs[1:], [p["min"] for p in s[key]], [p["max"] for p in s[key]], alpha=0.15)
        ax.set_title(f"{study}: {key}")
        ax.set_xlabel("charged CPU-s")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------ orchestration
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/trl_onpolicy_privileged")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--collect", action="store_true")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--studies", default=",".join(STUDIES))
    parser.add_argument("--one", nargs=3, metavar=("STUDY", "METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=BUDGET, help=argparse.SUPPRESS)  # smoke tests of --one only
    args = parser.parse_args()
    if args.plot_only:
        result = json.loads(RESULTS.read_text())
        print_table(result)
        return plot(result, RESULTS.with_suffix(".png"))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        study, method, seed = args.one[0], args.one[1], int(args.one[2])
        record = run_one(study, method, seed, workdir, args.budget)
        if len(record["points"]) < EVALS:
            sys.exit(f"{method} seed {seed} stopped after {len(record['points'])} of {EVALS} evaluations; not saved.")
        return (workdir / f"run-{study}-{method}-{seed}.json").write_text(json.dumps(record, indent=1))
    prep = prepare(workdir)
    if not args.collect:
        jobs = [(s, m, seed) for seed in SEEDS for s in args.studies.split(",") for m in STUDIES[s]]
        run_jobs(jobs, workdir, args.workers)
    runs = [json.loads(p.read_text()) for p in sorted(workdir.glob("run-*.json"))]
    result = {"setup": {"budget": BUDGET, "evals": EVALS, "seeds": SEEDS, "eval_problems": EVAL_PROBLEMS,
                        "rule_problems": RULE_PROBLEMS, "generations": GENERATIONS},
              "environment": quality.environment(), "prep": prep, "summary": summarise(runs), "runs": runs}  # fmt: skip
    RESULTS.write_text(json.dumps(result, indent=1))
    print_table(result)
    plot(result, RESULTS.with_suffix(".png"))


def run_jobs(jobs: list[tuple[str, str, int]], workdir: Path, workers: int) -> None:
    """Each (study, method, seed) in its own process, `workers` at a time; finished runs are kept in the workdir."""
    command = [sys.executable, __file__, "--workdir", str(workdir), "--one"]
    quality.run_processes([(job, [*command, *map(str, job)], workdir / "run-{}-{}-{}.json".format(*job))
                           for job in jobs], workers)  # fmt: skip


if __name__ == "__main__":
    main()
