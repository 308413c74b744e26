"""A short distillation run for the kill / SIGTERM / resume tests (`tests/test_resume.py`), one process.

    python tests/resume_script.py --output-dir D --max-steps 6 [--step-sleep 0.5] [--resume] [--out result.json]

Tiny Llama student (seed 0) and teacher (seed 1), on-policy (`lmbda=1`: the student samples, so the RNG state must
resume exactly), adaptive loss temperature, 2 rounds, a checkpoint every step, and an eval-like callback with a
per-round history (`RoundHistory`), whose state must survive. `--step-sleep` widens each step so a test can kill the
process between checkpoints. The result JSON holds the per-step losses and a digest of the final weights.
"""

import argparse
import json
import os
import sys
import time

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_models as tm
import torch

from trl_onpolicy import DistillCallback

torch.set_num_threads(1)


class RoundHistory(DistillCallback):
    """A per-round history with `state_dict` / `load_state_dict`, like the eval hook's."""

    def __init__(self, step_sleep: float = 0.0):
        self.history, self.step_sleep = [], step_sleep

    def on_round_end(self, args, state, control, round_index, **kwargs):
        self.history.append({"round": round_index, "step": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.step_sleep)

    def state_dict(self):
        return {"history": list(self.history)}

    def load_state_dict(self, state):
        self.history = list(state["history"])


def run(output_dir: str, max_steps: int, resume=None, step_sleep: float = 0.0, save_steps: int = 1) -> dict:
    tok = tm.tokenizer()
    hook = RoundHistory(step_sleep)
    trainer = tm.trainer(
        output_dir, tm.model(tok, seed=0), tm.model(tok, seed=1), tok, callbacks=[hook], lmbda=1.0,
        max_steps=max_steps, num_rounds=2, save_strategy="steps", save_steps=save_steps, learning_rate=1e-2,
        loss_temperature_schedule="adaptive", temperature_start=2.0, target_teacher_entropy=1.0,
        train_dataset=tm.dataset(n=16),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    weights = {n: p.detach().double().sum().item() for n, p in trainer.model.named_parameters()}
    return {
        "losses": {h["step"]: h["loss"] for h in tm.step_logs(trainer)},
        "temperatures": {h["step"]: h["loss_temperature"] for h in tm.step_logs(trainer)},
        "history": hook.history,
        "weights": weights,
        "global_step": trainer.state.global_step,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default=None)
    cli = parser.parse_args()
    result = run(cli.output_dir, cli.max_steps, True if cli.resume else None, cli.step_sleep)
    if cli.out:
        with open(cli.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
