"""The schedule of `lmbda` (`trl_onpolicy/lmbda_schedule.py`) and what follows from it in the trainer.

Values are pinned against a reference written from the definition; the trainer's draw is checked to follow the
schedule over many steps; the checks that depend on `lmbda` (completions needed, a teacher cache refused) read the
schedule's range; and a resumed run draws the same sources and ends with the same weights as an uninterrupted one.
"""

import math
import random
import re
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch

from trl_onpolicy import DistillCallback, OnPolicyDistillTrainer
from trl_onpolicy.callback_handler import round_ends
from trl_onpolicy.lmbda_schedule import SCHEDULES, lmbda_at, lmbda_of, lmbda_range
from trl_onpolicy.model_card import _settings, card_section
from trl_onpolicy.teachers.cache import TeacherCache
from trl_onpolicy.teachers.cache_build import build_teacher_cache
from trl_onpolicy.teachers.cache_format import CacheError


def reference(step, max_steps, schedule, start, end, num_rounds):
    """From the definition (max_steps >= num_rounds): progress p = step / (max_steps - 1); round r ends after the
    1-based step round(max_steps * (r + 1) / num_rounds)."""
    if schedule == "constant":
        return start
    if schedule == "step":
        last_steps = [round(max_steps * (r + 1) / num_rounds) for r in range(num_rounds)]
        r = next(i for i, last in enumerate(last_steps) if step + 1 <= last)
        return start + (end - start) * r / (num_rounds - 1)
    p = step / (max_steps - 1) if max_steps > 1 else 0.0
    if schedule == "linear":
        return start * (1 - p) + end * p
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))  # cosine


# ------------------------------------------------------------------------------------------------------- the values
def test_pinned_values():
    assert [lmbda_at(s, 5, "linear", 0.0, 1.0, 1) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    cosine = [lmbda_at(s, 5, "cosine", 1.0, 0.0, 1) for s in range(5)]
    assert cosine == pytest.approx([1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2, 0.0], abs=1e-15)
    # 10 steps in 3 rounds: round ends after steps 3, 7, 10 (uneven: 3, 4, 3 steps)
    assert [lmbda_at(s, 10, "step", 0.0, 1.0, 3) for s in range(10)] == [0.0] * 3 + [0.5] * 4 + [1.0] * 3
    assert [lmbda_at(s, 10, "constant", 0.3, 0.9, 3) for s in range(10)] == [0.3] * 10


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("max_steps, num_rounds", [(2, 2), (5, 2), (10, 3), (17, 4), (23, 7), (400, 5)])
@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.9, 0.2), (0.4, 0.4)])
def test_equals_the_definition(schedule, max_steps, num_rounds, start, end):
    values = [lmbda_at(s, max_steps, schedule, start, end, num_rounds) for s in range(max_steps)]
    expected = [reference(s, max_steps, schedule, start, end, num_rounds) for s in range(max_steps)]
    assert values == pytest.approx(expected, abs=1e-12)
    if schedule != "constant":  # endpoints: the first step has `start`, the last one `end`
        assert values[0] == start and values[-1] == end  # exactly: lmbda 1.0 must make every draw the student's
    assert all(min(start, end) <= v <= max(start, end) for v in values)


@pytest.mark.parametrize("max_steps, num_rounds", [(10, 3), (7, 2), (23, 7), (100, 6)])
def test_the_staircase_moves_exactly_where_the_trainer_ends_rounds(max_steps, num_rounds):
    """The 0-based step s follows the 1-based global step s: a new stair starts right after each round end."""
    values = [lmbda_at(s, max_steps, "step", 0.0, 1.0, num_rounds) for s in range(max_steps)]
    moves = [s for s in range(1, max_steps) if values[s] != values[s - 1]]
    assert moves == round_ends(max_steps, num_rounds)[:-1]
    assert sorted(set(values)) == pytest.approx([r / (num_rounds - 1) for r in range(num_rounds)])


def test_more_rounds_than_steps_still_ends_on_end():
    """4 rounds over 2 steps are 2 rounds (none is empty): the last step still has `end`."""
    assert [lmbda_at(s, 2, "step", 0.2, 0.8, 4) for s in range(2)] == [0.2, 0.8]
    assert lmbda_at(0, 1, "step", 0.2, 0.8, 4) == 0.2 and lmbda_at(0, 1, "linear", 0.2, 0.8, 1) == 0.2


def test_the_horizon_replaces_max_steps_and_end_holds_after_it(tmp_path):
    """`lmbda_schedule_steps=5` in a run of 1000 steps: 0 -> 1 over steps 0-4 exactly as a 5-step run, then 1."""
    config = tm.config(tmp_path, lmbda_schedule="linear", lmbda_start=0.0, lmbda_end=1.0, lmbda_schedule_steps=5)
    assert [lmbda_of(config, s, 1000) for s in range(8)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    unset = tm.config(tmp_path, lmbda_schedule="linear", lmbda_start=0.0, lmbda_end=1.0)
    assert lmbda_of(unset, 4, 1000) == pytest.approx(4 / 999)  # without it, max_steps is the horizon
    assert "| `lmbda_schedule_steps` | `5` |" in _settings(config)  # the model card names the horizon


# ------------------------------------------------------------------------------------------------------- the config
def test_defaults_and_range(tmp_path):
    assert lmbda_range(tm.config(tmp_path, lmbda=0.3)) == (0.3, 0.3)
    linear = tm.config(tmp_path, lmbda=0.3, lmbda_schedule="linear", lmbda_end=0.9)  # start defaults to lmbda
    assert lmbda_range(linear) == (0.3, 0.9) and lmbda_of(linear, 0, 5) == 0.3 and lmbda_of(linear, 4, 5) == 0.9
    flat = tm.config(tmp_path, lmbda=0.3, lmbda_schedule="cosine", lmbda_start=0.7)  # end defaults to start
    assert lmbda_range(flat) == (0.7, 0.7) and lmbda_of(flat, 4, 5) == 0.7
    down = tm.config(tmp_path, lmbda_schedule="step", lmbda_start=0.8, lmbda_end=0.1, num_rounds=2)
    assert lmbda_range(down) == (0.1, 0.8)
    assert down.lmbda_start == 0.8 and linear.lmbda_start is None  # None is kept: the config rebuilds as it was


FIX = ("Set `lmbda_schedule` to 'linear', 'cosine' or 'step' to move from `lmbda_start` to `lmbda_end`, or set only "
       "`lmbda`.")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lmbda_schedule": "exponential"},
         "`lmbda_schedule` must be one of ('constant', 'linear', 'cosine', 'step'), got 'exponential'."),
        ({"lmbda_start": 0.0},
         f"`lmbda_start` is set, but `lmbda_schedule='constant'` uses `lmbda` (1.0) at every step. {FIX}"),
        ({"lmbda_start": 0.0, "lmbda_end": 1.0, "lmbda": 0.5},
         ("`lmbda_start` and `lmbda_end` are set, but `lmbda_schedule='constant'` uses `lmbda` (0.5) at every step. "
          + FIX)),
        ({"lmbda_schedule": "linear", "lmbda_start": -0.1},
         "`lmbda_start` must be a probability in [0.0, 1.0], got -0.1."),
        ({"lmbda_schedule": "cosine", "lmbda_end": 1.5},
         "`lmbda_end` must be a probability in [0.0, 1.0], got 1.5."),
        ({"lmbda_schedule": "step", "lmbda_start": 0.0, "lmbda_end": 1.0},
         ("`lmbda_schedule='step'` holds one `lmbda` per round, but `num_rounds` is 1. Set `num_rounds` >= 2 (one "
          "stair per round), or use `lmbda_schedule='linear'`.")),
        ({"lmbda_schedule": "step", "lmbda_start": 0.0, "lmbda_end": 1.0, "num_rounds": 2, "lmbda_schedule_steps": 8},
         ("`lmbda_schedule_steps` (8) is the horizon of a 'linear' or 'cosine' schedule, but `lmbda_schedule` is "
          "'step'. Set `lmbda_schedule='linear'` or 'cosine', or leave `lmbda_schedule_steps` unset ('step' follows "
          "the rounds).")),
        ({"lmbda_schedule_steps": 8},
         ("`lmbda_schedule_steps` (8) is the horizon of a 'linear' or 'cosine' schedule, but `lmbda_schedule` is "
          "'constant'. Set `lmbda_schedule='linear'` or 'cosine', or leave `lmbda_schedule_steps` unset ('step' "
          "follows the rounds).")),
        ({"lmbda_schedule": "linear", "lmbda_start": 0.0, "lmbda_end": 1.0, "lmbda_schedule_steps": 0},
         "`lmbda_schedule_steps` must be a positive number of optimizer steps, got 0."),
    ],
)  # fmt: skip
def test_bad_schedule_is_refused_naming_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError) as info:
        tm.config(tmp_path, **overrides)
    assert str(info.value) == message


# ------------------------------------------------------------------------------------------------------- the draw
def _sources(config, max_steps):
    """The trainer's own draw (`_completion_source`) at every step, without building a trainer."""
    trainer = SimpleNamespace(args=config, state=SimpleNamespace(max_steps=max_steps))
    return [OnPolicyDistillTrainer._completion_source(trainer, s) for s in range(max_steps)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_the_draw_follows_the_schedule(tmp_path, seed, schedule):
    """Linear 0 -> 1 over 400 steps: each quarter's count of student steps is within 4 standard deviations of the sum
    of its probabilities (0.125, 0.375, 0.625, 0.875 of 100 steps for linear). A constant 0.5 would fail both ends."""
    n = 400
    config = tm.config(tmp_path, seed=seed, lmbda_schedule=schedule, lmbda_start=0.0, lmbda_end=1.0, num_rounds=4)
    sources = _sources(config, n)
    assert set(sources) == {"student", "dataset"}
    for quarter in range(4):
        steps = range(quarter * 100, (quarter + 1) * 100)
        p = [lmbda_at(s, n, schedule, 0.0, 1.0, 4) for s in steps]
        mean, sd = sum(p), math.sqrt(sum(q * (1 - q) for q in p))
        count = sum(sources[s] == "student" for s in steps)
        assert abs(count - mean) <= 4 * sd + 1e-9, (quarter, count, mean, sd)
    assert sources[0] == "dataset" and sources[-1] == "student"  # lmbda 0 and 1 are certain
    with_teacher = _sources(tm.config(tmp_path, seed=seed, lmbda_schedule=schedule, lmbda_start=0.0, lmbda_end=1.0,
                                      num_rounds=4, seq_kd=True), n)  # fmt: skip
    assert with_teacher == [s if s == "student" else "teacher" for s in sources]


def test_the_draw_of_a_constant_lmbda_is_unchanged(tmp_path):
    """The default schedule draws exactly what `random.Random(f"{seed}-{step}").random() < lmbda` drew before."""
    config = tm.config(tmp_path, lmbda=0.37, seed=5)
    expected = ["student" if random.Random(f"5-{s}").random() < 0.37 else "dataset" for s in range(200)]
    assert _sources(config, 200) == expected


# ------------------------------------------------------------------------------------- what the range decides
def test_completions_are_needed_when_any_step_is_off_policy(tmp_path):
    prompts = tm.dataset("prompt_only")
    with pytest.raises(ValueError, match=re.escape(
        "`lmbda_schedule='linear'` from 1.0 to 0.5 makes some batches off-policy, which need completions, but the "
        "dataset has none"
    )):  # fmt: skip
        tm.trainer(tmp_path, train_dataset=prompts, lmbda_schedule="linear", lmbda_end=0.5)
    # lmbda=0 would need completions, but the schedule holds 1.0 at every step: all batches are on-policy
    tm.trainer(tmp_path, train_dataset=prompts, lmbda=0.0, lmbda_schedule="cosine", lmbda_start=1.0)


def test_a_teacher_cache_is_refused_when_any_step_is_on_policy(tmp_path):
    tok = tm.tokenizer()
    build_teacher_cache(tm.model(tok, seed=1), tm.dataset(), tok, str(tmp_path / "cache"), top_k=5,
                        max_prompt_length=56, max_completion_length=8, batch_size=3)  # fmt: skip
    args = tm.config(tmp_path, lmbda=0.0, lmbda_schedule="linear", lmbda_end=0.3)
    with pytest.raises(CacheError, match=re.escape(
        "A teacher cache scores only the dataset's own completions, but `lmbda_schedule='linear'` from 0.0 to 0.3 "
        "asks for student rollouts. Set `lmbda=0.0` and `seq_kd=False`"
    )):  # fmt: skip
        TeacherCache.from_config(tmp_path / "cache", args, tok)
    offline = tm.config(tmp_path, lmbda=1.0, lmbda_schedule="step", lmbda_start=0.0, num_rounds=2)  # 0 at every step
    assert TeacherCache.from_config(tmp_path / "cache", offline, tok).top_k == 5


# -------------------------------------------------------------------------------------------- training and resume
class SourceLog(DistillCallback):
    """The completion source of every step that made rollouts, by 0-based step."""

    def __init__(self):
        self.sources = {}

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        self.sources[state.global_step] = rollouts.source


def _run(output_dir, resume=None, max_steps=8):
    tok = tm.tokenizer()
    log = SourceLog()
    trainer = tm.trainer(
        output_dir, tm.model(tok, seed=0), tm.model(tok, seed=1), tok, callbacks=[log], max_steps=max_steps,
        lmbda_schedule="linear", lmbda_start=0.0, lmbda_end=1.0, learning_rate=1e-2, save_strategy="steps",
        save_steps=max_steps // 2, seed=8,  # its draws: dataset at steps 0-2 and 4, student at 3 and 5-7
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer, log.sources


def test_resume_draws_the_same_sources_and_ends_on_the_same_weights(tmp_path):
    """8 steps of a linear 0 -> 1 schedule, a checkpoint after step 4: the resumed run draws steps 4..7 as the
    uninterrupted run does (a mix of dataset and student steps) and ends with the same parameters. With seed 8 a
    schedule that restarted at the resume (lmbda 0, 1/7, 2/7, 3/7 at steps 4..7) would draw the dataset at step 5."""
    straight, sources = _run(tmp_path / "straight")
    expected = {s: "student" if random.Random(f"8-{s}").random() < s / 7 else "dataset" for s in range(8)}
    assert sources == expected and set(sources.values()) == {"student", "dataset"}
    logged = [h["lmbda"] for h in tm.step_logs(straight)]  # the step's value, logged (the schedule is not constant)
    assert logged == pytest.approx([s / 7 for s in range(8)])

    assert (tmp_path / "straight" / "checkpoint-4").is_dir()  # as if the run had stopped after it
    resumed, later = _run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-4"))
    assert resumed.state.global_step == 8
    assert later == {s: sources[s] for s in range(4, 8)}
    assert set(later.values()) == {"student", "dataset"}  # both kinds of step happen after the resume
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    moved = [not torch.equal(a, b) for a, b in zip(straight.model.parameters(), tm.model(tm.tokenizer()).parameters())]
    assert any(moved)  # the comparison is of trained weights
    assert "| `lmbda_schedule` | `'linear'` |" in card_section(resumed)
