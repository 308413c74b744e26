"""The `trl-onpolicy` command.

    trl-onpolicy quickstart [--rounds 3 --steps-per-round 100 ...]   the built-in demo, offline, on a CPU
    trl-onpolicy distill --config recipe.yaml [--field value ...]   train: the example script's flags or a YAML recipe
    trl-onpolicy eval MODEL --tasks gsm8k,mmlu [--limit 200]        score a saved student, write a report
    trl-onpolicy serve-teacher MODEL --port 8000 [...]              a teacher server (vLLM's scoring API)
    trl-onpolicy cache-teacher MODEL DATASET OUTPUT [...]           the teacher's top-k log-probs, once, on disk

Run `trl-onpolicy <command> --help` for a command's flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

EPILOG = """\
examples:
  trl-onpolicy quickstart
  trl-onpolicy distill --config examples/recipes/qwen-gsm8k-jsd.yaml --max_steps 50
  trl-onpolicy distill --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
      --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name openai/gsm8k --dataset_config main \\
      --output_dir qwen-distilled
  trl-onpolicy eval qwen-distilled --tasks gsm8k --limit 200 --output-dir qwen-distilled/eval
  trl-onpolicy serve-teacher Qwen/Qwen2.5-1.5B-Instruct --port 8000

Several GPUs: accelerate launch [--config_file examples/accelerate_configs/zero3.yaml] \\
  examples/on_policy_distill.py --config recipe.yaml   (the same code as `distill`)
"""

DISTILL_HELP = "Distill a teacher into a student from flags or a YAML recipe (--config); every config field is a flag."


# name, module (None: `distill`, which parses its own flags with `trl.TrlParser`), one-line help
SUBCOMMANDS = (
    ("quickstart", "quickstart",
     "Distill the built-in tiny teacher into a student on a GSM8K-format task, scored after every round."),
    ("distill", None, DISTILL_HELP),
    ("eval", "eval_command",
     "Score a saved student with lm-eval tasks (toy_gsm8k, gsm8k, mmlu, ...) and write a report."),
    ("serve-teacher", "serve_teacher",
     "Serve a local teacher model over HTTP with vLLM's prompt log-prob API (FastAPI + uvicorn)."),
    ("cache-teacher", "cache_teacher",
     "Score a dataset's completions with a teacher once and store its top-k log-probs for offline training."),
)  # fmt: skip


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command's parser. Only the module of `command` (the one being run) is imported to add its flags, so
    `trl-onpolicy --help` and `--version` start without loading torch or transformers."""
    parser = argparse.ArgumentParser(
        prog="trl-onpolicy",
        description="On-policy knowledge distillation for Hugging Face TRL: the student writes, the teacher scores "
        "every token it wrote, the student learns to match the teacher there.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trl-onpolicy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", title="commands")
    for name, module_name, help_text in SUBCOMMANDS:
        if module_name is None or name != command:  # listed only; its flags are added when it is the one run
            commands.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(f".{module_name}", __package__)
        sub = commands.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "distill":  # TrlParser: `--config` plus flag overrides, and its own `--help`
        from . import distill_command

        return distill_command.run(argv[1:])
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        parser.print_help()
        return 2
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
