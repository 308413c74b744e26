"""The README's two set-up commands stay true: CI runs the test command verbatim, and the main command exists."""

import pathlib
import re

from trl_onpolicy.cli import build_parser


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert commands[0].startswith("pip install torch==2.13.0") and commands[0].endswith("trl-onpolicy quickstart")
    assert commands[1].startswith("pip install torch==2.13.0") and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = _setup_commands()[1]
    # CI spells each `&&`-joined step on its own line, with `python -m pip` for pip
    steps = [step.strip().replace("pip install", "python -m pip install -q") for step in test_command.split("&&")]
    for step in steps:
        assert step in ci, f"CI does not run {step!r} of the README's test command"


def test_main_command_is_the_quickstart():
    args = build_parser("quickstart").parse_args(["quickstart", "--rounds", "2"])
    assert args.command == "quickstart" and args.rounds == 2
