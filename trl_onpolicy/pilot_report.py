"""The report of `trl-onpolicy compare`: pilots of several methods at equal compute -> a table, a plot, a recommendation.

Input is plain data, so this module needs no trainer. A pilot is `{"method", "seed", "points": [...]}`; each point is
`{<unit>: charged seconds, "step", "scores": {task: value}, ...}` with the unit `cpu_s` or `gpu_s` (see
[`~trl_onpolicy.compute_meter.Meter`]), the first point being the student before training (0 s).

The recommendation is the method with the best final score on the primary task (the first eval task), averaged over
seeds, and how far to trust it: the lead over the runner-up is called *clear* only when it exceeds `NOISE_SES`
standard errors of the difference. The standard error is the larger of two estimates: the sampling error of the
difference of two proportions over the `n` eval examples each, `sqrt(2 p (1 - p) / n)` with the pooled score `p` (the
mean of the two; available whenever `n` is known), and, with two or more seeds per method, the spread over seeds,
`sqrt(s1^2 / k1 + s2^2 / k2)`. One seed per method measures no run-to-run noise at all, which the evidence says.
"""

from __future__ import annotations

import math
import statistics

from .compute_meter import reach

NOISE_SES = 2.0  # a lead counts as clear above this many standard errors of the difference


def score_of(point: dict, task: str) -> float:
    return float(point["scores"][task])


def summarise(pilots: list[dict], task: str, unit: str, target: float) -> dict:
    """Per method (in the order first seen): seeds, mean score and compute at each point, the final score (mean and
    standard deviation over seeds), steps, FLOPs, the last point's phases, and the compute to `target` times the best
    final score (interpolated per seed; None when a seed never got there)."""
    methods: dict[str, list[dict]] = {}
    for pilot in pilots:
        methods.setdefault(pilot["method"], []).append(pilot)
    out = {}
    for method, runs in methods.items():
        n_points = min(len(r["points"]) for r in runs)
        finals = [score_of(r["points"][n_points - 1], task) for r in runs]
        last = [r["points"][n_points - 1] for r in runs]
        out[method] = {
            "seeds": [r["seed"] for r in runs],
            "points": [
                {unit: statistics.mean(r["points"][i][unit] for r in runs),
                 "score": statistics.mean(score_of(r["points"][i], task) for r in runs)}
                for i in range(n_points)
            ],
            "final": statistics.mean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "steps": statistics.mean(p["step"] for p in last),
            "flops": statistics.mean(sum(p.get("flops", {}).values()) for p in last),
            "phases": {k: statistics.mean(p["phases"].get(k, 0.0) for p in last) for k in last[0].get("phases", {})},
        }
    best = max(s["final"] for s in out.values())
    for method, runs in methods.items():
        hits = [reach([{unit: p[unit], "score": score_of(p, task)} for p in r["points"]], target * best, x=unit,
                      y="score") for r in runs]  # fmt: skip
        out[method]["to_target"] = None if None in hits else statistics.mean(hits)
    return out


def standard_error(best: dict, other: dict, n_eval: int | None) -> tuple[float | None, str]:
    """The standard error of the difference of two methods' final scores, and what it was estimated from."""
    estimates, sources = [], []
    if n_eval:  # the pooled proportion: the noise of the difference if both methods were equally good
        pooled = min(max((best["final"] + other["final"]) / 2, 0.0), 1.0)
        estimates.append(math.sqrt(2 * pooled * (1 - pooled) / n_eval))
        sources.append(f"a proportion over {n_eval} eval examples")
    if best["final_std"] is not None and other["final_std"] is not None:
        estimates.append(math.sqrt(best["final_std"] ** 2 / len(best["seeds"])
                                   + other["final_std"] ** 2 / len(other["seeds"])))  # fmt: skip
        sources.append(f"the spread over {len(best['seeds'])} and {len(other['seeds'])} seeds")
    if not estimates:
        return None, "no estimate (the number of eval examples is unknown and there is one seed per method)"
    return max(estimates), " and ".join(sources)


def recommend(summary: dict, task: str, unit: str, target: float, n_eval: int | None) -> dict:
    """The best method by final score on `task`, with its lead over the runner-up, the noise it is judged against,
    whether the lead is clear (`strong`), and the evidence as sentences."""
    ranked = sorted(summary, key=lambda m: summary[m]["final"], reverse=True)
    best = ranked[0]
    seconds = "CPU-s" if unit == "cpu_s" else "GPU-s"
    evidence = [f"final {task}: " + ", ".join(f"{m} {summary[m]['final']:.3f}" for m in ranked)
                + f" (after ~{summary[best]['points'][-1][unit]:.1f} charged {seconds} each)"]  # fmt: skip
    reached = [f"{m} {summary[m]['to_target']:.1f}" if summary[m]["to_target"] is not None else f"{m} never"
               for m in ranked]  # fmt: skip
    evidence.append(f"{seconds} to {target:.0%} of the best final score: " + ", ".join(reached))
    seeds = {len(s["seeds"]) for s in summary.values()}
    if len(ranked) == 1:
        return {"method": best, "strong": False, "lead": None, "standard_error": None,
                "evidence": [*evidence, "one method only: nothing to compare it with"]}  # fmt: skip
    runner_up = ranked[1]
    lead = summary[best]["final"] - summary[runner_up]["final"]
    se, source = standard_error(summary[best], summary[runner_up], n_eval)
    strong = se is not None and lead > NOISE_SES * se
    if se is None:
        evidence.append(f"lead over {runner_up}: {lead:.3f}; the noise is unknown ({source}): weak")
    else:
        verdict = "clear" if strong else "within the noise: weak, run longer (--budget) or with more seeds (--seeds)"
        evidence.append(f"lead over {runner_up}: {lead:.3f} vs {NOISE_SES:g} standard errors = {NOISE_SES * se:.3f} "
                        f"(from {source}): {verdict}")  # fmt: skip
    if seeds == {1}:
        evidence.append("one seed per method: the run-to-run noise is not measured (--seeds 0,1,2 measures it)")
    return {"method": best, "runner_up": runner_up, "strong": strong, "lead": lead, "standard_error": se,
            "evidence": evidence}  # fmt: skip


def format_recommendation(rec: dict) -> str:
    strength = "" if rec["strong"] else " (weak)"
    return f"Recommendation: {rec['method']}{strength}.\n" + "\n".join(f"- {line}" for line in rec["evidence"]) + "\n"


def format_table(summary: dict, task: str, unit: str, checkpoints: list[float], target: float) -> str:
    """Markdown: one row per method: the score at each point (the start, then each nominal budget point), the final
    score (+- the standard deviation over seeds), the compute to `target` of the best final score, steps and FLOPs."""
    seconds = "CPU-s" if unit == "cpu_s" else "GPU-s"
    marks = ["start", *(f"@{c:g} {seconds}" for c in checkpoints)]
    head = ["method", "seeds", *marks, "final", f"{seconds} to {target:.0%} of best", "steps", "GFLOP"]
    lines = [f"{task} by charged compute", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        cells = [f"{p['score']:.3f}" for p in s["points"]] + ["-"] * (len(marks) - len(s["points"]))
        final = f"{s['final']:.3f}" + (f" ± {s['final_std']:.3f}" if s["final_std"] is not None else "")
        to = "never" if s["to_target"] is None else f"{s['to_target']:.1f}"
        lines.append("| " + " | ".join([method, str(len(s["seeds"])), *cells, final, to, f"{s['steps']:.0f}",
                                        f"{s['flops'] / 1e9:.1f}"]) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def make_figure(summary: dict, task: str, unit: str, target: float):
    """Score on `task` vs charged seconds, one line per method (mean over seeds), and the target line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method, s in summary.items():
        ax.plot([p[unit] for p in s["points"]], [p["score"] for p in s["points"]], marker="o", label=method)
    best = max(s["final"] for s in summary.values())
    ax.axhline(target * best, color="grey", lw=0.8, ls=":", label=f"{target:.0%} of the best final")
    ax.set(xlabel="charged " + ("CPU-seconds" if unit == "cpu_s" else "GPU-seconds"), ylabel=task,
           title=f"{task} vs charged compute")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
