"""The `trl-onpolicy` command: `--help` lists every subcommand; `distill` trains from a recipe with flag overrides;
`eval` scores a saved model (full or LoRA adapters) on the offline toy tasks and writes the report."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_assets import save_tiny_assets, train_flags

from trl_onpolicy.checkpoints import last_whole_checkpoint
from trl_onpolicy.commands import cli
from trl_onpolicy.commands.distill import DistillScriptArguments, load_datasets
from trl_onpolicy.toy.models import build_model
from trl_onpolicy.toy.tokenizer import build_tokenizer

COMMANDS = ["quickstart", "distill", "compare", "eval", "serve-teacher", "cache-teacher"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    """Two tiny models with the toy task's tokenizer, saved as `save_model` saves them; and a LoRA adapter folder."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("toy")
    tok = build_tokenizer()
    paths = {"student": folder / "student", "teacher": folder / "teacher", "adapter": folder / "adapter"}
    for name, layers in (("student", 1), ("teacher", 2)):
        build_model(layers, 32, tok).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    base = build_model(1, 32, tok)
    base.config._name_or_path = str(paths["student"])  # what from_pretrained records; the adapter names its base
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft.peft_config["default"].base_model_name_or_path = str(paths["student"])
    peft.save_pretrained(paths["adapter"])
    return {name: str(path) for name, path in paths.items()}


def _step_logs(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if re.match(r"step \d+/\d+ \| loss ", line)]


# --------------------------------------------------------------------------------------------------- help


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    listed = [line.split()[0] for line in text.split("commands:", 1)[1].split("examples:", 1)[0].splitlines()[2:]
              if line.startswith("    ") and not line.startswith("     ")]  # fmt: skip
    assert listed == COMMANDS, text
    assert "trl-onpolicy distill --config" in text and "trl-onpolicy eval" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: trl-onpolicy {command}")
    if command == "distill":  # TrlParser: every field of the three argument groups, and --config
        assert all(flag in text for flag in ("--config", "--teacher_model_name_or_path", "--use_peft", "--lmbda"))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["quickstart", "--help"], ["eval", "--help"],
                                  ["serve-teacher", "--help"], ["cache-teacher", "--help"],
                                  ["compare", "--help"]])  # fmt: skip
def test_help_and_version_load_no_heavy_library(argv):
    """Start-up: `--help` and `--version` (of every command but `distill`, whose flags are TRL's dataclasses) import
    neither torch nor transformers, TRL, PEFT or lm-eval (they took 6-13 s to load before anything was printed)."""
    code = (
        "import sys\nfrom trl_onpolicy.commands import cli\n"
        "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted({'torch', 'transformers', 'trl', 'peft', 'lm_eval', 'datasets'} & set(sys.modules))\n"
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-2000:]


def test_cache_teacher_flag_defaults_are_the_configs():
    from trl_onpolicy import OnPolicyDistillConfig
    from trl_onpolicy.commands.cache_teacher import DEFAULTS

    fields = OnPolicyDistillConfig.__dataclass_fields__
    assert DEFAULTS == {name: fields[name].default for name in DEFAULTS}


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- distill


def test_distill_from_a_recipe_with_overrides(assets, tmp_path, capsys):
    """The recipe asks for 5 steps and an lm-eval report; the command line overrides the step count to 2."""
    out = tmp_path / "out"
    flags = train_flags(assets, out, dataset="gsm8k")
    recipe = {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)}
    recipe.update(max_steps=5, num_rounds=1, eval_tasks="toy_mmlu", eval_limit=2,
                  system_prompt="Answer with '#### <number>'.")  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["distill", "--config", str(path), "--max_steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert [line.split(" | ")[0] for line in _step_logs(printed)] == ["step 1/2", "step 2/2"]  # one line per step
    assert "{'loss'" not in printed and "'grad_norm'" not in printed  # not also the Trainer's dicts
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())  # the round-end checkpoint
    assert state["global_step"] == state["max_steps"] == 2
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert [(r["round"], r["step"]) for r in report["rounds"]] == [(0, 0), (1, 2)]
    assert all(set(r["scores"]) == {"toy_mmlu"} for r in report["rounds"])


def test_gsm8k_rows_become_conversational_prompts(assets):
    script_args = DistillScriptArguments(dataset_name=assets["gsm8k"], system_prompt="Be brief.")
    train, test = load_datasets(script_args, need_eval=True)
    assert train.column_names == ["prompt", "completion"] and len(test) == 8
    assert train[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tom has 3 pens. He buys 2 more. How many?"},
    ]
    assert train[0]["completion"] == [{"role": "assistant", "content": "3 + 2 = 5.\n#### 5"}]
    jsonl, _ = load_datasets(DistillScriptArguments(dataset_name=assets["jsonl"], max_train_samples=3))
    assert jsonl.column_names == ["prompt", "completion"] and len(jsonl) == 3


def test_distill_without_a_teacher_says_how_to_set_one(assets, tmp_path, capsys):
    flags = train_flags(assets, tmp_path)
    i = flags.index("--teacher_model_name_or_path")
    assert cli.main(["distill", *flags[:i], *flags[i + 2 :]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trl-onpolicy distill: error: Set `--teacher_model_name_or_path`") and "Traceback" not in err
    with pytest.raises(ValueError, match="Set `--teacher_model_name_or_path`"):  # --debug: the exception itself
        cli.main(["distill", *flags[:i], *flags[i + 2 :], "--debug"])


def test_distill_with_a_self_teacher_needs_no_teacher_name(assets, tmp_path, capsys):
    """`--teacher_model_kind ema` instead of a teacher: the student's own EMA; the dataset here has no privileged
    context, so the trainer's refusal comes back as one message."""
    flags = train_flags(assets, tmp_path)
    i = flags.index("--teacher_model_name_or_path")
    assert cli.main(["distill", *flags[:i], *flags[i + 2 :], "--teacher_model_kind", "ema"]) == 1
    err = capsys.readouterr().err
    assert "trl-onpolicy distill: error: `teacher_model_kind='ema'` makes the student its own teacher" in err
    assert "Traceback" not in err and err.count("error:") == 1


# --------------------------------------------------------------------------------------------------- eval


def test_eval_writes_a_report(toy_models, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main([
        "eval", toy_models["student"], "--tasks", "toy_gsm8k,toy_mmlu", "--limit", "4", "--output-dir", str(out),
        "--teacher", toy_models["teacher"], "--max-gen-toks", "8", "--toy-eval-size", "20", "--threads", "1",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["rounds"]) == 1
    scores = report["rounds"][0]["scores"]
    assert set(scores) == {"toy_gsm8k", "toy_mmlu"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert set(report["teacher"]["scores"]) == {"toy_gsm8k", "toy_mmlu"}
    details = json.loads((out / "eval.json").read_text())
    assert details["student_results"]["primary"]["toy_gsm8k"].startswith("exact_match")
    assert "| teacher |" in (out / "report.md").read_text() and (out / "scores.png").stat().st_size > 0
    assert "toy_gsm8k" in capsys.readouterr().out


def test_eval_of_a_lora_adapter_folder(toy_models, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", toy_models["adapter"], "--tasks", "toy_mmlu", "--limit", "2", "--output-dir", str(out),
            "--toy-eval-size", "20"]  # fmt: skip
    assert cli.main(args) == 0
    assert set(json.loads((out / "report.json").read_text())["rounds"][0]["scores"]) == {"toy_mmlu"}


def test_eval_with_an_unknown_task_names_close_matches(toy_models, tmp_path, capsys):
    assert cli.main(["eval", toy_models["student"], "--tasks", "gsm8kk", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'gsm8k'" in err and err.rstrip().endswith("(add --debug for the traceback)")


# --------------------------------------------------------------------------------------------------- missing paths

ROOT = Path(__file__).resolve().parents[1]
ERROR_END = "(add --debug for the traceback)"


def _cli(args: list[str], cwd, timeout: float = 180, popen: bool = False):
    """`python -m trl_onpolicy.commands.cli ARGS` as a user runs it (this checkout first on the path), offline, one
    thread: the finished process, or with `popen` the running one (output piped)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "trl_onpolicy.commands.cli", *args]
    if popen:
        return subprocess.Popen(command, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _error_lines(stderr: str) -> list[str]:
    """The CLI's error message and its `--debug` hint: the last two lines of stderr (libraries may warn before)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.rstrip().splitlines()[-2:]


def test_distill_with_a_missing_teacher_path_says_so(assets, tmp_path):
    """It was transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" after the student
    loaded; now one message naming the model, the flag and the path, before anything loads."""
    flags = train_flags(assets, tmp_path / "out")
    flags[flags.index("--teacher_model_name_or_path") + 1] = "./no-such-teacher"
    start = time.perf_counter()
    proc = _cli(["distill", *flags], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    first, last = _error_lines(proc.stderr)
    assert first == (
        "trl-onpolicy distill: error: The teacher model (--teacher_model_name_or_path) './no-such-teacher' is a local "
        f"path that does not exist: {tmp_path / 'no-such-teacher'}. Check the path; a Hub model is named "
        "`namespace/name`."
    )
    assert last == ERROR_END
    assert not (tmp_path / "out").exists()  # failed before the trainer was built
    print(f"missing teacher: {time.perf_counter() - start:.1f} s")


def test_serve_teacher_with_a_missing_model_fails_before_serving(tmp_path):
    proc = _cli(["serve-teacher", "./nonexistent", "--port", "1"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 1 and "Serving" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert _error_lines(proc.stderr)[0] == (
        "trl-onpolicy serve-teacher: error: The teacher model (MODEL) './nonexistent' is a local path that does not "
        f"exist: {tmp_path / 'nonexistent'}. Check the path; a Hub model is named `namespace/name`."
    )


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["distill", "--model_name_or_path", "./no-such-student"],
         "The student model (--model_name_or_path) './no-such-student' is a local path that does not exist"),
        (["distill", "--reference_model_name_or_path", "../no-such-reference"],
         ("The reference model (--reference_model_name_or_path) '../no-such-reference' is a local path that does not "
         "exist")),
        (["distill", "--teacher_model_name_or_path", '{"a": "TEACHER", "b": "./no-such-b"}'],
         ("The teacher model (--teacher_model_name_or_path, member 'b') './no-such-b' is a local path that does not "
          "exist")),
        (["distill", "--model_name_or_path", "no-org/no-such-model"],
         ("The student model (--model_name_or_path) 'no-org/no-such-model' is not a local folder, and it is a Hub id "
         "that cannot be fetched: the Hub is offline")),
        (["eval", "./no-such-student", "--tasks", "toy_mmlu"],
         "The student model (MODEL) './no-such-student' is a local path that does not exist"),
        (["eval", "STUDENT", "--teacher", "./no-such-teacher", "--tasks", "toy_mmlu"],
         "The teacher model (--teacher) './no-such-teacher' is a local path that does not exist"),
        (["cache-teacher", "./no-such-teacher", "toy", "cache"],
         "The teacher model (TEACHER) './no-such-teacher' is a local path that does not exist"),
    ],
    ids=["student", "reference", "ensemble-member", "offline-hub-id", "eval-model", "eval-teacher", "cache-teacher"],
)  # fmt: skip
def test_a_missing_model_names_which_one(command, message, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if command[0] == "distill":
        flags = train_flags(assets, tmp_path / "out")
        for i in range(1, len(command), 2):  # replace the flag's value, or add the flag
            value = command[i + 1].replace("TEACHER", assets["teacher"])
            if command[i] in flags:
                flags[flags.index(command[i]) + 1] = value
            else:
                flags += [command[i], value]
        command = ["distill", *flags]
    command = [arg.replace("STUDENT", assets["student"]) for arg in command]
    assert cli.main(command) == 1
    first, last = _error_lines(capsys.readouterr().err)
    assert first.startswith(f"trl-onpolicy {command[0]}: error: {message}") and last == ERROR_END
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------------- resume


def test_distill_resume_from_a_missing_path_lists_the_checkpoints(assets, tmp_path):
    """It was `python examples/distill.py --resume_from_checkpoint /nonexistent` training from scratch without a word."""
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)  # not whole: no state files
    proc = _cli(["distill", *train_flags(assets, out), "--resume_from_checkpoint", "/nonexistent"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    first, last = _error_lines(proc.stderr)
    assert first == (
        f"trl-onpolicy distill: error: resume_from_checkpoint '/nonexistent' does not exist; output_dir '{out}' holds "
        "checkpoint-3 (incomplete). Give a checkpoint-N folder, a run folder holding them, or `true` for the last "
        "whole checkpoint in output_dir, or leave resume_from_checkpoint unset to start fresh."
    )
    assert last == ERROR_END


def test_distill_resume_true_and_a_run_folder(assets, tmp_path, capsys):
    """`--resume_from_checkpoint true` (it was "Can't find a valid checkpoint at true") and `out` (it was
    `FileNotFoundError: out/trainer_state.json`) both continue from out/checkpoint-2; with no checkpoint, `true` is an
    error, as transformers' `resume_from_checkpoint=True` is."""
    out = tmp_path / "out"
    flags = train_flags(assets, out)
    assert cli.main(["distill", *flags, "--resume_from_checkpoint", "true"]) == 1
    assert _error_lines(capsys.readouterr().err)[0] == (
        "trl-onpolicy distill: error: resume_from_checkpoint='true' resumes from the last whole checkpoint in "
        f"output_dir, but output_dir '{out}' does not exist. Check `output_dir`, give a checkpoint folder, or leave "
        "resume_from_checkpoint unset to start fresh."
    )
    flags[flags.index("--save_strategy") + 1] = "steps"
    assert cli.main(["distill", *flags, "--save_steps", "1"]) == 0  # checkpoints 1 and 2
    capsys.readouterr()
    for value, steps in (("true", 3), (str(out), 4)):  # each resumes from the last checkpoint and trains one step
        assert cli.main(["distill", *flags, "--save_steps", "1", "--max_steps", str(steps),
                         "--resume_from_checkpoint", value]) == 0  # fmt: skip
        assert len(_step_logs(capsys.readouterr().out)) == 1
        state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, steps + 1))


def test_distill_stopped_by_sigterm_says_how_to_resume_and_exits_143(assets, tmp_path):
    """A run stopped by SIGTERM used to exit 0 with "Saved the student to out.", as a finished one. Now: no final
    model, the step it stopped at, the exact command that resumes it, and exit status 143 (128 + SIGTERM); that
    command then resumes from the checkpoint."""
    out = tmp_path / "out"
    flags = train_flags(assets, out, steps=1000)
    flags[flags.index("--save_strategy") + 1] = "steps"
    flags += ["--save_steps", "1", "--save_total_limit", "2"]
    process = _cli(["distill", *flags], cwd=tmp_path, popen=True)
    start = time.monotonic()
    while not (out / "checkpoint-1" / "trainer_state.json").is_file():  # training runs; the handler is installed
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() - start < 180, "no checkpoint after 180 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    lines = stdout.rstrip().splitlines()
    step = int(lines[-2].split("Stopped by SIGTERM at step ", 1)[1].split(" ")[0])
    checkpoint = out / f"checkpoint-{step}"
    assert lines[-2] == f"Stopped by SIGTERM at step {step} of 1000; the checkpoint is {checkpoint}. Resume with:"
    resume = shlex.split(lines[-1])
    assert resume == ["trl-onpolicy", "distill", *flags, "--resume_from_checkpoint", str(checkpoint)]
    assert 1 <= step < 1000 and last_whole_checkpoint(str(out)) == str(checkpoint)
    assert "Saved the student" not in stdout and not (out / "model.safetensors").exists()
    resumed = _cli([*resume[1:], "--max_steps", str(step + 1)], cwd=tmp_path)  # the printed command, one step more
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(_step_logs(resumed.stdout)) == 1 and (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------- input errors


def _one_error(proc: subprocess.CompletedProcess, command: str) -> str:
    """The message of a command that failed with a user error: exit status 1, one message, no traceback."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    first, last = _error_lines(proc.stderr)
    assert first.startswith(f"trl-onpolicy {command}: error: ") and last == ERROR_END, proc.stderr[-3000:]
    return first.removeprefix(f"trl-onpolicy {command}: error: ")


def test_empty_datasets_get_the_trainers_message(assets, tmp_path):
    """`datasets` raised StopIteration for an empty .jsonl and IndexError for an empty save_to_disk folder."""
    from datasets import Dataset, DatasetDict

    (tmp_path / "empty.jsonl").write_text("\n")
    Dataset.from_dict({"prompt": []}).save_to_disk(tmp_path / "empty_ds")
    DatasetDict({"train": Dataset.from_dict({"prompt": []})}).save_to_disk(tmp_path / "empty_dict")
    for name, where in (("empty.jsonl", "empty.jsonl"), ("empty_ds", "empty_ds"), ("empty_dict", "empty_dict/train")):
        flags = train_flags(assets, tmp_path / "out")
        flags[flags.index("--dataset_name") + 1] = str(tmp_path / name)
        message = _one_error(_cli(["distill", *flags], cwd=tmp_path), "distill")
        assert message == (
            f"The train dataset is empty ({tmp_path / where} has no rows): pass a dataset with at least one prompt."
        )
    command = ["cache-teacher", assets["teacher"], str(tmp_path / "empty.jsonl"), str(tmp_path / "cache")]
    proc = _cli(command, cwd=tmp_path)
    assert _one_error(proc, "cache-teacher").startswith("The train dataset is empty (")


# --------------------------------------------------------------------------------------------------- help text


def _help_entries(text: str) -> dict[str, str]:
    """Each flag's help entry (its lines joined), by its first spelling."""
    entries, name = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            entries[name] = line
        elif name and line.startswith("    "):
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_distill_help_puts_the_distillation_options_first_in_plain_text(tmp_path, capsys):
    """It printed 1,081 lines, `--lmbda` at line 915 after ~600 lines of generic Trainer options, doc markup
    ([`~trl_onpolicy.eval.LmEvalCallback`]) and "(default: torch's choice). (default: None)"."""
    proc = _cli(["distill", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    short = proc.stdout
    lines = short.splitlines()
    headings = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert headings == ["options:", "data:", "distillation (OnPolicyDistillConfig):", "student model (trl.ModelConfig):",
                        "training:"]  # fmt: skip
    assert len(lines) < 350 and lines[-1].endswith("trl-onpolicy distill --help-all")
    entries = _help_entries(short)
    assert list(entries)[:3] == ["-h", "--help-all", "--config"]
    for flag in ("--teacher_model_name_or_path", "--lmbda", "--loss_type", "--teacher_top_k", "--model_name_or_path",
                 "--use_peft", "--max_steps", "--learning_rate", "--output_dir"):  # fmt: skip
        assert flag in entries, flag
    assert "--adam_beta1" not in entries and "--lora_dropout" not in entries  # in --help-all only
    assert entries["--lmbda"].split() == ["--lmbda", "FLOAT", "Probability", "that", "the", "student", "writes", "the",
                                          "completions.", "(default:", "1.0)"]  # fmt: skip
    assert entries["--num_threads"].endswith("torch CPU threads (default: torch's choice).")
    full = _help(["distill", "--help-all"], capsys)
    every = _help_entries(full)
    assert "--adam_beta1" in every and "--lora_dropout" in every and "--teacher_top_k" in every
    for text in (short, full):
        assert "`" not in text and "[~" not in text
        assert all(entry.count("(default") <= 1 for entry in _help_entries(text).values())
        assert "--teacher-top-k" not in text and "--no_bf16" not in text  # one spelling per flag


@pytest.mark.parametrize("command, flag, default", [
    ("quickstart", "--steps-per-round", "100"), ("eval", "--batch-size", "8"), ("serve-teacher", "--port", "8000"),
    ("cache-teacher", "--top-k", "20"),
])  # fmt: skip
def test_subcommand_help_shows_each_default_once(command, flag, default, capsys):
    text = _help([command, "--help"], capsys)
    entries = _help_entries(text)
    assert entries[flag].endswith(f"(default: {default})"), entries[flag]
    assert all(entry.count("(default") <= 1 for entry in entries.values())
    assert "(default: None)" not in text and "(default: False)" not in text and "`" not in text
    if command == "eval":
        assert "The tasks are the eval hook's\n(LmEvalCallback)" in text  # was [`~trl_onpolicy.eval.LmEvalCallback`]


def test_plain_text_drops_doc_markup():
    from trl_onpolicy.commands.help_format import plain_text

    assert plain_text("hook's ([`~trl_onpolicy.eval.LmEvalCallback`]), [`trl.ModelConfig`] and `lmbda`") == (
        "hook's (LmEvalCallback), trl.ModelConfig and lmbda"
    )
    assert plain_text("see [the docs](https://example.org/x).") == "see the docs (https://example.org/x)."


def test_a_misspelt_field_names_the_closest_one(tmp_path):
    """TRL said "Please remove them, add them to the dataclass, or set `fail_with_unknown_args=False`"."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lmdba: 0.5\n")
    proc = _cli(["distill", "--config", str(recipe), "--max_stepz", "3"], cwd=tmp_path)
    assert _one_error(proc, "distill") == (
        f"Unknown field `lmdba` in {recipe} (did you mean `lmbda`?); unknown field `max_stepz` on the command line "
        "(did you mean `max_steps`?). See `trl-onpolicy distill --help-all` for every field."
    )


def test_step_line_is_one_readable_line():
    """The Trainer printed ~400-character dicts of quoted strings with no step number."""
    from trl_onpolicy.step_log import format_step_line

    logs = {"loss": 0.001655, "grad_norm": 0.008, "learning_rate": 2e-05, "completion_length": 8.0,
            "truncated_fraction": 1.0, "loss_temperature": 1.0, "time/generation": 0.03355, "time/teacher": 0.001921,
            "divergence": 0.001655, "student_entropy": 3.928, "teacher_entropy": 3.929, "time/update": 0.0129,
            "tokens_per_second": 330.8, "nonfinite_skipped": 0.0, "epoch": 0.5}  # fmt: skip
    assert format_step_line(logs, 10, 300) == (
        "step 10/300 | loss 0.001655 | divergence 0.001655 | entropy student 3.928 teacher 3.929 | lr 2e-05 | "
        "completions 8.0 tokens | 331 tokens/s | seconds: generation 0.034 teacher 0.002 update 0.013"
    )
    assert format_step_line({**logs, "nonfinite_skipped": 2.0}, 10, 300).endswith(" | nonfinite_skipped 2")
    assert format_step_line({"eval/toy_mmlu/acc": 0.25, "eval/seconds": 1.5}, 10, 300) == (
        "step 10/300 | eval/toy_mmlu/acc 0.25 | eval/seconds 1.5"
    )
