"""Self-teachers (`teacher_model_kind` base / live / ema): scores against a separate copy of the weights they stand
for, the EMA against its definition, the student left exactly as it was by every scoring pass, exact resume, and every
refusal.
"""

import copy
import re
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from peft import LoraConfig, get_peft_model

from trl_onpolicy import OnPolicyDistillTrainer
from trl_onpolicy.rollouts import Rollouts, collate
from trl_onpolicy.teachers import LocalTeacher, SelfTeacher

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def batch(tok):
    prompts = [tok(p)["input_ids"] for p in ("what is 1+2?", "say hi", "go")]
    completions = [tok(c)["input_ids"] + [tok.eos_token_id] for c in (" 3", " hi there", " stop")]
    return collate(Rollouts(prompts, completions, "student"), tok.pad_token_id)


def token_logps(teacher, inputs) -> torch.Tensor:
    return teacher.score(inputs, need="token").token_logps


def nudge(model, seed: int = 3, scale: float = 0.05) -> None:
    """Move every trainable weight (as an optimizer step would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ each kind's scores
def test_live_teacher_is_the_student_as_it_is_now_with_no_copy():
    tok = tm.tokenizer()
    student, inputs = tm.model(tok, layers=2), batch(tok)
    teacher = SelfTeacher(student, "live")
    assert teacher.params == [] and teacher.weights == [] and teacher.model is student
    assert student.training is True and all(p.requires_grad for p in student.parameters())  # not frozen
    nudge(student)
    torch.testing.assert_close(token_logps(teacher, inputs), token_logps(LocalTeacher(copy.deepcopy(student)), inputs))
    assert student.training is True  # scored in eval mode, put back


def test_base_teacher_of_a_full_student_keeps_its_first_weights_and_restores_the_students():
    tok = tm.tokenizer()
    student, inputs = tm.model(tok, layers=2), batch(tok)
    initial = copy.deepcopy(student)
    teacher = SelfTeacher(student, "base")
    nudge(student)
    moved = state(student)
    scores = teacher.score(inputs, need="full")
    expected = LocalTeacher(initial).score(inputs, need="full")
    for name, now in state(student).items():
        assert torch.equal(now, moved[name]), name  # the scoring pass left the student exactly as it was
    torch.testing.assert_close(scores.reduce(inputs["completion_ids"]).token_logps,
                               expected.reduce(inputs["completion_ids"]).token_logps)  # fmt: skip
    assert torch.equal(scores.head.weight, initial.lm_head.weight)  # the head copied out of the swap, not lent
    assert scores.head.weight.data_ptr() != student.lm_head.weight.data_ptr()


def test_base_teacher_of_a_lora_student_is_its_base_network_without_a_copy():
    tok = tm.tokenizer()
    base = tm.model(tok, layers=2)
    reference = copy.deepcopy(base)
    student = get_peft_model(base, copy.deepcopy(LORA))
    teacher = SelfTeacher(student, "base")
    assert teacher.params == [] and teacher.disable_adapters
    inputs = batch(tok)
    torch.testing.assert_close(token_logps(teacher, inputs), token_logps(LocalTeacher(reference), inputs))
    assert not torch.allclose(token_logps(LocalTeacher(copy.deepcopy(student)), inputs), token_logps(teacher, inputs))


# ------------------------------------------------------------------------------------------ the EMA
def test_ema_follows_its_definition_every_sync_steps():
    tok = tm.tokenizer()
    student = tm.model(tok, layers=2)
    teacher = SelfTeacher(student, "ema", update_rate=0.3, sync_steps=2)
    expected = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    for step in range(1, 6):
        nudge(student, seed=step)
        teacher.update(step)
        if step % 2 == 0:  # ema <- ema + rate * (student - ema), at steps 2 and 4 only
            for n, p in student.named_parameters():
                expected[n] += 0.3 * (p.detach().double() - expected[n])
    for (n, _), w in zip(student.named_parameters(), teacher.weights):
        torch.testing.assert_close(w.double(), expected[n], rtol=0, atol=1e-6)
    separate = copy.deepcopy(student)
    with torch.no_grad():
        for p, w in zip(separate.parameters(), teacher.weights):
            p.copy_(w)
    inputs = batch(tok)
    torch.testing.assert_close(token_logps(teacher, inputs), token_logps(LocalTeacher(separate), inputs))


def test_ema_of_a_bf16_student_is_kept_in_float32():
    tok = tm.tokenizer()
    student = tm.model(tok).to(torch.bfloat16)
    teacher = SelfTeacher(student, "ema", update_rate=0.01)
    assert all(w.dtype == torch.float32 for w in teacher.weights)
    before = [w.clone() for w in teacher.weights]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * p.abs().clamp(min=0.05))  # a move that 1% of is below bf16's resolution for most weights
    teacher.update(1)
    moved = [(w - b).abs().max().item() for w, b in zip(teacher.weights, before)]
    assert min(moved) > 0  # every tensor moved: a bf16 EMA would have rounded most of these updates away
    rounded = [b.to(torch.bfloat16) for b in before]
    for r, p in zip(rounded, student.parameters()):
        r.lerp_(p.detach(), 0.01)
    assert any(torch.equal(r.float(), b.to(torch.bfloat16).float()) for r, b in zip(rounded, before))


def test_ema_of_a_lora_student_averages_the_adapters_only():
    tok = tm.tokenizer()
    student = get_peft_model(tm.model(tok, layers=2), copy.deepcopy(LORA))
    teacher = SelfTeacher(student, "ema")
    lora = [p for n, p in student.named_parameters() if "lora_" in n]
    assert len(teacher.params) == len(lora) > 0 and all(a is b for a, b in zip(teacher.params, lora))


# ------------------------------------------------------------------------------------------ in the trainer
def privileged(n: int = 8):
    data = tm.dataset(n=n)
    return data.add_column("privileged_context", [f"say{c}" for c in data["completion"]])


def test_ema_trainer_moves_the_ema_after_each_step_and_resumes_exactly(tmp_path):
    def run(name, resume=None):
        tok = tm.tokenizer()
        trainer = OnPolicyDistillTrainer(tm.model(tok, seed=0), args=tm.config(
            tmp_path / name, teacher_model_kind="ema", teacher_update_rate=0.5, max_steps=4, learning_rate=1e-2,
            save_strategy="steps", save_steps=2), train_dataset=privileged(), processing_class=tok)  # fmt: skip
        assert isinstance(trainer.teacher, SelfTeacher) and trainer.teacher.kind == "ema"
        trainer.train(resume_from_checkpoint=resume)
        return state(trainer.model), [w.clone() for w in trainer.teacher.weights], tm.step_logs(trainer)

    weights, ema, logs = run("straight")
    assert all(h["loss"] > 0 for h in logs)
    initial = state(tm.model(tm.tokenizer(), seed=0))
    assert any(not torch.equal(w, initial[n]) for (n, _), w in zip(initial.items(), ema))  # it moved
    resumed, resumed_ema, _ = run("straight", resume=str(tmp_path / "straight" / "checkpoint-2"))
    for name in weights:
        torch.testing.assert_close(resumed[name], weights[name], rtol=0, atol=1e-6)
    for a, b in zip(resumed_ema, ema):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_live_self_distillation_with_privileged_context_trains(tmp_path):
    tok = tm.tokenizer()
    student = tm.model(tok, seed=0)
    before = state(student)
    trainer = OnPolicyDistillTrainer(student, args=tm.config(tmp_path, teacher_model_kind="live", learning_rate=1e-2),
                                     train_dataset=privileged(), processing_class=tok)  # fmt: skip
    trainer.train()
    assert tm.step_logs(trainer)[0]["loss"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in state(student).items())


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_model_kind": "copy"},
         "`teacher_model_kind` must be one of ('separate', 'base', 'live', 'ema'), got 'copy'."),
        ({"teacher_model_kind": "ema", "teacher_update_rate": 0.0},
         "`teacher_update_rate` must be in (0, 1], got 0.0."),
        ({"teacher_model_kind": "ema", "teacher_sync_steps": 0}, "`teacher_sync_steps` must be >= 1, got 0."),
        ({"teacher_model_kind": "base", "teacher_model_name_or_path": "some/teacher"},
         "`teacher_model_kind='base'` makes the student its own teacher, but `teacher_model_name_or_path` is also"),
        ({"teacher_model_kind": "ema", "num_iterations": 2},
         "`num_iterations=2` reuses a batch's teacher scores for several steps, but a `teacher_model_kind='ema'`"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tm.config(tmp_path, **overrides)


def test_a_teacher_beside_a_self_teacher_is_refused(tmp_path):
    tok = tm.tokenizer()
    with pytest.raises(ValueError, match=re.escape("`teacher_model_kind='ema'` makes the student its own teacher, but "
                                                   "a teacher was also given (LlamaForCausalLM)")):  # fmt: skip
        tm.trainer(tmp_path, tok=tok, train_dataset=privileged(), teacher_model_kind="ema")


@pytest.mark.parametrize("kind", ["base", "live", "ema"])
def test_a_self_teacher_without_privileged_context_is_refused(tmp_path, kind):
    tok = tm.tokenizer()
    with pytest.raises(ValueError, match=re.escape(f"`teacher_model_kind={kind!r}` makes the student its own teacher, "
                                                   "and that teacher starts as the student itself")):  # fmt: skip
        OnPolicyDistillTrainer(tm.model(tok), args=tm.config(tmp_path, teacher_model_kind=kind),
                               train_dataset=tm.dataset(), processing_class=tok)  # fmt: skip


def test_a_lora_students_base_needs_no_privileged_context(tmp_path):
    tok = tm.tokenizer()
    trainer = OnPolicyDistillTrainer(tm.model(tok), args=tm.config(tmp_path, teacher_model_kind="base"),
                                     train_dataset=tm.dataset(), processing_class=tok,
                                     peft_config=copy.deepcopy(LORA))  # fmt: skip
    assert isinstance(trainer.teacher, SelfTeacher) and trainer.teacher.disable_adapters and not trainer.teacher.params


@pytest.mark.parametrize("distributed_type, plugin", [("FSDP", "fsdp"), ("DEEPSPEED", "zero3")])
def test_a_copied_teacher_is_refused_under_sharded_launchers(distributed_type, plugin):
    tok = tm.tokenizer()
    teacher = SelfTeacher(tm.model(tok), "ema")
    accelerator = SimpleNamespace(
        distributed_type=f"DistributedType.{distributed_type}", num_processes=2,
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2),
                              deepspeed_plugin=SimpleNamespace(zero_stage=3)),
    )  # fmt: skip
    launcher = "fsdp2" if plugin == "fsdp" else "zero3"
    with pytest.raises(ValueError, match=re.escape(f"which the sharded parameters of {launcher} do not allow here")):
        teacher.prepare(accelerator)
    SelfTeacher(tm.model(tok), "live").prepare(SimpleNamespace(**vars(accelerator), device="cpu"))  # no copy: allowed
