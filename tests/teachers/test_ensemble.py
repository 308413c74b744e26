"""Several teachers: routing rows by a column, and token-level mixtures, against references from the definitions."""

import copy
import json

import pytest
import tiny_models as tm
import torch
from datasets import Dataset
from test_trainer import Recorder, naive_divergence

from trl_onpolicy import OnPolicyDistillConfig
from trl_onpolicy.teachers import EnsembleTeacher, LocalTeacher, Teacher


def fragment(text: str) -> str:
    import re

    return re.escape(text)


def routed_dataset(n: int = 8) -> Dataset:
    rows = tm.dataset(n=n).to_dict()
    rows["teacher"] = ["a" if i % 2 == 0 else "b" for i in range(n)]
    return Dataset.from_dict(rows)


def peaked(tok, seed, layers=1, hidden=16, scale=30.0):
    model = tm.model(tok, seed=seed, layers=layers, hidden=hidden)
    with torch.no_grad():  # a divergence of O(1), far above float32 round-off
        model.lm_head.weight.mul_(scale)
    return model


class Spy(Teacher):
    """Delegates to a teacher and keeps the rows it was asked to score."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    def score(self, batch, **kwargs):
        self.seen.extend(row["prompt"] for row in batch["rows"])
        return self.inner.score(batch, **kwargs)


def per_token_logits(model, rollouts):
    """`(C, V)` logits per rollout, one unpadded sequence at a time."""
    out = []
    with torch.no_grad():
        for prompt, completion in zip(rollouts.prompt_ids, rollouts.completion_ids):
            ids = torch.tensor([prompt + completion])
            out.append(model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1])
    return out


def naive_mixture_divergence(s_logits, teachers_logits, weights, temperature, loss_type="forward_kl"):
    """Per-token divergence `(C,)` against p = sum_k w_k p_k, with `weights` `(C, T)`."""
    log_q = torch.log_softmax(s_logits.double() / temperature, -1)
    probs = torch.stack([torch.softmax(t.double() / temperature, -1) for t in teachers_logits], -1)  # (C, V, T)
    p = (probs * weights.double()[:, None, :]).sum(-1)  # (C, V)
    log_p = p.log()
    if loss_type == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


# ------------------------------------------------------------------------------------------------ mixtures
@pytest.mark.parametrize("mixture", ["weighted", "confidence"])
@pytest.mark.parametrize("loss_type, top_k", [("jsd", None), ("reverse_kl", 5), ("sampled_reverse_kl", None)])
def test_mixture_of_identical_teachers_equals_one_teacher(tmp_path, mixture, loss_type, top_k):
    tok = tm.tokenizer()
    teacher = peaked(tok, seed=1)
    logs = {}
    for name, spec in [("one", teacher), ("two", {"x": teacher, "y": copy.deepcopy(teacher)})]:
        tr = tm.trainer(
            tmp_path / name, tm.model(tok, seed=0), spec, tok, lmbda=0.0, loss_type=loss_type,
            teacher_top_k=top_k, teacher_mixture=mixture, temperature_start=2.0, max_steps=2, learning_rate=1e-2,
        )  # fmt: skip
        tr.train()
        logs[name] = tm.step_logs(tr)
    for one, two in zip(logs["one"], logs["two"]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
        assert two["divergence"] == pytest.approx(one["divergence"], rel=1e-5, abs=1e-7)
    assert abs(logs["one"][0]["divergence"]) > 0.01
    x, y = logs["two"][0]["teacher/x/tokens"], logs["two"][0]["teacher/y/tokens"]
    assert x + y == pytest.approx(logs["two"][0]["completion_length"] * 2)  # batch 2: every token shared out once
    assert x == pytest.approx(y)  # identical teachers: equal shares under either mixture


@pytest.mark.parametrize("mixture, temperature", [("weighted", 1.0), ("weighted", 2.0), ("confidence", 1.5)])
def test_mixture_matches_the_definition(tmp_path, mixture, temperature):
    tok = tm.tokenizer()
    student, t1, t2 = tm.model(tok, seed=0), peaked(tok, 1), peaked(tok, 2, layers=2, hidden=32, scale=5.0)
    reference_student, recorder = copy.deepcopy(student), Recorder()
    tr = tm.trainer(
        tmp_path, student, {"a": t1, "b": t2}, tok, callbacks=[recorder], lmbda=0.0, loss_type="forward_kl",
        teacher_mixture=mixture, teacher_weights={"a": 0.3, "b": 0.7} if mixture == "weighted" else None,
        temperature_start=temperature, temperature_grad_scale=False, per_device_train_batch_size=4,
    )  # fmt: skip
    tr.train()
    rollouts = recorder.rollouts[0]
    per_token = []
    for s, a, b in zip(*(per_token_logits(m, rollouts) for m in (reference_student, t1, t2))):
        if mixture == "weighted":
            weights = torch.tensor([0.3, 0.7]).expand(s.shape[0], 2)
        else:
            entropies = [
                -(torch.softmax(t / temperature, -1) * torch.log_softmax(t / temperature, -1)).sum(-1) for t in (a, b)
            ]
            weights = torch.softmax(-torch.stack(entropies, -1), -1)  # (C, 2)
        per_token.append(naive_mixture_divergence(s, [a, b], weights, temperature))
    expected = torch.cat(per_token).mean().item()
    log = tm.step_logs(tr)[0]
    assert expected > 0.05
    assert log["divergence"] == pytest.approx(expected, rel=1e-5)
    assert log["loss"] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("top_k", [None, 5])
def test_routing_sends_each_row_to_its_teacher(tmp_path, top_k):
    tok = tm.tokenizer()
    student, t1, t2 = tm.model(tok, seed=0), peaked(tok, 1), peaked(tok, 2, layers=2, hidden=32)
    reference_student, recorder = copy.deepcopy(student), Recorder()
    spies = {"a": Spy(LocalTeacher(t1)), "b": Spy(LocalTeacher(t2))}
    data = routed_dataset()
    tr = tm.trainer(
        tmp_path, student, spies, tok, train_dataset=data, callbacks=[recorder], lmbda=0.0, teacher_top_k=top_k,
        loss_type="jsd", per_device_train_batch_size=8,
    )  # fmt: skip
    tr.train()
    owner = dict(zip(data["prompt"], data["teacher"]))
    assert spies["a"].seen and spies["b"].seen
    assert all(owner[p] == "a" for p in spies["a"].seen) and all(owner[p] == "b" for p in spies["b"].seen)
    rollouts = recorder.rollouts[0]
    student_logits = per_token_logits(reference_student, rollouts)
    by_teacher = {"a": [], "b": []}
    for row, s, a, b in zip(rollouts.rows, student_logits, *(per_token_logits(m, rollouts) for m in (t1, t2))):
        t_logits = a if row["teacher"] == "a" else b
        by_teacher[row["teacher"]].append(naive_divergence(s, t_logits, "jsd", 0.5, 1.0, top_k))
    log = tm.step_logs(tr)[0]
    everything = torch.cat(by_teacher["a"] + by_teacher["b"])
    assert log["divergence"] == pytest.approx(everything.mean().item(), rel=1e-5)
    for name, values in by_teacher.items():
        values = torch.cat(values)
        assert log[f"teacher/{name}/tokens"] == len(values)
        assert log[f"teacher/{name}/divergence"] == pytest.approx(values.mean().item(), rel=1e-5)


def test_route_a_batch_with_rows_for_one_teacher_only(tmp_path):
    tok = tm.tokenizer()
    data = routed_dataset().filter(lambda row: row["teacher"] == "a")
    tr = tm.trainer(tmp_path, teacher={"a": tm.model(tok, seed=1), "b": tm.model(tok, seed=2)}, tok=tok,
                    train_dataset=data, lmbda=0.0)  # fmt: skip
    tr.train()
    log = tm.step_logs(tr)[0]
    assert log["teacher/b/tokens"] == 0 and "teacher/b/divergence" not in log
    assert log["teacher/a/tokens"] > 0


def test_a_dict_of_paths_from_the_config_trains(tmp_path):
    """The same script with `teacher_model_name_or_path` as JSON naming two saved teachers."""
    tok = tm.tokenizer()
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        paths[name] = str(tmp_path / name)
        tm.model(tok, seed=seed).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    config = tm.config(tmp_path / "out", teacher_model_name_or_path=json.dumps(paths), lmbda=1.0, max_steps=2)
    from trl_onpolicy import OnPolicyDistillTrainer

    tr = OnPolicyDistillTrainer(tm.model(tok), args=config, train_dataset=routed_dataset(), processing_class=tok)
    assert isinstance(tr.teacher, EnsembleTeacher) and tr.teacher.names == ["a", "b"]
    tr.train()
    assert len(tm.step_logs(tr)) == 2


# ------------------------------------------------------------------------------------------------ bad input
def test_routing_value_without_a_teacher(tmp_path):
    tok = tm.tokenizer()
    data = routed_dataset().map(lambda row: {"teacher": "physics" if row["teacher"] == "b" else "a"})
    tr = tm.trainer(tmp_path, teacher={"a": tm.model(tok, seed=1), "b": tm.model(tok, seed=2)}, tok=tok,
                    train_dataset=data, lmbda=0.0, per_device_train_batch_size=4)  # fmt: skip
    with pytest.raises(
        ValueError, match="teacher='physics' \\(row \\d of the batch\\) names no teacher; the teachers are a, b. Fix"
    ):
        tr.train()


def test_routing_column_missing_from_the_dataset(tmp_path):
    tok = tm.tokenizer()
    with pytest.raises(ValueError, match=fragment("are routed by the 'teacher' column, which the dataset lacks")):
        tm.trainer(tmp_path, teacher={"a": tm.model(tok, seed=1), "b": tm.model(tok, seed=2)}, tok=tok)


def test_mixture_weights_must_sum_to_one():
    with pytest.raises(ValueError, match=fragment("`teacher_weights` must be non-negative and sum to 1")):
        OnPolicyDistillConfig("out", teacher_weights={"a": 0.5, "b": 0.6})


def test_mixture_weights_must_name_every_teacher(tmp_path):
    tok = tm.tokenizer()
    with pytest.raises(ValueError, match=fragment("unknown: ['c'], missing: ['b']")):
        tm.trainer(tmp_path, teacher={"a": tm.model(tok, seed=1), "b": tm.model(tok, seed=2)}, tok=tok,
                   teacher_mixture="weighted", teacher_weights={"a": 0.5, "c": 0.5})  # fmt: skip


def test_token_mixing_refuses_top_k_only_teachers(tmp_path):
    class TopKOnly(Teacher):
        def __init__(self, inner):
            self.inner = inner

        def score(self, batch, **kwargs):
            return self.inner.score(batch, temperature=kwargs["temperature"], top_k=5)

    tok = tm.tokenizer()
    teachers = {"a": TopKOnly(LocalTeacher(tm.model(tok, seed=1))), "b": tm.model(tok, seed=2)}
    tr = tm.trainer(tmp_path, teacher=teachers, tok=tok, teacher_mixture="weighted", lmbda=0.0)
    with pytest.raises(ValueError, match=fragment("every teacher must run in this process")):
        tr.train()


# ------------------------------------------------------------------------------------------------ throughput
class CountingTeacher(LocalTeacher):
    """A local teacher that counts its scoring calls and checks how it runs."""

    def __init__(self, model):
        super().__init__(model)
        self.calls, self.modes = [], []

    def completion_hidden(self, batch, layers=None):
        self.calls.append(batch["input_ids"].shape)
        hidden, layer_hidden = super().completion_hidden(batch, layers)
        self.modes.append((torch.is_inference(hidden), hidden.requires_grad, hidden.dtype))
        return hidden, layer_hidden


def test_teacher_scores_once_per_step_in_its_own_dtype_whatever_the_accumulation(tmp_path):
    tok = tm.tokenizer()
    teacher = CountingTeacher(tm.model(tok, seed=1).to(torch.bfloat16))
    tr = tm.trainer(tmp_path, teacher=teacher, tok=tok, lmbda=0.0, per_device_train_batch_size=2,
                    gradient_accumulation_steps=4, max_steps=2)  # fmt: skip
    tr.train()
    assert [shape[0] for shape in teacher.calls] == [8, 8]  # one call per optimizer step, all 4 micro-batches at once
    assert teacher.modes == [(False, False, torch.bfloat16)] * 2  # bf16 teacher, no graph, usable outside inference
    assert all(p.dtype == torch.bfloat16 for p in teacher.model.parameters())
