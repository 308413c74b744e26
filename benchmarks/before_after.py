"""Our whole training step at two checkouts of the package, side by side: did a change cost speed or memory?

    OMP_NUM_THREADS=1 python benchmarks/before_after.py --before /path/to/old/checkout
    OMP_NUM_THREADS=1 python benchmarks/before_after.py --before OLD --after . --points 32000 64 151936 64

For each point (vocabulary V, completion length C), `vs_trl.run("ours", V, C, ...)` (the set-up of `vs_trl.py`: Llama
student 2 x 64, teacher 2 x 128, batch 8, on-policy JSD, float32, one torch thread) runs in a fresh process with the
package of each checkout on `PYTHONPATH` and that checkout's own `benchmarks/vs_trl.py`, before and after in
alternation (before, after, before, after, ...), `--repeats` times each, `--timed-steps` whole optimizer steps per run
after one warm-up step. Per checkout: completion tokens/s (median over runs of each run's figure, with min and max)
and peak tensor memory of one step (`LiveTensorBytes`); the ratios after / before. Then each checkout's own
`benchmarks/chunking.py` (the loss's chunking and tiling, whole steps and the loss alone) once, and the ratios of its
figures. Writes `results/before_after.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "before_after.json"

RUN = """
import json, sys, tempfile, warnings
sys.path.insert(0, {bench!r})
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import vs_trl
result = vs_trl.run("ours", {vocab}, {completion}, {timed}, memory=True, workdir=tempfile.mkdtemp())
print("RESULT " + json.dumps(result))
"""


def in_checkout(checkout: Path, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=checkout)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def step_run(checkout: Path, vocab: int, completion: int, timed: int) -> dict:
    code = RUN.format(bench=str(checkout / "benchmarks"), vocab=vocab, completion=completion, timed=timed)
    line = next(x for x in in_checkout(checkout, ["-c", code]).splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def steps(checkouts: dict[str, Path], points: list[tuple[int, int]], repeats: int, timed: int) -> list[dict]:
    out = []
    for vocab, completion in points:
        runs = {name: [] for name in checkouts}
        for rep in range(repeats):
            for name, checkout in checkouts.items():
                t0 = time.perf_counter()
                runs[name].append(step_run(checkout, vocab, completion, timed))
                print(f"V={vocab} C={completion} {name} {rep + 1}/{repeats}: "
                      f"{runs[name][-1]['tokens_per_second']:.0f} tok/s ({time.perf_counter() - t0:.0f} s)", flush=True)
        point = {"vocab": vocab, "completion_length": completion}
        for name, rs in runs.items():
            point[name] = {"tokens_per_second": spread([r["tokens_per_second"] for r in rs]),
                           "peak_MiB": rs[0]["peak_MiB"], "step_s": spread([r["step_s"] for r in rs])}  # fmt: skip
        point["after_over_before"] = {
            "tokens_per_second": point["after"]["tokens_per_second"]["median"]
            / point["before"]["tokens_per_second"]["median"],
            "peak_memory": point["after"]["peak_MiB"] / point["before"]["peak_MiB"],
        }
        out.append(point)
    return out


def chunking(checkouts: dict[str, Path]) -> dict:
    figures = {}
    for name, checkout in checkouts.items():
        path = Path(tempfile.mkdtemp()) / "chunking.json"
        in_checkout(checkout, [str(checkout / "benchmarks" / "chunking.py"), "--out", str(path)])
        result = json.loads(path.read_text())
        figures[name] = {r["setting"]: {"steps_per_second": r["steps_per_second"], "step_peak_MiB": r["step_peak_MiB"]}
                         for r in result["runs"]}  # fmt: skip
        figures[name]["loss_only_peak_MiB"] = {f"{r['setting']}, {r['tokens']} tokens": r["loss_peak_MiB"]
                                               for r in result["loss_only"]}  # fmt: skip
    before, after = figures["before"], figures["after"]
    figures["after_over_before"] = {
        setting: {key: after[setting][key] / before[setting][key] for key in ("steps_per_second", "step_peak_MiB")}
        for setting in before if setting != "loss_only_peak_MiB"
    }
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the checkout to compare against (a folder)")
    parser.add_argument("--after", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--points", type=int, nargs="+", default=[32_000, 64, 151_936, 64], help="V C V C ...")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--no-chunking", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    cli = parser.parse_args()
    checkouts = {"before": Path(cli.before).resolve(), "after": Path(cli.after).resolve()}
    points = list(zip(cli.points[::2], cli.points[1::2]))
    commits = {name: subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()
               for name, path in checkouts.items()}  # fmt: skip
    result = {"checkouts": {k: str(v) for k, v in checkouts.items()}, "commits": commits,
              "setup": {"repeats": cli.repeats, "timed_steps": cli.timed_steps, "warmup_steps": 1, "threads": 1},
              "steps": steps(checkouts, points, cli.repeats, cli.timed_steps)}  # fmt: skip
    if not cli.no_chunking:
        result["chunking"] = chunking(checkouts)
    Path(cli.out).write_text(json.dumps(result, indent=1) + "\n")
    for point in result["steps"]:
        print(f"V={point['vocab']} C={point['completion_length']}: after/before tok/s "
              f"{point['after_over_before']['tokens_per_second']:.3f}, peak {point['after_over_before']['peak_memory']:.3f}")
    for setting, ratios in result.get("chunking", {}).get("after_over_before", {}).items():
        print(f"chunking {setting}: after/before steps/s {ratios['steps_per_second']:.3f}, "
              f"peak {ratios['step_peak_MiB']:.3f}")


if __name__ == "__main__":
    main()
