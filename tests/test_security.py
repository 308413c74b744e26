"""Security: remote code stays off unless asked, generated code runs only when opted in (in a subprocess, with a
timeout), secrets never reach the output folder or the logs, and checkpoints hold their weights as safetensors.

- `trust_remote_code`: `False` by default, and every `from_pretrained` the trainer makes (student, tokenizer, teacher,
  reference model) receives the config's value: recorded by wrapping the `from_pretrained` of the auto classes.
- Code execution: HumanEval-style tasks are refused without `confirm_run_unsafe_code=True`; the metric lm-eval calls
  refuses without `HF_ALLOW_CODE_EVAL=1`; with both, every program runs in its own `python -I` subprocess in a temporary
  folder, and `while True: pass` is killed at the timeout.
- Secrets: `HF_TOKEN` and `TRL_ONPOLICY_TEACHER_API_KEY` set in the environment and `hub_token` set in the config, a
  4-step run against a teacher server that requires the key (so the key is really sent), checkpoints every 2 steps,
  the `CompletionsLogger`, logging every step, `save_model()` and `create_model_card()`; then every byte of every file
  under `output_dir`, every log record and everything written to stdout/stderr is searched for each secret. Two
  leaks were found and fixed in `config.py`: `hub_token` pickled into `training_args.bin` (`transformers.Trainer`
  `torch.save`s the whole config into every checkpoint, and `push_to_hub` uploads it), and the dataclass `repr`
  showing `hub_token`.
- Weights: every checkpoint and the final folder hold `model.safetensors` and no `pytorch_model.bin` or other pickled
  weights; the only pickles are the Trainer's training state (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`) and
  `training_args.bin`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from http_server import thread_server
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, PreTrainedModel

from trl_onpolicy import CompletionsLogger, OnPolicyDistillConfig, OnPolicyDistillTrainer
from trl_onpolicy.eval import CODE_OPT_IN, LmEvalCallback
from trl_onpolicy.round_evaluation import preserved_rng_and_env
from trl_onpolicy.tasks.code_eval import (
    CODE_EVAL_REFUSAL,
    HUMANEVAL_UTILS,
    LocalCodeEval,
    install_in_lm_eval,
    run_program,
)
from trl_onpolicy.teachers import ServerTeacher

SECRETS = {
    "HF_TOKEN": "hf_S3CRETenvTOKEN0zq8",
    "TRL_ONPOLICY_TEACHER_API_KEY": "sk-S3CRETteacherKEY7wv2",
    "hub_token": "hf_S3CREThubTOKEN4kx5",
}
TRAINING_STATE_PICKLES = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}  # the Trainer's; not weights


# --------------------------------------------------------------------------------------------- trust_remote_code
def test_trust_remote_code_is_off_by_default(tmp_path):
    assert OnPolicyDistillConfig.__dataclass_fields__["trust_remote_code"].default is False
    assert OnPolicyDistillConfig(str(tmp_path)).trust_remote_code is False


LOADERS = (AutoModelForCausalLM, AutoConfig, AutoTokenizer, AutoProcessor, PreTrainedModel)


def record_loads(monkeypatch) -> list[tuple[str, object]]:
    """Wrap the `from_pretrained` of the auto classes (and of every model class): record (class, trust_remote_code)."""
    calls = []
    for owner in LOADERS:
        original = owner.from_pretrained.__func__

        def wrapper(cls, *args, __original=original, **kwargs):
            calls.append((cls.__name__, kwargs.get("trust_remote_code", "<not passed>")))
            return __original(cls, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(wrapper))
    return calls


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = tm.tokenizer()
    tm.model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("trust", [None, True], ids=["default", "asked"])
def test_every_load_passes_the_configs_trust_remote_code(saved_model, tmp_path, monkeypatch, trust):
    """Student, tokenizer, teacher and reference model all loaded from a path: each load gets the config's value."""
    calls = record_loads(monkeypatch)
    overrides = {} if trust is None else {"trust_remote_code": trust}
    args = tm.config(tmp_path, reference_model_name_or_path=saved_model, **overrides)
    OnPolicyDistillTrainer(model=saved_model, teacher_model=saved_model, args=args, train_dataset=tm.dataset())
    expected = bool(trust)
    auto_calls = [(name, value) for name, value in calls if name.startswith("Auto")]
    assert [name for name, _ in auto_calls].count("AutoModelForCausalLM") == 2, calls  # teacher and reference
    assert "AutoTokenizer" in {name for name, _ in auto_calls}, calls
    assert all(value is expected for _, value in auto_calls), calls
    assert all(value in (expected, "<not passed>") for _, value in calls), calls  # model classes: never True unasked


# --------------------------------------------------------------------------------------------- code execution
def test_code_tasks_need_the_explicit_opt_in():
    with pytest.raises(ValueError, match=re.escape(CODE_OPT_IN.format(names=["humaneval"]))):
        LmEvalCallback(tasks=["humaneval"])
    LmEvalCallback(tasks=["humaneval"], confirm_run_unsafe_code=True)  # opted in: accepted


def test_the_metric_lm_eval_calls_refuses_without_the_environment_opt_in(monkeypatch):
    """lm-eval's `humaneval` calls `utils.pass_at_k`, whose metric is ours after `install_in_lm_eval`."""
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    install_in_lm_eval()
    utils = sys.modules[HUMANEVAL_UTILS]
    assert isinstance(utils.compute_, LocalCodeEval)
    assert "HF_ALLOW_CODE_EVAL" not in os.environ  # the install's self-test did not leave the opt-in behind
    with pytest.raises(ValueError, match=re.escape(CODE_EVAL_REFUSAL)):
        utils.pass_at_k(references=["assert f() == 1"], predictions=[["def f(): return 1"]], k=[1])
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert utils.pass_at_k(references=["assert f() == 1"], predictions=[["def f(): return 1"]], k=[1]) == {"pass@1": 1}


def test_the_opt_in_sets_the_environment_for_the_evaluation_only(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with preserved_rng_and_env(allow_code=True):
        assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
    with preserved_rng_and_env(allow_code=False):
        assert "HF_ALLOW_CODE_EVAL" not in os.environ


def test_generated_code_runs_in_a_subprocess_that_cannot_hang(monkeypatch, tmp_path):
    probe = tmp_path / "probe.txt"
    program = f"import os; open({str(probe)!r}, 'w').write(f'{{os.getpid()}} {{os.getcwd()}}')"
    assert run_program(program, timeout=30) == "passed"
    pid, cwd = probe.read_text().split(" ", 1)
    assert int(pid) != os.getpid()  # another process
    assert cwd != os.getcwd() and "trl-onpolicy-code-" in cwd and not Path(cwd).exists()  # a temp dir, removed

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    start = time.monotonic()
    scores, results = LocalCodeEval(timeout=1.0).compute(
        references=["", "assert True"], predictions=[["while True: pass"], ["import time; time.sleep(60)"]], k=[1]
    )
    elapsed = time.monotonic() - start
    assert [results[i][0][1]["result"] for i in (0, 1)] == ["timed out", "timed out"]
    assert scores == {"pass@1": 0.0}
    assert elapsed < 15, elapsed  # 1 s timeouts, two at once; slack for a busy machine, far below 60 s


# --------------------------------------------------------------------------------------------- secrets
@contextlib.contextmanager
def keyed_teacher_server(api_key: str):
    """`serve-teacher`'s app around a tiny teacher, requiring `api_key`, served by uvicorn in a thread."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from trl_onpolicy.commands.serve_teacher import create_app

    tok = tm.tokenizer()
    app = create_app(tm.model(tok, seed=1).eval(), tok, api_key=api_key)
    with thread_server(app) as url:
        yield url


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(self.format(record))


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A short run with every secret set; returns (output_dir, text logged or printed, the trainer)."""
    out = tmp_path_factory.mktemp("secret-run")
    records, stream = _Records(), io.StringIO()
    root = logging.getLogger()
    level = root.level
    with pytest.MonkeyPatch.context() as mp, keyed_teacher_server(SECRETS["TRL_ONPOLICY_TEACHER_API_KEY"]) as url:
        mp.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
        mp.setenv("TRL_ONPOLICY_TEACHER_API_KEY", SECRETS["TRL_ONPOLICY_TEACHER_API_KEY"])
        root.addHandler(records)
        root.setLevel(logging.DEBUG)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                tok = tm.tokenizer()
                args = tm.config(
                    out, teacher_model_name_or_path=url, teacher_top_k=5, hub_token=SECRETS["hub_token"],
                    max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1, report_to="none",
                    num_rounds=2, log_level="debug",
                )  # fmt: skip
                trainer = OnPolicyDistillTrainer(
                    model=tm.model(tok), args=args, train_dataset=tm.dataset(), processing_class=tok,
                    callbacks=[CompletionsLogger()],
                )  # fmt: skip
                assert isinstance(trainer.teacher, ServerTeacher)  # the key is really sent, with every request
                trainer.train()
                trainer.save_model()
                trainer.create_model_card()
                print(repr(trainer.teacher), vars(trainer.teacher), str(trainer.args), trainer.args.to_json_string())
        finally:
            root.removeHandler(records)
            root.setLevel(level)
    return out, "\n".join(records.messages) + "\n" + stream.getvalue(), trainer


def _files_with(folder: Path, secret: str) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
    )


def test_secrets_reach_no_file_log_or_model_card(secret_run):
    out, logged, trainer = secret_run
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "README.md" in files and "completions.jsonl" in files and "checkpoint-4/trainer_state.json" in files
    assert "distill" in (out / "README.md").read_text().lower()  # the model card was written, with our section
    assert trainer.state.global_step == 4
    for name, secret in SECRETS.items():
        assert secret not in logged, f"{name} appears in the logs or the console output"
        leaks = _files_with(out, secret)
        assert not leaks, f"{name} appears in {leaks}"
    print(f"\nsecrets checked: {len(SECRETS)} in {len(files)} files and {len(logged):,} characters of logs")


def test_hub_token_is_not_pickled_into_training_args_bin(secret_run):
    out, _, _ = secret_run
    assert _files_with(out, SECRETS["hub_token"]) == []


def test_the_configs_repr_hides_the_hub_token(tmp_path):
    args = tm.config(tmp_path, hub_token=SECRETS["hub_token"])
    assert SECRETS["hub_token"] not in str(args)  # holds: TrainingArguments masks every `*_token` field
    assert SECRETS["hub_token"] not in repr(args)


# --------------------------------------------------------------------------------------------- weights
def test_checkpoints_hold_weights_as_safetensors(secret_run):
    out, _, _ = secret_run
    folders = sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("checkpoint-"))
    assert [p.name for p in folders] == ["checkpoint-2", "checkpoint-4"]
    for folder in [*folders, out]:
        names = {p.name for p in folder.iterdir() if p.is_file()}
        assert "model.safetensors" in names, (folder.name, sorted(names))
        pickles = {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
        expected = {"training_args.bin"} | (TRAINING_STATE_PICKLES if folder != out else set())
        assert pickles == expected, (folder.name, sorted(pickles))
    optimizer = torch.load(folders[-1] / "optimizer.pt", weights_only=True)  # tensors and numbers only
    assert set(optimizer) == {"state", "param_groups"}
