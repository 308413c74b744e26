"""The compute meter: phases nest for the outermost, excluded time is not charged, FLOPs are 2 N / 6 N per token,
hooks come off, the CUDA clock synchronizes at phase edges, and the budget callback stops within one step."""

import types

import pytest
import tiny_models
import torch

from trl_onpolicy import compute_meter
from trl_onpolicy.compute_meter import BudgetCallback, Meter, evenly_spaced, reach, watch


class FakeClock:
    """A clock that moves only when told: `meter._now` returns `now`."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _meter() -> tuple[Meter, FakeClock]:
    meter, clock = Meter(clock="process"), FakeClock()
    meter._now, meter.t0 = clock, 0.0
    return meter, clock


def test_nested_phases_count_for_the_outermost_and_the_rest_is_update():
    meter, clock = _meter()
    clock.now = 1.0
    with meter.phase("teacher_generation"):
        clock.now = 2.0
        with meter.phase("teacher"):  # the teacher's forward passes while it writes: teacher_generation's
            clock.now = 5.0
        clock.now = 6.0
    with meter.phase("teacher"):
        clock.now = 6.5
    clock.now = 10.0
    snap = meter.snapshot()
    assert snap["cpu_s"] == 10.0
    assert snap["phases"] == {"teacher_generation": 5.0, "teacher": 0.5, "update": 4.5}


def test_excluded_time_is_not_charged_and_counts_for_no_phase():
    meter, clock = _meter()
    clock.now = 2.0
    with meter.excluded(), meter.phase("generation"):  # evaluation generates: not charged as generation
        clock.now = 9.0
    with meter.phase("generation"):
        clock.now = 10.0
    assert meter.charged() == 3.0
    assert meter.snapshot()["phases"] == {"generation": 1.0, "update": 2.0}


def test_flops_are_2n_per_token_forward_and_6n_with_gradients():
    tok = tiny_models.tokenizer()
    student = tiny_models.model(tok, layers=1, hidden=16)
    assert not student.config.tie_word_embeddings  # the head is counted on top of the backbone
    n = sum(p.numel() for p in student.model.parameters()) + student.lm_head.weight.numel()
    assert n == sum(p.numel() for p in student.parameters())
    meter = Meter(clock="process")
    watch(meter, student)
    ids = torch.randint(3, len(tok), (2, 5))  # (B, T): 10 tokens
    with torch.no_grad():
        student(input_ids=ids)
    student(input_ids=ids[:, :3]).logits.sum().backward()  # 6 tokens with gradients
    assert meter.tokens == {"student_forward": 10, "student_train": 6}
    assert meter.flops == {"student_forward": 2 * n * 10, "student_train": 6 * n * 6}


def test_a_tied_head_is_counted_once_and_the_teacher_is_timed():
    tok = tiny_models.tokenizer()
    teacher = tiny_models.model(tok, layers=1, hidden=16)
    teacher.config.tie_word_embeddings = True
    student = tiny_models.model(tok, layers=1, hidden=16, seed=1)
    meter = Meter(clock="process")
    watch(meter, student, teacher)
    with torch.no_grad():
        teacher(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert meter.flops["teacher_forward"] == 2 * sum(p.numel() for p in teacher.model.parameters()) * 4
    assert set(meter.phases) == {"teacher"}


def test_close_removes_every_hook_and_the_generate_wrapper():
    tok = tiny_models.tokenizer()
    student = tiny_models.model(tok)
    meter = Meter(clock="process")
    watch(meter, student)
    ids = torch.ones(1, 3, dtype=torch.long)
    student.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert "generation" in meter.phases and meter.tokens["student_forward"] > 0
    meter.close()
    before = dict(meter.tokens), dict(meter.phases)
    student.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        student(input_ids=ids)
    assert (dict(meter.tokens), dict(meter.phases)) == before
    assert (
        "generate" not in vars(student) and not student.model._forward_pre_hooks and not student.model._forward_hooks
    )


def test_the_cuda_clock_synchronizes_at_every_phase_edge(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^The 'cuda' clock needs a CUDA device; on a CPU use clock='process'"):
            Meter(clock="cuda")
    calls = []
    fake_cuda = types.SimpleNamespace(is_available=lambda: True, synchronize=lambda: calls.append("sync"))
    monkeypatch.setattr(compute_meter.torch, "cuda", fake_cuda)
    meter = Meter()  # CUDA available: the default clock is wall time, charged as GPU-seconds
    assert (meter.clock, meter.unit) == ("cuda", "gpu_s")
    calls.clear()
    with meter.phase("generation"):
        pass
    assert calls == ["sync", "sync"]
    assert set(meter.snapshot()) == {"gpu_s", "phases", "flops", "tokens"}
    with pytest.raises(ValueError, match=r"^Unknown clock 'wall': use one of \('process', 'cuda'\)\.$"):
        Meter(clock="wall")


def test_the_budget_callback_scores_at_each_checkpoint_and_stops_within_one_step():
    meter, clock = _meter()
    points = []
    scored_at = []

    def evaluate(model):
        scored_at.append(clock.now)
        clock.now += 100.0  # evaluation is slow, and not charged
        return 0.5

    callback = BudgetCallback(meter, evenly_spaced(5.0, 2), evaluate, points)
    control, state = types.SimpleNamespace(should_training_stop=False), types.SimpleNamespace(global_step=0)
    while not control.should_training_stop:
        state.global_step += 1
        clock.now += 1.5  # every step costs 1.5 s
        with meter.excluded():
            pass
        callback.on_step_end(None, state, control)
    assert [(p["step"], p["cpu_s"], p["accuracy"]) for p in points] == [(2, 3.0, 0.5), (4, 6.0, 0.5)]
    assert callback.step_ends == [1.5, 3.0, 4.5, 6.0]  # stopped at the first step end past 5 s
    assert evenly_spaced(6.0, 3) == [2.0, 4.0, 6.0]


def test_reach_reads_any_compute_and_score_keys():
    points = [{"gpu_s": 0, "score": 0.2}, {"gpu_s": 10, "score": 0.6}]
    assert reach(points, 0.4, x="gpu_s", y="score") == pytest.approx(5.0)
    assert reach(points, 0.7, x="gpu_s", y="score") is None
