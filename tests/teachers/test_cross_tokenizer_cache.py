"""A teacher cache built for a teacher of another tokenizer: it stores the spans form in the student's positions (the
teacher's top-k over its own vocabulary at each span's first student token, the span's length, the text's
log-prob), reads back exactly what the live `CrossTokenizerTeacher` gives, and training from it equals training from
the live teacher without the teacher in memory."""

import json

import pytest
import tiny_models as tm
import torch

from trl_onpolicy import CrossTokenizerTeacher, LocalTeacher, OnPolicyDistillTrainer, TeacherCache, build_teacher_cache
from trl_onpolicy.rollouts import Rollouts, collate
from trl_onpolicy.toy import build_tokenizer, make_dataset

K = 7


@pytest.fixture(scope="module")
def toks():
    student_tok = build_tokenizer()
    student_tok.pad_token = student_tok.pad_token or "<pad>"
    return student_tok, tm.byte_tokenizer()


def data():
    return make_dataset(6, seed=2).select_columns(["prompt", "completion"])


def build(tmp_path, toks, **lengths):
    student_tok, teacher_tok = toks
    return build_teacher_cache(tm.model(teacher_tok, seed=1), data(), student_tok, str(tmp_path / "cache"), top_k=K,
                               teacher_tokenizer=teacher_tok, **lengths)  # fmt: skip


def test_the_cache_reads_back_what_the_live_teacher_gives(tmp_path, toks):
    student_tok, teacher_tok = toks
    cache = build(tmp_path, toks)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["spans"] is True and manifest["vocab_size"] is None and manifest["teacher_tokenizer"]["fingerprint"]
    rows = [(student_tok(r["prompt"])["input_ids"], student_tok(r["completion"], add_special_tokens=False)["input_ids"]
             + [student_tok.eos_token_id]) for r in data()]  # fmt: skip
    batch = collate(Rollouts([p for p, _ in rows], [c for _, c in rows], "dataset"), student_tok.pad_token_id)
    live = CrossTokenizerTeacher(LocalTeacher(tm.model(teacher_tok, seed=1)), student_tok, teacher_tok, top_k=K)
    want, got = live.score(batch, top_k=K), cache.score(batch, top_k=K)
    real = batch["completion_mask"].bool()
    assert torch.equal(got.span_length[real], want.span_length[real]) and got.span_length.sum() > 0
    starts = want.span_length > 0  # what the loss reads: each span's first token
    assert torch.equal(got.topk_ids[starts], want.topk_ids[starts])
    torch.testing.assert_close(got.topk_logps[starts], want.topk_logps.float()[starts])
    torch.testing.assert_close(got.token_logps[real], want.token_logps.float()[real], equal_nan=True)
    assert torch.isinf(got.topk_logps[real & ~starts]).all()


def test_training_from_the_cache_equals_the_live_teacher(tmp_path, toks):
    student_tok, teacher_tok = toks

    def train(folder, teacher_model, **overrides):
        args = tm.config(folder, lmbda=0.0, teacher_top_k=K, max_steps=2, per_device_train_batch_size=3,
                         max_completion_length=48, max_length=160, learning_rate=1e-2, **overrides)  # fmt: skip
        student = tm.model(student_tok, seed=0)
        tr = OnPolicyDistillTrainer(model=student, teacher_model=teacher_model, args=args, train_dataset=data(),
                                    processing_class=student_tok)  # fmt: skip
        tr.train()
        return tm.step_logs(tr), {k: v.detach().clone() for k, v in student.named_parameters()}

    build(tmp_path, toks, max_prompt_length=112, max_completion_length=48)
    logs_cache, params_cache = train(tmp_path / "a", None, teacher_model_name_or_path=str(tmp_path / "cache"))
    live = CrossTokenizerTeacher(LocalTeacher(tm.model(teacher_tok, seed=1)), student_tok, teacher_tok, top_k=K)
    logs_live, params_live = train(tmp_path / "b", live)
    assert [log["loss"] for log in logs_cache] == pytest.approx([log["loss"] for log in logs_live], rel=1e-5)
    for name, value in params_live.items():
        torch.testing.assert_close(params_cache[name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(params_cache[k], v) for k, v in tm.model(student_tok, seed=0).state_dict().items()
               if k in params_cache)  # fmt: skip


def test_the_field_is_refused_with_a_cache(tmp_path, toks):
    student_tok, teacher_tok = toks
    build(tmp_path, toks)
    teacher_tok.save_pretrained(tmp_path / "teacher-tokenizer")
    args = tm.config(tmp_path / "out", lmbda=0.0, teacher_model_name_or_path=str(tmp_path / "cache"),
                     teacher_tokenizer_name_or_path=str(tmp_path / "teacher-tokenizer"))  # fmt: skip
    with pytest.raises(ValueError, match=r"^`teacher_tokenizer_name_or_path` wraps a live teacher, but the teacher is a "
                                         r"cache\. .* train from it without `teacher_tokenizer_name_or_path`\.$"):
        OnPolicyDistillTrainer(model=tm.model(student_tok), args=args, train_dataset=data(), processing_class=student_tok)
    assert isinstance(TeacherCache(tmp_path / "cache", student_tok), TeacherCache)


def test_the_command_builds_it_with_the_students_tokenizer(tmp_path, toks, capsys):
    from trl_onpolicy.commands import cli

    student_tok, teacher_tok = toks
    tm.model(teacher_tok, seed=1).save_pretrained(tmp_path / "teacher")
    teacher_tok.save_pretrained(tmp_path / "teacher")
    student_tok.save_pretrained(tmp_path / "student")
    data().to_json(tmp_path / "rows.jsonl")
    argv = ["cache-teacher", str(tmp_path / "teacher"), str(tmp_path / "rows.jsonl"), str(tmp_path / "out"), "--top-k",
            str(K), "--student-tokenizer", str(tmp_path / "student"), "--max-length", "160",
            "--max-completion-length", "48"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "Cached 6 rows" in capsys.readouterr().out
    built = TeacherCache(tmp_path / "out", student_tok)  # found by the student's tokens
    reference = build(tmp_path, toks, max_prompt_length=112, max_completion_length=48)
    assert built.spans and len(built) == len(reference) == 6
