"""Soak: 500 optimizer steps on tiny Llamas with rounds, evaluation and rotating checkpoints; memory must not grow.

The run: a 1-layer, 16-wide Llama student and teacher over the char tokenizer (`tests/tiny_models.py`), the student
writing every completion (`lmbda=1`, 8 new tokens), `num_rounds=5` (a round end, with its `on_round_end` event and
checkpoint, every 100 steps), `save_steps=100` with `save_total_limit=2` (old checkpoints deleted as new ones come),
an `eval_strategy="steps"` evaluation every 100 steps on a 4-row eval set (the student writes, the teacher scores),
and a `CompletionsLogger` writing every step's scored rollouts.

A callback samples the process RSS (`/proc/self/statm`) at every step end, the number of live torch tensors (every
object `gc` tracks whose type is `torch.Tensor` or `nn.Parameter`, after a `gc.collect()`) every 5 steps (a full
collection and scan costs ~0.3 s here), and `len(gc.get_objects())` every 50 steps. After a warm-up of 50 steps
(allocator pools, lazy imports) the test asserts that RSS grows by less than `RSS_BOUND_MB` and live tensors by at most
`TENSOR_BOUND`, and that gc-tracked objects grow by less than `OBJECT_BOUND` from step 150 (after the first checkpoint
and evaluation, which import and cache once) to the end. A rollout, KV cache, teacher score or autograd graph leaked
per step (hundreds of tensors over 450 steps, megabytes of RSS) cannot hide under these bounds. The figures are
printed (`-s`) for docs/reliability.md.

Run with `python -m pytest -m slow -s tests/test_soak.py` (about a minute on a busy 2-core CPU).
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time

import pytest
import tiny_models as tm
import torch
from transformers import TrainerCallback

from trl_onpolicy import CompletionsLogger, OnPolicyDistillTrainer

STEPS, WARMUP = 500, 50
RSS_BOUND_MB = 50.0
TENSOR_BOUND = 20
OBJECT_BOUND = 2000  # gc-tracked objects from step 150 (after the first checkpoint and evaluation) to the end
TENSOR_EVERY = 5  # a full `gc.collect()` + scan of ~480k objects costs ~0.3 s here: every step would double the run
PAGE = os.sysconf("SC_PAGE_SIZE")
TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in TENSOR_TYPES)  # `type`: no __instancecheck__ on proxies


class MemorySampler(TrainerCallback):
    def __init__(self):
        self.rss, self.tensors, self.objects = {}, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        self.rss[step] = rss_mb()
        if step % TENSOR_EVERY == 0:
            self.tensors[step] = live_tensors()
        if step % 50 == 0:
            self.objects[step] = len(gc.get_objects())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_500_steps_memory_stays_flat(tmp_path):
    tok = tm.tokenizer()
    sampler = MemorySampler()
    args = tm.config(
        tmp_path, max_steps=STEPS, num_rounds=5, lmbda=1.0, max_completion_length=8, save_strategy="steps",
        save_steps=100, save_total_limit=2, eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=2,
        logging_steps=10, learning_rate=1e-3,
    )  # fmt: skip
    trainer = OnPolicyDistillTrainer(
        model=tm.model(tok, seed=0),
        teacher_model=tm.model(tok, seed=1),
        args=args,
        train_dataset=tm.dataset("prompt_completion", 16),
        eval_dataset=tm.dataset("prompt_only", 4),
        processing_class=tok,
        callbacks=[sampler, CompletionsLogger(max_per_batch=2)],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ it did the whole run
    assert trainer.state.global_step == STEPS
    assert trainer.round_ends() == [100, 200, 300, 400, 500]
    checkpoints = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-400", "checkpoint-500"], checkpoints  # rotated: at most 2 kept
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [100, 200, 300, 400, 500]
    assert all(torch.isfinite(torch.tensor(h["eval_loss"])) for h in evals)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in tm.step_logs(trainer))
    with open(tmp_path / "completions.jsonl") as f:
        assert sum(1 for _ in f) == 2 * STEPS

    # ------------------------------------------------------------------ memory
    rss, tensors = sampler.rss, sampler.tensors
    assert sorted(rss) == list(range(1, STEPS + 1))
    base_rss, base_tensors = rss[WARMUP], tensors[WARMUP]
    after = [s for s in rss if s > WARMUP]
    rss_growth = max(rss[s] for s in after) - base_rss
    end_rss_growth = statistics.median(rss[s] for s in range(STEPS - 49, STEPS + 1)) - base_rss
    tensor_growth = max(tensors[s] for s in tensors if s > WARMUP) - base_tensors
    end_tensor_growth = tensors[STEPS] - base_tensors
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nsoak: {STEPS} steps in {seconds:.0f} s ({seconds / STEPS * 1000:.0f} ms/step incl. sampling); "
        f"RSS at step {WARMUP} {base_rss:.1f} MB, max after it +{rss_growth:.1f} MB, median of the last 50 steps "
        f"{end_rss_growth:+.1f} MB (bound {RSS_BOUND_MB} MB); peak RSS of the process {peak_mb:.0f} MB\n"
        f"soak: live tensors at step {WARMUP} {base_tensors}, max after it +{tensor_growth}, at step {STEPS} "
        f"{end_tensor_growth:+d} (bound {TENSOR_BOUND})\n"
        f"soak: gc objects every 50 steps {sampler.objects}\n"
        f"soak: RSS every 50 steps {{{', '.join(f'{s}: {rss[s]:.1f}' for s in range(50, STEPS + 1, 50))}}}"
    )
    assert rss_growth < RSS_BOUND_MB, f"RSS grew by {rss_growth:.1f} MB after the warm-up"
    assert tensor_growth <= TENSOR_BOUND, f"live tensors grew by {tensor_growth} after the warm-up"
    # gc-tracked objects: a one-off rise at the first checkpoint and evaluation (step 100, lazy imports), then only the
    # rows `log_history` gains (one per 10 steps, one per evaluation)
    object_growth = sampler.objects[STEPS] - sampler.objects[150]
    assert object_growth < OBJECT_BOUND, f"gc-tracked objects grew by {object_growth} from step 150 to {STEPS}"
