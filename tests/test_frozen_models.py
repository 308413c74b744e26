"""Frozen models and the decisions of `trl_onpolicy.launchers` in one process (the sharded runs themselves are in
tests/test_launchers.py, on two processes).

- a local teacher is frozen, in evaluation mode and in no optimizer;
- a launcher that replicates the teacher refuses one larger than one GPU, naming the launchers that shard it;
- DeepSpeed's own verdict on a non-finite step is read back (it steps inside `backward`), and a non-finite loss that
  DeepSpeed applied anyway is refused;
- a sharded teacher routed no rows still makes its pass (the others' collectives need it).
"""

import re
from types import SimpleNamespace

import pytest
import torch

import tiny_models as tm
from trl_onpolicy import frozen_models, launchers
from trl_onpolicy.nonfinite import deepspeed_skipped
from trl_onpolicy.teachers import EnsembleTeacher, LocalTeacher


def fragment(text: str) -> str:
    return re.escape(text)


def accelerator(kind: str = "NO", stage: int = 2, processes: int = 1):
    """The few fields of an `Accelerator` the placement reads."""
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage), fsdp_plugin=None)
    return SimpleNamespace(distributed_type=kind, num_processes=processes, state=state, device=torch.device("cpu"),
                           is_main_process=True)  # fmt: skip


def test_a_local_teacher_is_frozen_and_in_no_optimizer(tmp_path):
    tr = tm.trainer(tmp_path)
    teacher = tr.teacher.model
    tr.create_optimizer()
    optimized = {id(p) for group in tr.optimizer.param_groups for p in group["params"]}
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(id(p) in optimized for p in teacher.parameters())
    assert optimized, "the optimizer holds nothing: a vacuous test"


@pytest.mark.parametrize(("kind", "stage", "named"), [("DEEPSPEED", 2, "DeepSpeed ZeRO-1/2 replicates"),
                                                       ("NO", 0, "a single process holds")])  # fmt: skip
def test_a_replicated_teacher_larger_than_one_gpu_is_refused(monkeypatch, kind, stage, named):
    model = tm.model(tm.tokenizer())
    size = frozen_models.model_bytes(model)
    monkeypatch.setattr(frozen_models, "device_memory", lambda device: size - 1)
    with pytest.raises(ValueError, match=fragment(f"and one device has {(size - 1) / 2**30:.1f} GiB, and {named} it")):
        frozen_models.place_frozen_model(model, accelerator(kind, stage))
    with pytest.raises(ValueError, match=fragment("Launch with DeepSpeed ZeRO-3 (examples/accelerate_configs/zero3.yaml) "
                                                  "or FSDP2 (fsdp2.yaml), which shard it, or serve the teacher")):
        frozen_models.check_fits(size, size - 1, "zero")
    monkeypatch.setattr(frozen_models, "device_memory", lambda device: size)
    assert frozen_models.place_frozen_model(model, accelerator(kind, stage)) is model  # fits exactly


def test_zero3_is_not_a_replicating_launcher():
    assert launchers.launcher(accelerator("DEEPSPEED", 3)) == launchers.ZERO3
    assert launchers.launcher(accelerator("DEEPSPEED", 2)) == launchers.ZERO
    assert launchers.launcher(accelerator("MULTI_GPU", processes=2)) == launchers.DDP


class Engine(torch.nn.Module):
    """A DeepSpeed engine as the trainer sees it after `backward` stepped it (or skipped the step)."""

    def __init__(self, applied: bool, fp16: bool = False):
        super().__init__()
        self.applied, self.fp16 = applied, fp16

    def was_step_applied(self):
        return self.applied

    def fp16_enabled(self):
        return self.fp16


def test_deepspeed_verdict_on_a_nonfinite_step_is_read_back():
    assert deepspeed_skipped(torch.nn.Linear(2, 2), loss_nonfinite=False) is None  # not DeepSpeed: checked by the trainer
    assert deepspeed_skipped(Engine(applied=True), loss_nonfinite=False) is False
    assert deepspeed_skipped(Engine(applied=False), loss_nonfinite=False) is True  # non-finite gradients, finite loss
    assert deepspeed_skipped(Engine(applied=False), loss_nonfinite=True) is True
    assert deepspeed_skipped(Engine(applied=False, fp16=True), loss_nonfinite=False) is False  # a routine overflow
    with pytest.raises(FloatingPointError, match=fragment("The loss is not finite and DeepSpeed applied the update")):
        deepspeed_skipped(Engine(applied=True), loss_nonfinite=True)


def test_a_sharded_teacher_routed_no_rows_still_makes_its_pass():
    tok = tm.tokenizer()

    class Counting(LocalTeacher):
        calls = 0

        def score(self, batch, **kwargs):
            Counting.calls += 1
            return super().score(batch, **kwargs)

    idle = Counting(tm.model(tok, seed=2))
    idle.sharded, idle.accelerator = True, accelerator()  # as `prepare` marks a teacher that FSDP2 / ZeRO-3 sharded
    teacher = EnsembleTeacher({"a": LocalTeacher(tm.model(tok, seed=1)), "b": idle}, "route")
    ids = torch.tensor([[5, 6, 7, 8]])  # (1, 4): one row, routed to "a"
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_ids": ids[:, 2:],
             "completion_mask": torch.ones_like(ids[:, 2:]), "rows": [{"teacher": "a"}]}  # fmt: skip
    teacher.score(batch)
    assert Counting.calls == 1
    idle.sharded = False
    teacher.score(batch)
    assert Counting.calls == 1  # an unsharded teacher with no rows is not run
