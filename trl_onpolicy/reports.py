"""The per-round report: `report.json`, `report.md` and `scores.png` from the evaluation history.

Input is plain data, so this module needs no trainer: the `history` list that [`~trl_onpolicy.eval.LmEvalCallback`]
fills (`{"round", "step", "kind", "scores": {task: value}, "seconds", ...}` per evaluation; round 0 is the student
before training) and the teacher's scores on the same tasks (`{task: value}`, or `None` when not measured).

Only round-level rows go into the report (`kind` "before" or "round"); evaluations made every `eval_steps` are
plotted against steps elsewhere (the trainer log). A failed evaluation keeps its row with empty scores. The model
card's scores section ([`~trl_onpolicy.model_card.model_card_section`]) shows the same table.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .tasks import chance_level


def round_rows(history: list[dict]) -> list[dict]:
    """The round-level entries of `history` (`kind` "before" or "round"): the rows of the report."""
    return [e for e in history if e.get("kind", "round") != "step"]


def _tasks(rows: list[dict], teacher_scores: dict | None) -> list[str]:
    tasks: dict[str, None] = {}
    for scores in [*(r.get("scores") or {} for r in rows), teacher_scores or {}]:
        tasks.update(dict.fromkeys(scores))
    return list(tasks)


def build_report(history: list[dict], teacher_scores: dict[str, float] | None = None) -> dict[str, Any]:
    """`{"teacher": {"scores": {task: value}}, "rounds": [{"round", "step", "scores", "seconds"}, ...]}`."""
    return {
        "teacher": {"scores": {t: float(v) for t, v in (teacher_scores or {}).items()}},
        "rounds": [
            {
                "round": int(e["round"]),
                "step": int(e["step"]),
                "scores": {t: float(v) for t, v in (e.get("scores") or {}).items()},
                "seconds": float(e.get("seconds", 0.0)),
            }
            for e in round_rows(history)
        ],
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_table(history: list[dict], teacher_scores: dict[str, float] | None = None) -> str:
    """A Markdown table: one row per round (round 0: the student before training), the teacher, and the fraction of
    the teacher's score that the last round reached."""
    rows, teacher = round_rows(history), teacher_scores or {}
    tasks = _tasks(rows, teacher)
    lines = [
        "| " + " | ".join(["model", "step", *tasks, "eval seconds"]) + " |",
        "|" + "---|" * (len(tasks) + 3),
    ]
    for r in rows:
        label = r.get("label") or ("student, before training" if r["round"] == 0 else f"student, round {r['round']}")
        cells = [_fmt(r["scores"].get(t)) if r.get("scores") else "failed" for t in tasks]
        lines.append(f"| {label} | {r['step']} | " + " | ".join(cells) + f" | {r.get('seconds', 0.0):.1f} |")
    if teacher:
        lines.append("| teacher | | " + " | ".join(_fmt(teacher.get(t)) for t in tasks) + " | |")
        last = next((r for r in reversed(rows) if r.get("scores")), None)
        if last is not None:
            cells = []
            for t in tasks:
                s, ref = last["scores"].get(t), teacher.get(t)
                cells.append(f"{100 * s / ref:.0f}%" if s is not None and ref else "-")
            lines.append(f"| fraction of teacher (round {last['round']}) | | " + " | ".join(cells) + " | |")
    return "\n".join(lines) + "\n"


def make_figure(history: list[dict], teacher_scores: dict[str, float] | None):
    """The plot of [`plot_scores`] as a matplotlib `Figure` (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, teacher = round_rows(history), teacher_scores or {}
    tasks = _tasks(rows, teacher)
    fig = Figure(figsize=(8.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg without pyplot: leaves the user's matplotlib backend alone
    ax = fig.add_subplot(1, 1, 1)
    for i, task in enumerate(tasks):
        color = f"C{i % 10}"
        points = [(r["step"], r["scores"][task]) for r in rows if task in (r.get("scores") or {})]
        if points:
            ax.plot(*zip(*points), marker="o", color=color, label=task)
        if task in teacher:
            ax.axhline(teacher[task], color=color, linestyle="--", linewidth=1, label=f"{task} (teacher)")
    chances: dict[float, list[str]] = {}
    for task in tasks:
        if chance_level(task) is not None:
            chances.setdefault(chance_level(task), []).append(task)
    for level, names in sorted(chances.items()):
        ax.axhline(level, color="0.45", linestyle=":", linewidth=1.2, label=f"chance ({', '.join(names)})")
    before = any(r.get("kind") == "before" for r in rows)
    ax.set_xlabel("optimizer step (0 = before training)" if before else "optimizer step")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    if rows:
        ax.set_xticks(sorted({r["step"] for r in rows}))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(fontsize=8, loc="outside right upper")  # beside the axes: it never covers a line
    ax.set_title("Student score per round of on-policy distillation")
    return fig


def plot_scores(history: list[dict], teacher_scores: dict[str, float] | None, path: str) -> str:
    """Score per evaluated step for every task (solid, with markers), the teacher's score (dashed, same colour) and
    the chance level (dotted grey; 0.25 for four-choice tasks, 0 for generation), with the legend beside the plot.
    The x axis is the optimizer step, as in the table."""
    make_figure(history, teacher_scores).savefig(path, format="png")
    return path


def write_report(output_dir: str, history: list[dict], teacher_scores: dict[str, float] | None = None) -> dict:
    """Write `report.json`, `report.md` and `scores.png` into `output_dir`; returns the report dict."""
    os.makedirs(output_dir, exist_ok=True)
    report = build_report(history, teacher_scores)
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("# On-policy distillation: scores per round\n\n" + format_table(history, teacher_scores))
    plot_scores(history, teacher_scores, os.path.join(output_dir, "scores.png"))
    return report
