"""What scoring and training one micro-batch at a time buys: the local teacher's transient memory and the padding the
student no longer computes over (issue 13, "memory at scale").

    OMP_NUM_THREADS=1 python benchmarks/micro_batches.py            # the sweep; writes results/micro_batches.json
    OMP_NUM_THREADS=1 python benchmarks/micro_batches.py --quick    # one point, 3 repeats (smoke check)

One optimizer step's rollouts: `B = micro_batch * accumulation` rows with prompts of 16-48 tokens and completions
whose lengths are drawn uniformly from 8 to `C` (what sampling gives: most rows stop before the longest one).

- **teacher**: `LocalTeacher.score` over the step's rollouts, as before (`micro_batch_size=None`: one forward pass
  over all B rows, padded to the step's longest prompt and completion) and now (`micro_batch_size=micro_batch`: one
  pass per micro-batch, each cut to its own longest prompt and completion). Measured: the peak of the tensor bytes
  the call allocates on top of what was alive before (`LiveTensorBytes`: exact, independent of the machine's load),
  which is the transient the issue names, plus the `(B, C, H)` hidden states it returns; and seconds.
- **student**: forward + backward of the student's backbone over the step's micro-batches, each padded to the step's
  longest (before) or cut to its own lengths (`rollout_buffer.trim`, now); seconds and the columns computed.

Models: random Llama configs, teacher 4 x 512 and student 2 x 256, vocabulary 32,000 (the head is not run here:
only the backbones, where the two settings differ), float32, one thread. Each point: 2 warm-up calls, then
`--repeats` timed calls alternating before/now; the median and the [min, max] are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from _memory import LiveTensorBytes  # benchmarks/_memory.py
from _models import padded_llama

from trl_onpolicy.step_batch import StepBatch
from trl_onpolicy.rollouts import Rollouts, collate, position_kwargs
from trl_onpolicy.teachers import LocalTeacher, TeacherScores

RESULTS = Path(__file__).parent / "results" / "micro_batches.json"
TEACHER, STUDENT, VOCAB = (4, 512), (2, 256), 32_000
MiB = 2**20


def rollouts(n_rows: int, max_completion: int, seed: int = 0) -> Rollouts:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(16, 48))] for _ in range(n_rows)]
    completions = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(8, max_completion))] for _ in range(n_rows)]
    return Rollouts(prompts, completions, "student")


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "n": len(seconds)}


def teacher_point(teacher_model, batch, micro: int, repeats: int) -> dict:
    before, now = LocalTeacher(teacher_model), LocalTeacher(teacher_model, micro_batch_size=micro)
    result = {}
    for name, teacher in (("before", before), ("now", now)):
        with LiveTensorBytes() as counter:
            teacher.score(batch)
        result[name] = {"peak_MiB": counter.peak / MiB}
        teacher.score(batch)  # warm-up
    seconds = {"before": [], "now": []}
    for _ in range(repeats):  # alternating
        for name, teacher in (("before", before), ("now", now)):
            seconds[name] += timed(lambda t=teacher: t.score(batch), 1)
    for name in seconds:
        result[name].update(summary(seconds[name]))
    returned = batch["completion_ids"].numel() * teacher_model.config.hidden_size * 4 / MiB
    result["returned_hidden_MiB"] = returned
    result["peak_ratio_now_over_before"] = result["now"]["peak_MiB"] / result["before"]["peak_MiB"]
    return result


def student_step(student, micro_batches) -> None:
    backbone = student.model
    for part in micro_batches:
        out = backbone(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                       **position_kwargs(backbone, part["attention_mask"]), use_cache=False)  # fmt: skip
        out.last_hidden_state.float().pow(2).mean().backward()


def student_point(student, batch, accumulation: int, repeats: int) -> dict:
    scored = StepBatch(**{k: v for k, v in batch.items() if k != "rows"},
                       teacher=TeacherScores(1.0, token_logps=torch.zeros(batch["completion_ids"].shape)))
    trimmed = [{"input_ids": part.input_ids, "attention_mask": part.attention_mask}
               for part in scored.split(accumulation)[0]]
    rows = batch["input_ids"].shape[0]
    bounds = [round(i * rows / accumulation) for i in range(accumulation + 1)]
    padded = [{k: batch[k][lo:hi] for k in ("input_ids", "attention_mask")} for lo, hi in zip(bounds, bounds[1:])]
    for parts in (padded, trimmed):  # warm-up
        student_step(student, parts)
    seconds = {"before": [], "now": []}
    for _ in range(repeats):
        for name, parts in (("before", padded), ("now", trimmed)):
            seconds[name] += timed(lambda p=parts: student_step(student, p), 1)
            student.zero_grad(set_to_none=True)
    columns = {"before": sum(p["input_ids"].numel() for p in padded),
               "now": sum(p["input_ids"].numel() for p in trimmed)}  # fmt: skip
    result = {name: {**summary(seconds[name]), "token_columns": columns[name]} for name in seconds}
    result["time_ratio_now_over_before"] = result["now"]["median_s"] / result["before"]["median_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one point, 3 repeats")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per setting and point (default 10)")
    parser.add_argument("--out", default=str(RESULTS), help=f"JSON to write (default {RESULTS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    points = [(4, 4, 128)] if args.quick else [(4, 1, 128), (4, 4, 128), (4, 8, 128), (8, 4, 256), (4, 8, 512)]
    repeats = 3 if args.quick else args.repeats
    teacher_model = padded_llama(1, *TEACHER, VOCAB).eval().requires_grad_(False)
    student = padded_llama(0, *STUDENT, VOCAB)
    results = []
    for micro, accumulation, max_completion in points:
        batch = collate(rollouts(micro * accumulation, max_completion), pad_id=0)
        point = {"micro_batch": micro, "accumulation": accumulation, "max_completion": max_completion,
                 "step_shape": list(batch["input_ids"].shape)}  # fmt: skip
        point["teacher"] = teacher_point(teacher_model, batch, micro, repeats)
        point["student"] = student_point(student, batch, accumulation, repeats)
        results.append(point)
        t, s = point["teacher"], point["student"]
        print(f"micro {micro} x {accumulation}, C <= {max_completion}: teacher peak {t['before']['peak_MiB']:.0f} -> "
              f"{t['now']['peak_MiB']:.0f} MiB ({t['peak_ratio_now_over_before']:.2f}x), "
              f"{t['before']['median_s']:.3f} -> {t['now']['median_s']:.3f} s; student columns "
              f"{s['before']['token_columns']} -> {s['now']['token_columns']}, "
              f"{s['before']['median_s']:.3f} -> {s['now']['median_s']:.3f} s ({s['time_ratio_now_over_before']:.2f}x)",
              flush=True)  # fmt: skip
    record = {
        "settings": {"teacher": TEACHER, "student": STUDENT, "vocab": VOCAB, "repeats": repeats, "threads": 1,
                     "dtype": "float32", "prompts": "16-48 tokens", "completions": "uniform 8..C tokens"},
        "environment": {"torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
                        "processor": platform.processor(), "cpus": os.cpu_count()},
        "points": results,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
