"""`benchmarks/gpu_check.py` (issue 13's GPU measurement) at tiny sizes on CPU: every part runs and writes numbers, or
its failure is recorded, so that the script cannot rot between the sessions that are lent a GPU.

One run of `gpu_check.py --quick --device cpu` (bf16 weights, as on the GPU) serves every test here (~50 s on a shared
2-core machine); each test reads one part of its JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
PARTS = ("loss", "training", "fsdp2", "qlora")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # this checkout's package, not another
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def no_error(part: dict) -> None:
    if "error" in part:
        pytest.fail(part.get("traceback") or part.get("log_tail") or part["error"])


def assert_steps(r: dict, n: int) -> None:
    """Timed steps with their spread, tokens/s at the median step, and the mean completion length."""
    s = r["step_s"]
    assert s["n"] == n == len(r["all_step_s"])
    assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert r["completion_tokens_per_s"] == pytest.approx(r["completion_tokens_per_step"] / s["median"])
    assert 1 <= r["mean_completion_length"] <= 8  # quick: max_completion_length 8 (EOS is 1 in 512 per token)
    assert r["peak_GiB"] is None  # device memory is measured on CUDA only


def test_report_names_settings_environment_and_every_part(report):
    assert report["settings"]["device"] == "cpu" and report["settings"]["dtype"] == "torch.bfloat16"
    assert report["settings"]["sizes"]["name"] == "quick"
    assert {"torch", "transformers", "accelerate", "peft", "trl"} <= set(report["environment"]["packages"])
    assert all(report["environment"]["packages"][k] for k in ("torch", "transformers", "trl"))
    assert tuple(report["parts"]) == PARTS
    assert all(part["wall_s"] > 0 for part in report["parts"].values())


def test_loss_alone_ours_equals_trls_kernel(report):
    """Our tiled loss and TRL's chunked divergence (its torch fallback on CPU) on the same bf16 inputs: the same JSD
    and gradients within bf16 round-off, both timed."""
    r = report["parts"]["loss"]
    no_error(r)
    assert r["trl_kernel"].startswith("torch fallback")
    for name in ("ours", "trl"):
        assert r[name]["seconds"]["n"] == 3 and r[name]["seconds"]["median"] > 0
        assert 0 < r[name]["loss"] < 0.7  # a JSD at beta 0.5 is below log 2
    assert r["agreement"]["loss_relative_difference"] < 1e-3
    assert r["agreement"]["grad_hidden_relative_difference"] < 2e-2
    assert r["agreement"]["grad_head_relative_difference"] < 2e-2
    assert r["ratios_ours_over_trl"]["median_s"] == pytest.approx(
        r["ours"]["seconds"]["median"] / r["trl"]["seconds"]["median"]
    )


def test_training_ours_and_trl_in_alternating_blocks(report):
    r = report["parts"]["training"]
    assert "error" not in r
    for name in ("trl", "ours"):
        no_error(r[name])
        assert len(r[name]["blocks"]) == 2 and not r[name]["stopped_early"]
        assert_steps(r[name], 4)  # 2 blocks x 2 timed steps, after a warm-up step each
        assert all(len(b["losses"]) == 3 for b in r[name]["blocks"])
    assert r["ratios_ours_over_trl"]["median_step_s"] == pytest.approx(
        r["ours"]["step_s"]["median"] / r["trl"]["step_s"]["median"]
    )


def test_fsdp2_launch_shards_the_student(report):
    """torchrun with the FSDP2 plugin of examples/accelerate_configs/fsdp2.yaml: accelerate runs FSDP and every
    parameter of the student is a DTensor."""
    r = report["parts"]["fsdp2"]
    no_error(r)
    assert r["distributed_type"] == "DistributedType.FSDP" and r["num_processes"] == 1
    assert r["all_parameters_dtensor"] and r["parameters"] > 0
    assert r["fsdp_config"]["version"] == 2
    assert r["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]
    assert_steps(r, 1)


def test_qlora_trains_the_adapters_only(report):
    r = report["parts"]["qlora"]
    no_error(r)
    assert r["quantized_tensors"] > 0
    assert r["lora_tensors_moved"] > 0 and r["base_tensors_moved"] == 0
    assert_steps(r, 1)
