"""The quickstart end to end on a reduced budget: teacher recipe, student, rounds, eval hook, report files."""

import json
import struct

import pytest

from trl_onpolicy.cli import main


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
