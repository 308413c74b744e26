"""The `trl-onpolicy` command.

    trl-onpolicy quickstart [--rounds 3 --steps-per-round 100 ...]   the built-in demo, offline, on a CPU
    trl-onpolicy distill --config recipe.yaml [--field value ...]   train: the example script's flags or a YAML recipe
    trl-onpolicy compare --config recipe.yaml --budget 120          which method for this task: pilots at equal compute
    trl-onpolicy eval MODEL --tasks gsm8k,mmlu [--limit 200]        score a saved student, write a report
    trl-onpolicy serve-teacher MODEL --port 8000 [...]              a teacher server (vLLM's scoring API)
    trl-onpolicy cache-teacher MODEL DATASET OUTPUT [...]           the teacher's top-k log-probs, once, on disk

Run `trl-onpolicy <command> --help` for a command's flags. A mistake in the input (a bad flag value, a missing path, an
unreachable server) is reported as one message and exit status 1; `--debug` (anywhere on the line) or
`TRL_ONPOLICY_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from .. import __version__
from .help_format import HelpFormatter

EPILOG = """\
examples:
  trl-onpolicy quickstart
  trl-onpolicy distill --config examples/recipes/qwen-gsm8k-jsd.yaml --max_steps 50
  trl-onpolicy distill --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
      --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name openai/gsm8k --dataset_config main \\
      --output_dir qwen-distilled
  trl-onpolicy compare --config examples/recipes/toy-cpu.yaml --methods offline,onpolicy,mixed --budget 60
  trl-onpolicy eval qwen-distilled --tasks gsm8k --limit 200 --output-dir qwen-distilled/eval
  trl-onpolicy serve-teacher Qwen/Qwen2.5-1.5B-Instruct --port 8000

Several GPUs: accelerate launch [--config_file examples/accelerate_configs/zero3.yaml] \\
  examples/on_policy_distill.py --config recipe.yaml   (the same code as `distill`)
"""

DISTILL_HELP = "Distill a teacher into a student from flags or a YAML recipe (--config); every config field is a flag."


COMPARE_HELP = "Which method for your task: short pilots of offline, on-policy and mixed distillation at equal compute."
# name, module (None: a command that parses its own flags and a recipe with `trl.TrlParser`), one-line help
SUBCOMMANDS = (
    ("quickstart", "quickstart",
     "Distill the built-in tiny teacher into a student on a GSM8K-format task, scored after every round."),
    ("distill", None, DISTILL_HELP),
    ("compare", None, COMPARE_HELP),
    ("eval", "eval",
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
            name, help=help_text, description=module.__doc__, formatter_class=HelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    return parser


RECIPE_COMMANDS = tuple(name for name, module_name, _ in SUBCOMMANDS if module_name is None)  # distill, compare
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # trl_onpolicy/, not commands/
USER_ERROR_TYPES = (ImportError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)


def is_user_error(error: BaseException) -> bool:
    """
    Whether `error` is one a user fixes from its message: a missing optional package, a missing file, a run stopped
    by non-finite losses, or a `ValueError` / `OSError` / `RuntimeError` raised by this package itself (a bad setting,
    an unreachable teacher server or dataset) or by the Hub client (a model id that cannot be found or fetched).
    Anything else is a bug and keeps its traceback.
    """
    if isinstance(error, USER_ERROR_TYPES):
        return True
    if not isinstance(error, (ValueError, OSError, RuntimeError)):
        return False
    chain = [error] + ([error.__cause__] if error.__cause__ is not None else [])  # transformers wraps Hub errors
    for item in chain:
        frames = traceback.extract_tb(item.__traceback__)
        where = frames[-1].filename if frames else ""
        module = type(item).__module__ or ""
        if where.startswith(PACKAGE_DIR) or module.startswith(("huggingface_hub", "trl_onpolicy")):
            return True
    return False


def _run(command: str, function, debug: bool) -> int:
    """Run a command; a user error becomes one message on stderr and exit status 1 (the traceback with --debug). The
    status is the command's own when it returns an int (`distill` stopped by SIGTERM: 143), else 0."""
    try:
        status = function()
    except KeyboardInterrupt:
        print(f"trl-onpolicy {command}: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        message = str(error).strip() or type(error).__name__
        print(f"trl-onpolicy {command}: error: {message}\n(add --debug for the traceback)", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0  # `distill` returns 143 when SIGTERM stopped it


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TRL_ONPOLICY_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in RECIPE_COMMANDS:  # TrlParser: `--config` plus flag overrides, and their own `--help`
        module = importlib.import_module(f".{argv[0]}", __package__)
        return _run(argv[0], lambda: module.run(argv[1:]), debug)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        parser.print_help()
        return 2
    return _run(args.command, lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
