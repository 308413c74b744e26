"""`StepBatch` and `TeacherScores` are data: saved with `torch.save`, loaded with `weights_only=True`, they give back the
same batch, teacher scores included, with the heads taken from the teacher again (and checked)."""

import re

import pytest
import tiny_models as tm
import torch

from trl_onpolicy.heads import LinearHead
from trl_onpolicy.rollouts import Rollouts, collate
from trl_onpolicy.step_batch import StepBatch
from trl_onpolicy.teachers import EnsembleTeacher, LocalTeacher
from trl_onpolicy.teachers.base import TeacherScores

# five rollouts whose prompt and completion lengths differ, so that every group of two has its own longest of each
PROMPTS = [[5, 6, 7], [8] * 9, [9, 10], [11] * 6, [12]]
COMPLETIONS = [[13, 14], [15], [16] * 7, [17, 18, 19], [20] * 4]


def batch(tok):
    return collate(Rollouts(PROMPTS, COMPLETIONS, "dataset"), tok.pad_token_id)


def rollouts() -> Rollouts:
    rows = [{"prompt": f"p{i}", "teacher": "a" if i % 2 else "b"} for i in range(len(PROMPTS))]
    return Rollouts(PROMPTS, COMPLETIONS, "student", [False, False, True, False, True], rows)


def scored(teacher, tok, **score_kwargs) -> StepBatch:
    batch = StepBatch.collate(rollouts(), tok.pad_token_id)
    batch.teacher = teacher.score(batch.model_inputs(), temperature=1.5, **score_kwargs)
    return batch


def round_trip(batch: StepBatch, heads, tmp_path) -> StepBatch:
    torch.save(batch.state_dict(), tmp_path / "batch.pt")
    return StepBatch.from_state_dict(torch.load(tmp_path / "batch.pt", weights_only=True), heads)


def full_log_probs(scores: TeacherScores, mask: torch.Tensor) -> torch.Tensor:
    """`(N, V)` the teacher's log-probs over the real completion tokens, from whatever form the scores hold."""
    flat = scores.flatten(mask)
    return torch.log_softmax(flat.logits(0, int(mask.sum())) / scores.temperature, -1)


def two_teachers(tok, mixture):
    return EnsembleTeacher({"a": LocalTeacher(tm.model(tok, seed=1)), "b": LocalTeacher(tm.model(tok, seed=2))},
                           mixture=mixture)  # fmt: skip


@pytest.mark.parametrize("form", ["full", "topk", "token", "weighted", "route"])
def test_a_saved_batch_restores_as_it_was(tmp_path, form):
    tok = tm.tokenizer()
    if form in ("weighted", "route"):
        teacher = two_teachers(tok, form)
        batch = scored(teacher, tok)
    else:
        teacher = LocalTeacher(tm.model(tok, seed=1))
        batch = scored(teacher, tok, **{"topk": {"top_k": 4}, "token": {"need": "token"}}.get(form, {}))
    batch.reference_logps = torch.randn(batch.completion_ids.shape)
    restored = round_trip(batch, teacher.output_heads(), tmp_path)
    for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask", "reference_logps"):
        assert torch.equal(getattr(restored, name), getattr(batch, name)), name
    assert (restored.source, restored.truncated, restored.rows) == (batch.source, batch.truncated, batch.rows)
    assert restored.teacher.form == batch.teacher.form == ("token" if form == "token" else "topk" if form == "topk"
                                                           else "full")  # fmt: skip
    mask = batch.completion_mask.bool()
    if batch.teacher.form == "full":
        torch.testing.assert_close(full_log_probs(restored.teacher, mask), full_log_probs(batch.teacher, mask),
                                   rtol=0, atol=0)  # fmt: skip
    for name in TeacherScores._TENSORS:
        before, after = getattr(batch.teacher, name), getattr(restored.teacher, name)
        assert (before is None and after is None) or torch.equal(before, after), name


def test_a_restored_full_score_takes_the_head_from_the_teacher_and_checks_it(tmp_path):
    tok = tm.tokenizer()
    batch = scored(LocalTeacher(tm.model(tok, seed=1)), tok)
    state = batch.state_dict()
    assert "weight" not in str(state["teacher"]["head"])  # a fingerprint, not the tensors
    message = (
        "The rollout buffer of this checkpoint was scored by a teacher whose output head differs from this run's "
        "teacher. Resume with the same teacher, or delete the checkpoint's `rollout_buffer_*.pt` files to sample "
        "fresh rollouts."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        round_trip(batch, LocalTeacher(tm.model(tok, seed=3)).output_heads(), tmp_path)


def test_scores_whose_head_is_a_function_cannot_be_saved():
    scores = TeacherScores(1.0, hidden=torch.zeros(1, 2, 4), head=lambda h: h)
    with pytest.raises(TypeError, match=r"^Teacher scores whose head is a function cannot be saved; return a "
                                        r"`LinearHead`\.$"):  # fmt: skip
        scores.state_dict()


def test_split_keeps_every_field_of_its_rows():
    tok = tm.tokenizer()
    batch = scored(LocalTeacher(tm.model(tok, seed=1)), tok, need="token")
    batch.behaviour_logps = torch.randn(batch.completion_ids.shape)
    micro, ranges = batch.split(3)
    assert ranges == [(0, 2), (2, 3), (3, 5)]
    for part, (lo, hi) in zip(micro, ranges):
        c = part.completion_ids.shape[1]
        assert part.rows == batch.rows[lo:hi] and part.truncated == batch.truncated[lo:hi]
        assert torch.equal(part.behaviour_logps, batch.behaviour_logps[lo:hi, :c])
        assert torch.equal(part.teacher.token_logps, batch.teacher.token_logps[lo:hi, :c])
        assert part.completion_mask[:, c:].sum() == 0 and batch.completion_mask[lo:hi, c:].sum() == 0


def test_a_mixture_is_its_members_and_weights():
    """Several teachers mixed per token: the score holds each teacher's own full-form score (hidden states and a
    `LinearHead` each) and the `(B, C, T)` weights; its log-probs are log(sum_k w_k p_k), computed from them."""
    tok = tm.tokenizer()
    teacher = two_teachers(tok, "weighted")
    scores = scored(teacher, tok).teacher
    assert len(scores.members) == 2 and all(isinstance(m.head, LinearHead) for m in scores.members)
    mask = torch.ones(scores.teacher_weights.shape[:2], dtype=torch.bool)
    mixed = full_log_probs(scores, mask)  # (N, V)
    parts = [full_log_probs(m, mask) for m in scores.members]
    expected = torch.logsumexp(torch.stack([p + torch.tensor(0.5).log() for p in parts]), 0)  # (N, V)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_trim_cuts_a_micro_batch_to_its_own_lengths():
    tok = tm.tokenizer()
    inputs = batch(tok)  # (5, 9 + 7)
    n = inputs["completion_ids"].shape[1]
    inputs = StepBatch(**inputs, reference_logps=torch.randn(5, n),
                       teacher=TeacherScores(1.0, token_logps=torch.arange(5 * n, dtype=torch.float32).view(5, n)))
    micro, ranges = inputs.split(2)
    assert ranges == [(0, 2), (2, 5)]
    for part, (lo, hi) in zip(micro, ranges):
        p = max(len(PROMPTS[i]) for i in range(lo, hi))
        c = max(len(COMPLETIONS[i]) for i in range(lo, hi))
        assert part.input_ids.shape == part.attention_mask.shape == (hi - lo, p + c)
        assert part.completion_ids.shape == part.completion_mask.shape == part.reference_logps.shape == (hi - lo, c)
        assert part.teacher.token_logps.shape == (hi - lo, c)
        for row, i in enumerate(range(lo, hi)):  # every real token kept, in place
            ids = part.input_ids[row][part.attention_mask[row].bool()].tolist()
            assert ids == PROMPTS[i] + COMPLETIONS[i]
        torch.testing.assert_close(part.teacher.token_logps, inputs.teacher.token_logps[lo:hi, :c])
    assert micro[0].trim().input_ids.shape == micro[0].input_ids.shape  # trimming twice changes nothing
