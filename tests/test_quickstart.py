"""The quickstart end to end on a reduced budget: teacher recipe, student, rounds, eval hook, report files, and the
final student saved where `trl-onpolicy eval` finds it; every flag is checked before any work."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trl_onpolicy.commands.cli import main
from trl_onpolicy.commands.quickstart import LOSS_TYPES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_writes_one_row_per_round(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRL_ONPOLICY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main([
        "quickstart", "--output-dir", str(out), "--rounds", "2", "--steps-per-round", "2", "--batch-size", "4",
        "--teacher-steps", "60", "--student-sft-steps", "20", "--eval-limit", "6",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"teacher", "rounds"}
    assert set(report["teacher"]["scores"]) == {"toy_gsm8k", "toy_mmlu"}
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert [r["step"] for r in report["rounds"]] == [0, 2, 4]
    for row in report["rounds"]:
        assert set(row["scores"]) == {"toy_gsm8k", "toy_mmlu"}
        assert all(0.0 <= v <= 1.0 for v in row["scores"].values())
        assert row["seconds"] > 0
    table = (out / "report.md").read_text()
    assert "| student, round 2 |" in table and "| teacher |" in table
    png = (out / "scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 100  # a real image, wide
    printed = capsys.readouterr().out
    assert "student, before training" in printed and "teacher" in printed
    assert printed.rstrip().splitlines()[-1] == (
        f"Saved the final student to {out}; score it again with: trl-onpolicy eval {out} --tasks toy_gsm8k,toy_mmlu"
    )
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()  # it was only checkpoints
    again = tmp_path / "again"
    assert main(["eval", str(out), "--tasks", "toy_mmlu", "--limit", "6", "--toy-eval-size", "6", "--output-dir",
                 str(again)]) == 0  # fmt: skip
    rescored = json.loads((again / "report.json").read_text())["rounds"][0]["scores"]["toy_mmlu"]
    assert rescored == report["rounds"][-1]["scores"]["toy_mmlu"]  # the saved student is the final one


def test_quickstart_loss_types_are_the_configs():
    from trl_onpolicy.config import LOSS_TYPES as CONFIG_LOSS_TYPES

    assert LOSS_TYPES == CONFIG_LOSS_TYPES


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss-type", "kl"], ("argument --loss-type: invalid choice: 'kl' (choose from 'jsd', 'forward_kl', "
                                 "'reverse_kl', 'skew_forward_kl', 'skew_reverse_kl', 'sampled_reverse_kl')")),
        (["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
        (["--beta", "1.5"], "argument --beta: must be in [0.0, 1.0], got 1.5"),
        (["--learning-rate", "0"], "argument --learning-rate: must be > 0.0, got 0"),
        (["--max-completion-length", "512"], "argument --max-completion-length: must be in [1, 511], got 512"),
        (["--eval-limit", "ten"], "argument --eval-limit: invalid int value: 'ten'"),
    ],
)  # fmt: skip
def test_a_bad_option_fails_before_any_work(flags, message, tmp_path):
    """`--loss-type kl` used to fail after the models were loaded and the teacher scored (23 s, minutes on a first
    run); now argparse refuses it, without importing torch, and nothing is written."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    command = [sys.executable, "-m", "trl_onpolicy.commands.cli", "quickstart", "--output-dir", str(out), *flags]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == f"trl-onpolicy quickstart: error: {message}"
    assert not out.exists() and seconds < 10, seconds


def test_a_quickstart_stopped_by_sigterm_does_not_look_finished(capsys):
    """SIGTERM used to end the quickstart with its report and "Saved the final student", as a finished run. Now it
    says where it stopped, writes neither, and the command exits 143 (128 + SIGTERM)."""
    from trl_onpolicy.checkpoints import SigtermCheckpoint
    from trl_onpolicy.commands.cli import _run
    from trl_onpolicy.commands.quickstart import stopped_by_sigterm

    stop = SigtermCheckpoint()
    stop.stopped_at = (12, 300)
    assert _run("quickstart", lambda: stopped_by_sigterm(stop), debug=False) == 143
    assert capsys.readouterr().out == (
        "Stopped by SIGTERM at step 12 of 300: no report and no final student were written. The quickstart does not "
        "resume; run the same command again (the teacher and student it trained first are cached).\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--constitution", "--teacher", "smollm2"],
         "--constitution needs the toy teacher (trained to read the toy rule): drop --teacher smollm2."),
        (["--tools", "--teacher", "smollm2"],
         "--tools needs the toy teacher (trained to call the toy calculator): drop --teacher smollm2."),
        (["--tools", "--constitution"], "--tools and --constitution are two demos: run them one at a time."),
        (["--tools", "--rounds", "1"], ("--tools needs --rounds >= 2: the first round trains on the teacher's "
                                        "transcripts, the last on the student's own.")),
    ],
)  # fmt: skip
def test_demos_that_do_not_combine_are_refused_at_once(tmp_path, flags, message):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "trl_onpolicy.commands.cli", "quickstart", "--output-dir", str(out), *flags]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == f"trl-onpolicy quickstart: error: {message}"
    assert not out.exists()


def test_constitution_gives_the_rule_to_the_teacher_only():
    """The dataset carries the rule as privileged context, the config puts it before the teacher's prompt, and the
    tasks are the constitution's; without the flag, none of it."""
    import argparse

    from trl_onpolicy.commands import quickstart
    from trl_onpolicy.toy import build_tokenizer, constitution_text

    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    tokenizer = build_tokenizer()
    for flags in ([], ["--constitution"]):
        args = parser.parse_args([*flags, "--rounds", "1", "--steps-per-round", "2", "--batch-size", "3"])
        dataset, length = quickstart._prompts(args, tokenizer, smollm2=False)
        config = quickstart._config(args, False, length)
        if not flags:
            assert dataset.column_names == ["prompt"] and quickstart._tasks(args) == ["toy_gsm8k", "toy_mmlu"]
            assert config.teacher_prompt_template == "{prompt}\n\n{privileged_context}"  # TRL's default, unused
            continue
        assert dataset.column_names == ["prompt", "privileged_context"] and len(dataset) == 6
        assert set(dataset["privileged_context"]) == {constitution_text()}
        assert all(p.startswith("Question: ") and "Rule" not in p for p in dataset["prompt"])  # the student's view
        assert config.teacher_prompt_template == "{privileged_context}\n{prompt}"
        assert quickstart._tasks(args) == ["toy_refusal", "toy_allowed", "toy_gsm8k"]


@pytest.mark.slow
def test_constitutional_quickstart_scores_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRL_ONPOLICY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main([
        "quickstart", "--constitution", "--output-dir", str(out), "--rounds", "1", "--steps-per-round", "2",
        "--batch-size", "4", "--teacher-steps", "40", "--student-sft-steps", "20", "--eval-limit", "6",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["teacher"]["scores"]) == {"toy_refusal", "toy_allowed", "toy_gsm8k"}
    assert [set(r["scores"]) for r in report["rounds"]] == [{"toy_refusal", "toy_allowed", "toy_gsm8k"}] * 2
    info = json.loads(next((tmp_path / "cache").glob("teacher-*/info.json")).read_text())
    assert info["recipe"]["constitution_fraction"] == 0.25
    assert set(info["constitution_with_rule"]) == {"refusal", "accuracy", "over_refusal", "forbidden", "others"}
    printed = capsys.readouterr().out
    assert "The teacher line is the teacher without its rule" in printed
    assert printed.rstrip().splitlines()[-1].endswith("--tasks toy_refusal,toy_allowed,toy_gsm8k")


def test_tools_give_the_calculator_and_a_schedule_from_the_teachers_transcripts_to_the_students():
    """`--tools`: conversational prompts (the calculator's template adds the tools line), lmbda 0 -> 1 by round with
    the teacher writing the first round, forward KL unless asked otherwise, the calculator's scores as columns."""
    import argparse

    from trl_onpolicy import tool_evaluation
    from trl_onpolicy.commands import quickstart
    from trl_onpolicy.toy import build_tokenizer, make_dataset, prompt_text
    from trl_onpolicy.toy.calculator import calc, parse_calc_turn

    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    args = parser.parse_args(["--tools", "--rounds", "2", "--steps-per-round", "2", "--batch-size", "3"])
    dataset, length = quickstart._prompts(args, build_tokenizer(), smollm2=False)
    assert length == 200 and dataset.column_names == ["prompt"] and len(dataset) == 12
    questions = make_dataset(12, "train", seed=args.seed + 1)["question"]
    assert dataset["prompt"] == [[{"role": "user", "content": prompt_text(q)}] for q in questions]
    config = quickstart._config(args, False, length)
    assert (config.lmbda_schedule, config.lmbda_start, config.lmbda_end, config.seq_kd) == ("step", 0.0, 1.0, True)
    assert config.loss_type == "forward_kl" and config.max_tool_calling_iterations == 8
    assert quickstart._tool_arguments(args) == {"tools": [calc], "parse_response": parse_calc_turn}
    assert quickstart.TOOL_TASKS == [tool_evaluation.TOOL_TASK, tool_evaluation.CALLED]
    jsd = parser.parse_args(["--tools", "--loss-type", "jsd"])
    assert quickstart._config(jsd, False, length).loss_type == "jsd"
    plain = parser.parse_args([])
    assert quickstart._config(plain, False, length).loss_type == "jsd" and quickstart._tool_arguments(plain) == {}


@pytest.mark.slow
def test_tool_quickstart_scores_with_the_calculator(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRL_ONPOLICY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main([
        "quickstart", "--tools", "--output-dir", str(out), "--rounds", "2", "--steps-per-round", "2",
        "--batch-size", "4", "--teacher-steps", "40", "--student-sft-steps", "20", "--eval-limit", "6",
        "--max-completion-length", "60",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["teacher"]["scores"]) == {"toy_tools", "toy_tools_called"}
    assert [(r["round"], r["step"], set(r["scores"])) for r in report["rounds"]] == [
        (i, 2 * i, {"toy_tools", "toy_tools_called"}) for i in range(3)]  # fmt: skip
    info = json.loads(next((tmp_path / "cache").glob("teacher-*/info.json")).read_text())
    assert info["recipe"]["tool_fraction"] == 0.5
    printed = capsys.readouterr().out
    assert "Scored with the calculator" in printed and "| student, round 2 |" in printed
    assert (out / "model.safetensors").is_file()
