"""How far our optimizer step is from its irreducible parts, and how it compares with TRL's (issue 16).

    OMP_NUM_THREADS=1 python benchmarks/step_sweep.py                      # every point; results/step_sweep.json
    OMP_NUM_THREADS=1 python benchmarks/step_sweep.py --quick              # one tiny point, 2 timed steps
    OMP_NUM_THREADS=1 python benchmarks/step_sweep.py --points small-v32000-c48 large-v32000-c48
    python benchmarks/step_sweep.py --plot-only                            # results/step_sweep.png from the JSON

A step's irreducible cost is one student generation, one teacher prefill and one student forward/backward. At each
point of the sweep, three methods run in alternation (ours, parts, TRL, ours, parts, TRL, ...; `--repeats` times,
each run `--warmup` 2 warm-up steps then `--timed` timed steps, in this process, one torch thread):

- (a) `ours`: `OnPolicyDistillTrainer`'s whole optimizer step, the set-up of `vs_trl.py` (`lmbda=1`, JSD beta 0.5,
  batch 8, AdamW lr 1e-5 constant, clip 1.0, float32, gradient checkpointing off; `vs_trl.run`), with its phases
  from `vs_trl.Probe`: generation = the student sampler's calls, teacher = the teacher backbone's forward (its head
  runs in our loss: "update"), update = the rest;
- (b) `parts`: each irreducible part alone on the same models, prompts and generation config (`_step_parts.py`):
  (b1) `trl_onpolicy.rollouts.sample`, our sampler; (b1') plain `model.generate` (the "before" sampler), alternating
  with (b1) in the same steps; (b2) the teacher's no_grad backbone prefill over the `(B, P + C)` batch, its final
  hidden states kept at the completion positions; (b3) the student's backbone forward, the package's tiled
  generalized JSD (`distillation_loss`, the teacher's head projected inside its tiles), backward, clip and AdamW
  step. sum(b) = b1 + b2 + b3;
- (c) `trl`: `trl.DistillationTrainer`'s whole step with the same settings (`vs_trl.run`).

Reported per point, over all timed steps of all repeats pooled: each time's median, quartiles and min-max; the ratios
of medians (a) / sum(b) (our overhead over the parts), (c) / (a) (our lead over TRL), b1' / b1 (the sampler's
speed-up); the mean completion length trained on (random weights make EOS rare: completions run to C); and the peak
tensor memory of (a) and (c) (`LiveTensorBytes`, one extra step after the timed ones of the first repeat; peak =
weights + gradients + AdamW state + the step's working high point).

Sweep (point names for `--points`; "small": student Llama 2 layers x 128, teacher 4 x 256; "large": student 4 x 256,
teacher 8 x 512; V = vocabulary, C = completion length):

- small-v32000-c48, small-v128256-c48, small-v151936-c48;
- small-v32000-c16, small-v32000-c128;
- large-v32000-c48, large-v151936-c48.

`--quick`: tiny-v4096-c8 (student 2 x 64, teacher 2 x 128), one repeat, 2 timed steps. Times on a shared machine are
noisy: read the ratios within one run, not across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import vs_trl  # benchmarks/ (the script's folder is on sys.path); sets the offline variables before its imports
from _step_parts import run_parts
from chunking import environment

SHAPES = {"tiny": ((2, 64), (2, 128)), "small": ((2, 128), (4, 256)), "large": ((4, 256), (8, 512))}
SWEEP = ("small-v32000-c48", "small-v128256-c48", "small-v151936-c48", "small-v32000-c16", "small-v32000-c128",
         "large-v32000-c48", "large-v151936-c48")  # fmt: skip
QUICK = "tiny-v4096-c8"
METHODS = ("ours", "parts", "trl")
RESULTS = Path(__file__).parent / "results" / "step_sweep.json"


def parse_point(name: str) -> dict:
    """`"small-v32000-c48"` -> shapes and sizes; a clear error for anything else."""
    try:
        size, v, c = name.split("-")
        assert size in SHAPES and v[0] == "v" and c[0] == "c"
        vocab, completion = int(v[1:]), int(c[1:])
    except (ValueError, AssertionError):
        raise SystemExit(f"unknown point {name!r}: write SIZE-vV-cC with SIZE in {sorted(SHAPES)}, e.g. {SWEEP[0]}")
    (s_layers, s_hidden), (t_layers, t_hidden) = SHAPES[size]
    return {"name": name, "student": f"Llama {s_layers} x {s_hidden}", "teacher": f"Llama {t_layers} x {t_hidden}",
            "shapes": SHAPES[size], "vocab": vocab, "completion_length": completion}  # fmt: skip


def spread(values: list[float]) -> dict:
    """Median, quartiles, min, max and count of `values` (all of them kept under `all`)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "n": len(values), "all": list(values)}  # fmt: skip


def run_method(method: str, point: dict, warmup: int, timed: int, first: bool, workdir: str) -> dict:
    """One run of a method at a point (with memory for the trainers' first repeat)."""
    vocab, completion, shapes = point["vocab"], point["completion_length"], point["shapes"]
    if method == "parts":
        return run_parts(vocab, completion, shapes, warmup, timed)
    return vs_trl.run(method, vocab, completion, timed, memory=first, workdir=workdir, warmup=warmup, shapes=shapes,
                      memory_step=True)  # fmt: skip


def trainer_summary(runs: list[dict]) -> dict:
    """A trainer's runs pooled: step and phase spreads over every timed step, mean length, first repeat's memory."""
    pool = {key: [x for r in runs for x in r[f"all_{key}"]] for key in ("step_s", "generation_s", "teacher_s",
                                                                        "update_s", "tokens")}  # fmt: skip
    out = {key: spread(pool[key]) for key in ("step_s", "generation_s", "teacher_s", "update_s")}
    out["mean_completion_length"] = statistics.mean(pool["tokens"]) / vs_trl.BATCH
    out["losses"] = [r["losses"] for r in runs]
    out.update({k: runs[0][k] for k in ("resting_MiB", "working_MiB", "peak_MiB") if k in runs[0]})
    if "logged_time" in runs[0]:
        out["logged_time"] = [r["logged_time"] for r in runs]
    return out


def parts_summary(runs: list[dict]) -> dict:
    """The parts' runs pooled: each part's spread over every timed step; mean lengths of both samplers."""
    out = {part: spread([x for r in runs for x in r[part]]) for part in ("generate", "sample", "teacher", "update")}
    for sampler in ("generate", "sample"):
        tokens = [x for r in runs for x in r[f"{sampler}_tokens"]]
        out[f"{sampler}_mean_completion_length"] = statistics.mean(tokens) / vs_trl.BATCH
    out["sum_s"] = out["sample"]["median"] + out["teacher"]["median"] + out["update"]["median"]
    out["losses"] = [r["losses"] for r in runs]
    return out


def ratios(ours: dict, parts: dict, trl: dict) -> dict:
    """The point's ratios, every one of medians."""
    return {
        "overhead_ours_over_sum_of_parts": ours["step_s"]["median"] / parts["sum_s"],
        "trl_over_ours": trl["step_s"]["median"] / ours["step_s"]["median"],
        "generation_speedup_generate_over_sample": parts["generate"]["median"] / parts["sample"]["median"],
        "peak_memory_ours_over_trl": ours["peak_MiB"] / trl["peak_MiB"],
    }


def measure(point: dict, warmup: int, timed: int, repeats: int, t_start: float) -> dict:
    """Every method's runs at one point, alternating, and their summary."""
    runs = {method: [] for method in METHODS}
    workdir = tempfile.mkdtemp(prefix="bench-step-sweep-")
    for rep in range(repeats):
        for method in METHODS:
            t0 = time.perf_counter()
            runs[method].append(run_method(method, point, warmup, timed, rep == 0, workdir))
            gc.collect()
            print(f"  {point['name']} {method} repeat {rep + 1}/{repeats}: {time.perf_counter() - t0:.0f} s "
                  f"(elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)  # fmt: skip
    out = dict(point)
    out["ours"], out["parts"], out["trl"] = (trainer_summary(runs["ours"]), parts_summary(runs["parts"]),
                                             trainer_summary(runs["trl"]))  # fmt: skip
    out["ratios"] = ratios(out["ours"], out["parts"], out["trl"])
    return out


HEAD = ("point", "ours s/step", "sum of parts (gen / teacher / update)", "overhead (a)/sum(b)", "TRL s/step",
        "TRL/ours", "gen before (generate)", "gen ours (sample)", "gen speed-up", "peak MiB ours / TRL")  # fmt: skip


def table_rows(points: list[dict]) -> list[list[str]]:
    """One row per point: medians with their min-max spread, and the ratios."""

    def cell(s: dict, digits: int = 3) -> str:
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    rows = []
    for p in points:
        ours, parts, trl, r = p["ours"], p["parts"], p["trl"], p["ratios"]
        split = " / ".join(f"{parts[part]['median']:.3f}" for part in ("sample", "teacher", "update"))
        rows.append([
            p["name"], cell(ours["step_s"]), f"{parts['sum_s']:.3f} ({split})",
            f"{r['overhead_ours_over_sum_of_parts']:.2f}x", cell(trl["step_s"]), f"{r['trl_over_ours']:.2f}x",
            cell(parts["generate"]), cell(parts["sample"]), f"{r['generation_speedup_generate_over_sample']:.2f}x",
            f"{ours['peak_MiB']:.0f} / {trl['peak_MiB']:.0f}",
        ])  # fmt: skip
    return rows


def print_table(points: list[dict]):
    """The table as Markdown (seconds: median over every timed step, min-max in brackets)."""
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "---|" * len(HEAD))
    for row in table_rows(points):
        print("| " + " | ".join(row) + " |")
    for p in points:
        print(f"{p['name']}: mean completion length ours {p['ours']['mean_completion_length']:.1f}, "
              f"parts {p['parts']['sample_mean_completion_length']:.1f} (generate "
              f"{p['parts']['generate_mean_completion_length']:.1f}), TRL {p['trl']['mean_completion_length']:.1f}; "
              f"ours' phases gen / teacher / update {p['ours']['generation_s']['median']:.3f} / "
              f"{p['ours']['teacher_s']['median']:.3f} / {p['ours']['update_s']['median']:.3f} s")  # fmt: skip


def plot(result: dict, path: Path):
    """Bars per point: TRL / ours, our overhead over the parts, and the sampler's speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    names = [p["name"] for p in points]
    panels = (("trl_over_ours", "TRL s/step / ours"), ("overhead_ours_over_sum_of_parts", "ours / sum of parts"),
              ("generation_speedup_generate_over_sample", "generate s / sample s"))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels):
        values = [p["ratios"][key] for p in points]
        ax.bar(range(len(points)), values, color="tab:blue")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(points)), names, rotation=35, ha="right", fontsize=7)
        ax.set(title=title, ylabel="ratio of medians")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(result["setup"]["title"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK}, 1 repeat, 2 timed steps (a smoke check)")
    parser.add_argument("--points", nargs="+", default=list(SWEEP), metavar="POINT", help="points to run (see above)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method and point, in alternation")
    parser.add_argument("--timed", type=int, default=10, help="timed steps per run, after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per run")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    parser.add_argument("--out", default=str(RESULTS))
    cli = parser.parse_args(argv)
    if cli.quick:
        cli.points, cli.repeats, cli.timed = [QUICK], 1, 2
    if cli.timed * cli.repeats < 2 or cli.warmup < 0:
        parser.error("--timed x --repeats must be at least 2 (a spread needs two steps) and --warmup at least 0")
    cli.points = [parse_point(name) for name in cli.points]
    return cli


def setup(cli) -> dict:
    title = (f"step sweep: ours / parts / TRL alternating, {cli.repeats} repeat(s) x {cli.timed} timed steps after "
             f"{cli.warmup} warm-up; batch {vs_trl.BATCH}, JSD beta {vs_trl.BETA}, fp32, {torch.get_num_threads()} "
             "torch thread(s)")  # fmt: skip
    return {"title": title, "repeats": cli.repeats, "timed_steps": cli.timed, "warmup_steps": cli.warmup,
            "batch": vs_trl.BATCH, "beta": vs_trl.BETA, "learning_rate": vs_trl.LR, "methods": list(METHODS),
            "order": "per repeat: ours, parts, trl", "memory": "LiveTensorBytes over one extra step after the timed "
            "ones, first repeat; peak = resting (weights, gradients, AdamW state) + working",
            "spread": "median, quartiles (inclusive), min, max over every timed step of every repeat"}  # fmt: skip


def main(argv=None):
    cli = parse_args(argv)
    out = Path(cli.out)
    if vs_trl.redraw_or_prepare(out, cli.plot_only, plot):
        return
    t_start = time.perf_counter()
    result = {"setup": setup(cli), "environment": environment(), "points": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    for point in cli.points:
        result["points"].append(measure(point, cli.warmup, cli.timed, cli.repeats, t_start))
        result["setup"]["wall_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every point: a cut run keeps what it measured
    print("\n" + result["setup"]["title"])
    print_table(result["points"])
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    with contextlib.suppress(ImportError):
        plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
