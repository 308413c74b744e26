"""The per-round report: exact JSON shape, one Markdown row per round plus the teacher, a valid PNG."""

import json

import pytest

from trl_onpolicy.model_card import model_card_section
from trl_onpolicy.reports import build_report, format_table, plot_scores, write_report

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


def _legend_and_axes(fig):
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    (ax,) = fig.axes
    return fig.legends[0].get_window_extent(renderer), ax.get_window_extent(renderer), ax


def test_plot_legend_sits_beside_the_lines_with_a_chance_line_per_level():
    """The legend covered the teacher's line; there was no chance line (0.25 on four-choice tasks, 0 on generation)."""
    from trl_onpolicy.reports import make_figure

    legend, axes, ax = _legend_and_axes(make_figure(HISTORY, TEACHER))
    assert legend.x0 >= axes.x1  # entirely to the right of the plotting area
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["chance (toy_mmlu)"].get_ydata()) == [0.25, 0.25]
    assert list(lines["chance (toy_gsm8k)"].get_ydata()) == [0.0, 0.0]
    assert list(lines["toy_mmlu (teacher)"].get_ydata()) == [TEACHER["toy_mmlu"]] * 2
    several = make_figure([{"round": 0, "step": 0, "kind": "before", "scores": {"mmlu": 0.3, "toy_mmlu": 0.2}}], None)
    labels = [line.get_label() for line in several.axes[0].get_lines()]
    assert labels == ["mmlu", "toy_mmlu", "chance (mmlu, toy_mmlu)"]  # one line per chance level, naming its tasks


def test_plot_x_axis_is_the_tables_step():
    """`eval` of one saved model drew "round 1" where its table said step 0: the x axis is the step of each row."""
    from trl_onpolicy.reports import make_figure

    one = [{"round": 1, "label": "student, out", "step": 0, "kind": "round", "scores": {"toy_gsm8k": 0.2}}]
    (ax,) = make_figure(one, None).axes
    assert [line.get_xydata().tolist() for line in ax.get_lines() if line.get_label() == "toy_gsm8k"] == [[[0, 0.2]]]
    assert list(ax.get_xticks()) == [0] and ax.get_xlabel() == "optimizer step"
    (ax,) = make_figure(HISTORY, TEACHER).axes
    assert list(ax.get_xticks()) == [0, 10, 20, 30] and ax.get_xlabel() == "optimizer step (0 = before training)"
    assert [x for x, _ in ax.get_lines()[0].get_xydata()] == [0, 10, 30]  # the failed round 2 has no point
