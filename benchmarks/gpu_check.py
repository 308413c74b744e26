"""The GPU measurement of issue 13, in one run of under 10 minutes on one H200: ours against TRL's DistillationTrainer
at Qwen2.5 shapes in bf16, the loss alone against TRL's chunked divergence kernel, a one-GPU FSDP2 launch, QLoRA.

    python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json          # on a GPU: every part, ~8 minutes
    python3 benchmarks/gpu_check.py --quick --device cpu --out x.json   # every part, tiny, on CPU (a smoke test)
    python3 benchmarks/gpu_check.py --quick --parts loss                # tiny, on the GPU: Triton and our loss run

On a lent GPU machine (the device tool: Python 3.12, torch 2.11+cu130, transformers 5.17, accelerate 1.15, peft; no
trl, datasets or lm-eval, and nothing can be downloaded there), first prepare the wheels here, once, from the root of
the checkout that the tool sends: `bash benchmarks/gpu_wheels.sh` (writes `.whl/`, 18 MiB, ignored by git). Then,
with the device tool's `run`, `carry: [".whl"]`:

    # sanity, ~1 minute (timeout_s 180): versions, and the loss part at tiny sizes on the GPU
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; python3 -c "import torch, transformers, accelerate, peft, trl, datasets, pyarrow, fsspec, bitsandbytes, trl_onpolicy as t; print(torch.__version__, torch.cuda.get_device_name(), transformers.__version__, accelerate.__version__, peft.__version__, trl.__version__, datasets.__version__, pyarrow.__version__, fsspec.__version__, bitsandbytes.__version__, t.__version__)" && python3 benchmarks/gpu_check.py --quick --parts loss --out $OUT/sanity.json

    # the measurement, ~8-9 minutes (timeout_s 600); <sha>: the commit measured (the machine's copy has no git)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; set -o pipefail; python3 benchmarks/gpu_check.py --commit <sha> --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

A machine stays warm 30 s after a call: a second call later than that starts a fresh one (a minute or more of the
session's device time).

Parts, each guarded (a part that fails records its error and the rest go on; the JSON is rewritten after each part,
so a run cut short keeps what finished), in this order, each with a share of `--budget-s` (unused time rolls over):

- `loss`: the loss alone, forward + backward on the same `(N, H)` bf16 hidden states and bf16 heads (N = 16 x 512,
  student H = 896, teacher H = 1,536, V = 151,936): ours (`distillation_loss` with `LinearHead`s, JSD beta 0.5) against
  TRL's `_chunked_divergence_loss` (`ChunkedDivergenceFunction`: Triton on CUDA, its torch fallback on CPU), in
  alternation after two warm-ups each; seconds by CUDA events; working memory = `max_memory_allocated` above what
  was allocated before; the two losses and gradients compared.
- `training`: whole optimizer steps of `OnPolicyDistillTrainer` against `trl.DistillationTrainer`: random-weight
  Qwen2 models shaped like Qwen2.5-0.5B (student) and Qwen2.5-1.5B (teacher) with the 151,936 vocabulary, bf16 weights
  and `bf16=True`; batch 16 prompts x 512 completion tokens (no accumulation); on-policy (ours `lmbda=1`); JSD beta
  0.5; AdamW lr 1e-5, constant, clip 1.0; sampling temperature 1, no top-k / top-p; no gradient checkpointing; the
  rest as `vs_trl.py` (`common_args`). Blocks alternate (ours, TRL, ours, TRL), each 1 warm-up + 5 timed steps.
  Random weights rarely emit EOS, so completions run to 512 tokens: the mean length is recorded.
- `fsdp2`: our trainer under `torchrun --nproc_per_node 1` with accelerate's FSDP2 plugin, its fields those of
  `examples/accelerate_configs/fsdp2.yaml` (`gpu_check_fsdp2.py`); a few steps; whether the student's parameters are
  `DTensor`s. On CPU it needs a patch of accelerate's state (in that file).
- `qlora`: a 4-bit NF4 student (bitsandbytes) + LoRA (r 16, all linear layers), the bf16 teacher; a few steps; whether
  the adapters moved. Recorded as skipped, with the reason, where bitsandbytes does not import.

Per part: median step seconds with min / quartiles / max and every timed step, peak memory
(`torch.cuda.max_memory_allocated` over the timed steps; not measured on CPU), completion tokens/s, ratios ours/TRL.
Step times are taken between `on_step_end` callbacks with the device synchronised (`vs_trl.Probe`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")

import torch
from _gpu_loss import part_loss  # benchmarks/_gpu_*.py, _models.py (the script's folder is on sys.path)
from _gpu_training import GiB, free_memory, part_training, recorded, summarize, train_block
from _models import QWEN25_SHAPES, QWEN25_VOCAB, qwen2
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model shapes and run lengths: `FULL` on a GPU, `QUICK` for the CPU smoke test."""

    student: dict
    teacher: dict
    vocab: int
    batch: int  # prompts per optimizer step (one micro-batch)
    completion: int  # max_completion_length
    blocks: int  # alternating blocks per trainer in `training`
    timed_steps: int  # per block, after `warmup_steps`
    loss_repeats: int  # timed forward + backward per implementation in `loss`
    few_steps: int  # timed steps of `fsdp2` and `qlora`
    budget_s: float  # the whole run's time budget
    name: str = "full"
    warmup_steps: int = 1

    @property
    def loss_tokens(self) -> int:
        return self.batch * self.completion


# 64 wide: bitsandbytes' CPU kernels quantise rows in blocks of 64
TINY_STUDENT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1}  # fmt: skip
TINY_TEACHER = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1}  # fmt: skip
FULL = Sizes(QWEN25_SHAPES["0.5B"], QWEN25_SHAPES["1.5B"], QWEN25_VOCAB, batch=16, completion=512, blocks=2,
             timed_steps=5, loss_repeats=10, few_steps=3, budget_s=460)  # fmt: skip
QUICK = Sizes(TINY_STUDENT, TINY_TEACHER, 512, batch=4, completion=8, blocks=2, timed_steps=2, loss_repeats=3,
              few_steps=1, budget_s=300, name="quick")  # fmt: skip
# (part, share of the budget); a part's deadline is the run's start plus the shares up to and including its own
SHARES = (("loss", 0.08), ("training", 0.62), ("fsdp2", 0.16), ("qlora", 0.14))


# ------------------------------------------------------------------------------------------------------- fsdp2
def part_fsdp2(sizes: Sizes, device: str, dtype, deadline: float, workdir: str) -> dict:
    """`gpu_check_fsdp2.py` under `torchrun --nproc_per_node 1`: its JSON, or its exit status and its log's end."""
    out = Path(workdir) / "fsdp2.json"
    seconds = max(deadline - time.perf_counter(), 1.0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(HERE / "gpu_check_fsdp2.py"), "--out", str(out), "--device", device, "--dtype", str(dtype)[6:],
           "--seconds", f"{seconds:.0f}", "--workdir", workdir]  # fmt: skip
    cmd += ["--quick"] if sizes.name == "quick" else []
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crash in C++ leaves the Python stack in the log
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)  # fmt: skip
    try:
        log = proc.communicate(timeout=seconds + 120)[0]  # a step's slack past the deadline
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its worker
        log = proc.communicate()[0]
    if proc.returncode != 0 or not out.exists():
        return {"error": f"the FSDP2 launch exited with {proc.returncode}: {failure(log)}", "log_tail": log[-6000:]}
    launch = "torchrun --standalone --nproc_per_node 1 benchmarks/gpu_check_fsdp2.py"
    return {"launch": launch, **json.loads(out.read_text())}


def failure(log: str) -> str:
    """What a failed worker died of: a crash's signal and innermost Python frames, or its last exception line."""
    lines = log.splitlines()
    if "Current thread" in log:  # faulthandler's dump of a fatal signal
        start = next(i for i, line in enumerate(lines) if line.startswith("Current thread"))
        crash = next((line for line in lines if line.startswith("Fatal Python error")), "a fatal signal")
        return f"{crash}, in: " + " <- ".join(line.strip() for line in lines[start + 1 : start + 5])
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line) and "ChildFailed" not in line]
    return errors[-1] if errors else "no error line (see log_tail)"


# ------------------------------------------------------------------------------------------------------- qlora
class AdapterWatch(TrainerCallback):
    """Whether the LoRA weights moved over the run and the 4-bit base weights did not (compared at its ends)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        after = dict(model.named_parameters())
        moved = {n: not torch.equal(self.before[n], after[n]) for n in self.before}
        lora = [n for n in moved if "lora_" in n]
        base = [n for n in moved if "lora_" not in n]
        self.result = {
            "lora_tensors": len(lora), "lora_tensors_moved": sum(moved[n] for n in lora),
            "base_tensors": len(base), "base_tensors_moved": sum(moved[n] for n in base),
            "quantized_tensors": sum(p.dtype == torch.uint8 for p in after.values()),
        }  # fmt: skip


def part_qlora(sizes: Sizes, device: str, dtype, deadline: float, workdir: str) -> dict:
    """Our trainer on a 4-bit NF4 student with LoRA adapters (bitsandbytes), the teacher in `dtype`; a few steps."""
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a library that fails to load its CUDA binary
        return {"skipped": f"bitsandbytes does not import here: {type(e).__name__}: {e}"}
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def quantized_student():
        path = f"{workdir}/qlora-base"
        qwen2(0, sizes.student, sizes.vocab, dtype, device).save_pretrained(path)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        student = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                       device_map={"": 0 if device == "cuda" else "cpu"})  # fmt: skip
        if device == "cpu":  # on CPUs with avx512_bf16 an eval-mode forward (generation) repacks the 4-bit weights
            # for a kernel that passes no gradient and fails on a bias (../shared/ARCHITECTURE.md, "Launchers on CPU")
            for module in student.modules():
                if isinstance(module, bitsandbytes.nn.Linear4bit):
                    module.support_avx512bf16_for_cpu = False
        return student

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    watch = AdapterWatch()
    result = train_block("ours", sizes, device, dtype, deadline, workdir, sizes.few_steps,
                         make_student=quantized_student, callbacks=[watch], trainer_kwargs={"peft_config": lora})
    result = summarize([result], sizes.batch)
    result.update(watch.result, bitsandbytes=bitsandbytes.__version__, lora="r 16, alpha 32, all-linear; NF4 base")
    return result


# -------------------------------------------------------------------------------------------------------- main
PARTS = {"loss": part_loss, "training": part_training, "fsdp2": part_fsdp2, "qlora": part_qlora}


def guarded(name: str, sizes: Sizes, device: str, dtype, deadline: float, workdir: str) -> dict:
    """One part; an exception is recorded (type, message, end of the traceback) instead of ending the run."""
    start = time.perf_counter()
    result = recorded(PARTS[name], sizes, device, dtype, deadline, workdir)
    free_memory(device)
    result["wall_s"] = time.perf_counter() - start
    return result


def environment(device: str, commit: str | None) -> dict:
    """Versions and machine (`chunking.environment`), the other packages involved, and the GPU."""
    from importlib import metadata

    info = {}
    try:
        from chunking import environment as base

        info.update(base())
    except Exception as e:  # noqa: BLE001 (trl or git missing: record what is there)
        info["environment_error"] = f"{type(e).__name__}: {e}"
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "triton"):
        try:
            info.setdefault("packages", {})[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info.setdefault("packages", {})[name] = None
    info["commit"] = commit or info.get("commit")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_GiB": props.total_memory / GiB, "cuda": torch.version.cuda}  # fmt: skip
    return info


def settings(sizes: Sizes, device: str, dtype, budget_s: float) -> dict:
    return {
        "sizes": dataclasses.asdict(sizes), "device": device, "dtype": str(dtype), "budget_s": budget_s,
        "student": "Qwen2 shaped like Qwen2.5-0.5B" if sizes.name == "full" else "tiny Qwen2",
        "teacher": "Qwen2 shaped like Qwen2.5-1.5B" if sizes.name == "full" else "tiny Qwen2",
        "weights": "random (seeds 0 and 1), tied heads", "tokenizer": "character tokenizer (55 ids), models padded",
        "both trainers": "bf16=(dtype is bfloat16), JSD beta 0.5, temperature 1, top_k 0, top_p 1, AdamW "
        "(adamw_torch) lr 1e-5 constant, clip 1.0, no gradient checkpointing, gradient_accumulation_steps 1 "
        "(vs_trl.common_args)",
        "ours": "OnPolicyDistillConfig(lmbda=1.0, loss_type='jsd'), loss defaults (tiles)",
        "trl": "trl.DistillationConfig (on-policy by design), shuffle_dataset=False",
    }  # fmt: skip


def outcome(label: str, r: dict) -> str | None:
    """`label: ERROR ...` or `label: skipped: ...` where `r` is a failure or a skip, else None."""
    if "error" in r:
        return f"{label}: ERROR {r['error']}"[:400]
    return f"{label}: skipped: {r['skipped']}" if "skipped" in r else None


def step_line(label: str, r: dict) -> str:
    s = r["step_s"]
    peak = "n/a" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f} GiB"
    return (f"{label}: median step {s['median']:.3f} s (n={s['n']}, {s['min']:.3f}-{s['max']:.3f}), "
            f"{r['completion_tokens_per_s']:.0f} tok/s, len {r['mean_completion_length']:.1f}, "
            f"peak {peak}")  # fmt: skip


def summary_lines(parts: dict) -> list[str]:
    """A short table of what the parts measured (the device tool returns the end of the output)."""
    lines = []
    for name, r in parts.items():
        if outcome(name, r):
            lines.append(outcome(name, r))
        elif name == "loss":
            for k in ("ours", "trl"):
                t, working = r[k]["seconds"], r[k].get("working_GiB", float("nan"))
                lines.append(f"loss {k}: median {t['median'] * 1e3:.1f} ms (n={t['n']}), working {working:.2f} GiB, "
                             f"loss {r[k]['loss']:.6f}")  # fmt: skip
            lines.append(f"loss ours/trl: {r['ratios_ours_over_trl']}; {r['trl_kernel']}; agreement {r['agreement']}")
        elif name == "training":
            lines += [outcome(f"training {k}", r[k]) or step_line(f"training {k}", r[k]) for k in ("ours", "trl")]
            lines.append(f"training ours/trl: {r.get('ratios_ours_over_trl')}")
        else:
            lines.append(step_line(name, r))
            keys = ("all_parameters_dtensor", "distributed_type", "lora_tensors_moved", "base_tensors_moved")
            lines += [f"{name}: {k} = {r[k]}" for k in keys if k in r]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="the JSON (default: $OUT/gpu_check.json, else results/)")
    parser.add_argument("--quick", action="store_true", help="tiny models, small vocabulary, few steps")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run (default 460 s; quick 300 s)")
    parser.add_argument("--commit", default=None, help="the commit measured (the device machine's copy has no git)")
    parser.add_argument("--workdir", default=None)
    cli = parser.parse_args(argv)
    if cli.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; pass --device cpu (with --quick) to run on the CPU")
    sizes, dtype = QUICK if cli.quick else FULL, getattr(torch, cli.dtype)
    budget = cli.budget_s or sizes.budget_s
    out = Path(cli.out or Path(os.environ.get("OUT", HERE / "results")) / "gpu_check.json")
    workdir = cli.workdir or tempfile.mkdtemp(prefix="gpu-check-")
    if cli.device == "cpu":
        torch.set_num_threads(1)
    result = {"settings": settings(sizes, cli.device, dtype, budget),
              "environment": environment(cli.device, cli.commit), "parts": {}}  # fmt: skip
    start, share = time.perf_counter(), 0.0
    for name, part_share in SHARES:
        share += part_share
        if name in cli.parts:
            print(f"{name} ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
            result["parts"][name] = guarded(name, sizes, cli.device, dtype, start + share * budget, workdir)
            result["wall_s"] = time.perf_counter() - start
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(["", f"{result['environment'].get('gpu', {}).get('name', cli.device)}, {sizes.name} sizes, "
                      f"{result['wall_s']:.0f} s", *summary_lines(result["parts"]), f"wrote {out}"]))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
