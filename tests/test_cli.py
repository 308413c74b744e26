"""The `trl-onpolicy` command: `--help` lists every subcommand; `distill` trains from a recipe with flag overrides;
`eval` scores a saved model (full or LoRA adapters) on the offline toy tasks and writes the report."""

import json
import re
import subprocess
import sys

import pytest
import yaml
from tiny_assets import save_tiny_assets, train_flags

from trl_onpolicy import cli
from trl_onpolicy.distill_command import DistillScriptArguments, load_datasets
from trl_onpolicy.toy.models import build_model
from trl_onpolicy.toy.tokenizer import build_tokenizer

COMMANDS = ["quickstart", "distill", "eval", "serve-teacher", "cache-teacher"]


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
                                  ["serve-teacher", "--help"], ["cache-teacher", "--help"]])  # fmt: skip
def test_help_and_version_load_no_heavy_library(argv):
    """Start-up: `--help` and `--version` (of every command but `distill`, whose flags are TRL's dataclasses) import
    neither torch nor transformers, TRL, PEFT or lm-eval (they took 6-13 s to load before anything was printed)."""
    code = (
        "import sys\nfrom trl_onpolicy import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted({'torch', 'transformers', 'trl', 'peft', 'lm_eval', 'datasets'} & set(sys.modules))\n"
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-2000:]


def test_cache_teacher_flag_defaults_are_the_configs():
    from trl_onpolicy import OnPolicyDistillConfig
    from trl_onpolicy.cache_teacher import DEFAULTS

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


# --------------------------------------------------------------------------------------------------- input errors


def _cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`trl-onpolicy ARGV` in a fresh process, as a user runs it."""
    code = "import sys\nfrom trl_onpolicy import cli\nsys.exit(cli.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one error message of a failed command (no traceback)."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"trl-onpolicy {command}: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0].removeprefix(f"trl-onpolicy {command}: error: ")


def test_empty_datasets_get_the_trainers_message(assets, tmp_path):
    """`datasets` raised StopIteration for an empty .jsonl and IndexError for an empty save_to_disk folder."""
    from datasets import Dataset, DatasetDict

    (tmp_path / "empty.jsonl").write_text("\n")
    Dataset.from_dict({"prompt": []}).save_to_disk(tmp_path / "empty_ds")
    DatasetDict({"train": Dataset.from_dict({"prompt": []})}).save_to_disk(tmp_path / "empty_dict")
    for name, where in (("empty.jsonl", "empty.jsonl"), ("empty_ds", "empty_ds"), ("empty_dict", "empty_dict/train")):
        flags = train_flags(assets, tmp_path / "out")
        flags[flags.index("--dataset_name") + 1] = str(tmp_path / name)
        message = _error_line(_cli("distill", *flags), "distill")
        assert message == (
            f"The train dataset is empty ({tmp_path / where} has no rows): pass a dataset with at least one prompt."
        )
    proc = _cli("cache-teacher", assets["teacher"], str(tmp_path / "empty.jsonl"), str(tmp_path / "cache"))
    assert _error_line(proc, "cache-teacher").startswith("The train dataset is empty (")


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


def test_distill_help_puts_the_distillation_options_first_in_plain_text(capsys):
    """It printed 1,081 lines, `--lmbda` at line 915 after ~600 lines of generic Trainer options, doc markup
    ([`~trl_onpolicy.eval.LmEvalCallback`]) and "(default: torch's choice). (default: None)"."""
    proc = _cli("distill", "--help")
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
    from trl_onpolicy.help_format import plain_text

    assert plain_text("hook's ([`~trl_onpolicy.eval.LmEvalCallback`]), [`trl.ModelConfig`] and `lmbda`") == (
        "hook's (LmEvalCallback), trl.ModelConfig and lmbda"
    )
    assert plain_text("see [the docs](https://example.org/x).") == "see the docs (https://example.org/x)."


def test_a_misspelt_field_names_the_closest_one(tmp_path):
    """TRL said "Please remove them, add them to the dataclass, or set `fail_with_unknown_args=False`"."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lmdba: 0.5\n")
    proc = _cli("distill", "--config", str(recipe), "--max_stepz", "3")
    assert _error_line(proc, "distill") == (
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
