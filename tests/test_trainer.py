"""OnPolicyDistillTrainer on tiny CPU models: the loss against a naive reference, invariances, and what it learns.

Each test trains 1-4 steps of a 1-layer, hidden-16 Llama over a character tokenizer (see `tiny_models.py`).
"""

import copy
import dataclasses
import math

import pytest
import torch

import tiny_models as tm
from trl_onpolicy import DistillCallback


LOSS_TYPES = ["jsd", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "sampled_reverse_kl"]


class Recorder(DistillCallback):
    """Keeps a copy of every generation batch's rollouts."""

    def __init__(self):
        self.rollouts = []

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        self.rollouts.append(copy.deepcopy(rollouts))


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ identical teacher
@pytest.mark.parametrize(
    "loss_type, teacher_top_k",
    [(t, None) for t in LOSS_TYPES] + [("jsd", 5), ("reverse_kl", 5), ("forward_kl", 5)],
)
def test_identical_teacher_gives_zero_divergence(tmp_path, loss_type, teacher_top_k):
    tok = tm.tokenizer()
    student = tm.model(tok)
    teacher = copy.deepcopy(student)
    tr = tm.trainer(tmp_path, student, teacher, tok, loss_type=loss_type, teacher_top_k=teacher_top_k, lmbda=1.0)
    tr.train()
    log = tm.step_logs(tr)[0]
    assert abs(log["divergence"]) < 1e-5, log
    assert abs(log["loss"]) < 1e-5, log
    assert log["completion_length"] > 0


# ------------------------------------------------------------------------------------------ learning
def test_different_teacher_moves_student_not_teacher(tmp_path):
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0), tm.model(tok, seed=1)
    student_before, teacher_before = params(student), copy.deepcopy(teacher.state_dict())
    tr = tm.trainer(tmp_path, student, teacher, tok, learning_rate=1e-2, lmbda=1.0, max_steps=2)
    tr.train()
    assert tm.step_logs(tr)[0]["divergence"] > 1e-4  # the two models really differ
    trained = [name for name, p in student.named_parameters() if p.requires_grad]
    assert len(trained) == len(student_before)  # a full fine-tune: every parameter receives a gradient
    unchanged = [name for name, p in student.named_parameters() if torch.equal(p.detach(), student_before[name])]
    assert unchanged == []
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------------------------ naive reference
def naive_divergence(s_logits, t_logits, loss_type, beta, temperature, top_k):
    """Per-token divergence `(C,)` from `(C, V)` logits, straight from the definitions."""
    log_q = torch.log_softmax(s_logits.double() / temperature, -1)  # student (C, V)
    log_p = torch.log_softmax(t_logits.double() / temperature, -1)  # teacher (C, V)
    if top_k is not None:  # the teacher's top-k tokens plus one bucket for the rest of the mass, on both sides
        log_p, ids = log_p.topk(top_k, dim=-1)  # (C, K)
        log_q = log_q.gather(-1, ids)  # (C, K)
        log_p = torch.cat([log_p, torch.log(1 - log_p.exp().sum(-1, keepdim=True))], -1)  # (C, K + 1)
        log_q = torch.cat([log_q, torch.log(1 - log_q.exp().sum(-1, keepdim=True))], -1)  # (C, K + 1)
    p, q = log_p.exp(), log_q.exp()

    def kl(a, log_a, log_b):
        return (a * (log_a - log_b)).sum(-1)

    if loss_type == "forward_kl":
        return kl(p, log_p, log_q)
    if loss_type == "reverse_kl":
        return kl(q, log_q, log_p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, log_p, m.log()) + (1 - beta) * kl(q, log_q, m.log())


@pytest.mark.parametrize(
    "loss_type, temperature, top_k, grad_scale",
    [
        ("jsd", 1.0, None, True),
        ("jsd", 2.0, None, True),
        ("reverse_kl", 1.0, None, True),
        ("reverse_kl", 2.0, None, True),
        ("forward_kl", 1.0, None, True),
        ("forward_kl", 2.0, None, True),
        ("forward_kl", 2.0, None, False),
        ("jsd", 2.0, 5, True),
        ("reverse_kl", 1.0, 5, True),
    ],
)
def test_logged_loss_matches_naive_reference(tmp_path, loss_type, temperature, top_k, grad_scale):
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0), tm.model(tok, seed=1, layers=2, hidden=32)
    with torch.no_grad():  # a peaked teacher: a divergence of O(1), far above float32 round-off
        teacher.lm_head.weight.mul_(30.0)
    reference_student = copy.deepcopy(student)
    recorder = Recorder()
    tr = tm.trainer(
        tmp_path, student, teacher, tok, callbacks=[recorder], lmbda=0.0, loss_type=loss_type, beta=0.5,
        temperature_start=temperature, teacher_top_k=top_k, temperature_grad_scale=grad_scale,
        per_device_train_batch_size=4,
    )  # fmt: skip
    tr.train()
    rollouts = recorder.rollouts[0]
    assert rollouts.source == "dataset" and len(rollouts) == 4
    per_token = []
    with torch.no_grad():
        for prompt, completion in zip(rollouts.prompt_ids, rollouts.completion_ids):
            ids = torch.tensor([prompt + completion])  # one unpadded sequence at a time
            sl = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)  # positions predicting the completion
            s_logits = reference_student(ids).logits[0, sl]  # (C, V)
            t_logits = teacher(ids).logits[0, sl]  # (C, V)
            per_token.append(naive_divergence(s_logits, t_logits, loss_type, 0.5, temperature, top_k))
    divergence = torch.cat(per_token).mean().item()  # mean over every completion token of the step
    expected_loss = divergence * (temperature**2 if grad_scale else 1.0)
    log = tm.step_logs(tr)[0]
    assert divergence > 0.05
    assert log["loss_temperature"] == temperature
    assert log["divergence"] == pytest.approx(divergence, rel=1e-5)
    assert log["loss"] == pytest.approx(expected_loss, rel=1e-5)


# ------------------------------------------------------------------------------------------ invariance
def _run_layout(tmp_path, batch, accumulation):
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0), tm.model(tok, seed=1)
    tr = tm.trainer(
        tmp_path / f"{batch}x{accumulation}", student, teacher, tok, train_dataset=tm.dataset(n=16), lmbda=0.0,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=2,
        optim="sgd", learning_rate=0.5,
    )  # fmt: skip
    tr.train()
    return tm.step_logs(tr), params(student)


def test_batch_equals_gradient_accumulation(tmp_path):
    """8 x 1 == 1 x 8 == 4 x 2 (SGD: the weights are a linear function of the gradients, so they must agree too)."""
    initial = params(tm.model(tm.tokenizer(), seed=0))
    logs_ref, weights_ref = _run_layout(tmp_path, 8, 1)
    assert any(not torch.equal(weights_ref[k], initial[k]) for k in initial)
    for batch, accumulation in [(1, 8), (4, 2)]:
        logs, weights = _run_layout(tmp_path, batch, accumulation)
        for key in ("loss", "grad_norm", "divergence", "completion_length"):
            assert logs[0][key] == pytest.approx(logs_ref[0][key], rel=1e-5), (batch, accumulation, key)
        assert logs[1]["loss"] == pytest.approx(logs_ref[1]["loss"], rel=1e-5)
        for name, value in weights.items():
            torch.testing.assert_close(value, weights_ref[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ completion sources
@pytest.mark.parametrize(
    "lmbda, seq_kd, source", [(1.0, False, "student"), (0.0, True, "teacher"), (0.0, False, "dataset")]
)
def test_completion_source(tmp_path, lmbda, seq_kd, source):
    tok = tm.tokenizer()
    recorder = Recorder()
    tr = tm.trainer(tmp_path, tok=tok, callbacks=[recorder], lmbda=lmbda, seq_kd=seq_kd, max_steps=2)
    tr.train()
    assert [r.source for r in recorder.rollouts] == [source, source]
    for rollouts in recorder.rollouts:
        assert len(rollouts) == 2
        for prompt_ids, completion_ids, row in zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.rows):
            assert prompt_ids == tok(row["prompt"])["input_ids"]
            assert 1 <= len(completion_ids) <= 8
            if source == "dataset":
                assert completion_ids == tok(row["completion"])["input_ids"] + [tok.eos_token_id]


def test_num_generations_doubles_rollouts(tmp_path):
    recorder = Recorder()
    tr = tm.trainer(tmp_path, callbacks=[recorder], lmbda=1.0, num_generations=2, per_device_train_batch_size=3)
    tr.train()
    rollouts = recorder.rollouts[0]
    assert len(rollouts) == 6
    assert rollouts.prompt_ids[0::2] == rollouts.prompt_ids[1::2]  # each prompt twice, side by side
    assert len({tuple(p) for p in rollouts.prompt_ids}) == 3


def test_edited_rollouts_are_what_gets_scored(tmp_path):
    class Truncate(DistillCallback):
        def on_rollouts(self, args, state, control, rollouts, **kwargs):
            assert min(len(c) for c in rollouts.completion_ids) > 2
            rollouts.completion_ids = [c[:2] for c in rollouts.completion_ids]
            return rollouts

    recorder = Recorder()
    tr = tm.trainer(tmp_path, callbacks=[Truncate(), recorder], lmbda=0.0, per_device_train_batch_size=4)
    tr.train()
    assert tm.step_logs(tr)[0]["completion_length"] == 2.0


def test_filtered_rollouts_train_even_with_empty_micro_batches(tmp_path):
    """A filter keeps one rollout of two with 2 micro-batches: one of them is empty and contributes nothing."""

    class KeepFirst(DistillCallback):
        def __init__(self):
            self.kept = []

        def on_rollouts(self, args, state, control, rollouts, **kwargs):
            self.kept.append(len(rollouts.completion_ids[0]))
            return rollouts.select([0])

    keep = KeepFirst()
    tr = tm.trainer(
        tmp_path, callbacks=[keep], lmbda=0.0, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        max_steps=2,
    )  # fmt: skip
    tr.train()
    logs = tm.step_logs(tr)
    assert [log["completion_length"] for log in logs] == keep.kept
    assert all(math.isfinite(log["loss"]) and log["loss"] > 0 for log in logs)


# ------------------------------------------------------------------------------------------ dataset formats
@pytest.mark.parametrize("kind", ["prompt_only", "prompt_completion", "conversational_prompt_completion", "messages"])
def test_dataset_formats_train(tmp_path, kind):
    tok = tm.tokenizer()
    recorder = Recorder()
    lmbda = 1.0 if kind == "prompt_only" else 0.0
    tr = tm.trainer(tmp_path, tok=tok, train_dataset=tm.dataset(kind), callbacks=[recorder], lmbda=lmbda)
    tr.train()
    log = tm.step_logs(tr)[0]
    assert math.isfinite(log["loss"]) and log["loss"] > 0
    if kind in ("messages", "conversational_prompt_completion"):
        # the prompt is the conversation before the last assistant turn, which is the completion
        rollouts = recorder.rollouts[0]
        for prompt_ids, completion_ids, row in zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.rows):
            user, assistant = row["messages"] if kind == "messages" else row["prompt"] + row["completion"]
            assert tok.decode(prompt_ids) == f"#u:{user['content']}\n#a:"
            assert tok.decode(completion_ids) == f"{assistant['content']}\n</s>"


# ------------------------------------------------------------------------------------------ rounds and callbacks
def test_rounds_fire_and_checkpoint(tmp_path):
    class Rounds(DistillCallback):
        def __init__(self):
            self.ends = []

        def on_round_end(self, args, state, control, round_index, **kwargs):
            self.ends.append((round_index, state.global_step))

    rounds = Rounds()
    tr = tm.trainer(tmp_path, callbacks=[rounds], lmbda=0.0, num_rounds=2, max_steps=4, save_strategy="no")
    tr.train()
    assert rounds.ends == [(1, 2), (2, 4)]
    # save_strategy="no" saves nothing else, but every round end writes a checkpoint with the distillation state
    checkpoints = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        assert (tmp_path / name / "distill_state.json").is_file()
        assert (tmp_path / name / "model.safetensors").is_file()


def test_metrics_are_logged(tmp_path):
    tr = tm.trainer(tmp_path, lmbda=1.0)
    tr.train()
    log = tm.step_logs(tr)[0]
    for key in (
        "loss", "divergence", "teacher_entropy", "student_entropy", "completion_length", "truncated_fraction",
        "loss_temperature", "tokens_per_second", "time/generation", "time/teacher", "time/update", "nonfinite_skipped",
    ):  # fmt: skip
        assert key in log, key
        assert math.isfinite(log[key]), key
    assert 0.0 <= log["truncated_fraction"] <= 1.0
    assert 0 < log["teacher_entropy"] <= math.log(51) + 1e-4
    assert 0 < log["student_entropy"] <= math.log(51) + 1e-4
    assert log["tokens_per_second"] > 0 and log["time/generation"] > 0 and log["time/teacher"] > 0
    assert log["nonfinite_skipped"] == 0


# ------------------------------------------------------------------------------------------ loss temperature
def test_linear_temperature_schedule_is_logged(tmp_path):
    tr = tm.trainer(
        tmp_path, lmbda=0.0, max_steps=4, loss_temperature_schedule="linear", temperature_start=3.0,
        temperature_end=1.0,
    )  # fmt: skip
    tr.train()
    assert [h["loss_temperature"] for h in tm.step_logs(tr)] == pytest.approx([3.0, 2.5, 2.0, 1.5])


def test_adaptive_temperature_resumes_exactly(tmp_path):
    def run(output_dir, resume=None):
        tr = tm.trainer(
            output_dir, lmbda=0.0, max_steps=4, save_strategy="steps", save_steps=2,
            loss_temperature_schedule="adaptive", temperature_start=2.0, target_teacher_entropy=1.0,
            temperature_adapt_rate=0.05,
        )  # fmt: skip
        tr.train(resume_from_checkpoint=resume)
        return {h["step"]: h["loss_temperature"] for h in tm.step_logs(tr)}

    straight = run(tmp_path / "straight")
    assert len(set(straight.values())) == 4  # the controller moves every step
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's log history
    assert resumed[3] == pytest.approx(straight[3], rel=1e-9)
    assert resumed[4] == pytest.approx(straight[4], rel=1e-9)


def test_reference_model_changes_the_sampled_reverse_kl_advantage(tmp_path):
    """Generalized OPD: with a reference model the per-token reward is lambda*log(p/ref) - log(q/ref)."""
    tok = tm.tokenizer()
    reference_dir = tmp_path / "reference"
    tm.model(tok, seed=2).save_pretrained(reference_dir)
    tok.save_pretrained(reference_dir)
    plain = tm.trainer(
        tmp_path / "plain", tok=tok, loss_type="sampled_reverse_kl", lmbda=0.0, per_device_train_batch_size=8
    )
    plain.train()
    with_ref = tm.trainer(
        tmp_path / "ref", tok=tok, loss_type="sampled_reverse_kl", lmbda=0.0, per_device_train_batch_size=8,
        reference_model_name_or_path=str(reference_dir), reward_scale=2.0,
    )  # fmt: skip
    with_ref.train()
    batch = with_ref.score(with_ref.make_rollouts([with_ref.train_dataset[i] for i in range(8)], "dataset"))
    mask = batch.completion_mask.bool()
    student = tm.model(tok, seed=0)  # the student before its update
    with torch.no_grad():
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    n = batch.completion_ids.shape[1]
    log_q = torch.log_softmax(logits[:, -n - 1 : -1].float(), -1).gather(-1, batch.completion_ids[..., None])[
        ..., 0
    ]
    log_p = batch.teacher.token_logps[mask]  # sampled-token form: the loss needs nothing else
    log_ref = batch.reference_logps[mask]
    expected = -(2.0 * (log_p - log_ref) - (log_q[mask] - log_ref)).mean()
    first = tm.step_logs(with_ref)[0]
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert first["loss"] != pytest.approx(tm.step_logs(plain)[0]["loss"], rel=1e-3)


def test_on_rollouts_callbacks_chain_in_order(tmp_path):
    """A filter then an editor: the editor sees the filtered rollouts, and the teacher scores the edited ones."""

    class KeepFirstTwo(Recorder):
        def on_rollouts(self, args, state, control, rollouts, **kwargs):
            return rollouts.select([0, 1])

    class AppendEos(Recorder):
        def on_rollouts(self, args, state, control, rollouts, **kwargs):
            super().on_rollouts(args, state, control, rollouts)
            eos = args_tok.eos_token_id
            return dataclasses.replace(rollouts, completion_ids=[c[:2] + [eos] for c in rollouts.completion_ids])

    args_tok = tm.tokenizer()
    editor, seen = AppendEos(), Recorder()
    tr = tm.trainer(tmp_path, tok=args_tok, callbacks=[KeepFirstTwo(), editor, seen], lmbda=0.0,
                    per_device_train_batch_size=4)  # fmt: skip
    tr.train()
    assert len(editor.rollouts[0]) == 2  # the editor got the filter's output
    assert all(len(c) == 3 and c[-1] == args_tok.eos_token_id for c in seen.rollouts[0].completion_ids)
    assert tm.step_logs(tr)[0]["completion_length"] == 3.0


def test_round_end_evaluation_keeps_the_steps_training_row(tmp_path):
    """An eval hook logging at a round end must not swallow that step's own loss row."""

    class LogsAtRoundEnd(DistillCallback):
        def on_round_end(self, args, state, control, round_index, trainer=None, **kwargs):
            trainer.log({"eval/toy/score": float(round_index)})

    tr = tm.trainer(tmp_path, callbacks=[LogsAtRoundEnd()], max_steps=4, num_rounds=2)
    tr.train()
    assert [h["step"] for h in tm.step_logs(tr)] == [1, 2, 3, 4]
    assert [h["eval/toy/score"] for h in tr.state.log_history if "eval/toy/score" in h] == [1.0, 2.0]


def test_no_gradient_checkpointing_future_warning_at_checkpoint_saves(tmp_path):
    """TRL's generation helper reads transformers' deprecated `is_gradient_checkpointing`; its FutureWarning printed
    again after every checkpoint save (4 times in 4 steps with save_steps=1). Only that message is filtered. In a fresh
    process with Python's default warning filters (pytest's configuration ignores FutureWarnings)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, warnings\nimport tiny_models as tm\n"
        "trainer = tm.trainer(sys.argv[1], max_steps=3, save_strategy='steps', save_steps=1)\ntrainer.train()\n"
        "warnings.warn('another FutureWarning', FutureWarning)\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300, check=True)  # fmt: skip
    assert "is_gradient_checkpointing" not in proc.stderr
    assert "FutureWarning: another FutureWarning" in proc.stderr
