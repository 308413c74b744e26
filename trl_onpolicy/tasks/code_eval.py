"""pass@k for HumanEval without the Hub: a local stand-in for `evaluate.load("code_eval")`.

lm-eval's `humaneval` task imports `lm_eval/tasks/humaneval/utils.py`, whose first lines call
`evaluate.load("code_eval")`: that fetches the metric's script from the Hub and fails offline, so the task cannot even
be built. [`install_in_lm_eval`] imports that module once with `evaluate.load("code_eval")` answered by
[`LocalCodeEval`], which has the same `compute(references, predictions, k)` contract and result shape. The task's
YAML, prompts, stop sequences and filters are used unchanged.

How it departs from `code_eval`: each candidate program runs in its own `python -I` subprocess (a fresh interpreter,
killed at the timeout) in a temporary directory, instead of a forked worker with a reliability guard. That is process
isolation, not a sandbox: generated code can still touch the file system and network. Like `code_eval`, nothing runs
unless `HF_ALLOW_CODE_EVAL=1`.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..code_execution import run_python

CODE_EVAL_REFUSAL = (
    "HumanEval scores a model by EXECUTING the code it generates on this machine. That code is untrusted: it can "
    "delete files or reach the network. Set HF_ALLOW_CODE_EVAL=1 to allow it (LmEvalCallback(..., "
    "confirm_run_unsafe_code=True) sets it for the evaluation only), preferably inside a container or VM."
)


def estimate_pass_at_k(num_samples: np.ndarray, num_correct: np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k per problem (Chen et al., 2021): 1 - C(n - c, k) / C(n, k), as a stable product."""
    def one(n: int, c: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

    return np.array([one(int(n), int(c)) for n, c in zip(num_samples, num_correct)])


def run_program(program: str, timeout: float = 3.0) -> str:
    """Run `program` in a fresh `python -I` subprocess; returns "passed", "failed" or "timed out"."""
    return run_python(program, timeout).status


class LocalCodeEval:
    """The `compute` of Hugging Face's `code_eval` metric, run locally (see the module docstring)."""

    def __init__(self, num_workers: int | None = None, timeout: float = 3.0):
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)
        self.timeout = timeout

    def compute(self, references, predictions, k=(1, 10, 100), num_workers=None, timeout=None):
        """`predictions[i]` is a list of candidate programs for problem i, `references[i]` its test code.

        Returns `({"pass@k": mean over problems}, {i: [(j, {"passed": bool, "result": str})]})`, like `code_eval`.
        """
        if os.environ.get("HF_ALLOW_CODE_EVAL", "0") != "1":
            raise ValueError(CODE_EVAL_REFUSAL)
        ks = [k] if isinstance(k, int) else list(k)
        jobs = [(i, j, f"{cand}\n{ref}") for i, (cands, ref) in enumerate(zip(predictions, references))
                for j, cand in enumerate(cands)]
        timeout = self.timeout if timeout is None else timeout
        with ThreadPoolExecutor(max_workers=num_workers or self.num_workers) as pool:
            outcomes = list(pool.map(lambda job: run_program(job[2], timeout), jobs))
        results: dict[int, list] = {i: [] for i in range(len(predictions))}
        for (i, j, _), outcome in zip(jobs, outcomes):
            results[i].append((j, {"passed": outcome == "passed", "result": outcome}))
        total = np.array([len(r) for r in results.values()])
        correct = np.array([sum(x["passed"] for _, x in r) for r in results.values()])
        pass_at_k = {f"pass@{kk}": float(estimate_pass_at_k(total, correct, kk).mean())
                     for kk in ks if (total >= kk).all()}
        return pass_at_k, results


HUMANEVAL_UTILS = "lm_eval.tasks.humaneval.utils"


def install_in_lm_eval() -> None:
    """Import lm-eval's `humaneval/utils.py` with `evaluate.load("code_eval")` answered locally (idempotent).

    lm-eval caches the module in `sys.modules` by name and file time, so every humaneval variant that later loads
    `!function utils.pass_at_k` gets this copy, whose `compute_` is a [`LocalCodeEval`].
    """
    import evaluate
    import lm_eval

    module = sys.modules.get(HUMANEVAL_UTILS)
    if module is not None and isinstance(getattr(module, "compute_", None), LocalCodeEval):
        return
    if module is None:
        path = Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "utils.py"
        original_load = evaluate.load

        def load(name, *args, **kwargs):
            return LocalCodeEval() if name == "code_eval" else original_load(name, *args, **kwargs)

        previous = os.environ.get("HF_ALLOW_CODE_EVAL")
        # The module's import runs one fixed self-test ("def add(a,b): return a*b") through the metric.
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
        evaluate.load = load
        try:
            try:
                from lm_eval.tasks._yaml_loader import _load_module_with_cache
            except ImportError:  # pragma: no cover - other lm-eval versions: fall back to a plain import
                import importlib

                module = importlib.import_module(HUMANEVAL_UTILS)
            else:
                module = _load_module_with_cache(path)
        finally:
            evaluate.load = original_load
            if previous is None:
                os.environ.pop("HF_ALLOW_CODE_EVAL", None)
            else:
                os.environ["HF_ALLOW_CODE_EVAL"] = previous
    module.compute_ = LocalCodeEval()
