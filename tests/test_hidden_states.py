"""Hidden-state matching: the layer map, the term against its definition, the learned projector, save and resume."""

import copy
import os
import re
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from safetensors.torch import load_file
from test_trainer import Recorder, params
from transformers import LlamaForCausalLM

from trl_onpolicy import hidden_states
from trl_onpolicy.hidden_states import PROJECTOR_FILE, HiddenStateProjector, hidden_state_distance, layer_map
from trl_onpolicy.teachers import EnsembleTeacher, LocalTeacher, Teacher


def test_default_layer_map_is_evenly_spaced_and_ends_together():
    assert layer_map(2, 4) == [(1, 2), (2, 4)]
    assert layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert layer_map(2, 3) == [(1, 2), (2, 3)]  # round(1.5) = 2 (banker's rounding), the last layers meet


def test_layer_map_from_pairs_and_its_errors():
    assert layer_map(2, 4, ["0:0", "2:3"]) == [(0, 0), (2, 3)]
    with pytest.raises(
        ValueError, match=re.escape("pair '3:1' is out of range: the student's hidden states are 0..2")
    ):
        layer_map(2, 4, ["3:1"])
    with pytest.raises(ValueError, match=re.escape("entries are 'student:teacher' indices like '2:4', got '2-4'")):
        layer_map(2, 4, ["2-4"])


def test_distances_from_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    mse = ((s - t) ** 2).mean(-1).mean(-1)
    cos = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    torch.testing.assert_close(hidden_state_distance(s, t, "mse"), mse)
    torch.testing.assert_close(hidden_state_distance(s, t, "cosine"), cos.mean(-1))
    assert hidden_state_distance(s, s, "cosine").abs().max() < 1e-6


def test_projector_is_identity_for_equal_widths_and_learned_otherwise():
    assert list(HiddenStateProjector(2, 16, 16).parameters()) == []
    x = torch.randn(3, 2, 16)
    assert torch.equal(HiddenStateProjector(2, 16, 16)(x), x)
    projector = HiddenStateProjector(2, 32, 16)
    assert [p.shape for p in projector.parameters()] == [torch.Size([16, 32])] * 2
    assert projector(torch.randn(3, 2, 32)).shape == (3, 2, 16)


# ------------------------------------------------------------------------------------------ in the trainer
@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_term_is_zero_for_identical_models(tmp_path, distance):
    tok = tm.tokenizer()
    student = tm.model(tok, layers=2)
    tr = tm.trainer(tmp_path, student, copy.deepcopy(student), tok, lmbda=1.0, hidden_state_weight=1.0,
                    hidden_state_distance=distance)  # fmt: skip
    tr.train()
    log = tm.step_logs(tr)[0]
    assert abs(log["hidden_state_distance"]) < 1e-6 and abs(log["loss"]) < 1e-5


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_term_matches_the_definition_and_moves_the_student(tmp_path, distance):
    """Same widths: the logged distance is the mean over completion tokens of the per-pair distance, and the loss adds
    `weight * distance` to the divergence of a run without the term."""
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0, layers=2), tm.model(tok, seed=1, layers=4)
    runs = {}
    for weight in (0.0, 0.5):
        recorder = Recorder()
        tr = tm.trainer(
            tmp_path / str(weight), copy.deepcopy(student), teacher, tok, callbacks=[recorder], lmbda=0.0,
            hidden_state_weight=weight, hidden_state_distance=distance, per_device_train_batch_size=4,
            learning_rate=1e-2,
        )  # fmt: skip
        tr.train()
        runs[weight] = (tm.step_logs(tr)[0], params(tr.model), recorder.rollouts[0])
    log, _, rollouts = runs[0.5]
    per_token = []
    with torch.no_grad():
        for prompt, completion in zip(rollouts.prompt_ids, rollouts.completion_ids):
            ids = torch.tensor([prompt + completion])
            sl = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
            s = student(ids, output_hidden_states=True).hidden_states
            t = teacher(ids, output_hidden_states=True).hidden_states
            pairs = [(1, 2), (2, 4)]  # the default map of 2 student layers onto 4
            per_token.append(hidden_state_distance(
                torch.stack([s[i][0, sl] for i, _ in pairs], 1), torch.stack([t[j][0, sl] for _, j in pairs], 1),
                distance,
            ))  # fmt: skip
    expected = torch.cat(per_token).mean().item()
    assert expected > 1e-3
    assert log["hidden_state_distance"] == pytest.approx(expected, rel=1e-5)
    assert log["loss"] == pytest.approx(runs[0.0][0]["loss"] + 0.5 * expected, rel=1e-5)
    assert "hidden_state_distance" not in runs[0.0][0]
    changed = [n for n, p in runs[0.5][1].items() if not torch.equal(p, runs[0.0][1][n])]
    assert changed  # the term moves the student beyond what the divergence alone does


def test_learned_projector_trains_saves_and_resumes(tmp_path):
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0, layers=2, hidden=16), tm.model(tok, seed=1, layers=2, hidden=32)
    kwargs = dict(lmbda=0.0, hidden_state_weight=1.0, learning_rate=1e-2, max_steps=4, save_strategy="steps",
                  save_steps=2, train_dataset=tm.dataset(n=8))  # fmt: skip
    tr = tm.trainer(tmp_path / "a", copy.deepcopy(student), teacher, tok, **kwargs)
    projector = tr.model.hidden_state_projector
    before = copy.deepcopy(projector.state_dict())
    tr.train()
    after = projector.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # the optimizer trains the projection

    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert set(load_file(checkpoint / PROJECTOR_FILE)) == {"maps.0.weight", "maps.1.weight"}
    weights = load_file(checkpoint / "model.safetensors")
    assert not any("hidden_state_projector" in k for k in weights)  # the student's own weights only
    reloaded = LlamaForCausalLM.from_pretrained(checkpoint)
    assert not hasattr(reloaded, "hidden_state_projector")

    tr.save_model(str(tmp_path / "final"))
    assert os.path.isfile(tmp_path / "final" / PROJECTOR_FILE)
    final = load_file(tmp_path / "final" / PROJECTOR_FILE)
    torch.testing.assert_close(final["maps.0.weight"], after["maps.0.weight"])

    resumed = tm.trainer(tmp_path / "a", copy.deepcopy(student), teacher, tok, **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for k, v in resumed.model.hidden_state_projector.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)  # resume from step 2 reaches the same step 4
    assert [h["loss"] for h in tm.step_logs(resumed)][-2:] == [h["loss"] for h in tm.step_logs(tr)][-2:]


def test_needs_a_local_teacher(tmp_path):
    tok = tm.tokenizer()
    with pytest.raises(ValueError, match=re.escape("the EnsembleTeacher backend returns log-probs only")):
        tm.trainer(
            tmp_path, teacher=EnsembleTeacher({"a": tm.model(tok)}, "weighted"), tok=tok, hidden_state_weight=1.0
        )


def test_attach_projector_reads_the_teachers_width_from_the_teacher_interface():
    """`attach_projector` asks the backend for its `text_config` (no import of a concrete backend): a local teacher
    (or a subclass) gives its model's, so the projector maps its width to the student's; a backend that wraps a local
    teacher without running it here has none, and the error names that backend."""
    tok = tm.tokenizer()
    student, teacher_model = tm.model(tok, layers=1, hidden=16), tm.model(tok, layers=2, hidden=32, seed=1)
    args = SimpleNamespace(hidden_state_weight=1.0, hidden_state_layers=None)

    class Subclassed(LocalTeacher):
        pass

    assert hidden_states.attach_projector(student, student, Subclassed(teacher_model), args) == [(1, 2)]
    assert student.hidden_state_projector.maps[0].weight.shape == (16, 32)  # (H_s, H_t)

    class Wrapper(Teacher):
        def __init__(self, inner):
            self.inner = inner

    with pytest.raises(ValueError) as error:
        hidden_states.attach_projector(student, student, Wrapper(LocalTeacher(teacher_model)), args)
    assert str(error.value) == (
        "`hidden_state_weight=1.0` matches the teacher's hidden states, which only a teacher running in this process "
        "has; the Wrapper backend returns log-probs only. Use a local teacher model or set `hidden_state_weight=0.0`."
    )
    off = SimpleNamespace(hidden_state_weight=0)
    assert hidden_states.attach_projector(student, student, Wrapper(None), off) is None  # no matching: no check
