"""`trl-onpolicy eval`: score a saved student with the eval hook, and write the report.

    trl-onpolicy eval MODEL [--tasks gsm8k,mmlu] [--limit 200] [--output-dir eval-out] [--teacher TEACHER]

MODEL is a folder written by `trainer.save_model()` (a full model, or a LoRA adapter folder whose
`adapter_config.json` names the base model) or a Hub id when online. The tasks are the eval hook's
([`~trl_onpolicy.eval.LmEvalCallback`]): `toy_gsm8k` and `toy_mmlu` always run offline, `gsm8k`, `mmlu` and `humaneval`
offline with the `eval-data` extra (HumanEval executes generated code: `--confirm-run-unsafe-code`), any other lm-eval
task with `--include-path` or the Hub. With `--teacher`, the teacher is scored on the same tasks and the report adds the
fraction of the teacher's score the student reaches.

Writes `report.json`, `report.md`, `scores.png` (as the per-round report, with one row) and `eval.json` (every metric
lm-eval returned, the settings and the timings) into `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `eval` flags."""
    parser.add_argument("model", help="Saved student: a model folder, a LoRA adapter folder, or a Hub id (online).")
    parser.add_argument(
        "--tasks", default="gsm8k,mmlu", help="Comma-separated lm-eval tasks (toy_gsm8k, toy_mmlu, gsm8k, mmlu, ...)."
    )
    parser.add_argument("--limit", type=float, default=None, help="Examples per task (a float < 1: a fraction).")
    parser.add_argument("--output-dir", default="eval-out", help="Where report.json, report.md, eval.json go.")
    parser.add_argument("--teacher", default=None, help="Also score this model (a reference row in the report).")
    parser.add_argument("--num-fewshot", type=int, default=None, help="Shots per task (default: the task's own).")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size.")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="Cap on generated tokens (generation tasks).")
    parser.add_argument("--apply-chat-template", action="store_true", help="Render prompts with the chat template.")
    parser.add_argument("--include-path", action="append", default=None, help="Folder of extra task YAMLs.")
    parser.add_argument(
        "--confirm-run-unsafe-code", action="store_true", help="Allow tasks that execute generated code (HumanEval)."
    )
    parser.add_argument("--toy-eval-size", type=int, default=200, help="Problems in the toy tasks' eval split.")
    parser.add_argument("--dtype", default="auto", help="Model dtype: auto, float32, bfloat16 or float16.")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's seeds.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")


def load_model(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """A causal LM (or a PEFT model from an adapter folder) and its tokenizer, on CUDA when available, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    tokenizer_path = path
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
        if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer_path = model.peft_config["default"].base_model_name_or_path
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _saved_step(path: str) -> int:
    """The optimizer step the model was saved at (from `trainer_state.json`), or 0 when unknown."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f).get("global_step", 0))
    except (OSError, ValueError):
        return 0


def run(args: argparse.Namespace) -> dict:
    """Score `args.model` (and `args.teacher`), write the report; returns the `eval.json` dict."""
    from ..model_paths import check_model_name

    check_model_name(args.model, "student", "MODEL")  # both before any loading
    check_model_name(args.teacher, "teacher", "--teacher")
    import torch

    from ..eval import LmEvalCallback
    from ..reports import format_table, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SystemExit("--tasks names no task.")
    hook = LmEvalCallback(
        tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot, include_path=args.include_path,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code, apply_chat_template=args.apply_chat_template,
        gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None, batch_size=args.batch_size,
        seed=args.seed, task_dir=os.path.join(args.output_dir, "lm_eval_tasks"), toy_eval_size=args.toy_eval_size,
    )  # fmt: skip
    results = {"model": args.model, "teacher": args.teacher, "tasks": tasks, "limit": args.limit}
    teacher_scores = None
    if args.teacher:
        start = time.perf_counter()
        model, tokenizer = load_model(args.teacher, args.dtype, args.trust_remote_code)
        out = hook.evaluate(model, tokenizer, output_dir=args.output_dir)
        teacher_scores = out["scores"]
        results["teacher_results"] = {**out, "seconds": round(time.perf_counter() - start, 3)}
        del model
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype, args.trust_remote_code)
    out = hook.evaluate(model, tokenizer, output_dir=args.output_dir)
    seconds = round(time.perf_counter() - start, 3)
    results["student_results"] = {**out, "seconds": seconds}

    # One report row, labelled with the saved model's folder
    label = f"student, {os.path.basename(os.path.normpath(args.model))}"
    history = [{"round": 1, "label": label, "step": _saved_step(args.model), "kind": "round", "scores": out["scores"],
                "metrics": out["metrics"], "seconds": seconds}]  # fmt: skip
    write_report(args.output_dir, history, teacher_scores)
    with open(os.path.join(args.output_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"{args.model}:")
    print(format_table(history, teacher_scores))
    print(f"Wrote report.json, report.md, scores.png and eval.json to {args.output_dir}.")
    return results
