"""Throughput and peak memory of whole on-policy training steps: ours against TRL's DistillationTrainer and GKDTrainer.

    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py            # the sweep; writes results/vs_trl.json and vs_trl.png
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --quick    # one small point, one repeat (smoke check)
    python benchmarks/vs_trl.py --plot-only                  # redraw results/vs_trl.png from results/vs_trl.json

The same run for the three trainers, at every point of a sweep over the vocabulary size V (32,000 / 128,256 /
151,936) and the completion length C (64 / 256):

- models: Llama student 2 layers x 64 wide, teacher 2 layers x 128 wide, untied heads, random weights (seeds 0 and
  1), float32; a character tokenizer (55 ids) whose embedding and output matrices are padded to V rows, as in
  `chunking.py`, so every logit row is V wide and both trainers compare all V columns;
- data: the same prompt-only dataset (short prompts of 12-24 characters), batch 8, no gradient accumulation;
- on-policy: ours `lmbda=1.0`; `DistillationTrainer` is on-policy by design (it has no `lmbda`); `GKDTrainer`
  `lmbda=1.0`. Sampling at temperature 1, no top-k, no top-p, `max_completion_length` = `max_new_tokens` = C. Random
  weights make EOS rare (about 1 in V per token), so completions run to C tokens in all three: the mean completion
  length each trainer trained on is recorded per step and printed;
- loss: generalized JSD with `beta=0.5` in all three. The conventions agree: m = beta p_teacher + (1 - beta) p_student
  and JSD = beta KL(p_teacher || m) + (1 - beta) KL(p_student || m) (`trl_onpolicy/divergences.py`,
  `GKDTrainer.generalized_jsd_loss`, `trl/kernels/chunked_divergence.py::_jsd_tile`); at 0.5 it is symmetric anyway.
  Loss temperature 1, sum over completion tokens divided by the step's completion-token count;
- update: AdamW (`optim="adamw_torch"`), lr 1e-5, constant schedule, grad-norm clip 1.0, no activation
  checkpointing of the model (TRL's `DistillationConfig` defaults it on; it is set off for all three), float32
  (`bf16=False`), seed 0, one torch thread (`torch.set_num_threads(1)`, recorded in the JSON).

What is measured:

- completion tokens/s: completion tokens trained per second of whole optimizer steps, timed between `on_step_end`
  callbacks after one warm-up step (generation, teacher, student pass, loss, backward, AdamW all included). Each
  trainer runs `--repeats` times in alternation (ours, TRL, GKD, ours, TRL, GKD, ...); a trainer's figure is the best
  of its repeats' median steps, and the ratio ours / TRL is of those figures;
- phases, the same instruments for all three: generation = the student's `generate` calls (ours: its student
  sampler's calls, which need not go through `generate`, with their padding and EOS cutting); teacher = the teacher
  backbone's forward (a hook on its `LlamaModel`: TRL projects the teacher's hidden states inside its loss kernel and
  ours inside its loss chunks, so the teacher's head counts as "update" in both); update = step - generation - teacher;
- peak memory: `LiveTensorBytes` (`_memory.py`) over one whole optimizer step after the timed ones, in the first
  repeat: working = the step's high point of tensor bytes it allocated, resting = weights of both models + gradients +
  AdamW state at the step's start, peak = resting + working;
- GKDTrainer materialises `(B, P + C, V)` float32 logits of both models and several same-sized temporaries. It runs
  where its peak is estimated (from its measured working memory at V = 32,000, scaled by V) to fit in `--gkd-cap-gib`
  (12 GiB); elsewhere it is recorded as skipped with the estimate. It gets a collator (it has none for prompt-only
  text) that tokenises the prompts as the other two do and gives `labels` of B x C placeholders so that the Trainer's
  token count, which GKD divides by, is the number of completion tokens it will train on;
- a torch.profiler table of one step of ours and of TRL at the largest point (top ops by self CPU time).

Times on a shared 2-core machine are noisy: compare within one run of this script (ratios), not across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import torch
import trl
from _memory import LiveTensorBytes, resting_bytes  # benchmarks/_memory.py (the script's folder is on sys.path)
from _models import padded_llama
from chunking import environment
from datasets import Dataset
from transformers import LlamaForCausalLM, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer

from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer
from trl_onpolicy.toy.tokenizer import CHARS, char_tokenizer

# -------------------------------------------------------------------------------------------------------- config
VOCABS = (32_000, 128_256, 151_936)
COMPLETIONS = (64, 256)
STUDENT, TEACHER = (2, 64), (2, 128)  # (layers, hidden)
BATCH, BETA, LR, SEED = 8, 0.5, 1e-5, 0
TRAINERS = ("ours", "trl", "gkd")
LABELS = {"ours": "ours (OnPolicyDistillTrainer)", "trl": "TRL DistillationTrainer", "gkd": "TRL GKDTrainer"}
MiB, GiB = 2**20, 2**30
RESULTS = Path(__file__).parent / "results" / "vs_trl.json"


# ---------------------------------------------------------------------------------------------------- set-up
def llama(seed: int, layers: int, hidden: int, vocab: int) -> LlamaForCausalLM:
    return padded_llama(seed, layers, hidden, vocab)


def prompts(n_rows: int) -> Dataset:
    """Prompt-only rows of 12-24 characters (the same rows, in the same order, for every trainer)."""
    rng = random.Random(SEED)
    alphabet = list(CHARS[:36]) + [" "]
    return Dataset.from_dict(
        {"prompt": ["".join(rng.choices(alphabet, k=rng.randint(12, 24))) for _ in range(n_rows)]}
    )


def common_args(out_dir: str, steps: int) -> dict:
    return dict(  # noqa: C408 (one keyword list for three configs)
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        learning_rate=LR, optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=False, use_cpu=True, seed=SEED, logging_steps=1, report_to=[],
        save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, temperature=1.0, top_p=1.0, top_k=0,
        beta=BETA,
    )  # fmt: skip


class GKDPromptCollator:
    """Prompt-only text -> what `GKDTrainer.training_step` reads: left-padded `prompts` and their mask; `labels` are
    B x C placeholders (replaced after generation) so that the Trainer counts the completion tokens to divide by."""

    def __init__(self, tokenizer, completion_length: int):
        self.tokenizer, self.completion_length = tokenizer, completion_length

    def __call__(self, rows: list[dict]) -> dict:
        ids = [self.tokenizer(row["prompt"])["input_ids"] for row in rows]
        width = max(len(i) for i in ids)
        prompt = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, P)
        mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, P)
        for r, i in enumerate(ids):
            prompt[r, width - len(i) :], mask[r, width - len(i) :] = torch.tensor(i), 1
        labels = torch.zeros((len(ids), self.completion_length), dtype=torch.long)  # (B, C) placeholders
        return {"prompts": prompt, "prompt_attention_mask": mask, "input_ids": prompt, "attention_mask": mask,
                "labels": labels}  # fmt: skip


def build(name: str, vocab: int, completion: int, steps: int, out_dir: str, callbacks, models=None,
          trainer_kwargs: dict | None = None, **overrides):
    """
    A trainer `name` on fresh models (same seeds for every trainer) and the same prompts.

    `models`: a `(student, teacher)` pair to train instead of this script's Llamas (`gpu_check.py` passes Qwen-shaped
    ones); `overrides`: training-argument fields over `common_args` (`per_device_train_batch_size` also sets how many
    prompt rows there are); `trainer_kwargs`: more keywords for our trainer (`peft_config`).
    """
    tok = char_tokenizer()
    student, teacher = models or (llama(0, *STUDENT, vocab), llama(1, *TEACHER, vocab))
    args = {**common_args(out_dir, steps), **overrides}
    data = prompts(args["per_device_train_batch_size"] * steps)
    if name == "ours":
        config = OnPolicyDistillConfig(**args, lmbda=1.0, loss_type="jsd", max_completion_length=completion)
        trainer = OnPolicyDistillTrainer(
            student, teacher, args=config, train_dataset=data, processing_class=tok, callbacks=callbacks,
            **(trainer_kwargs or {}),
        )  # fmt: skip
        teacher_model = trainer.teacher.model
    elif name == "trl":
        config = trl.DistillationConfig(**args, max_completion_length=completion, shuffle_dataset=False)
        trainer = trl.DistillationTrainer(
            student, teacher, args=config, train_dataset=data, processing_class=tok, callbacks=callbacks
        )
        teacher_model = trainer.teacher_model
    else:
        args.pop("top_p"), args.pop("top_k")  # GKD hard-codes top_k=0, top_p=1.0 in its generation config
        config = GKDConfig(**args, lmbda=1.0, max_new_tokens=completion)
        trainer = GKDTrainer(
            student, teacher, args=config, train_dataset=data, processing_class=tok, callbacks=callbacks,
            data_collator=GKDPromptCollator(tok, completion),
        )  # fmt: skip
        teacher_model = trainer.teacher_model
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer, teacher_model


# ------------------------------------------------------------------------------------------- instruments
class Probe(TrainerCallback):
    """Step wall times and per-phase seconds (between `on_step_end`s); with `memory`, tensor memory over the steps
    after step `memory_after` (by default the first: the timed ones) to the last."""

    def __init__(self, memory: bool = False, memory_after: int = 1):
        self.step_times, self.phases, self.tokens = [], [], []
        self.memory, self.memory_after = memory, memory_after
        self.counter = LiveTensorBytes()
        self.resting = None
        self.modules = ()
        self._gen = self._teacher = 0.0
        self._tokens = 0
        self._t = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._t is None:  # the first step: from its beginning (later steps: from the previous step's end)
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_times.append(now - self._t)
        self.phases.append((self._gen, self._teacher))
        self.tokens.append(self._tokens)
        self._gen = self._teacher = 0.0
        self._tokens = 0
        if self.memory and state.global_step == self.memory_after:
            self.resting = resting_bytes(self.modules, kwargs.get("optimizer"))
            self.counter.__enter__()
        elif self.memory and state.global_step == state.max_steps:
            self.counter.__exit__(None, None, None)
        self._t = time.perf_counter()

    # --- hooks
    def timed_generate(self, generate):
        @functools.wraps(generate)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            self._gen += time.perf_counter() - t0
            sequences = out.sequences if hasattr(out, "sequences") else out
            prompt_width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
            generated = sequences[:, prompt_width:]  # (B, C')
            eos = torch.cumsum((generated == 2).long(), 1)  # tokens after the first EOS are not trained on
            self._tokens += int(((eos == 0) | ((eos == 1) & (generated == 2))).sum())
            return out

        return wrapper

    def timed_sampler(self, sample):
        """Our trainer's student sampler (`Sampler.sample`), however it samples: its completions are already cut
        after the first EOS, so their lengths are the tokens trained on."""

        @functools.wraps(sample)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = sample(*args, **kwargs)
            self._gen += time.perf_counter() - t0
            self._tokens += sum(len(ids) for ids in out.completion_ids)
            return out

        return wrapper

    def attach(self, trainer, teacher_model):
        student = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(trainer, "student_sampler"):  # ours: its sampler need not call `generate`
            trainer.student_sampler.sample = self.timed_sampler(trainer.student_sampler.sample)
        else:
            student.generate = self.timed_generate(student.generate)
        backbone = teacher_model.model  # the teacher's LlamaModel: every trainer runs it once per step

        def start(*_):
            self._t_teacher = time.perf_counter()

        def stop(*_):
            self._teacher += time.perf_counter() - self._t_teacher

        backbone.register_forward_pre_hook(start)
        backbone.register_forward_hook(stop)
        self.modules = (student, teacher_model)


def run(name: str, vocab: int, completion: int, timed: int, memory: bool, workdir: str, warmup: int = 1,
        shapes: tuple[tuple[int, int], tuple[int, int]] = (STUDENT, TEACHER), memory_step: bool = False) -> dict:
    """
    One training run: `warmup` warm-up steps, then `timed` timed steps. With `memory`, tensor memory is counted over
    the timed steps, or, with `memory_step`, over one more step after them (so that the counter slows no timed step).
    `shapes`: the (layers, hidden) of the student and the teacher.
    """
    steps = warmup + timed + (memory and memory_step)
    probe = Probe(memory, memory_after=warmup + timed if memory_step else warmup)
    models = (llama(0, *shapes[0], vocab), llama(1, *shapes[1], vocab))
    trainer, teacher_model = build(name, vocab, completion, steps, f"{workdir}/{name}", [probe], models=models)
    probe.attach(trainer, teacher_model)
    trainer.train()
    timed_steps = slice(warmup, warmup + timed)  # the first `warmup` steps warm up
    step_s, tokens = probe.step_times[timed_steps], probe.tokens[timed_steps]
    gen_s = [g for g, _ in probe.phases[timed_steps]]
    teacher_s = [t for _, t in probe.phases[timed_steps]]
    update_s = [s - g - t for s, g, t in zip(step_s, gen_s, teacher_s)]
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    result = {
        "step_s": statistics.median(step_s),
        "generation_s": statistics.median(gen_s),
        "teacher_s": statistics.median(teacher_s),
        "update_s": statistics.median(update_s),
        "completion_tokens_per_step": statistics.mean(tokens),
        "mean_completion_length": statistics.mean(tokens) / BATCH,
        "tokens_per_second": statistics.mean(tokens) / statistics.median(step_s),
        "losses": [h["loss"] for h in logs],
        "all_step_s": step_s,
        "all_generation_s": gen_s,
        "all_teacher_s": teacher_s,
        "all_update_s": update_s,
        "all_tokens": tokens,
    }
    if name == "ours":  # the trainer's own clocks, as a cross-check of the hooks
        result["logged_time"] = {
            k: statistics.median(h[f"time/{k}"] for h in logs[timed_steps]) for k in ("generation", "teacher")
        }
    if memory:
        result["resting_MiB"] = probe.resting / MiB
        result["working_MiB"] = probe.counter.peak / MiB
        result["peak_MiB"] = (probe.resting + probe.counter.peak) / MiB
    del trainer
    return result


# ----------------------------------------------------------------------------------------------------- profile
def profile(name: str, vocab: int, completion: int, workdir: str, top: int = 15) -> list[dict]:
    """torch.profiler over one step after a warm-up step: the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    class Prof(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.prof = torch_profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
            elif state.global_step == 2:
                self.prof.__exit__(None, None, None)

    cb = Prof()
    trainer, _ = build(name, vocab, completion, 2, f"{workdir}/prof-{name}", [cb])
    trainer.train()
    events = sorted(cb.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
        for e in events[:top]
    ]


# -------------------------------------------------------------------------------------------------------- plot
def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    styles = {"ours": "-o", "trl": "--s", "gkd": ":^"}
    for c in sorted({p["completion_length"] for p in points}):
        row = [p for p in points if p["completion_length"] == c]
        vocabs = [p["vocab"] / 1000 for p in row]
        for name in TRAINERS:
            tps = [p[name]["tokens_per_second"] if "tokens_per_second" in p.get(name, {}) else None for p in row]
            mem = [p[name].get("peak_MiB") if name in p else None for p in row]
            if any(v is not None for v in tps):
                axes[0].plot(vocabs, [v if v is not None else float("nan") for v in tps], styles[name],
                             label=f"{name}, C={c}")  # fmt: skip
            if any(v is not None for v in mem):
                axes[2].plot(vocabs, [v / 1024 if v is not None else float("nan") for v in mem], styles[name],
                             label=f"{name}, C={c}")  # fmt: skip
        for other in ("trl", "gkd"):
            ratios = [p["ratios"].get(f"tokens_per_second_ours_over_{other}") for p in row]
            if any(r is not None for r in ratios):
                axes[1].plot(vocabs, [r if r is not None else float("nan") for r in ratios], styles[other],
                             label=f"ours / {other}, C={c}")  # fmt: skip
    axes[1].axhline(1.5, color="grey", lw=0.8, ls="--")
    axes[1].text(axes[1].get_xlim()[0], 1.52, "target 1.5x", color="grey", fontsize=8)
    axes[0].set(title="completion tokens/s (whole steps)", xlabel="vocabulary (thousands)", ylabel="tokens/s")
    axes[1].set(title="throughput ratio (higher: ours faster)", xlabel="vocabulary (thousands)", ylabel="ratio")
    axes[2].set(title="step peak tensor memory", xlabel="vocabulary (thousands)", ylabel="GiB")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(result["setup"]["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------------- main
def print_table(points: list[dict]):
    head = (f"{'V':>7} {'C':>4} {'trainer':>7} {'len':>5} {'tok/s':>7} {'step s':>7} {'gen s':>6} {'teach s':>7} "
            f"{'upd s':>6} {'peak MiB':>9} {'rest MiB':>9} {'work MiB':>9}")  # fmt: skip
    print(head)
    for p in points:
        for name in TRAINERS:
            r = p.get(name)
            if r is None:
                continue
            if "skipped" in r:
                print(f"{p['vocab']:>7} {p['completion_length']:>4} {name:>7}   {r['skipped']}")
                continue
            print(f"{p['vocab']:>7} {p['completion_length']:>4} {name:>7} {r['mean_completion_length']:>5.1f} "
                  f"{r['tokens_per_second']:>7.0f} {r['step_s']:>7.2f} {r['generation_s']:>6.2f} "
                  f"{r['teacher_s']:>7.3f} {r['update_s']:>6.2f} {r.get('peak_MiB', float('nan')):>9.1f} "
                  f"{r.get('resting_MiB', float('nan')):>9.1f} {r.get('working_MiB', float('nan')):>9.1f}")  # fmt: skip
        ratios = "  ".join(f"{k.replace('tokens_per_second_', 'tok/s ').replace('_', ' ')}: {v:.2f}x"
                           for k, v in p["ratios"].items())  # fmt: skip
        print(f"{'':>13} {ratios}")


def best(runs: list[dict]) -> dict:
    """The run with the best median step, with the memory of the run that measured it."""
    top = dict(min(runs, key=lambda r: r["step_s"]))
    for r in runs:
        for k in ("resting_MiB", "working_MiB", "peak_MiB"):
            if k in r:
                top[k] = r[k]
    top["repeat_step_s"] = [r["step_s"] for r in runs]
    return top


def redraw_or_prepare(out: Path, plot_only: bool, draw) -> bool:
    """With `plot_only`, redraw `out`'s PNG from its JSON with `draw` and return True; else set up a timed run
    (warnings off, one torch thread) and return False."""
    if plot_only:
        draw(json.loads(out.read_text()), out.with_suffix(".png"))
        return True
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="V=32000, C=64, 1 repeat, 2 timed steps")
    parser.add_argument("--repeats", type=int, default=2, help="runs per trainer and point, in alternation")
    parser.add_argument("--timed-steps", type=int, default=1, help="timed steps per run, after 1 warm-up step")
    parser.add_argument(
        "--big",
        type=float,
        default=20e6,
        help="points with V x C above this get one repeat (their steps take minutes here)",
    )
    parser.add_argument(
        "--profile-point",
        type=int,
        nargs=2,
        metavar=("V", "C"),
        default=None,
        help="where to profile one step of ours and of TRL (default: largest V, shortest C)",
    )
    parser.add_argument("--gkd-cap-gib", type=float, default=12.0)
    parser.add_argument("--no-gkd", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    cli = parser.parse_args()
    out = Path(cli.out)
    if redraw_or_prepare(out, cli.plot_only, plot):
        return
    vocabs, completions = ((32_000,), (64,)) if cli.quick else (VOCABS, COMPLETIONS)
    repeats, timed = (1, 2) if cli.quick else (cli.repeats, cli.timed_steps)
    names = ("ours", "trl") if cli.no_gkd else TRAINERS
    workdir = tempfile.mkdtemp(prefix="bench-vs-trl-")
    t_start = time.perf_counter()

    points, gkd_working_per_vocab = [], {}  # GKD's working bytes per vocabulary column, by completion length
    for completion in completions:
        for vocab in vocabs:
            runs = {name: [] for name in names}
            skipped = {}
            point_repeats = 1 if vocab * completion > cli.big else repeats
            for rep in range(point_repeats):
                for name in names:
                    if name in skipped or (name == "gkd" and rep > 0):  # GKD: one repeat (context, not the target)
                        continue
                    if name == "gkd" and completion in gkd_working_per_vocab:
                        need = gkd_working_per_vocab[completion] * vocab
                        if need > cli.gkd_cap_gib * GiB:
                            skipped[name] = f"skipped: would need ~{need / GiB:.1f} GiB (cap {cli.gkd_cap_gib:g} GiB)"
                            continue
                    t0 = time.perf_counter()
                    r = run(name, vocab, completion, timed, memory=rep == 0, workdir=workdir)
                    runs[name].append(r)
                    print(f"  V={vocab} C={completion} {name} repeat {rep + 1}: {r['tokens_per_second']:.0f} tok/s, "
                          f"len {r['mean_completion_length']:.1f}, {time.perf_counter() - t0:.0f} s "
                          f"(elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)  # fmt: skip
                    if name == "gkd" and rep == 0 and completion not in gkd_working_per_vocab:
                        gkd_working_per_vocab[completion] = (r["peak_MiB"] * MiB) / vocab
            point = {"vocab": vocab, "completion_length": completion, "repeats": point_repeats}
            point.update({name: best(rs) for name, rs in runs.items() if rs})
            point.update({name: {"skipped": why} for name, why in skipped.items()})
            point["ratios"] = {}
            for other in ("trl", "gkd"):
                if "tokens_per_second" in point.get(other, {}):
                    point["ratios"][f"tokens_per_second_ours_over_{other}"] = (
                        point["ours"]["tokens_per_second"] / point[other]["tokens_per_second"]
                    )
                    point["ratios"][f"peak_memory_ours_over_{other}"] = (
                        point["ours"]["peak_MiB"] / point[other]["peak_MiB"]
                    )
            points.append(point)

    profiles = {}
    if not cli.no_profile:
        vocab, completion = cli.profile_point or (vocabs[-1], completions[0])
        for name in ("ours", "trl"):
            profiles[name] = {
                "vocab": vocab,
                "completion_length": completion,
                "top": profile(name, vocab, completion, workdir),
            }

    title = (f"Llama student {STUDENT[0]}x{STUDENT[1]}, teacher {TEACHER[0]}x{TEACHER[1]}; batch {BATCH}, on-policy, "
             f"JSD beta={BETA}; {torch.get_num_threads()} torch thread; best of {repeats} repeats ({timed} timed step each; 1 repeat where V x C > {cli.big:.0e})")  # fmt: skip
    print("\n" + title)
    print_table(points)
    for name, prof in profiles.items():
        print(
            f"\nprofile, {name}, V={prof['vocab']} C={prof['completion_length']}, one step, top ops by self CPU time:"
        )
        for e in prof["top"]:
            print(f"  {e['self_s']:>7.3f} s {100 * e['share']:>5.1f}%  {e['calls']:>6}  {e['op']}")

    result = {
        "setup": {
            "title": title,
            "student": f"Llama {STUDENT[0]} layers x {STUDENT[1]}",
            "teacher": f"Llama {TEACHER[0]} layers x {TEACHER[1]}",
            "tokenizer": "character tokenizer (55 ids), embedding and output matrices padded to V rows",
            "batch": BATCH,
            "beta": BETA,
            "learning_rate": LR,
            "optimizer": "adamw_torch, constant lr, clip 1.0",
            "seed": SEED,
            "temperature": 1.0,
            "top_k": 0,
            "warmup_steps": 1,
            "timed_steps": timed,
            "repeats": repeats,
            "ours": "OnPolicyDistillConfig(lmbda=1.0, loss_type='jsd', loss_chunk_size default)",
            "trl": "trl.DistillationConfig (on-policy by design), shuffle_dataset=False",
            "gkd": "trl.experimental.gkd.GKDConfig(lmbda=1.0), prompt collator in this script",
            "gkd_cap_GiB": cli.gkd_cap_gib,
            "memory_measure": "LiveTensorBytes over one whole optimizer step: working = high point of bytes the step "
            "allocated and held; resting = weights of both models + gradients + AdamW state; peak = resting + working",
            "wall_s": time.perf_counter() - t_start,
        },
        "environment": environment(),
        "points": points,
        "profiles": profiles,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    with contextlib.suppress(ImportError):
        plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
