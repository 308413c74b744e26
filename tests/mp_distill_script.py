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

from tiny_models import ThreeTurns  # this script's folder is on sys.path

from trl_onpolicy.frozen_models import load_frozen_model
from trl_onpolicy.toy import char_tokenizer
from trl_onpolicy import DistillCallback, OnPolicyDistillConfig, OnPolicyDistillTrainer

torch.set_num_threads(1)

GO_ON_TEMPLATE = (
    "{% for m in messages %}{{ '#' + m['role'][0] + ':' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '#a:' }}{% endif %}"
)
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


def placed_teacher(tok, arch: str, source: str, folder: str, hidden: int = 32, seed: int = 1):
    """The teacher (`seed`, width `hidden`) as a launcher meets it (call it once the config has set up the processes).
    `"memory"`: a model built here; `"disk"`: a path, loaded by the trainer (under ZeRO-3 `from_pretrained` partitions
    it); `"meta"`: saved, then loaded with `load_frozen_model`, which under FSDP's `cpu_ram_efficient_loading` reads the
    weights on the main process only (the others hold meta tensors), so the trainer must broadcast them."""
    from accelerate import PartialState

    state = PartialState()
    if source == "memory":
        return tiny_model(tok, arch, seed=seed, hidden=hidden)
    if source not in ("disk", "meta"):
        raise ValueError(f"unknown teacher source {source!r}")
    if state.is_main_process:
        tiny_model(tok, arch, seed=seed, hidden=hidden).save_pretrained(folder)
        tok.save_pretrained(folder)
    state.wait_for_everyone()
    return folder if source == "disk" else load_frozen_model(folder)


def run(
    out: str,
    per_device_batch_size: int,
    lmbda: float = 0.0,
    max_steps: int = 2,
    arch: str = "llama",
    output_dir: str | None = None,
    teachers: str = "one",
    launcher: str = "ddp",
    teacher_source: str = "memory",
    teacher_hidden: int = 32,
    callbacks: tuple = (),
    wrap_teacher=None,
    resume: str | None = None,
    environment: bool = False,
    **config,
) -> dict:
    """
    Train `max_steps` steps; the main process writes (and every process returns) the summary described above.
    `teachers="mixture"`: two teachers (one wider than the student) mixed per token with weights 0.25 / 0.75;
    `teachers="hidden"`: a wider teacher with hidden-state matching (a learned projection, trained and synchronised like
    the student's weights); `teachers="self"`: a LoRA student (random adapters) distilled from its own base network; `teachers="ema"`: the
    student's EMA (rate 0.5) as its teacher, with a privileged context. `launcher`: `"ddp"`, `"fsdp2"` or `"zero3"` (see `cpu_launchers.py`); `teacher_source`:
    see [`placed_teacher`]; `wrap_teacher`: a function of the teacher model giving the teacher backend; `config`:
    more `OnPolicyDistillConfig` fields; `resume`: a checkpoint to resume from; `environment`: multi-turn rollouts
    with `tiny_models.ThreeTurns`, sampled greedily (so that the transcripts do not depend on the process that writes them).
    """
    import cpu_launchers

    launch = cpu_launchers.config_kwargs(launcher)  # the processes are set up here for ZeRO-3
    tok = char_tokenizer(chat_template=GO_ON_TEMPLATE if environment else None)
    # greedy, and every token ends a turn (a random student would rarely write EOS): three one-token turns
    turns = {"do_sample": False, "eos_token_id": list(range(2, len(tok)))}
    greedy_turns = {"max_completion_length": 30, "generation_kwargs": turns} if environment else {}
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.abspath(out)), "trainer")
    student = tiny_model(tok, arch, seed=0)
    extra, columns, teacher_seed = {}, {"prompt": PROMPTS, "completion": COMPLETIONS}, 1
    if teachers == "mixture":
        extra = {"teacher_mixture": "weighted", "teacher_weights": {"a": 0.25, "b": 0.75}}
    elif teachers == "hidden":
        teacher_hidden, teacher_seed, extra = 48, 2, {"hidden_state_weight": 0.5}
    elif teachers == "ema":  # the student's EMA as its teacher, which sees a privileged context the student does not
        extra = {"teacher_model_kind": "ema", "teacher_update_rate": 0.5}
        columns["privileged_context"] = [f"hint: {c}" for c in COMPLETIONS]
    peft = None
    if teachers == "self":  # a LoRA student whose base network is its teacher; random adapters, so the loss is not 0
        from peft import LoraConfig

        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    args = OnPolicyDistillConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_batch_size,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=1e9,  # no clipping: the grad norm is logged as computed
        lmbda=lmbda,
        logging_steps=1,
        report_to=[],
        seed=0,
        ddp_find_unused_parameters=False,
        **launch,
        **{"max_completion_length": 8, "save_strategy": "no", **extra, **greedy_turns, **config},
    )
    teacher = placed_teacher(tok, arch, teacher_source, os.path.join(output_dir, "teacher"), teacher_hidden,
                             teacher_seed)  # fmt: skip
    teacher_was_meta = any(p.is_meta for p in teacher.parameters()) if not isinstance(teacher, str) else False
    teacher = wrap_teacher(teacher) if wrap_teacher is not None else teacher
    if teachers == "mixture":
        teacher = {"a": teacher, "b": tiny_model(tok, arch, seed=2, hidden=48)}
    teacher = None if teachers in ("self", "ema") else teacher
    recorder = RecordPrompts(tok)
    trainer = OnPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict(columns),
        processing_class=tok,
        callbacks=[recorder, *callbacks],
        peft_config=peft,
        environment_factory=ThreeTurns if environment else None,
    )
    trained = trainer.accelerator.unwrap_model(trainer.model)  # the student, with a projector or LoRA adapters if any
    initial = {n: p.detach().clone().double() for n, p in trained.named_parameters()}
    trainer.train(resume_from_checkpoint=resume)

    prompts = gather_object([recorder.steps])  # one list of steps per process
    final = trainer.accelerator.unwrap_model(trainer.model)
    teacher_model = getattr(trainer.teacher, "model", None)
    result = {
        "num_processes": trainer.accelerator.num_processes,
        "backend": trainer.accelerator.state.backend,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "per_device_batch_size": per_device_batch_size,
        "logs": [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h],
        "prompts": [sorted(p for proc in prompts for p in proc[step]) for step in range(len(prompts[0]))],
        "student_sharded": cpu_launchers.is_sharded(final),
        "teacher_sharded": teacher_model is not None and cpu_launchers.is_sharded(teacher_model),
        "teacher_was_meta": gather_object([teacher_was_meta]),
        "global_step": trainer.state.global_step,
        "weights": {
            n: {"update_norm": (p.double() - initial[n]).norm().item(), "sum": p.double().sum().item()}
            for n, p in cpu_launchers.full_parameters(final).items()
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
    parser.add_argument("--teachers", default="one", choices=["one", "mixture", "hidden", "ema"])
    parser.add_argument("--steps-per-generation", default="1", help="An integer or 'round' (rollout pools).")
    parser.add_argument("--environment", action="store_true", help="multi-turn rollouts with ThreeTurns, greedy")
    cli = parser.parse_args()
    run(cli.out, cli.per_device_batch_size, cli.lmbda, cli.max_steps, cli.arch, cli.output_dir, cli.teachers,
        steps_per_generation=cli.steps_per_generation, environment=cli.environment)  # fmt: skip
    finish()


def finish() -> None:
    """Wait for every process, then leave without the interpreter's teardown. The run's results are written by then;
    under load a process tearing down its C++ state (gloo's threads) now and then aborted the launch with "terminate
    called without an active exception" after training had finished (4 of about 95 two-process runs on two shared
    cores, with or without `destroy_process_group`; none in 33 runs since), failing a test whose training had
    succeeded."""
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
