"""The `trl-onpolicy` command.

    trl-onpolicy quickstart [--rounds 3 --steps-per-round 40 ...]   the built-in demo, offline, on a CPU
    trl-onpolicy serve-teacher MODEL --port 8000 [...]              a teacher server (vLLM's scoring API)
    trl-onpolicy cache-teacher MODEL DATASET OUTPUT [...]           the teacher's top-k log-probs, once, on disk

Run `trl-onpolicy <command> --help` for a command's flags.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__, cache_teacher, quickstart, serve_teacher


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-onpolicy",
        description="On-policy knowledge distillation for Hugging Face TRL.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trl-onpolicy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "quickstart",
        help="Distill the built-in tiny teacher into a student on a GSM8K-format task, scored after every round.",
        description=quickstart.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quickstart.add_arguments(demo)
    demo.set_defaults(func=quickstart.run)
    server = commands.add_parser(
        "serve-teacher",
        help="Serve a local teacher model over HTTP with vLLM's prompt log-prob API (FastAPI + uvicorn).",
        description=serve_teacher.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_teacher.add_arguments(server)
    server.set_defaults(func=serve_teacher.run)
    cache = commands.add_parser(
        "cache-teacher",
        help="Score a dataset's completions with a teacher once and store its top-k log-probs for offline training.",
        description=cache_teacher.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cache_teacher.add_arguments(cache)
    cache.set_defaults(func=cache_teacher.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
