"""A two-step distillation run on tiny models, launched by `tests/test_multiprocess.py` with and without accelerate.

    # one process, global batch 4
    python tests/mp_distill_script.py --out one.json --per-device-batch-size 4
    # two CPU processes over gloo, the same global batch 4
    CUDA_VISIBLE_DEVICES= ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/mp_distill_script.py --out two.json --per-device-batch-size 2

Why `--multi_gpu` and not `--cpu`: in accelerate 1.15, `accelerate launch --cpu --num_processes 2` goes to the simple
launcher, which starts ONE process unless an MPI hostfile is given (`--mpirun_hostfile`). `--multi_gpu` is the torchrun
launcher; with no CUDA device visible and `use_cpu=True` its processes join over gloo on the CPU. The JSON records
`num_processes` and `backend`, so a launch that silently ran one process cannot pass for two.

The main process writes a JSON with, per logged step, the loss, grad norm and divergence; the prompts each step used
(gathered from every process); and, per parameter, the norm of its total update and its final sum. Plain SGD keeps the
final weights a linear function of the gradients, so the comparison is not at the mercy of Adam's first step, which
turns a gradient of 1e-9 and one of -1e-9 into opposite updates of full size.

Everything is built from configs with fixed seeds (student seed 0, teacher seed 1); nothing is downloaded.
"""

import argparse
import json
import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trl_onpolicy.toy import char_tokenizer
from trl_onpolicy import DistillCallback, OnPolicyDistillConfig, OnPolicyDistillTrainer

torch.set_num_threads(1)

PROMPTS = ["what is 1+2?", "say hi", "count 123", "abc", "2*3=", "spell cat", "is 7 odd?", "end"]
COMPLETIONS = [" 3", " hi there", " 4 5", " d", " 6", " c a t", " yes", " ok."]


def tiny_model(tok, arch: str = "llama", seed: int = 0, hidden: int = 32):
    """A one-layer causal LM: Llama (rotary positions) or GPT-2 (learned absolute positions)."""
    torch.manual_seed(seed)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok), n_embd=hidden, n_layer=1, n_head=2, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, **ids,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class RecordPrompts(DistillCallback):
    """Collects, per step, the prompts of this process's rollouts."""

    def __init__(self, tok):
        self.tok, self.steps = tok, []

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        self.steps.append(self.tok.batch_decode(rollouts.prompt_ids, skip_special_tokens=True))


def run(
    out: str,
    per_device_batch_size: int,
    lmbda: float = 0.0,
    max_steps: int = 2,
    arch: str = "llama",
    output_dir: str | None = None,
    teachers: str = "one",
) -> dict:
    """
    Train `max_steps` steps; the main process writes (and every process returns) the summary described above.
    `teachers="mixture"`: two teachers (one wider than the student) mixed per token with weights 0.25 / 0.75;
    `teachers="hidden"`: a wider teacher with hidden-state matching (a learned projection, trained and synchronised like
    the student's weights).
    """
    tok = char_tokenizer()
    student, teacher = tiny_model(tok, arch, seed=0), tiny_model(tok, arch, seed=1)
    extra, columns = {}, {"prompt": PROMPTS, "completion": COMPLETIONS}
    if teachers == "mixture":
        teacher = {"a": teacher, "b": tiny_model(tok, arch, seed=2, hidden=48)}
        extra = {"teacher_mixture": "weighted", "teacher_weights": {"a": 0.25, "b": 0.75}}
    elif teachers == "hidden":
        teacher = tiny_model(tok, arch, seed=2, hidden=48)
        extra = {"hidden_state_weight": 0.5}
    args = OnPolicyDistillConfig(
        output_dir=output_dir or os.path.join(os.path.dirname(os.path.abspath(out)), "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=per_device_batch_size,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=1e9,  # no clipping: the grad norm is logged as computed
        lmbda=lmbda,
        max_completion_length=8,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        use_cpu=True,
        ddp_find_unused_parameters=False,
        **extra,
    )
    recorder = RecordPrompts(tok)
    trainer = OnPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict(columns),
        processing_class=tok,
        callbacks=[recorder],
    )
    initial = {n: p.detach().clone().double() for n, p in student.named_parameters()}  # with a projector, if any
    trainer.train()

    prompts = gather_object([recorder.steps])  # one list of steps per process
    final = trainer.accelerator.unwrap_model(trainer.model)
    result = {
        "num_processes": trainer.accelerator.num_processes,
        "backend": trainer.accelerator.state.backend,
        "per_device_batch_size": per_device_batch_size,
        "logs": [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h],
        "prompts": [sorted(p for proc in prompts for p in proc[step]) for step in range(len(prompts[0]))],
        "weights": {
            n: {
                "update_norm": (p.detach().double() - initial[n]).norm().item(),
                "sum": p.detach().double().sum().item(),
            }
            for n, p in final.named_parameters()
        },
    }
    if trainer.accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON written by the main process.")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--per-device-batch-size", type=int, default=2)
    parser.add_argument("--lmbda", type=float, default=0.0, help="0: dataset completions (deterministic).")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--teachers", default="one", choices=["one", "mixture", "hidden"])
    cli = parser.parse_args()
    run(cli.out, cli.per_device_batch_size, cli.lmbda, cli.max_steps, cli.arch, cli.output_dir, cli.teachers)


if __name__ == "__main__":
    main()
