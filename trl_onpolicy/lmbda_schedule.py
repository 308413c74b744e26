"""The curriculum of `lmbda`: the probability, per optimizer step, that the student writes the step's completions.

`lmbda` is GKD's name. A step is on-policy with probability `lmbda`; otherwise the teacher writes the completions
(`seq_kd=True`) or the dataset's own are used. TRL's GKD holds it constant; here it may follow a schedule from
`start` to `end` over training, e.g. from the dataset's or the teacher's text while the student is still weak
(`start=0`) to the student's own samples (`end=1`), the distribution it will be judged on.

With `s` the 0-based step about to be trained, `N` the schedule's horizon (`lmbda_schedule_steps`, by default the
run's `max_steps`) and `p = s / max(N - 1, 1)` (clamped to [0, 1], so the first step has `start`, step `N - 1` has
`end`, and `end` holds after the horizon):

- `"constant"`: `lmbda` at every step (`start` and `end` are not used; the config refuses them).
- `"linear"`:   `start + (end - start) * p`.
- `"cosine"`:   `end + (start - end) * (1 + cos(pi * p)) / 2`: flat near both ends, the midpoint at `p = 1/2`.
- `"step"`:     a staircase over the rounds ([`~trl_onpolicy.rounds.round_ends`]): round `r` of `R` (0-based) holds
  `start + (end - start) * r / (R - 1)` at each of its steps. `R = num_rounds` (fewer when `num_rounds > N`,
  since rounds are never empty).

Each is computed as `start * (1 - w) + end * w` with `w` the weight of `end` (`p`, `(1 - cos(pi * p)) / 2`,
`r / (R - 1)`), so the endpoints come out exactly (`lmbda=1.0` draws the student every time) and no rounding error
steps outside `[start, end]`.

Every value is a pure function of `(s, N)` and the config, so a resumed run draws exactly what an uninterrupted one
draws, and a step's value can be computed for any step, ahead of time too.
"""

from __future__ import annotations

import math

from .rounds import round_of

SCHEDULES = ("constant", "linear", "cosine", "step")


def lmbda_at(step: int, max_steps: int, schedule: str, start: float, end: float, num_rounds: int) -> float:
    """
    The value of `lmbda` at one optimizer step (see the module docstring for the formulas).

    Args:
        step (`int`):
            The 0-based step about to be trained (the Trainer's `global_step` before it).
        max_steps (`int`):
            Optimizer steps of the whole run.
        schedule (`str`):
            One of `SCHEDULES`.
        start (`float`), end (`float`):
            The values at the first and at the last step; `"constant"` returns `start`.
        num_rounds (`int`):
            Rounds of the run; only `"step"` uses them.

    Returns:
        `float`: the probability that this step's completions are the student's.
    """
    if schedule == "constant":
        return start
    p = min(max(step / max(max_steps - 1, 1), 0.0), 1.0)
    if schedule == "linear":
        w = p
    elif schedule == "cosine":
        w = (1.0 - math.cos(math.pi * p)) / 2.0
    elif schedule == "step":
        r, rounds = round_of(step, max_steps, num_rounds)
        w = r / (rounds - 1) if rounds > 1 else 0.0
    else:
        raise ValueError(f"`lmbda_schedule` must be one of {SCHEDULES}, got {schedule!r}.")
    value = start * (1.0 - w) + end * w  # the weight w of `end`: 0 gives `start` and 1 gives `end` exactly
    return min(max(value, min(start, end)), max(start, end))  # never past an endpoint by a rounding error


def lmbda_endpoints(config) -> tuple[float, float]:
    """`(start, end)` of the config's schedule: `lmbda_start` (None: `lmbda`) and `lmbda_end` (None: the start);
    `(lmbda, lmbda)` for `"constant"`."""
    if config.lmbda_schedule == "constant":
        return config.lmbda, config.lmbda
    start = config.lmbda if config.lmbda_start is None else config.lmbda_start
    return start, start if config.lmbda_end is None else config.lmbda_end


def lmbda_of(config, step: int, max_steps: int) -> float:
    """The config's `lmbda` at `step` of a run of `max_steps` ([`lmbda_at`] with the config's schedule, over
    `lmbda_schedule_steps` when it is set: a run stopped by time or compute has no meaningful `max_steps`)."""
    start, end = lmbda_endpoints(config)
    horizon = max_steps if config.lmbda_schedule_steps is None else config.lmbda_schedule_steps
    return lmbda_at(step, horizon, config.lmbda_schedule, start, end, config.num_rounds)


def lmbda_range(config) -> tuple[float, float]:
    """The lowest and highest `lmbda` the config's schedule takes: what decides whether any step is off-policy
    (`lo < 1`: completions from the teacher or the dataset are needed) or on-policy (`hi > 0`: a live teacher is)."""
    start, end = lmbda_endpoints(config)
    return min(start, end), max(start, end)


def describe(config) -> str:
    """The schedule in an error message: "`lmbda=0.5`", or "`lmbda_schedule='linear'` from 0.0 to 1.0"."""
    if config.lmbda_schedule == "constant":
        return f"`lmbda={config.lmbda}`"
    start, end = lmbda_endpoints(config)
    return f"`lmbda_schedule={config.lmbda_schedule!r}` from {start} to {end}"
