"""Steps/s and peak memory of a tiny distillation run, with the loss chunked (64 tokens), not chunked, and tiled.

    OMP_NUM_THREADS=1 python benchmarks/chunking.py            # writes benchmarks/results/chunking.json
    OMP_NUM_THREADS=1 python benchmarks/chunking.py --quick    # fewer steps, for a smoke check

The run: student and teacher are Llama 2 layers x 64 wide with a 32,000-token output layer (a character tokenizer
whose embedding matrix is padded to 32,000 rows, so every logit row is as wide as Llama-2's), batch 8, dataset
completions of exactly 128 tokens (`lmbda=0`: no sampling, so the steps are identical in both settings and the
comparison is of the loss alone), `loss_type="jsd"`, full teacher distribution. That is N = 1,024 completion tokens per
step. The first two settings take the whole-vocabulary path (`loss_vocab_tile=0`: each chunk projected to all V
columns, autograd of `divergences.py`): `loss_chunk_size=64` projects the tokens 64 at a time, `4096` (>= N) all of
them at once, which is what "no chunking" means here. The third is the defaults: one chunk of up to 4,096 tokens whose
vocabulary is walked in tiles with a closed-form gradient (`fused_divergence.py`).

What is measured, and how:

- steps/s: wall time of `timed_steps` optimizer steps after `warmup_steps`, one torch thread, measured between
  `on_step_end` callbacks (it includes teacher scoring, the student pass, loss, backward and the AdamW step).
- step memory: `LiveTensorBytes` (in `_memory.py`), a `TorchDispatchMode` that sees the output of every ATen op (forward,
  backward, optimizer; CPU or any device), adds the bytes of each new tensor storage and subtracts them when the
  storage is freed (a weakref finalizer). It is active for one whole optimizer step after the timed ones (teacher
  scoring, student pass, loss, backward, AdamW step). "working" is the high point of the bytes the step allocated and
  still held; "resting" is what was live before the step began (the weights of both models and the AdamW moments,
  counted directly); "peak" = resting + working. Tensor bytes only: not the allocator's slack, not Python objects,
  and not process RSS (whose high-water mark on a shared CPU machine is dominated by the allocator and by noise).
  `torch.distributed._tools.mem_tracker.MemTracker` does the same with categories, but in torch 2.13 it fails on
  frozen modules (it registers a gradient hook on every parameter of every module that runs, the teacher's too).
- loss memory: the same counter around `distillation_loss` forward + backward alone, fed with `(N, 64)` hidden states,
  for N = 1,024 and N = 4,096: it shows the loss's memory following the chunk size, not the token count.

Run on a shared 2-core machine: the steps/s are comparable within one run of this script, not across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
import trl
from _memory import LiveTensorBytes, resting_bytes  # benchmarks/_memory.py (the script's folder is on sys.path)
from _models import padded_llama
from datasets import Dataset
from transformers import LlamaForCausalLM, TrainerCallback

import trl_onpolicy
from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer
from trl_onpolicy.heads import linear_head, output_logits
from trl_onpolicy.loss import distillation_loss
from trl_onpolicy.rollouts import Rollouts
from trl_onpolicy.toy.tokenizer import CHARS, char_tokenizer

# -------------------------------------------------------------------------------------------------------- config
VOCAB = 32_000
LAYERS, HIDDEN = 2, 64
BATCH = 8
COMPLETION_TOKENS = 128  # including the EOS
CHUNKED, UNCHUNKED = 64, 4096  # UNCHUNKED >= BATCH * COMPLETION_TOKENS: one chunk holds every token
# (label, loss_chunk_size, loss_vocab_tile): two whole-vocabulary settings, then the defaults (tiled)
SETTINGS = [("64, whole vocab", CHUNKED, 0), ("4096, whole vocab", UNCHUNKED, 0), ("default, tiled", None, None)]
MiB = 2**20
RESULTS = Path(__file__).parent / "results" / "chunking.json"


# ---------------------------------------------------------------------------------------------------- set-up
def llama(seed: int) -> LlamaForCausalLM:
    return padded_llama(seed, LAYERS, HIDDEN, VOCAB)


def dataset(n_rows: int) -> Dataset:
    """Prompts of 10-30 characters; completions of exactly COMPLETION_TOKENS - 1 characters (+ EOS)."""
    rng = random.Random(0)
    text = lambda n: "".join(rng.choice(list(CHARS[:36]) + [" "]) for _ in range(n))
    return Dataset.from_dict({
        "prompt": [text(rng.randint(10, 30)) for _ in range(n_rows)],
        "completion": [text(COMPLETION_TOKENS - 1) for _ in range(n_rows)],
    })  # fmt: skip


# ------------------------------------------------------------------------------------------- one training run
class Probe(TrainerCallback):
    """Times steps `warmup+1 .. warmup+timed`, then tracks memory over the next (last) step."""

    def __init__(self, warmup: int, timed: int):
        self.warmup, self.timed = warmup, timed
        self.t0 = self.t1 = None
        self.counter = LiveTensorBytes()
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()
        elif state.global_step == self.warmup + self.timed:
            self.t1 = time.perf_counter()
            self.resting = resting_bytes([self.trainer.model, self.trainer.teacher.model], self.trainer.optimizer)
            self.counter.__enter__()
        elif state.global_step == self.warmup + self.timed + 1:
            self.counter.__exit__(None, None, None)


def train_run(label: str, chunk_size: int | None, tile: int | None, warmup: int, timed: int, out_dir: str) -> dict:
    tok = char_tokenizer()
    steps = warmup + timed + 1
    args = OnPolicyDistillConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=BATCH, lmbda=0.0, loss_type="jsd",
        max_completion_length=COMPLETION_TOKENS, loss_chunk_size=chunk_size, loss_vocab_tile=tile, logging_steps=1, report_to=[],
        save_strategy="no", seed=0, use_cpu=True, dataloader_pin_memory=False,
    )  # fmt: skip
    probe = Probe(warmup, timed)
    trainer = OnPolicyDistillTrainer(
        model=llama(0), teacher_model=llama(1), args=args, train_dataset=dataset(BATCH * steps),
        processing_class=tok, callbacks=[probe],
    )  # fmt: skip
    probe.trainer = trainer
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    working = probe.counter.peak
    return {
        "setting": label,
        "loss_chunk_size": chunk_size,
        "loss_vocab_tile": tile,
        "completion_tokens_per_step": int(logs[0]["completion_length"] * BATCH),
        "steps_per_second": timed / (probe.t1 - probe.t0),
        "step_peak_MiB": (probe.resting + working) / MiB,
        "step_resting_MiB": probe.resting / MiB,
        "step_working_MiB": working / MiB,
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h["grad_norm"] for h in logs],
    }, trainer


# --------------------------------------------------------------------------------------------- the loss alone
def loss_peak(trainer, n_tokens: int, chunk_size: int | None, tile: int | None) -> float:
    """MiB allocated at the high point of `distillation_loss` forward + backward on `n_tokens` tokens."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    rows = [trainer.train_dataset[i] for i in range(n_tokens // COMPLETION_TOKENS)]
    rollouts = Rollouts([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], "dataset")
    batch = trainer.score(rollouts)
    mask = batch.completion_mask.bool()  # (B, C)
    teacher = batch.teacher.flatten(mask)
    targets = batch.completion_ids[mask]  # (N,)
    assert targets.numel() == n_tokens, (targets.numel(), n_tokens)
    torch.manual_seed(0)
    hidden = torch.randn(n_tokens, HIDDEN, requires_grad=True)  # (N, H)
    counter = LiveTensorBytes()
    with counter:
        sums = distillation_loss(
            hidden, linear_head(student) if tile != 0 else lambda h: output_logits(student, h), teacher, targets,
            loss_type="jsd", vocab_size=VOCAB, num_items=n_tokens, chunk_size=chunk_size, vocab_tile=tile,
        )  # fmt: skip
        sums.loss.backward()
        del sums
    student.zero_grad(set_to_none=True)
    return counter.peak / MiB


# ------------------------------------------------------------------------------------------------------- main
def environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "trl_onpolicy"], capture_output=True, text=True, check=True
            ).stdout
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        cpu = platform.processor() or None
    return {
        "commit": commit, "trl_onpolicy_uncommitted_changes": dirty, "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "trl_onpolicy": trl_onpolicy.__version__,
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} cores visible",
        "python": platform.python_version(),
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps (smoke check)")
    parser.add_argument("--out", default=str(RESULTS))
    cli = parser.parse_args()
    torch.set_num_threads(1)
    warmup, timed = (1, 2) if cli.quick else (2, 8)

    runs, loss_rows = [], []
    for label, chunk, tile in SETTINGS:
        run, trainer = train_run(label, chunk, tile, warmup, timed, f"/tmp/trl-onpolicy-bench-chunk{chunk}-{tile}")
        runs.append(run)
        for n_tokens in (BATCH * COMPLETION_TOKENS, 4 * BATCH * COMPLETION_TOKENS):
            if n_tokens // COMPLETION_TOKENS <= len(trainer.train_dataset):
                loss_rows.append(
                    {
                        "setting": label,
                        "tokens": n_tokens,
                        "loss_peak_MiB": loss_peak(trainer, n_tokens, chunk, tile),
                    }
                )
        del trainer
    chunked, whole, tiled = runs
    ratios = {
        "steps_per_second_chunked_over_unchunked": chunked["steps_per_second"] / whole["steps_per_second"],
        "step_peak_unchunked_over_chunked": whole["step_peak_MiB"] / chunked["step_peak_MiB"],
        "step_working_unchunked_over_chunked": whole["step_working_MiB"] / chunked["step_working_MiB"],
        "max_relative_loss_difference": max(abs(a - b) / abs(b) for a, b in zip(chunked["losses"], whole["losses"])),
        "steps_per_second_tiled_over_chunked": tiled["steps_per_second"] / chunked["steps_per_second"],
        "step_peak_chunked_over_tiled": chunked["step_peak_MiB"] / tiled["step_peak_MiB"],
        "step_working_chunked_over_tiled": chunked["step_working_MiB"] / tiled["step_working_MiB"],
        "max_relative_loss_difference_tiled": max(
            abs(a - b) / abs(b) for a, b in zip(tiled["losses"], whole["losses"])
        ),
    }

    print(f"Llama {LAYERS}x{HIDDEN}, vocab {VOCAB}, batch {BATCH} x {COMPLETION_TOKENS} completion tokens, jsd, "
          f"{torch.get_num_threads()} thread, {warmup} warm-up + {timed} timed steps")  # fmt: skip
    print(f"{'setting':>18} {'steps/s':>8} {'step peak MiB':>14} {'resting MiB':>12} {'working MiB':>12}")
    for r in runs:
        print(f"{r['setting']:>18} {r['steps_per_second']:>8.2f} {r['step_peak_MiB']:>14.1f} "
              f"{r['step_resting_MiB']:>12.1f} {r['step_working_MiB']:>12.1f}")  # fmt: skip
    print(f"\n{'setting':>18} {'tokens':>7} {'loss fwd+bwd peak MiB':>22}")
    for r in loss_rows:
        print(f"{r['setting']:>18} {r['tokens']:>7} {r['loss_peak_MiB']:>22.1f}")
    print("\n" + "\n".join(f"{k}: {v:.3g}" for k, v in ratios.items()))

    result = {
        "setup": {
            "student": f"Llama {LAYERS}x{HIDDEN}, vocab {VOCAB}",
            "teacher": f"Llama {LAYERS}x{HIDDEN}, vocab {VOCAB}",
            "batch": BATCH,
            "completion_tokens": COMPLETION_TOKENS,
            "loss_type": "jsd",
            "lmbda": 0.0,
            "warmup_steps": warmup,
            "timed_steps": timed,
            "memory_measure": "LiveTensorBytes (a TorchDispatchMode): bytes of tensor storages allocated during one "
            "optimizer step and still alive, at their high point (working); resting = weights of both models + AdamW "
            "state; peak = resting + working",
        },
        "environment": environment(),
        "runs": runs,
        "loss_only": loss_rows,
        "ratios": ratios,
    }
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {cli.out}")


if __name__ == "__main__":
    main()
