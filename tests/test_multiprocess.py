"""Multi-process training (issue 2, item 11): two CPU processes over gloo give the gradient of one big batch.

The loss divides by the step's completion-token count on all processes and multiplies by the process count (DDP
averages gradients), so 2 processes x batch 2 must give the same loss, grad norm and weights as 1 process x batch 4.

Data order: accelerate replaces the Trainer's random sampler by a seeded one that draws the same permutation in every
process and hands consecutive per-device batches to the processes in turn, so with `max_steps=2` and 8 rows, step 1 of
the 2-process run uses the same 4 rows as step 1 of the 1-process run (split 2 + 2). The script records each step's
prompts from every process and the test checks that, too.

How the processes are launched, and why not with `--cpu`: see `tests/mp_distill_script.py`.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mp_distill_script as script
import psutil
import pytest
import torch
from datasets import Dataset

from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer
from trl_onpolicy.rollouts import Rollouts

SCRIPT = Path(__file__).with_name("mp_distill_script.py")
TIMEOUT_S = 300  # a hang (a collective one process never reaches) fails here instead of stalling CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(tmp_path: Path, *script_args: str, script: Path = SCRIPT) -> dict:
    """Run `script` under `accelerate launch` with two CPU processes; return the main process's JSON."""
    out = tmp_path / "two.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(script), "--out", str(out), "--output-dir", str(tmp_path / "trainer"), *script_args,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # on a hang the workers go too (torchrun starts them in sessions of their own): no orphan keeps a core busy
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            process.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"2-process run did not finish in {TIMEOUT_S} s (hang?). stderr tail:\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"2-process run failed ({proc.returncode}):\n{stderr[-5000:]}"
    result = json.loads(out.read_text())
    result["seconds"] = time.perf_counter() - start
    assert result["num_processes"] == 2 and result["backend"] == "gloo", (result["num_processes"], result["backend"])
    return result


@pytest.mark.parametrize("teachers", ["one", "mixture", "hidden", "ema"])
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, teachers):
    """lmbda=0 (dataset completions): loss, grad norm and weights of 2 x batch 2 equal those of 1 x batch 4 (with one
    teacher; two teachers mixed per token; hidden-state matching with a learned projection, whose weights must agree
    too; and the student's own EMA as its teacher, moved after each step on every process alike)."""
    two = launch_two_processes(tmp_path, "--per-device-batch-size", "2", "--lmbda", "0", "--teachers", teachers)
    one = script.run(
        str(tmp_path / "one.json"), per_device_batch_size=4, lmbda=0.0, output_dir=str(tmp_path / "one"),
        teachers=teachers,
    )  # fmt: skip
    assert one["num_processes"] == 1

    assert_same_training(one, two, teachers)


def assert_same_training(one: dict, two: dict, teachers: str = "one") -> None:
    """The same rows at each step, and the same loss, grad norm, divergence and final weights (summaries of
    `mp_distill_script.run`)."""
    assert one["prompts"] == two["prompts"], "the two runs did not see the same rows at each step"
    assert len(one["logs"]) == len(two["logs"]) == 2
    keys = {"one": [], "ema": [], "mixture": ["teacher/a/divergence", "teacher/b/tokens"],
            "hidden": ["hidden_state_distance"]}  # fmt: skip
    for a, b in zip(one["logs"], two["logs"]):
        for key in ("loss", "grad_norm", "divergence", *keys[teachers]):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (a["step"], key, a[key], b[key])
        assert a["completion_length"] == b["completion_length"]
    if teachers == "hidden":
        assert any("hidden_state_projector" in name for name in one["weights"])
    for name, w in one["weights"].items():
        v = two["weights"][name]
        # SGD update norms agree to float32 rounding of the weights (~1e-6 relative for the smallest updates).
        assert math.isclose(w["update_norm"], v["update_norm"], rel_tol=1e-4, abs_tol=1e-9), (name, w, v)
        assert math.isclose(w["sum"], v["sum"], rel_tol=1e-6, abs_tol=1e-6), (name, w, v)
    assert sum(w["update_norm"] for w in one["weights"].values()) > 1e-3, "the weights did not move: a vacuous test"


def test_two_processes_match_one_process_with_multi_turn_rollouts(tmp_path):
    """lmbda=1 with an environment (three turns, each answered by a user message) and greedy sampling: each process
    writes its rows' transcripts, the same as one process writes them, and trains only on the student's turns; loss,
    grad norm, divergence, completion length (drawn tokens only) and final weights of 2 x batch 2 equal 1 x batch 4."""
    two = launch_two_processes(tmp_path, "--per-device-batch-size", "2", "--lmbda", "1", "--environment")
    one = script.run(str(tmp_path / "one.json"), per_device_batch_size=4, lmbda=1.0, output_dir=str(tmp_path / "one"),
                     environment=True)  # fmt: skip
    assert_same_training(one, two)
    assert all(log["multi_turn/turns"] == 3 for log in one["logs"] + two["logs"])  # three turns, every rollout
    assert all(log["multi_turn/drawn_fraction"] < 1 for log in one["logs"])  # with context between the turns


def test_two_processes_on_policy_completes(tmp_path):
    """lmbda=1: each process samples its own completions (lengths differ) and no collective hangs."""
    two = launch_two_processes(tmp_path, "--per-device-batch-size", "2", "--lmbda", "1")
    assert len(two["logs"]) == 2
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in two["logs"])
    assert [len(p) for p in two["prompts"]] == [4, 4]  # 2 prompts per process per step


def test_loss_of_a_row_does_not_depend_on_the_padding_of_its_batch(tmp_path):
    """
    Per-process batches are padded separately from the one-process batch, so a row's loss must not depend on how much
    left padding its batch-mates give it. Llama's rotary positions are shift-invariant; GPT-2's learned absolute
    positions are not, unless the positions are counted over real tokens (as `generate` counts them).
    """
    tok = script.char_tokenizer()
    trainer = OnPolicyDistillTrainer(
        model=script.tiny_model(tok, "gpt2", seed=0),
        teacher_model=script.tiny_model(tok, "gpt2", seed=1),
        args=OnPolicyDistillConfig(output_dir=str(tmp_path), lmbda=0.0, report_to=[], max_completion_length=8),
        train_dataset=Dataset.from_dict({"prompt": ["abc", "what is 1+2? say it"], "completion": [" d", " 3"]}),
        processing_class=tok,
    )
    short, long = trainer.train_dataset[0], trainer.train_dataset[1]

    def loss_sum(rows) -> float:
        rollouts = Rollouts([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], "dataset")
        batch = trainer.score(rollouts)
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(1.0)).item()

    alone = loss_sum([short]) + loss_sum([long])
    together = loss_sum([short, long])  # `short` gets 16 columns of left padding here
    assert math.isclose(alone, together, rel_tol=1e-5), (alone, together)
