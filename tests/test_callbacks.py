"""Callbacks (`callbacks.py`): what `CompletionsLogger` writes, against log-probs computed naively."""

import copy

import pytest
import tiny_models as tm
import torch


def test_completions_logger(tmp_path):
    import json

    from trl_onpolicy import CompletionsLogger

    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0), tm.model(tok, seed=1)
    initial_student = copy.deepcopy(student)
    tr = tm.trainer(tmp_path, student, teacher, tok, callbacks=[CompletionsLogger()], lmbda=0.0, max_steps=2)
    tr.train()
    lines = (tmp_path / "completions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4  # 2 steps x batch 2
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    for r in records:
        assert {"prompt", "completion", "student_mean_logp", "teacher_mean_logp"} <= r.keys()
        index = tm.PROMPTS.index(r["prompt"])
        assert r["completion"] == tm.COMPLETIONS[index]
        ids = tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(r["prompt"])["input_ids"])

        def mean_logp(model, ids=ids, n_prompt=n_prompt):  # mean log-prob of the completion tokens, naively
            with torch.no_grad():
                logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, n_prompt - 1 : -1].double(), -1)
            return logps.gather(-1, torch.tensor(ids[n_prompt:])[:, None]).mean().item()

        assert r["teacher_mean_logp"] == pytest.approx(mean_logp(teacher), rel=1e-5)  # the teacher never changes
        if r["step"] == 1:  # scored before the first update
            assert r["student_mean_logp"] == pytest.approx(mean_logp(initial_student), rel=1e-5)
        assert r["student_mean_logp"] != r["teacher_mean_logp"]
