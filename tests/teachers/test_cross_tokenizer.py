"""A teacher of another tokenizer (`CrossTokenizerTeacher`, the spans form, `span_loss.py`): its span measures against
the teacher's own forward pass, the loss against ULD written from the definition, and the trainer end to end (the
toy's BPE student, a byte-level teacher): weights move, the alignment rate is logged, gradient accumulation gives the
step of one big batch; and what it refuses."""

import math

import pytest
import tiny_models as tm
import torch

from trl_onpolicy import CrossTokenizerTeacher, LocalTeacher
from trl_onpolicy.loss import distillation_loss
from trl_onpolicy.span_loss import SpanLoss
from trl_onpolicy.token_alignment import teacher_completion
from trl_onpolicy.toy import build_tokenizer, make_dataset
from trl_onpolicy.trainer_setup import span_loss


@pytest.fixture(scope="module")
def toks():
    student_tok = build_tokenizer()
    student_tok.pad_token = student_tok.pad_token or "<pad>"
    return student_tok, tm.byte_tokenizer()


def batch_of(tok, prompts, completions):
    """`collate`'s layout of token lists."""
    from trl_onpolicy.teachers.cross_tokenizer import _layout

    return _layout(prompts, completions, tok.pad_token_id)


def teacher_logps(model, prompt, completion):
    """From the definition: the teacher's next-token log-probs predicting each completion token, `(C, V)`."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1)


def test_span_measures_are_the_teachers_first_distribution_times_the_rest_as_written(toks):
    student_tok, teacher_tok = toks
    teacher = tm.model(teacher_tok, seed=3)
    prompt = student_tok("Question: 12 + 3?", add_special_tokens=False)["input_ids"]
    completion = student_tok(" 12 + 3 = 15. Café", add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
    cross = CrossTokenizerTeacher(LocalTeacher(teacher), student_tok, teacher_tok, top_k=7)
    scores = cross.score(batch_of(student_tok, [prompt], [completion]))
    t_prompt = teacher_tok(student_tok.decode(prompt), add_special_tokens=False)["input_ids"]
    t_completion, alignment = teacher_completion(student_tok, teacher_tok, completion, {student_tok.eos_token_id},
                                                 teacher_tok.eos_token_id)  # fmt: skip
    logps = teacher_logps(teacher, t_prompt, t_completion)  # (C_t, V_t)
    starts = [a for a, _ in alignment.student]
    assert torch.nonzero(scores.span_length[0])[:, 0].tolist() == starts
    for (a, b), (c, d) in zip(alignment.student, alignment.teacher):
        rest = sum(logps[j, t_completion[j]].item() for j in range(c + 1, d))
        values, ids = logps[c].topk(7)
        assert scores.span_length[0, a].item() == b - a and scores.topk_ids[0, a].tolist() == ids.tolist()
        assert torch.allclose(scores.topk_logps[0, a], values + rest, atol=1e-5)
    assert 0 < cross.alignment_rate < 1  # bytes against BPE words: some one-to-one spans, not all


def test_the_loss_is_uld_of_the_span_measures_over_the_steps_tokens(toks):
    """Against a teacher sharing the student's tokenizer, every span is one token: the loss is the sum over tokens of
    sum_r |sort(q)_r - sort(p)_r| over the top k, divided by the token count."""
    student_tok, _ = toks
    student, teacher = tm.model(student_tok, seed=0), tm.model(student_tok, seed=1)
    prompts = [student_tok(t, add_special_tokens=False)["input_ids"] for t in ("Question: 1 + 2?", "Question: 7?")]
    completions = [student_tok(t, add_special_tokens=False)["input_ids"] for t in (" 1 + 2 = 3", " 7 x 1 = 7.")]
    batch = batch_of(student_tok, prompts, completions)
    k = 5
    scores = CrossTokenizerTeacher(LocalTeacher(teacher), student_tok, student_tok, top_k=k).score(batch)
    mask = batch["completion_mask"].bool()
    assert scores.span_length[mask].tolist() == [1] * int(mask.sum())  # the same tokenizer: one token per span
    hidden = student.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden = hidden[:, -batch["completion_ids"].shape[1] - 1 : -1][mask]  # (N, H)
    sums = distillation_loss(hidden, student.lm_head, scores.flatten(mask), batch["completion_ids"][mask],
                             loss_type="jsd", vocab_size=len(student_tok), num_items=int(mask.sum()), chunk_size=3)
    expected = 0.0
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            q = torch.softmax(student(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1], -1)
        p = teacher_logps(teacher, prompt, completion).exp()
        for t in range(len(completion)):
            expected += (q[t].topk(k).values - p[t].topk(k).values).abs().sum().item()
    assert sums.loss.item() == pytest.approx(expected / int(mask.sum()), rel=1e-4)


def test_the_sampled_loss_is_the_reverse_kl_of_each_spans_text(toks):
    """`loss_type="sampled_reverse_kl"`: per span, log q(text) - log p(text), each model's log-prob of the span's
    text in its own tokens (from the two forward passes), put on the span's first token; its gradient is
    (log q - log p) grad log q(text)."""
    student_tok, teacher_tok = toks
    student, teacher = tm.model(student_tok, seed=0), tm.model(teacher_tok, seed=5)
    prompt = student_tok("Question: 12 + 3?", add_special_tokens=False)["input_ids"]
    completion = student_tok(" 12 + 3 = 15. Café", add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
    batch = batch_of(student_tok, [prompt], [completion])
    scores = CrossTokenizerTeacher(LocalTeacher(teacher), student_tok, teacher_tok, top_k=3).score(batch)
    t_prompt = teacher_tok(student_tok.decode(prompt), add_special_tokens=False)["input_ids"]
    t_completion, alignment = teacher_completion(student_tok, teacher_tok, completion, {student_tok.eos_token_id},
                                                 teacher_tok.eos_token_id)  # fmt: skip
    t_logps = teacher_logps(teacher, t_prompt, t_completion)
    logits = student(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    s_logps = torch.log_softmax(logits, -1)  # (C, V_s)
    expected, surrogate = 0.0, 0.0
    for (a, b), (c, d) in zip(alignment.student, alignment.teacher):
        log_q = sum(s_logps[i, completion[i]] for i in range(a, b))
        log_p = sum(t_logps[j, t_completion[j]].item() for j in range(c, d))
        expected += log_q.item() - log_p
        surrogate = surrogate + (log_q.detach() - log_p) * log_q  # its gradient is the loss's
    mask = batch["completion_mask"].bool()
    hidden = student.model(batch["input_ids"]).last_hidden_state[:, -len(completion) - 1 : -1][mask]
    hidden.retain_grad()
    sums = distillation_loss(hidden, student.lm_head, scores.flatten(mask), batch["completion_ids"][mask],
                             loss_type="sampled_reverse_kl", vocab_size=len(student_tok), num_items=len(completion),
                             span_loss=SpanLoss(sampled=True))  # fmt: skip
    assert sums.loss.item() == pytest.approx(expected / len(completion), rel=1e-5)
    grads = torch.autograd.grad(sums.loss, student.lm_head.weight)[0]
    reference = torch.autograd.grad(surrogate / len(completion), student.lm_head.weight)[0]
    torch.testing.assert_close(grads, reference, rtol=1e-4, atol=1e-6)


def trainer(tmp_path, toks, steps=2, hybrid=False, columns=("prompt",), **overrides):
    student_tok, teacher_tok = toks
    cross = CrossTokenizerTeacher(LocalTeacher(tm.model(teacher_tok, seed=1)), student_tok, teacher_tok,
                                  hybrid=hybrid)  # fmt: skip
    values = {"max_steps": steps, "per_device_train_batch_size": 4, "max_completion_length": 6, "max_length": 96,
              "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0, "temperature": 1.0, **overrides}  # fmt: skip
    return tm.OnPolicyDistillTrainer(
        model=tm.model(student_tok, seed=0), teacher_model=cross, args=tm.config(tmp_path, **values),
        train_dataset=make_dataset(8, seed=1).select_columns(list(columns)), processing_class=student_tok,
    )  # fmt: skip


@pytest.mark.parametrize(("hybrid", "loss_type"), [(False, "jsd"), (True, "jsd"), (False, "sampled_reverse_kl")])
def test_the_trainer_distills_from_a_teacher_of_another_tokenizer(tmp_path, toks, hybrid, loss_type):
    tr = trainer(tmp_path, toks, hybrid=hybrid, loss_type=loss_type)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train()
    logs = tm.step_logs(tr)
    assert all(math.isfinite(log["loss"]) and (log["loss"] > 0 or loss_type == "sampled_reverse_kl") for log in logs)
    assert all(0.0 <= log["alignment_rate"] <= 1.0 for log in logs)
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_gradient_accumulation_gives_the_step_of_one_big_batch(tmp_path, toks):
    """4 x 1 == 2 x 2 on the dataset's completions (the same tokens in both layouts; SGD, so the weights agree too)."""
    layouts = [(4, 1), (2, 2)]
    runs = [trainer(tmp_path / f"{b}x{a}", toks, steps=1, columns=("prompt", "completion"), lmbda=0.0,
                    per_device_train_batch_size=b, gradient_accumulation_steps=a) for b, a in layouts]  # fmt: skip
    for run in runs:
        run.train()
    (log_one,), (log_two,) = (tm.step_logs(run) for run in runs)
    assert log_two["loss"] == pytest.approx(log_one["loss"], rel=1e-5) and log_one["loss"] > 0
    for (name, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_iterations": 2}, (r"^The loss against a teacher of another tokenizer is per span, and takes no "
                                 r"per-token importance weight yet: set `num_iterations=1`")),
        ({"loss_type": "sampled_reverse_kl", "hybrid": True},
         r"^`uld_use_hybrid_loss` compares distributions; `loss_type='sampled_reverse_kl'` compares the sampled text"),
        ({"hidden_state_weight": 1.0}, "the CrossTokenizerTeacher backend returns log-probs only"),
        ({"seq_kd": True, "lmbda": 0.0}, r"^`seq_kd=True` has the teacher write completions, but a teacher of another"),
    ],
)
def test_what_a_teacher_of_another_tokenizer_cannot_do_is_refused(tmp_path, toks, overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, toks, **overrides)


def test_an_alignment_rate_below_the_floor_is_refused_with_the_fix(toks):
    student_tok, teacher_tok = toks
    cross = CrossTokenizerTeacher(LocalTeacher(tm.model(teacher_tok)), student_tok, teacher_tok, min_alignment_rate=0.9)
    words = student_tok("Question: what", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError) as error:
        cross.score(batch_of(student_tok, [words], [student_tok(" 12 + 3", add_special_tokens=False)["input_ids"]]))
    assert str(error.value).startswith("Only 0.0% of the student's tokens align one-to-one with the teacher's, below "
                                       "the floor `min_alignment_rate=0.9`")  # fmt: skip
    assert str(error.value).endswith("Lower the floor to train anyway, or pick a teacher whose tokenizer is closer to "
                                     "the student's.")  # fmt: skip


def test_hybrid_weights_come_both_or_neither(toks):
    student_tok, teacher_tok = toks
    with pytest.raises(ValueError, match=r"^Give both `matched_weight` and `unmatched_weight`, or neither"):
        CrossTokenizerTeacher(LocalTeacher(tm.model(teacher_tok)), student_tok, teacher_tok, hybrid=True,
                              matched_weight=0.5)  # fmt: skip
    cross = CrossTokenizerTeacher(LocalTeacher(tm.model(teacher_tok)), student_tok, teacher_tok, hybrid=True)
    loss = span_loss(cross, tm.config("unused", beta=0.5))
    assert isinstance(loss, SpanLoss) and loss.hybrid and loss.weights()[0] == pytest.approx(len(loss.teacher_ids) / 260)
    with pytest.raises(ValueError, match=r"^The hybrid loss's JSD compares sub-probability measures and needs "
                                         r"0 < beta < 1, got beta=1.0\.$"):  # fmt: skip
        span_loss(cross, tm.config("unused", beta=1.0))


def test_a_served_teacher_of_another_tokenizer_gives_the_local_teachers_spans(toks):
    """The server scores the teacher's own tokens (top-k); the client re-tokenizes and aligns: the spans equal those
    of the same teacher run in this process."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from http_server import thread_server

    from trl_onpolicy.commands.serve_teacher import create_app
    from trl_onpolicy.teachers import ServerTeacher

    student_tok, teacher_tok = toks
    teacher = tm.model(teacher_tok, layers=2, hidden=32, seed=4).eval()
    prompts = [student_tok(t, add_special_tokens=False)["input_ids"] for t in ("Question: 12 + 3?", "Question: 7?")]
    completions = [student_tok(t, add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
                   for t in (" 12 + 3 = 15", " 7 x 2 = 14. Café")]  # fmt: skip
    batch = batch_of(student_tok, prompts, completions)
    local = CrossTokenizerTeacher(LocalTeacher(teacher), student_tok, teacher_tok, top_k=5).score(batch)
    with thread_server(create_app(teacher, teacher_tok)) as url:
        served = CrossTokenizerTeacher(ServerTeacher(url, teacher_tok, timeout=30), student_tok, teacher_tok, top_k=5)
        remote = served.score(batch)
    assert torch.equal(remote.span_length, local.span_length) and torch.equal(remote.topk_ids, local.topk_ids)
    torch.testing.assert_close(remote.topk_logps, local.topk_logps, rtol=1e-4, atol=1e-4)


def test_multi_turn_rollouts_are_refused_up_front(tmp_path, toks):
    student_tok, teacher_tok = toks
    cross = CrossTokenizerTeacher(LocalTeacher(tm.model(teacher_tok)), student_tok, teacher_tok)
    with pytest.raises(ValueError, match=r"^A teacher of another tokenizer \(`CrossTokenizerTeacher`\) scores "
                                         r"single-turn completions only"):  # fmt: skip
        tm.OnPolicyDistillTrainer(model=tm.model(student_tok), teacher_model=cross, args=tm.config(tmp_path),
                                  train_dataset=make_dataset(4).select_columns(["prompt"]), processing_class=student_tok,
                                  environment_factory=tm.ThreeTurns)  # fmt: skip


def test_the_config_field_wraps_the_teacher_and_its_loss(tmp_path, toks):
    """`teacher_tokenizer_name_or_path` (GOLD's name): the teacher model is wrapped, the hybrid settings reach the
    loss, and the run trains."""
    student_tok, teacher_tok = toks
    teacher_tok.save_pretrained(tmp_path / "teacher-tokenizer")
    args = tm.config(tmp_path / "out", teacher_tokenizer_name_or_path=str(tmp_path / "teacher-tokenizer"),
                     uld_use_hybrid_loss=True, uld_hybrid_matched_weight=0.3, uld_hybrid_unmatched_weight=0.7,
                     uld_crossentropy_weight=0.2, uld_distillation_weight=0.9,
                     per_device_train_batch_size=4, max_completion_length=6, max_length=96, teacher_top_k=9)  # fmt: skip
    tr = tm.OnPolicyDistillTrainer(model=tm.model(student_tok), teacher_model=tm.model(teacher_tok, seed=2), args=args,
                                   train_dataset=make_dataset(4, seed=1).select_columns(["prompt"]),
                                   processing_class=student_tok)  # fmt: skip
    assert isinstance(tr.teacher, CrossTokenizerTeacher) and tr.teacher.top_k == 9
    assert len(tr.teacher.teacher_tokenizer) == 260
    loss = tr.student_loss.span_loss
    assert loss.hybrid and loss.weights() == (0.3, 0.7) and len(loss.student_ids) == len(loss.teacher_ids) > 0
    assert (loss.crossentropy_weight, loss.distillation_weight) == (0.2, 0.9)
    tr.train()
    assert 0.0 <= tm.step_logs(tr)[0]["alignment_rate"] <= 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"uld_use_hybrid_loss": True}, ("`uld_use_hybrid_loss` set, but there is no teacher of another tokenizer: "
                                         "set `teacher_tokenizer_name_or_path`")),
        ({"teacher_tokenizer_name_or_path": "t", "uld_hybrid_matched_weight": 0.5},
         "`uld_hybrid_matched_weight` and `uld_hybrid_unmatched_weight` must be both None or both >= 0, got (0.5, None)."),
        ({"teacher_tokenizer_name_or_path": "t", "uld_min_alignment_rate": 1.5},
         "`uld_min_alignment_rate` must be in [0, 1], got 1.5."),
        ({"teacher_tokenizer_name_or_path": "t", "uld_crossentropy_weight": 0.0, "uld_distillation_weight": 0.0},
         "`uld_crossentropy_weight` and `uld_distillation_weight` must be >= 0 and not both 0, got (0.0, 0.0)."),
    ],
)  # fmt: skip
def test_uld_settings_are_checked_in_the_config(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        tm.config(tmp_path, **overrides)
    assert message in str(error.value)


def test_a_teacher_the_field_cannot_wrap_is_refused(tmp_path, toks):
    student_tok, teacher_tok = toks
    args = tm.config(tmp_path, teacher_tokenizer_name_or_path="unused")
    with pytest.raises(ValueError, match=r"^`teacher_tokenizer_name_or_path` wraps one teacher model or server of "
                                         r"another tokenizer, got dict\."):  # fmt: skip
        tm.OnPolicyDistillTrainer(model=tm.model(student_tok), teacher_model={"a": tm.model(teacher_tok)}, args=args,
                                  train_dataset=make_dataset(4).select_columns(["prompt"]), processing_class=student_tok)


def test_a_vocabulary_mismatch_names_the_field(tmp_path, toks):
    student_tok, teacher_tok = toks
    with pytest.raises(ValueError, match="or set `teacher_tokenizer_name_or_path` to the teacher's tokenizer"):
        tm.OnPolicyDistillTrainer(model=tm.model(student_tok), teacher_model=tm.model(teacher_tok),
                                  args=tm.config(tmp_path), train_dataset=make_dataset(4).select_columns(["prompt"]),
                                  processing_class=student_tok)  # fmt: skip


def test_a_conversational_prompt_reaches_the_teacher_in_its_own_chat_template(tmp_path):
    """The student reads `#u:...` (its template); the teacher of another tokenizer reads its own `<|user|>` markers,
    in its own tokens: exactly `apply_chat_template` of the teacher's tokenizer, never the student's rendering."""
    student_tok, teacher_tok = tm.tokenizer(), tm.byte_tokenizer()
    teacher_tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip
    inner = LocalTeacher(tm.model(teacher_tok, seed=1))
    seen, score = [], inner.score

    def recording(inputs, **kwargs):
        width = inputs["input_ids"].shape[1] - inputs["completion_ids"].shape[1]
        for ids, mask in zip(inputs["input_ids"][:, :width].tolist(), inputs["attention_mask"][:, :width].tolist()):
            seen.append([t for t, m in zip(ids, mask) if m])
        return score(inputs, **kwargs)

    inner.score = recording
    cross = CrossTokenizerTeacher(inner, student_tok, teacher_tok)
    questions = ["add 2 and 3", "say hi", "count to 4", "name a color"]
    data = tm.Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})
    args = tm.config(tmp_path, per_device_train_batch_size=4, max_completion_length=4, max_length=96)
    tm.OnPolicyDistillTrainer(model=tm.model(student_tok), teacher_model=cross, args=args, train_dataset=data,
                              processing_class=student_tok).train()  # fmt: skip
    expected = {tuple(teacher_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                      tokenize=True)["input_ids"]) for q in questions}  # fmt: skip
    assert len(seen) == 4 and {tuple(p) for p in seen} <= expected
    assert teacher_tok.decode(seen[0]).startswith("<|user|>")


def test_gold_weights_need_a_teacher_of_another_tokenizer(tmp_path):
    tok = tm.tokenizer()
    with pytest.raises(ValueError, match=r"^`uld_crossentropy_weight` and `uld_distillation_weight` weigh the loss "
                                         r"against a teacher of another tokenizer, but this teacher shares the "
                                         r"student's"):
        tm.trainer(tmp_path, tok=tok, uld_crossentropy_weight=0.5)
