"""Specialised students behind a router (MoDE) against one student of the same parameters, at equal compute (issue 20).

    OMP_NUM_THREADS=1 python benchmarks/specialists.py              # 3 methods x 3 seeds, 2 at a time (~35 min)
    OMP_NUM_THREADS=1 python benchmarks/specialists.py --collect    # summarise the finished runs in --workdir
    python benchmarks/specialists.py --plot-only                    # redraw results/specialists.png

Settings, fixed on 2026-12-04 before the first run:
- two domains of the toy task, each with its own teacher (quality.py's two tasks): *standard* (2-4 equations; the
  standard teacher, 3 x 128, 700 steps) and *hard* (5-8 equations; the same recipe trained 1,000 steps on hard
  problems). A training row is a prompt and its `domain`; the mixed datasets alternate the two domains.
- scored by greedy exact match on 100 eval problems of each domain (quality.py's eval problems, each domain's
  completion length); the headline is the mean of the two domains, at 120 and 240 charged CPU-s (process CPU time, one
  torch thread; evaluation not charged). Seeds 0, 1, 2; batch 32, AdamW, lr 1e-3 constant after 10 warm-up steps
  (quality.py's `common_args`); lmbda 1, JSD beta 0.5, sampling temperature 1.
- methods:
    specialists        two students 2 x 128 (quality.py's standard warm start, 0.61 M parameters each, 1.21 M in all),
                       each distilled on its domain's prompts from its domain's teacher for half the budget (the
                       standard one first); at inference `RoutedStudents` routes every prompt, by the domain given
                       (the column) and, at the end, by a `PromptClassifier` trained on 2,048 training prompts (its
                       CPU-s charged)
    generalist_4x128_eqflops
                       one student 4 x 128 (1.13 M parameters: the specialists' total, the embedding counted once),
                       warm-started by the same SFT recipe for 161 steps (the 2 x 128's 300 steps in FLOPs: 300 x
                       0.605 / 1.130), distilled on both domains for the whole budget, each row scored by its
                       domain's teacher (`teacher_model={"standard": ..., "hard": ...}`, routed by the column)
    generalist_2x128   the same with one specialist's student (half the parameters): what one small student does
- the specialists share one warm start (trained once); not charged, nor are the generalists'.
- added after a first look at the warm starts (before any distillation ran): the 4 x 128 after 161 SFT steps scores
  0.072 on 500 standard problems against the 2 x 128's 0.238, so equal warm-up FLOPs hand the specialists a far better
  start. Added, settings fixed before it ran:
    generalist_4x128   the same 4 x 128 warm-started for 300 steps, like the specialists (1.87x their warm-up FLOPs):
                       the comparison at an equal start, which favours the generalist in warm-up compute
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import quality  # benchmarks/quality.py: the meter, the runner, the tasks
import torch

RESULTS = Path(__file__).parent / "results"
METHODS = ["specialists", "generalist_4x128", "generalist_4x128_eqflops", "generalist_2x128"]
DOMAINS = ("standard", "hard")
SEEDS, BUDGET, EVALS, EVAL_PROBLEMS, CLASSIFIER_PROMPTS = (0, 1, 2), 240.0, 2, 100, 2048
GENERALIST = (4, 128)
WARM_STEPS = {"generalist_4x128": 300, "generalist_4x128_eqflops": 161}  # SFT steps of the 4 x 128's warm start


def load_models(method: str):
    """The two teachers, the warm student(s) of `method` and the tokenizer (every toy model shares it)."""
    import transformers

    from trl_onpolicy import toy

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    teachers = {d: quality.load_pair(d)[0] for d in DOMAINS}
    tokenizer = quality.load_pair("standard")[2]
    if method in WARM_STEPS:
        student = toy.load_or_train_student(*GENERALIST, sft_steps=WARM_STEPS[method], progress=False)[0]
    else:
        student = quality.load_pair("standard")[1]
    return teachers, student, tokenizer


def domain_prompts(domains: tuple[str, ...], seed: int, n: int = 8192):
    """Training prompts of `domains`, alternating, with their `domain` column."""
    import datasets

    parts = [quality.prompts(d, seed, n // len(domains)) for d in domains]
    rows = [{"prompt": part[i]["prompt"], "domain": d} for i in range(len(parts[0])) for d, part in zip(domains, parts)]
    return datasets.Dataset.from_list(rows)


def train(student, teacher, tokenizer, domains, seed, budget, workdir, evaluate) -> list[dict]:
    """Distill `teacher` (a model, or a dict by domain) into `student` on `domains` for `budget` charged CPU-s;
    the points at half and all of it."""
    from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer

    length = max(quality.completion_length(tokenizer, d) for d in domains)
    meter = quality.Meter(clock="process")
    quality.watch(meter, student)
    for model in teacher.values() if isinstance(teacher, dict) else [teacher]:
        meter.watch_backbone(model.get_decoder(), "teacher", phase="teacher")
    with meter.excluded():
        config = OnPolicyDistillConfig(**quality.common_args(f"{workdir}/out-{'-'.join(domains)}-{seed}", seed, 1e-3),
                                       max_completion_length=length, max_length=512, temperature=1.0, top_k=0,
                                       top_p=1.0, lmbda=1.0, loss_type="jsd", beta=0.5,
                                       teacher_routing_column="domain")  # fmt: skip
        trainer = OnPolicyDistillTrainer(student, teacher_model=teacher, args=config, processing_class=tokenizer,
                                         train_dataset=domain_prompts(domains, seed))  # fmt: skip
    points: list[dict] = []
    trainer.add_callback(quality.budget_callback(meter, [budget / 2, budget], evaluate, points))
    trainer.train()
    return points


def scores(model, tokenizer) -> dict[str, float]:
    from trl_onpolicy import toy

    return {d: toy.evaluate_exact_match(model, tokenizer, quality.eval_problems(d, EVAL_PROBLEMS),
                                        max_new_tokens=quality.completion_length(tokenizer, d)) for d in DOMAINS}  # fmt: skip


def routed_point(students: dict, tokenizer, seed: int) -> dict:
    """The specialists behind a classifier trained on training prompts (its CPU-s charged): exact match per domain
    and the router's accuracy on the eval prompts."""
    from trl_onpolicy import DomainRouter, PromptClassifier, RoutedStudents, toy

    started = time.process_time()
    train_rows = domain_prompts(DOMAINS, 40_000 + seed, CLASSIFIER_PROMPTS)
    classifier = PromptClassifier(list(DOMAINS))
    classifier.fit(train_rows["prompt"], train_rows["domain"], seed=seed)
    cost = time.process_time() - started
    mixture = RoutedStudents(students, {d: tokenizer for d in DOMAINS}, DomainRouter(list(DOMAINS), classifier=classifier))
    out = {"classifier_cpu_s": round(cost, 2)}
    for d in DOMAINS:
        problems = quality.eval_problems(d, EVAL_PROBLEMS)
        prompts = [toy.prompt_text(p["question"]) for p in problems]
        length = max(quality.completion_length(tokenizer, k) for k in DOMAINS)
        completions, routes = mixture.generate(prompts, do_sample=False, max_new_tokens=length)
        out[d] = sum(toy.is_correct(c, p) for c, p in zip(completions, problems)) / len(problems)
        out[f"router_accuracy_{d}"] = sum(r == d for r in routes) / len(routes)
    return out


def run_one(method: str, seed: int, workdir: Path) -> dict:
    teachers, student, tokenizer = load_models(method)
    torch.manual_seed(seed)
    started = time.perf_counter()
    if method != "specialists":
        details: list[dict] = []

        def evaluate_both(model):
            details.append(scores(model, tokenizer))
            return statistics.mean(details[-1].values())

        points = train(student, teachers, tokenizer, DOMAINS, seed, BUDGET, workdir, evaluate_both)
        for point, per_domain in zip(points, details):
            point["per_domain"] = per_domain
        return {"method": method, "seed": seed, "points": points, "wall_s": round(time.perf_counter() - started, 1)}
    students, halves = {}, {}
    for d in DOMAINS:
        students[d] = student if d == DOMAINS[0] else load_models(method)[1]

        def evaluate(model, _d=d):
            from trl_onpolicy import toy

            return toy.evaluate_exact_match(model, tokenizer, quality.eval_problems(_d, EVAL_PROBLEMS),
                                            max_new_tokens=quality.completion_length(tokenizer, _d))  # fmt: skip

        halves[d] = train(students[d], teachers[d], tokenizer, (d,), seed, BUDGET / 2, workdir, evaluate)
    points = [combine([halves[d][i] for d in DOMAINS]) for i in range(EVALS)]
    routed = routed_point(students, tokenizer, seed)
    return {"method": method, "seed": seed, "points": points, "specialist_points": halves, "routed": routed,
            "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def combine(points: list[dict]) -> dict:
    """One point of the specialists from each one's point at the same share of its budget: CPU-s and steps summed,
    the accuracy the mean over the domains (equal numbers of eval problems)."""
    phases = {k: sum(p["phases"].get(k, 0.0) for p in points) for k in points[0]["phases"]}
    return {"cpu_s": sum(p["cpu_s"] for p in points), "step": sum(p["step"] for p in points), "phases": phases,
            "accuracy": statistics.mean(p["accuracy"] for p in points),
            "per_domain": {d: p["accuracy"] for d, p in zip(DOMAINS, points)}}  # fmt: skip


# ------------------------------------------------------------------------------------------------ summary


def prepare() -> dict:
    """Each teacher and warm student scored on both domains (and the parameters of each student)."""
    from trl_onpolicy import toy

    teachers, small, tokenizer = load_models("specialists")
    large = load_models("generalist_4x128")[1]
    prep = {"teachers": {d: scores(t, tokenizer) for d, t in teachers.items()},
            "student_2x128": {**scores(small, tokenizer), "num_parameters": toy.num_parameters(small)},
            "student_4x128": {**scores(large, tokenizer), "num_parameters": toy.num_parameters(large)},
            "student_4x128_eqflops": scores(load_models("generalist_4x128_eqflops")[1], tokenizer)}  # fmt: skip
    return prep


def summarise(prep: dict, runs: list[dict]) -> dict:
    out = {}
    for method, mine, n in quality.runs_by_method(runs, METHODS):
        out[method] = {
            "seeds": [r["seed"] for r in mine],
            "points": [{**point, **{d: statistics.mean(r["points"][i]["per_domain"][d] for r in mine) for d in DOMAINS}}
                       for i, point in enumerate(quality.seed_points(mine, n))],
            **quality.last_point_means(mine, n, ("generation", "teacher")),
        }  # fmt: skip
        if method == "specialists":
            routed = [r["routed"] for r in mine]
            out[method]["routed_by_classifier"] = {
                k: statistics.mean(x[k] for x in routed) for k in routed[0]
            } | {"mean": statistics.mean(statistics.mean(x[d] for d in DOMAINS) for x in routed)}
    return {"setup": {"budget": BUDGET, "evals": EVALS, "eval_problems_per_domain": EVAL_PROBLEMS, "seeds": SEEDS,
                      "domains": DOMAINS, "generalist": GENERALIST, "generalist_sft_steps": WARM_STEPS},
            "environment": quality.environment(), "prep": prep, "methods": out, "runs": runs}  # fmt: skip


def print_table(result: dict) -> None:
    prep = result["prep"]
    for name in ("student_2x128", "student_4x128", "student_4x128_eqflops"):
        p = prep[name]
        print(f"{name}: {p.get('num_parameters', 0):,} parameters; start standard {p['standard']:.3f}, hard "
              f"{p['hard']:.3f}")
    for d, s in prep["teachers"].items():
        print(f"teacher of {d}: standard {s['standard']:.3f}, hard {s['hard']:.3f}")
    print("method | @120 | @240 (per seed) | standard | hard | steps | CPU-s: generation, teacher")
    for method, s in result["methods"].items():
        first, last = s["points"][0], s["points"][-1]
        print(" | ".join([method, f"{first['exact_match']['mean']:.3f}",
                          f"{last['exact_match']['mean']:.3f} ({' / '.join(f'{a:.3f}' for a in last['per_seed'])})",
                          f"{last['standard']:.3f}", f"{last['hard']:.3f}", f"{s['steps']:.0f}",
                          ", ".join(f"{s['phases_s'][k]:.0f}" for k in ("generation", "teacher"))]))  # fmt: skip
        if "routed_by_classifier" in s:
            r = s["routed_by_classifier"]
            print(f"  routed by the classifier: {r['mean']:.3f} (standard {r['standard']:.3f}, hard {r['hard']:.3f});"
                  f" router accuracy {r['router_accuracy_standard']:.3f} / {r['router_accuracy_hard']:.3f}; "
                  f"classifier {r['classifier_cpu_s']:.1f} CPU-s")  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prep = result["prep"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, key in zip(axes, ("mean", *DOMAINS)):
        for method, s in result["methods"].items():
            start = prep[{"generalist_4x128": "student_4x128", "generalist_4x128_eqflops": "student_4x128_eqflops"}
                         .get(method, "student_2x128")]
            first = statistics.mean(start[d] for d in DOMAINS) if key == "mean" else start[key]
            ys = [first] + [p["exact_match"]["mean"] if key == "mean" else p[key] for p in s["points"]]
            ax.plot([0.0] + [p["cpu_s"] for p in s["points"]], ys, "-o", label=method)
        ax.set(title="both domains (mean)" if key == "mean" else f"{key} domain", xlabel="charged CPU-seconds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"exact match ({EVAL_PROBLEMS} problems per domain)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Routed specialists against one student of the same parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    quality.study_main(__doc__, __file__, "/tmp/trl_onpolicy_specialists", RESULTS / "specialists.json", METHODS,
                       SEEDS, sys.modules[__name__])  # fmt: skip


if __name__ == "__main__":
    main()
