"""`trl-onpolicy compare`: short pilots of each method at equal compute, scored with the recipe's eval tasks.

    trl-onpolicy compare --config recipe.yaml --methods offline,onpolicy,mixed --budget 120 [--evals 3 --seeds 0,1]
    trl-onpolicy compare --budget 30      # the embedded default: toy teacher, toy student, toy_gsm8k and toy_mmlu

Which regime a task is in (does the student need its own samples, or do the dataset's or the teacher's completions
do?) is hard to know in advance. Each pilot starts from the same student (loaded again from the recipe's
`model_name_or_path`), with the same seed, and trains until it has been charged `--budget` seconds by
[`~trl_onpolicy.compute_meter.Meter`] (CPU-seconds on a CPU, GPU-seconds on an accelerator, charged as
`benchmarks/quality.py` charges them); it is scored with the recipe's eval tasks (`eval_tasks`, `eval_limit`) before
training and at `--evals` evenly spaced points (evaluation is not charged). Methods:

- `offline`: `lmbda=0`: the dataset's completions when it has them (supervised KD), else `seq_kd=True`: the teacher
  writes them, charged as *teacher_generation*;
- `onpolicy`: `lmbda=1`: the student writes every completion;
- `mixed`: `lmbda=0.5`: half the batches each way;
- any of them with overrides of recipe fields: `onpolicy:loss_type=reverse_kl,beta=1.0` (named as written).

Every other flag (and every line of `--config`) is a field of `trl-onpolicy distill`. The budget, not `max_steps`,
ends a pilot: `max_steps` is set to 1,000,000, so a decaying learning-rate schedule stays near its peak for a pilot
(warm-up still applies), `num_rounds` to 1, and no checkpoints are saved. Writes into `--output_dir`: `compare.json`
(every point: charged seconds, phases, FLOPs; the environment), `compare.md` (the table and the recommendation) and
`compare.png` (the primary task's score vs charged seconds, one line per method), and prints the recommendation with
its evidence (see [`~trl_onpolicy.pilot_report`]).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from .help_format import HelpFormatter
from .quickstart import _number

METHODS = {"offline": 0.0, "onpolicy": 1.0, "mixed": 0.5}  # method -> lmbda
# The embedded default recipe: the quickstart's models and eval tasks, toy-cpu.yaml's training settings.
EMBEDDED_DEFAULT = [
    "--model_name_or_path", "toy", "--teacher_model_name_or_path", "toy", "--dataset_name", "toy",
    "--max_train_samples", "6400", "--eval_tasks", "toy_gsm8k,toy_mmlu", "--eval_limit", "200", "--num_threads", "1",
    "--loss_type", "jsd", "--beta", "0.5", "--max_completion_length", "96", "--max_length", "512",
    "--learning_rate", "1e-3", "--warmup_steps", "20", "--per_device_train_batch_size", "32", "--logging_steps", "10",
]  # fmt: skip
NO_EVAL_TASKS = (
    "The recipe sets no eval tasks, and compare scores every pilot with them: add `eval_tasks: toy_gsm8k` (comma-"
    "separated lm-eval tasks; `eval_limit: 200` for examples per task) to {recipe}, or pass `--eval_tasks TASKS`."
)


def method_spec(text: str) -> tuple[str, list[str]]:
    """`name` or `name:key=value,...` -> (the name as written, its flags); an argparse `type`."""
    name, _, overrides = text.strip().partition(":")
    if name not in METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {name!r}: use {', '.join(METHODS)}, optionally with recipe fields, e.g. "
            "onpolicy:loss_type=reverse_kl,beta=1.0"
        )
    flags = []
    for item in filter(None, overrides.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: write overrides as key=value, got {item!r}")
        flags += [f"--{key.strip()}", value.strip()]
    return text.strip(), flags


def _methods(text: str) -> list[tuple[str, list[str]]]:
    specs, rest = [], text
    while rest:  # a comma starts a new method unless what follows it is `key=value` (an override of the last one)
        head, _, rest = rest.partition(",")
        if specs and "=" in head and ":" not in head:
            specs[-1] += "," + head
        else:
            specs.append(head)
    methods = [method_spec(s) for s in specs if s.strip()]
    twice = sorted({label for label, _ in methods if [m for m, _ in methods].count(label) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"method(s) {', '.join(twice)} given twice (--seeds runs a method again)")
    return methods


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers, got {text!r}") from None


def make_parser(prog: str = "trl-onpolicy compare") -> argparse.ArgumentParser:
    """compare's own flags; every other flag is a recipe field (`trl-onpolicy distill --help`)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter,
                                     allow_abbrev=False, usage="%(prog)s [--config RECIPE.yaml] [options] "
                                     "[--FIELD VALUE ...]")  # fmt: skip
    add = parser.add_argument
    add("--config", metavar="RECIPE.yaml", default=None,
        help="The recipe (as for distill); default: the embedded toy task, teacher and student.")
    add("--methods", type=_methods, default=_methods("offline,onpolicy,mixed"),
        help="Comma-separated methods: offline, onpolicy, mixed, each optionally name:key=value,... (default: all).")
    add("--budget", type=_number(float, 0.0, low_open=True), required=True, metavar="SECONDS",
        help="Charged seconds per pilot (CPU-seconds on a CPU, GPU-seconds on an accelerator).")
    add("--evals", type=_number(int, 1), default=3, metavar="N",
        help="Evaluations per pilot, evenly spaced over the budget.")
    add("--seeds", type=_seeds, default=None, metavar="LIST", help="Comma-separated seeds, one pilot per method and seed "
        "(default: the recipe's seed).")  # fmt: skip
    add("--target", type=_number(float, 0.0, 1.0, low_open=True), default=0.9, metavar="FRACTION",
        help="The table's compute column: seconds to this fraction of the best final score.")
    add("--clock", choices=["auto", "process", "cuda"], default="auto",
        help="process: CPU-seconds; cuda: synchronized wall time (GPU-seconds); auto: cuda when available.")
    add("--output_dir", default="compare-out", metavar="DIR",
        help="Where compare.json, compare.md, compare.png and the pilots go.")
    return parser


def recipe_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The recipe's flags: `--config` (or the embedded default), then the fields given on the command line."""
    return (["--config", args.config] if args.config else list(EMBEDDED_DEFAULT)) + rest


def pilot_argv(base: list[str], method_flags: list[str], lmbda: float, seq_kd: bool, seed: int, out: str):
    """One pilot's flags: the recipe, the pilot's settings, the method (last: its overrides win)."""
    return [
        *base, "--output_dir", out, "--max_steps", "1000000", "--num_rounds", "1", "--save_strategy", "no",
        "--eval_strategy", "no", "--seed", str(seed), "--report_to", "none", "--disable_tqdm", "true",
        "--push_to_hub", "false", "--lmbda", str(lmbda), "--seq_kd", str(seq_kd).lower(), *method_flags,
    ]  # fmt: skip


def run(argv: list[str] | None = None, prog: str = "trl-onpolicy compare") -> int:
    """Parse `argv`, check everything that can be checked before loading a model, run the pilots, write the report."""
    args, rest = make_parser(prog).parse_known_args(sys.argv[1:] if argv is None else list(argv))
    import torch

    from . import pilots
    from .distill import check_arguments, load_datasets
    from .distill import make_parser as make_recipe_parser

    recipe = make_recipe_parser(prog="trl-onpolicy distill")  # the fields are distill's: its --help-all lists them
    base = recipe_argv(args, rest)
    script_args, training_args, model_args = recipe.parse_args_and_config(args=base)
    if not script_args.eval_tasks:
        raise ValueError(NO_EVAL_TASKS.format(recipe=args.config or "the recipe"))
    for _, flags in args.methods:  # a misspelt override fails now, before any model loads
        recipe.parse_args_and_config(args=base + flags)
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    check_arguments(model_args, training_args)
    dataset, _ = load_datasets(script_args)
    columns = set(dataset.column_names or [])
    seq_kd = not columns & {"completion", "messages"}  # off-policy batches: the dataset's completions, else the teacher's
    seeds = args.seeds or [training_args.seed]
    plan = []
    for label, flags in args.methods:
        for seed in seeds:
            out = os.path.join(args.output_dir, "pilots", f"{label.replace(':', '_').replace(',', '_')}-seed{seed}")
            lmbda = METHODS[label.partition(":")[0]]
            argv_one = pilot_argv(base, flags, lmbda, seq_kd and lmbda < 1.0, seed, out)
            plan.append((label, seed, argv_one))
    result = pilots.run_pilots(plan, recipe, script_args, dataset, args)
    result["setup"].update(recipe=base, seq_kd_for_offline=seq_kd)
    result["environment"] = environment(result["setup"]["clock"])
    pilots.write_outputs(result, args.output_dir)
    return 0


def environment(clock: str) -> dict:
    import torch
    import transformers
    import trl

    from .. import __version__

    device = torch.cuda.get_device_name(0) if clock == "cuda" else platform.processor() or platform.machine()
    return {"trl_onpolicy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version(), "device": device, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["compare", *sys.argv[1:]]))
