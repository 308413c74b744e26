"""The README's two set-up commands stay true: CI runs the test command verbatim, and the main command exists."""

import pathlib
import re

from trl_onpolicy.commands.cli import build_parser


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


def test_docs_name_the_real_cache_folder_and_its_variable(monkeypatch):
    """examples/README.md named `~/.cache/trl-onpolicy`; the folder is `~/.cache/trl_onpolicy`."""
    from trl_onpolicy.toy.recipe import cache_dir

    monkeypatch.delenv("TRL_ONPOLICY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(cache_dir()) == "/home/someone/.cache/trl_onpolicy"
    monkeypatch.setenv("TRL_ONPOLICY_CACHE", "/data/cache")
    assert str(cache_dir()) == "/data/cache"
    for doc in ("README.md", "examples/README.md"):
        text = (ROOT / doc).read_text()
        assert "~/.cache/trl_onpolicy" in text and "TRL_ONPOLICY_CACHE" in text, doc
        assert ".cache/trl-onpolicy" not in text, doc


def test_every_example_output_folder_is_ignored_by_git():
    """`toy-cpu-out/` and `custom-callback-out/` showed up as untracked files after running the examples."""
    import subprocess

    sources = [*ROOT.glob("examples/*.py"), *ROOT.glob("examples/recipes/*.yaml"), *ROOT.glob("trl_onpolicy/**/*.py")]
    folders = {m for path in sources for m in re.findall(r"\b([a-z0-9][a-z0-9-]*-out)\b", path.read_text())}
    assert {"toy-cpu-out", "custom-callback-out", "quickstart-out", "eval-out"} <= folders
    for folder in sorted(folders):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/x"], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{folder}/ is not in .gitignore"
