"""Forward + backward of the distillation loss alone: whole-vocabulary chunks (autograd) against vocabulary tiles
(closed-form gradient), at two vocabulary sizes.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/tiled_loss.py      # ~1.5 min on a shared 2-core machine
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/tiled_loss.py --loss-type reverse_kl --temperature 2

(`PYTHONPATH=.` makes a checkout's `trl_onpolicy` win over an installed one.) N = 512 completion tokens, H = 64 for the
student and 128 for the teacher, untied float32 heads of V rows, random weights, generalized JSD (beta 0.5) by default.
"whole" is `vocab_tile=0` with the previous default `chunk_size=1024`; "tiled" is the defaults (one chunk of 512
tokens, 1024-column tiles on CPU). Seconds: best of 3 forward + backward, after one untimed run under the memory
counter. Memory: `LiveTensorBytes` (`_memory.py`) over forward + backward: tensor bytes allocated inside and alive at
the high point (inputs and weights excluded, their views too; the `(N, H)` and `(V, H)` gradients included). Writes
`benchmarks/results/tiled_loss.json`. Most of the run time is
the whole-vocabulary path at V = 151,936.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _memory import LiveTensorBytes  # benchmarks/_memory.py (the script's folder is on sys.path)
from chunking import environment

from trl_onpolicy.heads import LinearHead
from trl_onpolicy.loss import distillation_loss
from trl_onpolicy.teachers.base import TeacherScores

N, H_STUDENT, H_TEACHER = 512, 64, 128
VOCABS = (32_000, 151_936)
MiB = 2**20
RESULTS = Path(__file__).parent / "results" / "tiled_loss.json"


def problem(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H_STUDENT, vocab, bias=False)
    teacher_head = torch.nn.Linear(H_TEACHER, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, H_STUDENT, generator=g) / 4)
        teacher_head.weight.copy_(torch.randn(vocab, H_TEACHER, generator=g) / 4)
    hidden = torch.randn(N, H_STUDENT, generator=g, requires_grad=True)  # (N, H)
    teacher_hidden = torch.randn(N, H_TEACHER, generator=g)  # (N, H_t)
    targets = torch.randint(0, vocab, (N,), generator=g)  # (N,)
    return head, teacher_head, hidden, teacher_hidden, targets


def run(vocab, tiled, loss_type, temperature, repeats=3):
    head, teacher_head, hidden, teacher_hidden, targets = problem(vocab)
    if tiled:  # the trainer hands both heads over as `LinearHead`s (see `linear_head`); an nn.Linear is taken as one
        teacher = TeacherScores(temperature, hidden=teacher_hidden, head=LinearHead(teacher_head.weight))
        kwargs = {}
    else:
        teacher = TeacherScores(temperature, hidden=teacher_hidden, head=teacher_head)
        kwargs = {"vocab_tile": 0, "chunk_size": 1024}

    def step():
        sums = distillation_loss(hidden, head, teacher, targets, loss_type=loss_type, vocab_size=vocab, num_items=N,
                                 scale=temperature**2, **kwargs)  # fmt: skip
        sums.loss.backward()
        return sums

    with LiveTensorBytes() as counter:  # an untimed first run, for the memory (the counter slows ops down)
        step()
    peak = counter.peak
    times = []
    for _ in range(repeats):
        hidden.grad = head.weight.grad = None
        start = time.perf_counter()
        sums = step()
        times.append(time.perf_counter() - start)
    return min(times), peak, sums.loss.item(), (hidden.grad, head.weight.grad)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss-type", default="jsd")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", default=str(RESULTS))
    cli = parser.parse_args()
    torch.set_num_threads(1)
    print(f"N={N}, H={H_STUDENT} (teacher {H_TEACHER}), {cli.loss_type}, T={cli.temperature}, "
          f"{torch.get_num_threads()} thread; best of 3 forward+backward")  # fmt: skip
    print(f"{'V':>8} {'path':>6} {'seconds':>8} {'peak MiB':>9} {'loss':>10}")
    points = []
    for vocab in VOCABS:
        rows = {}
        for tiled in (False, True):
            rows[tiled] = run(vocab, tiled, cli.loss_type, cli.temperature)
            seconds, peak, loss, _ = rows[tiled]
            print(f"{vocab:>8} {'tiled' if tiled else 'whole':>6} {seconds:>8.3f} {peak / MiB:>9.1f} {loss:>10.6f}")
        (t_old, m_old, l_old, g_old), (t_new, m_new, l_new, g_new) = rows[False], rows[True]
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(g_new, g_old))
        print(
            f"{vocab:>8} whole/tiled time {t_old / t_new:.2f}x, memory {m_old / m_new:.2f}x; "
            f"relative loss difference {abs(l_new - l_old) / abs(l_old):.1e}, gradients {diff:.1e}"
        )
        points.append({
            "vocab": vocab, "whole_s": t_old, "tiled_s": t_new, "whole_MiB": m_old / MiB, "tiled_MiB": m_new / MiB,
            "time_ratio": t_old / t_new, "memory_ratio": m_old / m_new, "loss_whole": l_old, "loss_tiled": l_new,
            "relative_gradient_difference": diff,
        })  # fmt: skip
    setup = {"tokens": N, "student_hidden": H_STUDENT, "teacher_hidden": H_TEACHER, "loss_type": cli.loss_type,
             "temperature": cli.temperature, "repeats": 3, "whole": "vocab_tile=0, chunk_size=1024",
             "tiled": "defaults"}  # fmt: skip
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.out).write_text(json.dumps({"setup": setup, "environment": environment(), "points": points}, indent=1))
    print(f"wrote {cli.out}")


if __name__ == "__main__":
    main()
