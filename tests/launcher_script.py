"""Two-process runs under FSDP2 and DeepSpeed ZeRO-3 on CPU, launched by `tests/test_launchers.py`.

The run itself is `mp_distill_script.run` (tiny models, SGD, a summary JSON from the main process); this script picks
the launcher (`cpu_launchers.py`) and adds what a scenario needs:

    --scenario equivalence  the DDP test's run, sharded; with `--eval`, lm-eval before training and at the round end
    --scenario on-policy    lmbda=1, each process sampling with its own seed and stop strings (different lengths)
    --scenario sigterm      SIGTERM delivered to one process only, during step 2 of 4
    --scenario nan          the teacher's scores of step 1 are NaN (the update must be skipped on every process)
    --scenario buffer       a checkpoint inside a reuse window (num_iterations=2) whose rollout buffer of process 1 is
                            gone, resumed
    --scenario uneven       a filter keeps 4 rollouts a step on process 0 and 1 on process 1 (2 micro-batches of 2):
                            the teacher's passes differ (2 vs 1) and process 1 has an empty micro-batch

    accelerate launch --multi_gpu --num_processes 2 ... tests/launcher_script.py --launcher fsdp2 --out two.json
"""

import argparse
import json
import os
import signal

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

import mp_distill_script as base
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from trl_onpolicy import DistillCallback, LmEvalCallback
from trl_onpolicy.rollout_buffer import buffer_file
from trl_onpolicy.teachers import LocalTeacher

STOP_STRINGS = list("abcdefgh")  # ~1 in 6 characters ends a completion: lengths spread from 1 to 16


def eval_callback(task_dir: str) -> LmEvalCallback:
    """The toy tasks, small: one generation task (generation with `synced_gpus`), one log-likelihood task."""
    return LmEvalCallback(tasks=["toy_gsm8k", "toy_mmlu"], limit=8, toy_eval_size=8, task_dir=task_dir,
                          gen_kwargs={"max_gen_toks": 8})  # fmt: skip


class NaNTeacherAtCall(LocalTeacher):
    """A local teacher whose scores of its `nan_call`-th call (1-based) are NaN."""

    def __init__(self, model, nan_call: int = 1):
        super().__init__(model)
        self.nan_call, self.calls = nan_call, 0

    def score(self, batch, **kwargs):
        scores = super().score(batch, **kwargs)
        self.calls += 1
        if self.calls == self.nan_call:
            scores.hidden = torch.full_like(scores.hidden, float("nan"))
        return scores


class SpreadLengths(DistillCallback):
    """Seeds each process differently and records the longest completion each process sampled per step."""

    def __init__(self):
        self.longest = []

    def on_train_begin(self, args, state, control, **kwargs):
        torch.manual_seed(100 + PartialState().process_index)

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        self.longest.append(max(len(c) for c in rollouts.completion_ids))


class KeepOnProcessOne(DistillCallback):
    """Keeps only the first rollout of each step on process 1 (an uneven filter); records how many each step kept."""

    def __init__(self):
        self.kept = []

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        kept = rollouts.select([0]) if PartialState().process_index == 1 else rollouts
        self.kept.append(len(kept))
        return kept


class SigtermOneProcess(DistillCallback):
    """Sends SIGTERM to this process during step 2, on process `rank` only."""

    def __init__(self, rank: int):
        self.rank = rank

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1 and PartialState().process_index == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--launcher", required=True, choices=["ddp", "fsdp2", "zero3"])
    parser.add_argument("--scenario", default="equivalence",
                        choices=["equivalence", "on-policy", "sigterm", "nan", "buffer", "uneven"])  # fmt: skip
    parser.add_argument("--teacher-source", default="memory", choices=["memory", "disk", "meta"])
    parser.add_argument("--teachers", default="one", choices=["one", "mixture", "hidden", "self"])
    parser.add_argument("--eval", action="store_true")
    cli = parser.parse_args()

    common = {"per_device_batch_size": 2, "output_dir": cli.output_dir, "launcher": cli.launcher}
    extra, callbacks = {}, []
    if cli.scenario == "equivalence":
        evaluator = eval_callback(os.path.join(cli.output_dir, "tasks")) if cli.eval else None
        callbacks = [evaluator] if evaluator else []
        result = base.run(cli.out, lmbda=0.0, teacher_source=cli.teacher_source, teachers=cli.teachers,
                          callbacks=callbacks, **common)  # fmt: skip
        extra = {"eval_history": evaluator.history if evaluator else None}
    elif cli.scenario == "on-policy":
        spread = SpreadLengths()
        result = base.run(cli.out, lmbda=1.0, teacher_hidden=48, callbacks=[spread], stop_strings=STOP_STRINGS,
                          max_completion_length=16, **common)  # fmt: skip
        extra = {"longest": gather_object([spread.longest])}
    elif cli.scenario == "sigterm":
        result = base.run(cli.out, max_steps=4, callbacks=[SigtermOneProcess(rank=1)], **common)
        extra = {"global_steps": gather_object([result["global_step"]])}
    elif cli.scenario == "uneven":
        uneven = KeepOnProcessOne()
        result = base.run(cli.out, callbacks=[uneven], gradient_accumulation_steps=2, **common)
        extra = {"kept": gather_object([uneven.kept])}
    elif cli.scenario == "nan":
        result = base.run(cli.out, wrap_teacher=NaNTeacherAtCall, **common)
    else:  # buffer
        saving = {"num_iterations": 2, "save_strategy": "steps", "save_steps": 1}
        base.run(cli.out, max_steps=1, **saving, **common)
        checkpoint = os.path.join(cli.output_dir, "checkpoint-1")
        state = PartialState()
        if state.process_index == 1:
            os.remove(buffer_file(checkpoint, 1))
        state.wait_for_everyone()
        result = base.run(cli.out, max_steps=2, resume=checkpoint, **saving, **common)
    if PartialState().is_main_process:
        with open(cli.out, "w") as f:
            json.dump({**result, **extra}, f, indent=1)
    base.finish()


if __name__ == "__main__":
    main()
