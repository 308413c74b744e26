"""A teacher of another tokenizer on the embedded default: what does the alignment cost, what does ULD give? (issue 20)

    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer.py              # 4 methods x 3 seeds, 2 at a time
    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer.py --collect    # summarise the finished runs in --workdir
    python benchmarks/cross_tokenizer.py --plot-only                    # redraw results/cross_tokenizer.png

Settings, fixed on 2026-12-04 before the first run:
- task: the standard toy problems (2-4 equations), prompts only; scored by exact match on 200 eval problems (greedy,
  the student's tokenizer), at 120 and 240 charged CPU-s (quality.py's meter: process CPU time, one torch thread).
- student: quality.py's warm start (2 x 128, 300 SFT steps, the toy's BPE tokenizer); seeds 0, 1, 2; batch 32 rows,
  AdamW, lr 1e-3 constant after 10 warm-up steps (quality.py's `common_args`); lmbda 1, sampling temperature 1,
  completions of quality.py's length.
- teachers (not charged): the standard toy teacher (3 x 128, 700 steps, BPE), and the same recipe trained on the same
  problems with one token per byte (`Recipe(tokenizer="bytes")`, `toy.byte_tokenizer`): a teacher of another family.
- methods:
    same_jsd            the BPE teacher, JSD beta 0.5 (quality.py's onpolicy_jsd): the reference
    same_uld            the BPE teacher through `CrossTokenizerTeacher` with the student's own tokenizer: every span is
                        one token, so this isolates the change of loss (ULD on the top 64) from the change of teacher
    cross_uld           the byte-level teacher, `teacher_tokenizer_name_or_path`, ULD on the top 64
    cross_hybrid        the same with `uld_use_hybrid_loss`: JSD beta 0.5 on the 132 tokens both vocabularies have
                        with the same text (the ASCII characters and the special tokens), ULD on the rest; GOLD's
                        default weights (132 / 260 and the rest)
- added after a first look (seed 0 at 240 CPU-s: same_uld 0.000 against same_jsd 0.480; ULD compares how peaked the
  two distributions are, not which token each puts its mass on, so nothing tells the student which text is right), the
  cross-tokenizer loss that does compare texts, settings fixed before it ran:
    same_srkl           the BPE teacher, `loss_type="sampled_reverse_kl"` (per token): the reference for the next
    cross_srkl          the byte-level teacher, `loss_type="sampled_reverse_kl"`: per span, log q(text) - log p(text)
- charged: everything, the re-tokenization and alignment included (its CPU-s are also reported as `alignment`).
- headline: exact match at 240 CPU-s per method (mean and each seed), steps made, where the CPU-s went.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import quality  # benchmarks/quality.py: the meter, the pair, the runner
import torch

RESULTS = Path(__file__).parent / "results"
METHODS = ["same_jsd", "same_uld", "cross_uld", "cross_hybrid", "same_srkl", "cross_srkl"]
SEEDS, BUDGET, EVALS, EVAL_PROBLEMS, TOP_K = (0, 1, 2), 240.0, 2, 200, 64


def load(method: str):
    import transformers

    from trl_onpolicy import toy

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    _, student, tokenizer, _, _ = quality.load_pair("standard")
    kind = "bytes" if method.startswith("cross") else "bpe"
    teacher, teacher_tokenizer, info = toy.load_or_train_teacher(progress=False, **({"tokenizer": "bytes"} if kind
                                                                                      == "bytes" else {}))  # fmt: skip
    return teacher, teacher_tokenizer, student, tokenizer, info


def build_trainer(method, meter, teacher, teacher_tokenizer, student, tokenizer, seed, workdir, length):
    from trl_onpolicy import CrossTokenizerTeacher, LocalTeacher, OnPolicyDistillConfig, OnPolicyDistillTrainer

    common = quality.common_args(f"{workdir}/out-{method}-{seed}", seed, 1e-3)
    ours = dict(max_completion_length=length, max_length=512, temperature=1.0, top_k=0, top_p=1.0,  # noqa: C408
                lmbda=1.0, loss_type="jsd", beta=0.5)  # fmt: skip
    with meter.excluded():
        teacher_model = teacher
        if method == "same_uld":
            teacher_model = CrossTokenizerTeacher(LocalTeacher(teacher), tokenizer, tokenizer, top_k=TOP_K)
        elif method.startswith("cross"):
            folder = Path(workdir) / "teacher-tokenizer"
            teacher_tokenizer.save_pretrained(folder)
            ours.update(teacher_tokenizer_name_or_path=str(folder), teacher_top_k=TOP_K,
                        uld_use_hybrid_loss=method == "cross_hybrid")  # fmt: skip
        if method.endswith("srkl"):
            ours["loss_type"] = "sampled_reverse_kl"
        config = OnPolicyDistillConfig(**common, **ours)
        trainer = OnPolicyDistillTrainer(student, teacher_model=teacher_model, args=config,
                                         train_dataset=quality.prompts("standard", seed), processing_class=tokenizer)
    if hasattr(trainer.teacher, "_teacher_rows"):  # the alignment's CPU-s, reported on their own
        for name in ("_teacher_rows", "_spans"):
            original = getattr(trainer.teacher, name)
            setattr(trainer.teacher, name, lambda *a, _f=original, **k: _timed(meter, _f, a, k))
    return trainer


def _timed(meter, function, args, kwargs):
    with meter.phase("alignment"):
        return function(*args, **kwargs)


def run_one(method: str, seed: int, workdir: Path) -> dict:
    from trl_onpolicy import toy

    teacher, teacher_tokenizer, student, tokenizer, _ = load(method)
    problems = quality.eval_problems("standard", EVAL_PROBLEMS)
    length = quality.completion_length(tokenizer, "standard")
    torch.manual_seed(seed)
    meter = quality.Meter(clock="process")
    quality.watch(meter, student, teacher)
    trainer = build_trainer(method, meter, teacher, teacher_tokenizer, student, tokenizer, seed, str(workdir), length)
    points: list[dict] = []
    rates: list[float] = []
    started = time.perf_counter()

    def evaluate(model):
        rates.append(getattr(trainer.teacher, "alignment_rate", None))
        return toy.evaluate_exact_match(model, tokenizer, problems, max_new_tokens=length)

    checkpoints = [BUDGET * (i + 1) / EVALS for i in range(EVALS)]
    trainer.add_callback(quality.budget_callback(meter, checkpoints, evaluate, points))
    trainer.train()
    return {"method": method, "seed": seed, "points": points, "alignment_rate": rates,
            "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def prepare() -> dict:
    from trl_onpolicy import toy

    prep = {}
    problems = quality.eval_problems("standard", EVAL_PROBLEMS)
    for method in ("same_jsd", "cross_uld"):
        teacher, teacher_tokenizer, student, tokenizer, info = load(method)
        key = "teacher_bytes" if method == "cross_uld" else "teacher_bpe"
        prep[key] = {"exact_match": toy.evaluate_exact_match(teacher, teacher_tokenizer, problems),
                     "info": {k: info[k] for k in ("name", "num_parameters", "recipe")}}  # fmt: skip
        prep["student"] = toy.evaluate_exact_match(student, tokenizer, problems)
    return prep


def summarise(prep: dict, runs: list[dict]) -> dict:
    out = {}
    for method, mine, n in quality.runs_by_method(runs, METHODS):
        out[method] = {
            "seeds": [r["seed"] for r in mine],
            "points": quality.seed_points(mine, n),
            **quality.last_point_means(mine, n, ("generation", "teacher", "alignment")),
            "alignment_rate": [r["alignment_rate"][-1] for r in mine],
        }  # fmt: skip
    return {"setup": {"budget": BUDGET, "evals": EVALS, "eval_problems": EVAL_PROBLEMS, "seeds": SEEDS, "top_k": TOP_K},
            "environment": quality.environment(), "prep": prep, "methods": out, "runs": runs}  # fmt: skip


def print_table(result: dict) -> None:
    prep = result["prep"]
    print(f"teacher (BPE): {prep['teacher_bpe']['exact_match']:.3f}; teacher (bytes): "
          f"{prep['teacher_bytes']['exact_match']:.3f}; warm student: {prep['student']:.3f}")  # fmt: skip
    print("method | @120 | @240 (per seed) | steps | alignment rate | CPU-s: generation, teacher, alignment")
    for method, s in result["methods"].items():
        first, last = s["points"][0], s["points"][-1]
        rate = "-" if s["alignment_rate"][0] is None else f"{statistics.mean(s['alignment_rate']):.3f}"
        print(" | ".join([method, f"{first['exact_match']['mean']:.3f}",
                          f"{last['exact_match']['mean']:.3f} ({' / '.join(f'{a:.3f}' for a in last['per_seed'])})",
                          f"{s['steps']:.0f}", rate,
                          ", ".join(f"{s['phases_s'][k]:.0f}" for k in ("generation", "teacher", "alignment"))]))  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prep = result["prep"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, s in result["methods"].items():
        xs = [0.0] + [p["cpu_s"] for p in s["points"]]
        ys = [prep["student"]] + [p["exact_match"]["mean"] for p in s["points"]]
        lo = [prep["student"]] + [p["exact_match"]["min"] for p in s["points"]]
        hi = [prep["student"]] + [p["exact_match"]["max"] for p in s["points"]]
        line = ax.plot(xs, ys, "-o", label=method)[0]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(prep["teacher_bpe"]["exact_match"], color="k", lw=1, label="teacher (BPE)")
    ax.axhline(prep["teacher_bytes"]["exact_match"], color="k", lw=1, ls="--", label="teacher (bytes)")
    ax.set(title="On-policy distillation from a teacher of another tokenizer", xlabel="charged CPU-seconds",
           ylabel="exact match (200 problems)", ylim=(0, 1.05))  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    quality.study_main(__doc__, __file__, "/tmp/trl_onpolicy_cross_tokenizer", RESULTS / "cross_tokenizer.json", METHODS, SEEDS, sys.modules[__name__])


if __name__ == "__main__":
    main()
