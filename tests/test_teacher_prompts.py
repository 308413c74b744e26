"""Privileged context: the teacher's own prompt, composed, tokenized, aligned with the student's completion tokens,
and used by the trainer (scores, `seq_kd`), the eval loss and the teacher cache.

The alignment tests compare against a naive reference written from the definition: each row alone, unpadded, the
teacher's log-softmax over `teacher prompt + completion` at the positions that predict the completion tokens.
"""

import logging
import re

import pytest
import tiny_models as tm
import torch
from datasets import Dataset

from trl_onpolicy import OnPolicyDistillTrainer
from trl_onpolicy.prompts import prepare_dataset
from trl_onpolicy.rollouts import Rollouts, collate, teacher_inputs
from trl_onpolicy.teacher_prompts import (
    BOTH_COLUMNS_ERROR,
    add_teacher_prompt_ids,
    check_template,
    teacher_prompt,
    teacher_prompt_ids,
)
from trl_onpolicy.teachers import EnsembleTeacher, LocalTeacher
from trl_onpolicy.teachers.cache_build import SAME_ROW_ERROR, build_teacher_cache

TEMPLATE = "{prompt}\n\n{privileged_context}"
SYSTEM = {"role": "system", "content": "be brief"}


def naive_token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """`(c,)` log p_teacher(completion[t] | prompt + completion[:t]), one unpadded row."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (p + c, V)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logps[positions, torch.tensor(completion)]


# ------------------------------------------------------------------------------------------ composing the prompt
def test_plain_prompt_goes_through_the_template():
    row = {"prompt": "2+3=?", "privileged_context": "answer: 5"}
    assert teacher_prompt(row, TEMPLATE) == "2+3=?\n\nanswer: 5"
    assert teacher_prompt(row, "Hint: {privileged_context}\n{prompt}") == "Hint: answer: 5\n2+3=?"
    messages = [{"role": "user", "content": "answer: 5"}, {"role": "assistant", "content": "(checked)"}]
    assert teacher_prompt({**row, "privileged_context": messages}, TEMPLATE) == "2+3=?\n\nanswer: 5\n(checked)"


def test_conversational_prompt_gets_the_context_in_its_last_user_turn():
    prompt = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"},
              {"role": "user", "content": "2+3=?"}]  # fmt: skip
    composed = teacher_prompt({"prompt": prompt, "privileged_context": "5"}, TEMPLATE)
    assert composed == [*prompt[:3], {"role": "user", "content": "2+3=?\n\n5"}]
    assert prompt[3]["content"] == "2+3=?"  # the row itself is not edited
    messages = [SYSTEM, {"role": "user", "content": "2+3=?"}, {"role": "assistant", "content": "5"}]
    assert teacher_prompt({"messages": messages, "privileged_context": "5"}, TEMPLATE) == [
        SYSTEM, {"role": "user", "content": "2+3=?\n\n5"}]  # fmt: skip


def test_teacher_prompt_column_is_used_as_given_and_rows_without_either_get_none():
    assert teacher_prompt({"prompt": "a", "teacher_prompt": "whole"}, TEMPLATE) == "whole"
    given = [SYSTEM, {"role": "user", "content": "q"}]
    assert teacher_prompt({"prompt": "a", "teacher_prompt": given}, TEMPLATE) == given
    assert teacher_prompt({"prompt": "a", "privileged_context": None, "teacher_prompt": None}, TEMPLATE) is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "teacher_prompt": "t", "privileged_context": "c"}, BOTH_COLUMNS_ERROR),
        ({"prompt": [SYSTEM], "privileged_context": "c"},
         "the prompt has no message with role 'user' (roles: ['system']). Give the row a `teacher_prompt`"),
        ({"prompt": "a", "privileged_context": 3},
         "A row's `privileged_context` must be a string or a list of messages, got int (3)."),
        ({"prompt": "a", "teacher_prompt": 3}, "A row's `teacher_prompt` must be a string or a list of messages"),
    ],
)  # fmt: skip
def test_bad_rows_are_refused(row, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        teacher_prompt(row, TEMPLATE)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{prompt}", "lacks {privileged_context}: it must place both"),
        ("context only", "lacks {prompt} and {privileged_context}"),
        ("{prompt} {answer} {privileged_context}", "cannot be filled (KeyError: 'answer'): it may hold only"),
        ("{prompt} {privileged_context} {", "cannot be filled (ValueError: "),
    ],
)
def test_bad_templates_are_refused_by_the_config(tmp_path, template, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_template(template)
    with pytest.raises(ValueError, match=re.escape(message)):
        tm.config(tmp_path, teacher_prompt_template=template)


def test_a_template_without_the_column_it_fills_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=re.escape("`teacher_prompt_template` is set ('Hint: {privileged_context}\\n"
                                                   "{prompt}') but the train dataset has no `privileged_context` "
                                                   "column to fill it with (columns: ['prompt', 'completion'])")):  # fmt: skip
        tm.trainer(tmp_path, teacher_prompt_template="Hint: {privileged_context}\n{prompt}")


# ------------------------------------------------------------------------------------------ tokenizing it
def test_teacher_prompt_ids_are_tokenized_as_a_student_prompt():
    tok = tm.tokenizer()
    plain = {"prompt": "2+3=?", "privileged_context": "5"}
    assert teacher_prompt_ids(plain, tok, TEMPLATE) == tok("2+3=?\n\n5")["input_ids"]
    chat = {"prompt": [{"role": "user", "content": "2+3=?"}], "privileged_context": "5"}
    expected = tok.apply_chat_template([{"role": "user", "content": "2+3=?\n\n5"}], add_generation_prompt=True,
                                       tokenize=True)  # fmt: skip
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert teacher_prompt_ids(chat, tok, TEMPLATE) == list(expected)
    assert tok.decode(teacher_prompt_ids(chat, tok, TEMPLATE)) == "#u:2+3=?\n\n5\n#a:"
    assert teacher_prompt_ids({"prompt": "a"}, tok, TEMPLATE) == []


def test_dataset_column_added_only_with_a_privileged_column_and_cut_from_the_left(caplog):
    tok = tm.tokenizer()
    plain = prepare_dataset(tm.dataset(), tok, 56, 8)
    assert add_teacher_prompt_ids(plain, tok, TEMPLATE, 56) is plain
    rows = Dataset.from_dict({"prompt": ["ab", "cd", "ef"], "completion": [" x", " y", " z"],
                              "privileged_context": ["0123456789", None, "q"]})  # fmt: skip
    with caplog.at_level(logging.WARNING):
        out = add_teacher_prompt_ids(prepare_dataset(rows, tok, 8, 8), tok, TEMPLATE, 8)
    full = tok("ab\n\n0123456789")["input_ids"]
    assert out[0]["teacher_prompt_ids"] == full[-8:] and out[0]["teacher_prompt_truncated"]
    assert out[1]["teacher_prompt_ids"] == [] and out[2]["teacher_prompt_ids"] == tok("ef\n\nq")["input_ids"]
    assert "1 of 3 teacher prompts (prompt + privileged context) in the train dataset are longer" in caplog.text


# ------------------------------------------------------------------------------------------ alignment
def rollouts_with_teacher_prompts(tok):
    """Four rollouts: teacher prompts longer, shorter, absent (the student's own) and much longer than the student's."""
    prompts = [tok(p)["input_ids"] for p in ("what is 1+2?", "say hi", "go", "abc")]
    completions = [tok(c)["input_ids"] + [tok.eos_token_id] for c in (" 3", " hi there", " stop now", " d")]
    teacher = [tok("what is 1+2?\n\nit is 3")["input_ids"], tok("hi")["input_ids"], [],
               tok("abc\n\nthe alphabet goes on with d e f g")["input_ids"]]  # fmt: skip
    rows = [{"teacher_prompt_ids": t, "other": i} for i, t in enumerate(teacher)]
    return Rollouts(prompts, completions, "student", rows=rows), [t or p for t, p in zip(teacher, prompts)]


def test_local_teacher_scores_each_completion_after_its_own_teacher_prompt():
    tok = tm.tokenizer()
    model = tm.model(tok, layers=2, seed=1)
    rollouts, expected_prompts = rollouts_with_teacher_prompts(tok)
    student_in = collate(rollouts, tok.pad_token_id)
    inputs = teacher_inputs(rollouts, student_in, tok.pad_token_id)
    assert inputs["completion_ids"] is student_in["completion_ids"]  # the student's tokens are the targets
    assert inputs["input_ids"].shape[1] - student_in["completion_ids"].shape[1] == max(map(len, expected_prompts))
    for micro in (None, 1, 3):  # one pass, and row groups each cut to their own longest teacher prompt
        scores = LocalTeacher(model, micro_batch_size=micro).score(inputs, need="token")
        for i, (prompt, completion) in enumerate(zip(expected_prompts, rollouts.completion_ids)):
            reference = naive_token_logps(model, prompt, completion)
            torch.testing.assert_close(scores.token_logps[i, : len(completion)], reference, rtol=0, atol=1e-5)
    own = LocalTeacher(model).score(student_in, need="token").token_logps
    assert not torch.allclose(own[0, :2], scores.token_logps[0, :2])  # the context changes what the teacher says


def test_routed_teachers_each_score_after_the_teacher_prompt():
    tok = tm.tokenizer()
    models = {"a": tm.model(tok, seed=1), "b": tm.model(tok, layers=2, seed=2)}
    rollouts, expected_prompts = rollouts_with_teacher_prompts(tok)
    for i, row in enumerate(rollouts.rows):
        row["teacher"] = "ab"[i % 2]
    inputs = teacher_inputs(rollouts, {**collate(rollouts, tok.pad_token_id), "rows": rollouts.rows}, tok.pad_token_id)
    teachers = {name: LocalTeacher(model) for name, model in models.items()}
    scores = EnsembleTeacher(teachers).score(inputs, top_k=5)
    for i, (prompt, completion) in enumerate(zip(expected_prompts, rollouts.completion_ids)):
        reference = naive_token_logps(models["ab"[i % 2]], prompt, completion)
        torch.testing.assert_close(scores.token_logps[i, : len(completion)], reference, rtol=0, atol=1e-5)


def test_without_teacher_prompts_the_student_inputs_are_used_as_they_are():
    tok = tm.tokenizer()
    rollouts = Rollouts([[5, 6], [7]], [[8, 2], [9, 9, 2]], "student", rows=[{"teacher_prompt_ids": []}, {}])
    student_in = collate(rollouts, tok.pad_token_id)
    assert teacher_inputs(rollouts, student_in, tok.pad_token_id) is student_in


# ------------------------------------------------------------------------------------------ the trainer
def privileged_dataset(n: int = 8) -> Dataset:
    data = tm.dataset(n=n)
    return data.add_column("privileged_context", [f"the answer is{c}" for c in data["completion"]])


def test_trainer_scores_after_the_teacher_prompt_and_the_reference_after_the_students(tmp_path):
    tok = tm.tokenizer()
    trainer = tm.trainer(tmp_path, tok=tok, train_dataset=privileged_dataset(), per_device_train_batch_size=4)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch, rollouts, _ = trainer.make_step_batch(rows)
    teacher = trainer.teacher.model
    tokens = batch.teacher.reduce(batch.completion_ids).token_logps  # (B, C)
    for i, row in enumerate(rollouts.rows):
        completion = rollouts.completion_ids[i]
        assert row["teacher_prompt_ids"] == tok(rows[i]["prompt"] + "\n\n" + rows[i]["privileged_context"])["input_ids"]
        reference = naive_token_logps(teacher, row["teacher_prompt_ids"], completion)
        torch.testing.assert_close(tokens[i, : len(completion)], reference, rtol=0, atol=1e-5)
    assert batch.input_ids.shape[1] == max(map(len, rollouts.prompt_ids)) + batch.completion_ids.shape[1]


def test_seq_kd_teacher_writes_from_its_own_prompt(tmp_path):
    tok = tm.tokenizer()
    trainer = tm.trainer(tmp_path, tok=tok, train_dataset=privileged_dataset(), lmbda=0.0, seq_kd=True)
    asked = []

    class Recording:
        def sample(self, prompt_ids, generation_config, tokenizer):
            asked.extend(prompt_ids)
            return trainer.student_sampler.sample(prompt_ids, generation_config, tokenizer)

    trainer.teacher_sampler = Recording()
    rows = [trainer.train_dataset[i] for i in range(2)]
    rollouts = trainer.make_rollouts(rows, "teacher")
    assert asked == [list(r["teacher_prompt_ids"]) for r in rows]
    assert rollouts.prompt_ids == [list(r["prompt_ids"]) for r in rows]  # the student learns from its own prompt


def test_one_step_trains_and_the_context_changes_the_loss(tmp_path):
    losses = {}
    for name, data in (("with", privileged_dataset()), ("without", tm.dataset())):
        trainer = tm.trainer(tmp_path / name, train_dataset=data)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        losses[name] = tm.step_logs(trainer)[0]["loss"]
    assert losses["with"] != pytest.approx(losses["without"], rel=1e-4)


def test_eval_loss_uses_the_teacher_prompts(tmp_path):
    data = privileged_dataset(4)
    runs = {}
    for name, eval_data in (("with", data), ("without", data.remove_columns("privileged_context"))):
        tok = tm.tokenizer()
        trainer = OnPolicyDistillTrainer(tm.model(tok, seed=0), teacher_model=tm.model(tok, seed=1),
                                         args=tm.config(tmp_path / name), train_dataset=data, eval_dataset=eval_data,
                                         processing_class=tok)  # fmt: skip
        runs[name] = trainer.evaluate()["eval_loss"]
    assert runs["with"] != pytest.approx(runs["without"], rel=1e-4)


# ------------------------------------------------------------------------------------------ the teacher cache
def test_cache_holds_the_scores_after_the_teacher_prompt(tmp_path):
    tok, data = tm.tokenizer(), privileged_dataset(4)
    teacher = tm.model(tok, seed=1)
    cache = build_teacher_cache(teacher, data, tok, str(tmp_path / "cache"), top_k=5, max_prompt_length=56,
                                max_completion_length=8, batch_size=3)  # fmt: skip
    rows = add_teacher_prompt_ids(prepare_dataset(data, tok, 56, 8), tok, TEMPLATE, 56)
    rollouts = Rollouts([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], "dataset")
    cached = cache.score(collate(rollouts, tok.pad_token_id), top_k=5)  # looked up by the student's view
    for i, row in enumerate(rows):
        reference = naive_token_logps(teacher, row["teacher_prompt_ids"], row["completion_ids"])
        n = len(row["completion_ids"])
        torch.testing.assert_close(cached.token_logps[i, :n], reference, rtol=0, atol=1e-5)


def test_cache_refuses_one_student_row_with_two_teacher_prompts(tmp_path):
    tok = tm.tokenizer()
    data = Dataset.from_dict({"prompt": ["ab", "ab"], "completion": [" x", " x"], "privileged_context": ["1", "2"]})
    with pytest.raises(ValueError, match=re.escape(SAME_ROW_ERROR)):
        build_teacher_cache(tm.model(tok, seed=1), data, tok, str(tmp_path / "cache"), top_k=5)
