"""The per-round report: exact JSON shape, one Markdown row per round plus the teacher, a valid PNG."""

import json

import pytest

from trl_onpolicy.reports import build_report, format_table, model_card_section, plot_scores, write_report

HISTORY = [
    {"round": 0, "step": 0, "kind": "before", "scores": {"toy_gsm8k": 0.1, "toy_mmlu": 0.25},
     "metrics": {"toy_gsm8k": {"exact_match,strict-match": 0.1}}, "seconds": 3.2},
    {"round": 1, "step": 10, "kind": "round", "scores": {"toy_gsm8k": 0.3, "toy_mmlu": 0.4}, "metrics": {},
     "seconds": 3.0},
    {"round": 1, "step": 15, "kind": "step", "scores": {"toy_gsm8k": 0.35, "toy_mmlu": 0.4}, "metrics": {},
     "seconds": 3.1},
    {"round": 2, "step": 20, "kind": "round", "scores": {}, "metrics": {}, "seconds": 0.5, "error": "RuntimeError: x"},
    {"round": 3, "step": 30, "kind": "round", "scores": {"toy_gsm8k": 0.45, "toy_mmlu": 0.5}, "metrics": {},
     "seconds": 2.9},
]
TEACHER = {"toy_gsm8k": 0.9, "toy_mmlu": 0.8}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_write_report_files_and_exact_json_shape(tmp_path):
    report = write_report(str(tmp_path), HISTORY, TEACHER)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    assert set(report) == {"teacher", "rounds"}
    assert report["teacher"] == {"scores": TEACHER}
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2, 3]  # the step-wise evaluation is not a round row
    for row in report["rounds"]:
        assert set(row) == {"round", "step", "scores", "seconds"}
    assert report["rounds"][0] == {"round": 0, "step": 0, "scores": {"toy_gsm8k": 0.1, "toy_mmlu": 0.25},
                                   "seconds": 3.2}
    assert (tmp_path / "scores.png").read_bytes()[:8] == PNG_SIGNATURE
    markdown = (tmp_path / "report.md").read_text()
    assert format_table(HISTORY, TEACHER) in markdown


def test_table_has_one_row_per_round_and_the_teacher():
    lines = format_table(HISTORY, TEACHER).strip().splitlines()
    assert lines[0] == "| model | step | toy_gsm8k | toy_mmlu | eval seconds |"
    body = lines[2:]
    assert [line.split("|")[1].strip() for line in body] == [
        "student, before training", "student, round 1", "student, round 2", "student, round 3", "teacher",
        "fraction of teacher (round 3)",
    ]
    assert body[0] == "| student, before training | 0 | 0.100 | 0.250 | 3.2 |"
    assert "failed" in body[2]
    assert body[-1] == "| fraction of teacher (round 3) | | 50% | 62% | |"


def test_without_teacher_and_model_card(tmp_path):
    table = format_table(HISTORY[:2])
    assert "teacher" not in table and len(table.strip().splitlines()) == 4
    report = write_report(str(tmp_path), HISTORY[:2], None)
    assert report["teacher"] == {"scores": {}}
    card = model_card_section(HISTORY, TEACHER)
    assert card.startswith("## Evaluation\n") and format_table(HISTORY, TEACHER) in card
    assert model_card_section([], TEACHER) == ""


def test_plot_is_a_png(tmp_path):
    path = plot_scores(HISTORY, TEACHER, str(tmp_path / "plot.png"))
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_build_report_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    history = [{"round": 0, "step": 0, "scores": {"t": np.float64(0.5)}, "seconds": 1}]
    report = build_report(history, {"t": np.float32(1)})
    json.dumps(report)
    assert report["rounds"][0]["scores"]["t"] == 0.5
