"""`num_iterations`: one batch of rollouts and teacher scores trains several optimizer steps (`rollout_buffer.py`).

Tiny CPU models (see `tiny_models.py`). Each test counts what was generated and scored, compares what was trained on,
pins `sampled_reverse_kl`'s importance weight against a naive reference, or resumes mid-cycle; and `split` / `trim`
cut a step's batch into micro-batches, each to its own lengths.
"""

import copy
import os
import re

import pytest
import tiny_models as tm
import torch

from trl_onpolicy import DistillCallback, OnPolicyDistillConfig
from trl_onpolicy.rollout_buffer import buffer_file


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def spy(trainer) -> dict:
    """Count generation and teacher calls, and keep each step's trained token ids and micro-batch keys."""
    seen = {"generate": 0, "teacher": 0, "sources": [], "input_ids": [], "rows": [], "keys": []}
    make_rollouts, score, get_batch_samples = trainer.make_rollouts, trainer.teacher.score, trainer.get_batch_samples

    def counted_make_rollouts(rows, source):
        seen["generate"] += 1
        seen["sources"].append(source)
        return make_rollouts(rows, source)

    def counted_score(*args, **kwargs):
        seen["teacher"] += 1
        return score(*args, **kwargs)

    def recorded_get_batch_samples(*args, **kwargs):
        micro, num_items = get_batch_samples(*args, **kwargs)
        if micro:
            seen["input_ids"].append([m.input_ids.clone() for m in micro])  # (b, p + c) each, trimmed
            seen["rows"].append([tuple(ids[mask.bool()].tolist()) for m in micro
                                 for ids, mask in zip(m.input_ids, m.attention_mask)])  # fmt: skip
            seen["keys"].append(sorted(k for k, v in vars(micro[0]).items() if v is not None))
        return micro, num_items

    trainer.make_rollouts, trainer.teacher.score = counted_make_rollouts, counted_score
    trainer.get_batch_samples = recorded_get_batch_samples
    return seen


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_invalid_num_iterations_is_refused(tmp_path, value):
    message = f"`num_iterations` must be an integer >= 1 (1 = fresh rollouts every optimizer step), got {value!r}."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OnPolicyDistillConfig(output_dir=str(tmp_path), num_iterations=value)


# ------------------------------------------------------------------------------------------ reuse
# on-policy; and mixed, 2 micro-batches: with seed 0 the draws of steps 1 and 4 give dataset, then student completions
@pytest.mark.parametrize("lmbda, accumulation, sources", [(1.0, 1, ["student"] * 2), (0.3, 2, ["dataset", "student"])])
def test_each_batch_is_generated_and_scored_once_then_trained_three_times(tmp_path, lmbda, accumulation, sources):
    tr = tm.trainer(
        tmp_path, lmbda=lmbda, gradient_accumulation_steps=accumulation, max_steps=6, num_iterations=3,
        learning_rate=1e-2, train_dataset=tm.dataset(n=32),
    )  # fmt: skip
    seen = spy(tr)
    tr.train()
    assert tr.state.global_step == 6
    assert seen["generate"] == 2 and seen["teacher"] == 2  # steps 1 and 4
    assert seen["sources"] == sources  # a reused batch keeps its source: no new draw
    ids = seen["input_ids"]

    def same(a, b):
        return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))

    for first, later in [(0, 1), (0, 2), (3, 4), (3, 5)]:
        assert same(ids[later], ids[first])  # the same token ids, prompt and completion
    assert not same(ids[3], ids[0])  # a fresh batch at step 4
    logs = tm.step_logs(tr)
    assert [log["rollouts/reused"] for log in logs] == [0, 1, 1, 0, 1, 1]
    for log in logs:
        fresh = log["rollouts/reused"] == 0
        assert (log["time/generation"] > 0) == fresh and (log["time/teacher"] > 0) == fresh
        assert log["time/generation"] >= 0 and log["time/update"] > 0
    assert [log["completion_length"] for log in logs[:3]] == [logs[0]["completion_length"]] * 3
    assert all("behaviour_logps" not in keys for keys in seen["keys"])  # only sampled_reverse_kl needs them


def test_reuse_step_with_fewer_micro_batches_trains_on_the_whole_batch(tmp_path):
    """6 rows, batch 2 x 2 accumulation: each epoch's second step has one micro-batch, and reuses a batch of four."""
    tr = tm.trainer(
        tmp_path, lmbda=1.0, gradient_accumulation_steps=2, max_steps=4, num_iterations=2, train_dataset=tm.dataset(n=6),
    )  # fmt: skip
    seen = spy(tr)
    tr.train()
    assert tr.state.global_step == 4 and seen["generate"] == 2
    assert [len(micro) for micro in seen["input_ids"]] == [2, 1, 2, 1]
    assert [len(rows) for rows in seen["rows"]] == [4, 4, 4, 4]  # the real tokens of each rollout, padding dropped
    assert seen["rows"][1] == seen["rows"][0] and seen["rows"][3] == seen["rows"][2]


def test_loss_temperature_is_held_while_a_batch_is_reused(tmp_path):
    """The teacher scored the batch at its step's temperature: the reuse steps keep it (a linear schedule, 3 -> 1)."""
    tr = tm.trainer(
        tmp_path, lmbda=0.0, max_steps=4, num_iterations=2, loss_temperature_schedule="linear", temperature_start=3.0,
        temperature_end=1.0,
    )  # fmt: skip
    tr.train()
    assert [h["loss_temperature"] for h in tm.step_logs(tr)] == pytest.approx([3.0, 3.0, 2.0, 2.0])


@pytest.mark.parametrize("loss_type", ["jsd", "sampled_reverse_kl"])
def test_num_iterations_1_is_the_default_and_keeps_nothing(tmp_path, loss_type):
    def run(name, **extra):
        tok = tm.tokenizer()
        student = tm.model(tok, seed=0)
        tr = tm.trainer(
            tmp_path / name, student, tm.model(tok, seed=1), tok, lmbda=1.0, max_steps=3, loss_type=loss_type,
            learning_rate=1e-2, save_strategy="steps", save_steps=1, **extra,
        )  # fmt: skip
        seen = spy(tr)
        tr.train()
        return tm.step_logs(tr), params(student), seen

    logs, weights, seen = run("default")
    logs_1, weights_1, seen_1 = run("one", num_iterations=1)
    assert seen["generate"] == seen_1["generate"] == 3
    assert [log["loss"] for log in logs_1] == [log["loss"] for log in logs]
    for name, value in weights.items():
        assert torch.equal(weights_1[name], value), name
    assert all("rollouts/reused" not in log for log in logs_1)  # the log rows are as they were
    assert not any((tmp_path / "one" / f"checkpoint-{s}" / "rollout_buffer_0.pt").exists() for s in (1, 2, 3))


# ------------------------------------------------------------------------------------------ importance weight
class Snapshots(DistillCallback):
    """The student's weights before each step, its gradients right before each optimizer step, the rollouts, and the
    buffer's stored log-probs. (A deep copy of the model in training would keep the Trainer's patched `forward`,
    bound to the live model: the weights are copied instead.)"""

    def __init__(self):
        self.weights, self.grads, self.rollouts, self.buffers = [], [], [], []

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        self.rollouts.append(copy.deepcopy(rollouts))

    def on_step_begin(self, args, state, control, model=None, trainer=None, **kwargs):
        self.weights.append({name: value.detach().clone() for name, value in model.state_dict().items()})
        batch = trainer.rollout_buffer.batch
        behaviour = None if batch is None else batch.behaviour_logps
        self.buffers.append(None if behaviour is None else behaviour.clone())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})


def naive_token_logps(model, rollouts) -> torch.Tensor:
    """`(N,)` log-probs of the completion tokens, one unpadded sequence at a time, in float64."""
    out = []
    for prompt, completion in zip(rollouts.prompt_ids, rollouts.completion_ids):
        ids = torch.tensor([prompt + completion])
        positions = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)  # predicting the completion
        logps = torch.log_softmax(model(ids).logits[0, positions].double(), -1)  # (C, V)
        out.append(logps.gather(-1, torch.tensor(completion)[:, None])[:, 0])  # (C,)
    return torch.cat(out)


def test_sampled_reverse_kl_reuse_step_equals_naive_importance_weighted_reference(tmp_path):
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0), tm.model(tok, seed=1, layers=2, hidden=32)
    with torch.no_grad():  # a peaked teacher: per-token terms of O(1)
        teacher.lm_head.weight.mul_(30.0)
    snapshots = Snapshots()
    tr = tm.trainer(
        tmp_path, student, teacher, tok, callbacks=[snapshots], lmbda=1.0, loss_type="sampled_reverse_kl",
        num_iterations=3, max_steps=2, per_device_train_batch_size=4, optim="sgd", learning_rate=0.5,
        max_grad_norm=0.0,
    )  # fmt: skip
    snapshots.trainer = tr
    seen = spy(tr)
    tr.train()
    assert len(snapshots.rollouts) == 1  # step 2 reuses step 1's rollouts
    rollouts = snapshots.rollouts[0]
    assert "behaviour_logps" not in seen["keys"][0] and "behaviour_logps" in seen["keys"][1]
    models = [tm.model(tok, seed=0) for _ in snapshots.weights]
    for model, weights in zip(models, snapshots.weights):
        model.load_state_dict(weights)
        model.double()
    with torch.no_grad():
        log_p = naive_token_logps(teacher.double(), rollouts)  # (N,)
        log_q0 = naive_token_logps(models[0], rollouts)  # (N,) the student that sampled them
    n_tokens = log_p.numel()
    mask = tr.rollout_buffer.batch.completion_mask.bool()  # the buffer is kept: step 3 would reuse it too
    torch.testing.assert_close(snapshots.buffers[1][mask].double(), log_q0, rtol=1e-5, atol=1e-5)  # stored at use 1

    logs = tm.step_logs(tr)
    for step, model in enumerate(models):
        log_q = naive_token_logps(model, rollouts)  # (N,) with the gradient, at the current student
        ratio = torch.exp(log_q - log_q0)  # (N,) 1 at the first use
        loss = (ratio * (log_q.detach() - log_p)).sum() / n_tokens  # ratio x the per-token sampled reverse KL
        loss.backward()
        assert logs[step]["loss"] == pytest.approx(loss.item(), rel=1e-4)
        for name, p in model.named_parameters():
            torch.testing.assert_close(snapshots.grads[step][name].double(), p.grad, rtol=1e-4, atol=1e-7)
        if step == 1:
            assert (ratio.detach() - 1).abs().max() > 1e-2  # the student moved: the weight is not trivially 1
            unweighted = (log_q.detach() - log_p).mean().item()
            assert logs[step]["loss"] != pytest.approx(unweighted, rel=1e-3)


# ------------------------------------------------------------------------------------------ resume
def _trainer(output_dir, loss_type, teacher_top_k=None):
    tok = tm.tokenizer()
    return tm.trainer(
        output_dir, tm.model(tok, seed=0), tm.model(tok, seed=1), tok, lmbda=1.0, loss_type=loss_type,
        teacher_top_k=teacher_top_k, num_iterations=3, max_steps=6, save_strategy="steps", save_steps=2,
        learning_rate=1e-2, train_dataset=tm.dataset(n=16),
    )  # fmt: skip


def _run(output_dir, loss_type, teacher_top_k=None, resume=None) -> tuple[list[float], dict]:
    tr = _trainer(output_dir, loss_type, teacher_top_k)
    tr.train(resume_from_checkpoint=resume)
    return {h["step"]: h["loss"] for h in tm.step_logs(tr)}, params(tr.accelerator.unwrap_model(tr.model))


@pytest.mark.parametrize(
    "loss_type, teacher_top_k",
    [("jsd", None), ("reverse_kl", 5), ("sampled_reverse_kl", None)],  # full, top-k, sampled-token form
)
def test_resume_mid_cycle_equals_the_straight_run(tmp_path, loss_type, teacher_top_k):
    straight, weights = _run(tmp_path / "straight", loss_type, teacher_top_k)
    for step in (2, 4):  # mid-cycle: steps 3 and 5 reuse the batches of steps 1 and 4
        assert (tmp_path / "straight" / f"checkpoint-{step}" / "rollout_buffer_0.pt").is_file()
    assert not (tmp_path / "straight" / "checkpoint-6" / "rollout_buffer_0.pt").exists()  # step 7 would be fresh
    for step in (2, 4):
        resumed, resumed_weights = _run(
            tmp_path / f"from-{step}", loss_type, teacher_top_k, str(tmp_path / "straight" / f"checkpoint-{step}")
        )
        for later in range(step + 1, 7):
            assert resumed[later] == pytest.approx(straight[later], rel=1e-6), (step, later)
        for name, value in weights.items():
            torch.testing.assert_close(resumed_weights[name], value, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("teacher_top_k", [None, 5])  # full distribution (hidden states + head), top-k
def test_resume_restores_the_buffered_batch_without_scoring_it_again(tmp_path, teacher_top_k):
    """The buffered batch is data: resumed at step 2, the run trains step 3 on it with no generation and no teacher
    pass, and samples and scores again only for step 4's fresh batch."""
    _run(tmp_path / "straight", "jsd", teacher_top_k)
    tr = _trainer(tmp_path / "resumed", "jsd", teacher_top_k)
    seen = spy(tr)
    tr.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert seen["generate"] == 1 and seen["teacher"] == 1  # step 4 only
    assert [len(ids) for ids in seen["input_ids"]] == [1, 1, 1, 1]  # steps 3-6 trained


def test_resume_with_another_teacher_is_refused(tmp_path):
    """A buffered full-distribution score takes its head from the teacher again: a different teacher is caught."""
    _run(tmp_path / "straight", "jsd")
    tok = tm.tokenizer()
    tr = tm.trainer(tmp_path / "resumed", tm.model(tok, seed=0), tm.model(tok, seed=7), tok, lmbda=1.0,
                    num_iterations=3, max_steps=6, train_dataset=tm.dataset(n=16))  # fmt: skip
    message = (
        "The rollout buffer of this checkpoint was scored by a teacher whose output head differs from this run's "
        "teacher. Resume with the same teacher, or delete the checkpoint's `rollout_buffer_*.pt` files to sample "
        "fresh rollouts."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tr.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))


def test_resume_without_the_buffer_would_differ(tmp_path):
    """The control of the test above: the buffer is what makes the resumed run exact."""
    straight, weights = _run(tmp_path / "straight", "jsd")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    os.remove(buffer_file(str(checkpoint), 0))
    resumed, resumed_weights = _run(tmp_path / "resumed", "jsd", resume=str(checkpoint))
    assert resumed[3] != pytest.approx(straight[3], rel=1e-6)  # step 3 sampled a fresh batch
    assert any(not torch.allclose(resumed_weights[k], v) for k, v in weights.items())
