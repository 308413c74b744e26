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
