"""Loss temperature schedules: pinned values, monotonicity, the adaptive controller, resume, validation."""

import json
import math

import pytest

from trl_onpolicy.temperature import SCHEDULES, LossTemperature, grad_scale


START, END, TOTAL = 4.0, 1.0, 100


def _values(temp, steps):
    return [temp.step(s) for s in steps]


# ---------------------------------------------------------------------- deterministic schedules


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # steps:     0      TOTAL/2                TOTAL  beyond
        ("constant", [START, START, START, START]),
        ("linear", [START, (START + END) / 2, END, END]),
        ("cosine", [START, (START + END) / 2, END, END]),
        ("exponential", [START, math.sqrt(START * END), END, END]),  # geometric mean at half way
    ],
)
def test_pinned_values(schedule, expected):
    temp = LossTemperature(schedule, start=START, end=END, total_steps=TOTAL)
    assert temp.value == pytest.approx(START)  # before any step() call: the step-0 value
    assert _values(temp, [0, TOTAL // 2, TOTAL, 10 * TOTAL]) == pytest.approx(expected)


def test_pinned_quarter_points():
    # a quarter of the way: linear 1/4 of the gap, cosine (1 + cos(pi/4)) / 2 of it left, exponential ratio**(1/4)
    kwargs = dict(start=START, end=END, total_steps=TOTAL)
    assert LossTemperature("linear", **kwargs).step(25) == pytest.approx(START + (END - START) * 0.25)
    assert LossTemperature("cosine", **kwargs).step(25) == pytest.approx(END + (START - END) * (1 + 2**-0.5) / 2)
    assert LossTemperature("exponential", **kwargs).step(25) == pytest.approx(START * (END / START) ** 0.25)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("start, end", [(4.0, 1.0), (0.5, 3.0)])
def test_monotonic_between_start_and_end(schedule, start, end):
    temp = LossTemperature(schedule, start=start, end=end, total_steps=TOTAL)
    values = _values(temp, range(TOTAL + 5))
    sign = 1 if end > start else -1
    assert all(sign * (b - a) >= -1e-12 for a, b in zip(values, values[1:]))
    assert all(min(start, end) - 1e-12 <= v <= max(start, end) + 1e-12 for v in values)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_repeated_step_is_idempotent(schedule):
    temp = LossTemperature(schedule, start=2.0, end=1.0, total_steps=10, target_entropy=1.0)
    first = temp.step(3)
    assert temp.step(3) == first
    assert temp.value == first


def test_deterministic_schedule_is_a_function_of_step():
    # Resuming a non-adaptive schedule is calling step(k): order and history do not matter.
    a = LossTemperature("cosine", start=3.0, end=1.0, total_steps=20)
    b = LossTemperature("cosine", start=3.0, end=1.0, total_steps=20)
    _values(a, range(15))
    assert a.step(15) == b.step(15)


# ---------------------------------------------------------------------- adaptive


def _adaptive(**kwargs):
    defaults = dict(start=2.0, target_entropy=2.0, min_temperature=0.5, max_temperature=10.0, adapt_rate=0.1)
    return LossTemperature("adaptive", **{**defaults, **kwargs})


def test_adaptive_direction():
    low = _adaptive()
    assert low.step(0, teacher_entropy=1.0) > 2.0  # teacher too peaked -> soften: raise T
    high = _adaptive()
    assert high.step(0, teacher_entropy=3.0) < 2.0  # teacher too flat -> sharpen: lower T
    same = _adaptive()
    assert same.step(0, teacher_entropy=2.0) == pytest.approx(2.0)


def test_adaptive_update_formula():
    temp = _adaptive(start=2.0, target_entropy=2.0, adapt_rate=0.1)
    # log T <- log 2 + 0.1 * (2 - 1.5) / 2
    assert temp.step(0, teacher_entropy=1.5) == pytest.approx(2.0 * math.exp(0.025))


def test_adaptive_without_entropy_is_unchanged():
    temp = _adaptive()
    before = temp.step(0, teacher_entropy=1.0)
    assert temp.step(1) == before
    assert temp.step(2, teacher_entropy=None) == before


def test_adaptive_moves_once_per_step_number():
    temp = _adaptive()
    moved = temp.step(0, teacher_entropy=1.0)
    assert temp.step(0, teacher_entropy=1.0) == moved  # same step again: no compounding
    assert temp.step(1, teacher_entropy=1.0) > moved


def test_adaptive_respects_clamp():
    temp = _adaptive(start=2.0, min_temperature=0.5, max_temperature=3.0, adapt_rate=1.0)
    values = [temp.step(s, teacher_entropy=0.0) for s in range(50)]  # always too peaked
    assert max(values) == pytest.approx(3.0)
    assert all(v <= 3.0 + 1e-12 for v in values)
    values = [temp.step(s, teacher_entropy=100.0) for s in range(50, 100)]  # always too flat
    assert min(values) == pytest.approx(0.5)
    assert all(v >= 0.5 - 1e-12 for v in values)


def test_adaptive_converges_on_toy_teacher():
    # Fake teacher whose mean entropy is a known increasing function of the loss temperature.
    c, d, target = 2.0, 1.0, 3.0

    def entropy(t):
        return c * math.log(t) + d

    temp = _adaptive(start=1.0, target_entropy=target, adapt_rate=0.1)
    for s in range(200):
        temp.step(s, teacher_entropy=entropy(temp.value))
    assert abs(entropy(temp.value) - target) < 1e-3
    assert temp.value == pytest.approx(math.exp((target - d) / c), rel=1e-3)


# ---------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_state_dict_resumes_exactly(schedule):
    def entropy(t):
        return 1.5 * math.log(t) + 0.7

    def run(temp, steps):
        return [temp.step(s, teacher_entropy=entropy(temp.value)) for s in steps]

    kwargs = dict(start=3.0, end=1.0, total_steps=15, target_entropy=2.0)
    temp = LossTemperature(schedule, **kwargs)
    run(temp, range(10))
    state, saved_value = temp.state_dict(), temp.value
    assert json.loads(json.dumps(state)) == state
    expected = run(temp, range(10, 20))

    fresh = LossTemperature(schedule, **kwargs)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh.value == saved_value
    assert run(fresh, range(10, 20)) == expected


def test_load_state_dict_restores_value_before_stepping():
    temp = _adaptive()
    for s in range(5):
        temp.step(s, teacher_entropy=1.0)
    fresh = _adaptive()
    fresh.load_state_dict(temp.state_dict())
    assert fresh.value == temp.value
    assert fresh.step(4, teacher_entropy=1.0) == temp.value  # step 4 already applied before the save


def test_load_state_dict_rejects_bad_state():
    temp = LossTemperature()
    with pytest.raises(ValueError, match="missing"):
        temp.load_state_dict({"schedule": "constant"})
    state = temp.state_dict()
    state["schedule"] = "warmup"
    with pytest.raises(ValueError, match="Unknown loss temperature schedule 'warmup'"):
        temp.load_state_dict(state)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="warmup"), r"Unknown loss temperature schedule 'warmup'.*constant, linear, cosine"),
        (dict(start=0.0), r"`start` must be a finite number > 0, got 0.0"),
        (dict(start=-1.0), r"`start` must be a finite number > 0, got -1.0"),
        (dict(end=0.0), r"`end` must be a finite number > 0, got 0.0"),
        (dict(min_temperature=0.0), r"`min_temperature` must be a finite number > 0, got 0.0"),
        (dict(max_temperature=-2.0), r"`max_temperature` must be a finite number > 0, got -2.0"),
        (dict(start=float("nan")), r"`start` must be a finite number > 0, got nan"),
        (dict(min_temperature=5.0, max_temperature=2.0), r"`min_temperature` \(5.0\) is greater than `max_"),
        (dict(total_steps=0), r"`total_steps` must be an integer >= 1, got 0"),
        (dict(total_steps=-3), r"`total_steps` must be an integer >= 1, got -3"),
        (dict(schedule="adaptive"), r"'adaptive' schedule needs `target_entropy`, got None"),
        (dict(schedule="adaptive", target_entropy=0.0), r"`target_entropy` must be a finite number > 0, got 0.0"),
        (dict(schedule="adaptive", target_entropy=-1.0), r"`target_entropy` must be a finite number > 0, got -1.0"),
        (dict(adapt_rate=0.0), r"`adapt_rate` must be a finite number > 0, got 0.0"),
        (dict(adapt_rate=-0.1), r"`adapt_rate` must be a finite number > 0, got -0.1"),
        (dict(schedule="adaptive", target_entropy=1.0, start=20.0), r"`start` \(20.0\) lies outside"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossTemperature(**kwargs)


def test_invalid_step_arguments():
    with pytest.raises(ValueError, match=r"`step` must be an integer >= 0.*got -1"):
        LossTemperature().step(-1)
    with pytest.raises(ValueError, match=r"`teacher_entropy` must be finite, got nan"):
        _adaptive().step(0, teacher_entropy=float("nan"))


# ---------------------------------------------------------------------- grad_scale


def test_grad_scale():
    assert grad_scale(2.0, True) == 4.0
    assert grad_scale(0.5, True) == 0.25
    assert grad_scale(1.0, True) == 1.0
    assert grad_scale(3.0, False) == 1.0
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0, got 0.0"):
        grad_scale(0.0, True)
