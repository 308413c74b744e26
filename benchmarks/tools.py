"""Agentic distillation on the embedded default: does the student learn to call the calculator? (issue 19)

    OMP_NUM_THREADS=1 python benchmarks/tools.py                # prep, then 2 methods x 3 seeds, 2 at a time
    OMP_NUM_THREADS=1 python benchmarks/tools.py --collect      # summarise the finished runs in --workdir
    python benchmarks/tools.py --plot-only                      # redraw results/tools.png

Settings, fixed on 2026-12-04 before the first run:
- task: the standard toy problems (2-4 equations) with the calculator (`toy/calculator.py`): every prompt is the chat
  template's rendering with the tools line ("Tools: calc"), every equation's value may be asked of `calc`.
- teacher: the toy teacher recipe with `tool_fraction=0.5` (3 x 128, 700 steps; half of its training chains use the
  calculator, the tool's answers masked out of the loss); not charged.
- student: quality.py's warm start (2 x 128, 300 SFT steps on the plain ground truth): it has never seen a call.
- every run: 240 charged CPU-s (quality.py's meter: process CPU time, one torch thread), scored at 120 and 240 CPU-s
  on 200 eval problems with the calculator (greedy, the trainer's own multi-turn rollouts: exact match, calls per
  problem, malformed calls per problem); seeds 0, 1, 2; batch 32 rows, AdamW, lr 1e-3 constant after 10 warm-up
  steps (quality.py's `common_args`).
    onpolicy_tools     OnPolicyDistillTrainer, lmbda 1, JSD beta 0.5, tools=[calc], parse_response=parse_calc_turn,
                       max_tool_calling_iterations 8, max_completion_length 200, sampling temperature 1
    offline_sft_tools  the teacher writes greedy transcripts with the calculator for 2,048 fresh train prompts (the
                       trainer's multi-turn rollouts, charged as teacher_generation), then trl.SFTTrainer on them as
                       conversations with `assistant_only_loss=True` (the tool's answers are context, as in ours)
- added after a first look (seed 0 of the two arms above: on-policy made no call in 246 steps, SFT on transcripts 2.96
  per problem), as the constitution study did for the same reason (teacher-written text teaches a new format):
    seqkd_tools        OnPolicyDistillTrainer, lmbda 0, seq_kd=True (the teacher writes each step's transcripts with
                       the calculator, live), loss_type forward_kl, otherwise as onpolicy_tools
- added on 2026-12-05 after the table above (on-policy JSD taught no call in any seed; teacher transcripts did), to
  test the two explanations the note gave, settings fixed before their first run:
    onpolicy_fkl_tools as onpolicy_tools with loss_type forward_kl: the likely reason given was that JSD's gradient on
                       a logit scales with the student's own probability of the token; forward KL's (q - p) does not
    two_stage_tools    offline_sft_tools on a pool of 1,024 transcripts (the pool and its SFT charged) until 160
                       CPU-s, then onpolicy_tools from that student (a fresh optimizer, as a second command would have)
                       until 240 CPU-s; scored at 120, 160 (the switch) and 240
- headline: exact match with the calculator and calls per problem at 240 CPU-s, mean and each seed; the teacher's and
  the warm student's scores with the calculator as the reference lines.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import quality  # benchmarks/quality.py: the meter, the pair, the runner
import torch

RESULTS = Path(__file__).parent / "results"
METHODS = ["onpolicy_tools", "offline_sft_tools", "seqkd_tools", "onpolicy_fkl_tools", "two_stage_tools"]
SEEDS, BUDGET, EVALS, EVAL_PROBLEMS, POOL, LENGTH = (0, 1, 2), 240.0, 2, 200, 2048, 200
SWITCH, SWITCH_POOL = 160.0, 1024  # two_stage_tools: CPU-s at which SFT on transcripts hands over to on-policy
TOOL_FRACTION = 0.5


def load():
    import transformers

    from trl_onpolicy import toy
    from trl_onpolicy.tool_evaluation import tool_tokenizer

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    teacher, tokenizer, teacher_info = toy.load_or_train_teacher(progress=False, tool_fraction=TOOL_FRACTION)
    _, student, _, _, student_info = quality.load_pair("standard")
    return teacher, student, tool_tokenizer(tokenizer), teacher_info, student_info


def score(model, tokenizer, problems):
    from trl_onpolicy.tool_evaluation import evaluate_with_tools

    return evaluate_with_tools(model, tokenizer, problems, max_new_tokens=LENGTH)


def conversations(problems):
    from trl_onpolicy.toy import prompt_text

    return [[{"role": "user", "content": prompt_text(p["question"])}] for p in problems]


def transcript_messages(tokenizer, completion_ids: list[int], tool_mask: list[int]) -> list[dict]:
    """A rollout's completion as messages: each run of drawn tokens is a turn of the model (parsed), each run of
    context tokens a tool answer (" = 12" -> "12")."""
    from trl_onpolicy.toy.calculator import TOOL_NAME, parse_calc_turn

    messages, start = [], 0
    for i in range(1, len(completion_ids) + 1):
        if i == len(completion_ids) or tool_mask[i] != tool_mask[start]:
            text = tokenizer.decode(completion_ids[start:i], skip_special_tokens=True)
            if tool_mask[start]:
                messages.append(parse_calc_turn(text))
            else:
                messages.append({"role": "tool", "name": TOOL_NAME, "content": text.removeprefix(" = ")})
            start = i
    return messages


def teacher_transcripts(meter, teacher, tokenizer, seed: int, size: int = POOL):
    """The teacher's greedy transcripts with the calculator for `size` fresh train prompts, as conversations."""
    from datasets import Dataset
    from transformers.utils import get_json_schema

    from trl_onpolicy import toy
    from trl_onpolicy.tool_evaluation import greedy_tool_rollouts
    from trl_onpolicy.toy.calculator import calc

    problems, completions, correct = toy.generate_problems(size, "train", seed=10_000 + seed), [], 0
    with meter.phase("teacher_generation"):
        for part, rollouts in greedy_tool_rollouts(teacher, tokenizer, problems, LENGTH, 64, 8, source="teacher"):
            for problem, c, m in zip(part, rollouts.completion_ids, rollouts.tool_mask):
                completions.append(transcript_messages(tokenizer, c, m))
                correct += toy.is_correct(tokenizer.decode(c, skip_special_tokens=True), problem)
    data = Dataset.from_dict({"prompt": conversations(problems), "completion": completions,
                              "tools": [json.dumps([get_json_schema(calc)])] * size})  # fmt: skip
    return data, correct / size


def build_trainer(method: str, meter, teacher, student, tokenizer, seed: int, workdir: str, pool_size: int = POOL):
    import trl

    from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer, toy
    from trl_onpolicy.toy.calculator import calc, parse_calc_turn

    common = quality.common_args(f"{workdir}/out-{method}-{seed}", seed, 1e-3)
    if method == "offline_sft_tools":
        pool, pool_correct = teacher_transcripts(meter, teacher, tokenizer, seed, pool_size)
        with meter.excluded():
            config = trl.SFTConfig(**common, max_length=512, assistant_only_loss=True)
            return trl.SFTTrainer(student, args=config, train_dataset=pool, processing_class=tokenizer), pool_correct
    with meter.excluded():
        problems = toy.generate_problems(16_384, "train", seed=30_000 + seed)
        data = __import__("datasets").Dataset.from_dict({"prompt": conversations(problems)})
        method_kw = {"seqkd_tools": {"lmbda": 0.0, "seq_kd": True, "loss_type": "forward_kl"},
                     "onpolicy_fkl_tools": {"lmbda": 1.0, "loss_type": "forward_kl"}}.get(
            method, {"lmbda": 1.0, "loss_type": "jsd", "beta": 0.5})  # fmt: skip
        config = OnPolicyDistillConfig(**common, max_completion_length=LENGTH, max_length=512, temperature=1.0,
                                       top_k=0, top_p=1.0, max_tool_calling_iterations=8, **method_kw)  # fmt: skip
        trainer = OnPolicyDistillTrainer(
            student,
            teacher_model=teacher,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            tools=[calc],
            parse_response=parse_calc_turn,
        )
        return trainer, None


def run_one(method: str, seed: int, workdir: Path) -> dict:
    from trl_onpolicy import toy

    teacher, student, tokenizer, _, _ = load()
    problems = toy.generate_problems(EVAL_PROBLEMS, "eval", seed=0)
    torch.manual_seed(seed)
    meter = quality.Meter(clock="process")
    quality.watch(meter, student, teacher)
    points: list[dict] = []
    checkpoints = [BUDGET * (i + 1) / EVALS for i in range(EVALS)]

    def train(trainer, checkpoints):
        trainer.add_callback(quality.BudgetCallback(
            meter, checkpoints, lambda model: score(model, tokenizer, problems), points,
            lambda p: f"  step {p['step']:5d}  {p['cpu_s']:7.1f} CPU-s  {p['accuracy']}  {p['phases']}"))  # fmt: skip
        trainer.train()

    started = time.perf_counter()
    if method == "two_stage_tools":  # SFT on transcripts until the switch, then on-policy on the same student
        checkpoints = sorted({*checkpoints, SWITCH})
        first, pool_correct = build_trainer("offline_sft_tools", meter, teacher, student, tokenizer, seed,
                                            str(workdir), SWITCH_POOL)  # fmt: skip
        train(first, [c for c in checkpoints if c <= SWITCH])
        trainer, _ = build_trainer("onpolicy_tools", meter, teacher, student, tokenizer, seed, f"{workdir}/stage2")
    else:
        trainer, pool_correct = build_trainer(method, meter, teacher, student, tokenizer, seed, str(workdir))
    train(trainer, checkpoints)
    return {"method": method, "seed": seed, "points": points, "pool_exact_match": pool_correct,
            "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def prepare() -> dict:
    from trl_onpolicy import toy

    teacher, student, tokenizer, teacher_info, _ = load()
    problems = toy.generate_problems(EVAL_PROBLEMS, "eval", seed=0)
    prep = {"teacher": score(teacher, tokenizer, problems), "student": score(student, tokenizer, problems),
            "teacher_plain_exact_match": toy.evaluate_exact_match(teacher, tokenizer, problems),
            "teacher_info": {k: teacher_info[k] for k in ("name", "num_parameters", "recipe")}}  # fmt: skip
    return prep


def summarise(prep: dict, runs: list[dict]) -> dict:
    out = {}
    for method, mine, n in quality.runs_by_method(runs, METHODS):
        out[method] = {
            "seeds": [r["seed"] for r in mine],
            "points": [{"cpu_s": statistics.mean(r["points"][i]["cpu_s"] for r in mine),
                        **{key: quality.spread([r["points"][i]["accuracy"][key] for r in mine])
                           for key in ("exact_match", "calls_per_problem", "malformed_per_problem")},
                        "per_seed": [r["points"][i]["accuracy"]["exact_match"] for r in mine]} for i in range(n)],
            **quality.last_point_means(mine, n, ("teacher_generation", "generation", "teacher", "update")),
            "pool_exact_match": [r["pool_exact_match"] for r in mine],
        }  # fmt: skip
    return {"setup": {"budget": BUDGET, "evals": EVALS, "eval_problems": EVAL_PROBLEMS, "seeds": SEEDS, "pool": POOL,
                      "tool_fraction": TOOL_FRACTION}, "environment": quality.environment(), "prep": prep,
            "methods": out, "runs": runs}  # fmt: skip


def print_table(result: dict) -> None:
    prep = result["prep"]
    print(f"teacher with calc: {prep['teacher']}; warm student with calc: {prep['student']}")
    print(
        "method | @120 s exact match | @240 s exact match (per seed) | calls/problem @240 | malformed/problem @240 | "
        "steps | phases (CPU-s)"
    )
    for method, s in result["methods"].items():
        first, last = s["points"][0], s["points"][-1]
        print(" | ".join([method, f"{first['exact_match']['mean']:.3f}",
                          f"{last['exact_match']['mean']:.3f} ({' / '.join(f'{a:.3f}' for a in last['per_seed'])})",
                          f"{last['calls_per_problem']['mean']:.2f}", f"{last['malformed_per_problem']['mean']:.2f}",
                          f"{s['steps']:.0f}", json.dumps({k: round(v) for k, v in s["phases_s"].items()})]))  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prep = result["prep"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, s in result["methods"].items():
        xs = [0.0] + [p["cpu_s"] for p in s["points"]]
        for ax, key, start in ((left, "exact_match", prep["student"]["exact_match"]),
                               (right, "calls_per_problem", prep["student"]["calls_per_problem"])):  # fmt: skip
            ys = [start] + [p[key]["mean"] for p in s["points"]]
            lo = [start] + [p[key]["min"] for p in s["points"]]
            hi = [start] + [p[key]["max"] for p in s["points"]]
            line = ax.plot(xs, ys, "-o", label=method)[0]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    left.axhline(prep["teacher"]["exact_match"], color="k", lw=1, label="teacher")
    right.axhline(prep["teacher"]["calls_per_problem"], color="k", lw=1, label="teacher")
    left.set(title="exact match with the calculator (200 problems)", xlabel="charged CPU-seconds", ylim=(0, 1.05))
    right.set(title="calc calls per problem", xlabel="charged CPU-seconds")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def evaluations(method: str) -> int:
    """The evaluation points of a finished run."""
    return EVALS + (method == "two_stage_tools")


def main():
    quality.study_main(__doc__, __file__, "/tmp/trl_onpolicy_tools", RESULTS / "tools.json", METHODS, SEEDS, sys.modules[__name__])


if __name__ == "__main__":
    main()
