"""Loss temperature: the temperature that softens the student and teacher distributions inside the distillation loss.

This is not the sampling temperature of the rollouts: that one decides which completions the student writes, this one
decides how the divergence between the two models' next-token distributions is measured (`softmax(logits / T)` on both
sides). The two are separate knobs on purpose; see `STYLE.md`.

[`LossTemperature`] gives the value for each optimizer step. With `s` the 0-based global step, `N = total_steps` and
`p = min(s / N, 1)` (so every schedule holds `end` from step `N` on):

- `"constant"`:    `T = start` (`end` is ignored).
- `"linear"`:      `T = start + (end - start) * p`.
- `"cosine"`:      `T = end + (start - end) * 0.5 * (1 + cos(pi * p))`: flat near both ends, `(start + end) / 2` at
  `p = 1/2`.
- `"exponential"`: `T = start * (end / start) ** p`: geometric interpolation, a constant ratio per step, i.e. linear
  in `log T`.
- `"adaptive"`:    a proportional controller on `log T` that steers the mean per-token entropy of the teacher (measured
  at the current loss temperature on the last batch) towards `target_entropy`:

      log T <- log T + adapt_rate * (target_entropy - teacher_entropy) / target_entropy

  then `T` is clamped to `[min_temperature, max_temperature]`. Entropy grows with `T`, so a too-peaked teacher raises
  `T` and a too-flat one lowers it. It starts at `start`; a step without a measured entropy leaves `T` unchanged.

The first four are pure functions of the step, so resuming is calling `step(k)`; the adaptive one carries state
(`log T`) that goes through [`~LossTemperature.state_dict`] like an LR scheduler's.

Gradient scale. Hinton et al. (2015, "Distilling the Knowledge in a Neural Network", section 2) note that the gradients
of a loss between distributions softened at temperature `T` shrink by about `1 / T**2`, and multiply the soft loss by
`T**2` so that changing `T` does not change the effective learning rate. The trainer does the same when the config
option `temperature_grad_scale` is on: it multiplies the loss by [`grad_scale`]`(T, True) = T**2`. This module only
documents and computes the factor; it never touches a loss.

How this departs from the paper: Hinton et al. use one fixed `T` and a mix of soft and hard targets; here the loss is
the on-policy divergence alone and `T` may follow a schedule. The adaptive controller is our own addition, not from a
paper; it is a plain proportional controller with no integral term, so on a teacher whose entropy is `c * log T + d` it
converges geometrically (factor `1 - adapt_rate * c / target_entropy` per step) when `0 < adapt_rate * c <
2 * target_entropy`.
"""

from __future__ import annotations

import math
from typing import Any


SCHEDULES = ("constant", "linear", "cosine", "exponential", "adaptive")

# Guards the division in the adaptive update; `target_entropy > 0` is validated, so this only matters for tiny targets.
_EPS = 1e-8


def grad_scale(temperature: float, enabled: bool) -> float:
    """Factor the trainer multiplies the distillation loss by: `temperature**2` when `enabled`, else `1.0`.

    Args:
        temperature (`float`):
            Current loss temperature, `> 0`.
        enabled (`bool`):
            Value of the config option `temperature_grad_scale`.

    Returns:
        `float`: `temperature**2` or `1.0`.
    """
    _check_positive("temperature", temperature)
    return float(temperature) ** 2 if enabled else 1.0


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}. Pass a positive temperature.")


class LossTemperature:
    """
    Schedule of the loss temperature, advanced once per optimizer step (see the module docstring for the formulas).

    Args:
        schedule (`str`, *optional*, defaults to `"constant"`):
            One of `"constant"`, `"linear"`, `"cosine"`, `"exponential"`, `"adaptive"`.
        start (`float`, *optional*, defaults to `1.0`):
            Temperature at step 0 (for `"adaptive"`: the initial value of the controller).
        end (`float`, *optional*, defaults to `1.0`):
            Temperature from step `total_steps` on. Ignored by `"constant"` and `"adaptive"`.
        total_steps (`int`, *optional*, defaults to `1`):
            Number of optimizer steps over which `start` moves to `end`. Ignored by `"constant"` and `"adaptive"`.
        target_entropy (`float` or `None`, *optional*, defaults to `None`):
            Mean per-token teacher entropy (nats) that `"adaptive"` steers towards. Required, and `> 0`, for
            `"adaptive"`; ignored otherwise.
        min_temperature (`float`, *optional*, defaults to `0.5`):
            Lower clamp of `"adaptive"`.
        max_temperature (`float`, *optional*, defaults to `10.0`):
            Upper clamp of `"adaptive"`.
        adapt_rate (`float`, *optional*, defaults to `0.1`):
            Gain of the `"adaptive"` controller on `log T`.

    Example:

    ```python
    >>> temp = LossTemperature("cosine", start=2.0, end=1.0, total_steps=100)
    >>> temp.step(50)
    1.5
    ```
    """

    @classmethod
    def from_config(cls, args) -> LossTemperature:
        """The schedule an [`OnPolicyDistillConfig`] describes (`loss_temperature_schedule`, `temperature_*`,
        `target_teacher_entropy`), over `max_steps` (the trainer sets the real count once training starts)."""
        return cls(
            schedule=args.loss_temperature_schedule,
            start=args.temperature_start,
            end=args.temperature_end,
            total_steps=max(args.max_steps, 1),
            target_entropy=args.target_teacher_entropy,
            min_temperature=args.temperature_min,
            max_temperature=args.temperature_max,
            adapt_rate=args.temperature_adapt_rate,
        )

    def __init__(
        self,
        schedule: str = "constant",
        start: float = 1.0,
        end: float = 1.0,
        total_steps: int = 1,
        target_entropy: float | None = None,
        min_temperature: float = 0.5,
        max_temperature: float = 10.0,
        adapt_rate: float = 0.1,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"Unknown loss temperature schedule {schedule!r}. Choose one of {', '.join(SCHEDULES)}.")
        for name, value in (
            ("start", start),
            ("end", end),
            ("min_temperature", min_temperature),
            ("max_temperature", max_temperature),
        ):
            _check_positive(name, value)
        if min_temperature > max_temperature:
            raise ValueError(
                f"`min_temperature` ({min_temperature}) is greater than `max_temperature` ({max_temperature}). "
                "Set `min_temperature <= max_temperature`."
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"`total_steps` must be an integer >= 1, got {total_steps!r}. Pass the number of optimizer steps."
            )
        if not (isinstance(adapt_rate, (int, float)) and math.isfinite(adapt_rate) and adapt_rate > 0):
            raise ValueError(f"`adapt_rate` must be a finite number > 0, got {adapt_rate!r}. Try 0.1.")
        if schedule == "adaptive":
            if target_entropy is None:
                raise ValueError(
                    "The 'adaptive' schedule needs `target_entropy`, got None. Pass the mean per-token teacher "
                    "entropy (nats) to aim for, e.g. 1.0."
                )
            if not (isinstance(target_entropy, (int, float)) and math.isfinite(target_entropy) and target_entropy > 0):
                raise ValueError(f"`target_entropy` must be a finite number > 0, got {target_entropy!r}.")
            if not min_temperature <= start <= max_temperature:
                raise ValueError(
                    f"`start` ({start}) lies outside [`min_temperature`, `max_temperature`] = "
                    f"[{min_temperature}, {max_temperature}]. Pick a start inside the clamp range."
                )

        self.schedule = schedule
        self.start = float(start)
        self.end = float(end)
        self.total_steps = int(total_steps)
        self.target_entropy = None if target_entropy is None else float(target_entropy)
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.adapt_rate = float(adapt_rate)

        self._step = 0  # last step passed to `step()`
        self._log_temperature = math.log(self.start)  # state of the adaptive controller
        self._last_update_step: int | None = None  # step at which the controller last moved (one move per step)

    # ------------------------------------------------------------------ values

    @property
    def value(self) -> float:
        """The temperature to use for the current step."""
        if self.schedule == "adaptive":
            return math.exp(self._log_temperature)
        return self._scheduled(self._step)

    def _scheduled(self, step: int) -> float:
        p = min(step / self.total_steps, 1.0)
        if self.schedule == "constant":
            return self.start
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * p
        if self.schedule == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.schedule == "exponential":
            return self.start * (self.end / self.start) ** p
        raise AssertionError(f"unreachable: schedule {self.schedule!r}")

    def step(self, step: int, teacher_entropy: float | None = None) -> float:
        """
        Move to optimizer step `step` and return the new value.

        Args:
            step (`int`):
                0-based global optimizer step.
            teacher_entropy (`float` or `None`, *optional*, defaults to `None`):
                Mean per-token teacher entropy (nats) measured at the current value on the last batch. Used only by
                `"adaptive"`; `None` leaves its value unchanged.

        Returns:
            `float`: the temperature for step `step`.

        The adaptive controller moves at most once per step number: a second call with the step it last moved at is a
        no-op, so repeated calls (e.g. once per gradient-accumulation micro-batch) do not compound.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0 (the 0-based global optimizer step), got {step!r}.")
        self._step = step
        if self.schedule != "adaptive" or teacher_entropy is None or step == self._last_update_step:
            return self.value
        entropy = float(teacher_entropy)
        if not math.isfinite(entropy):
            raise ValueError(f"`teacher_entropy` must be finite, got {entropy}. Check the teacher logits for NaN/inf.")
        error = (self.target_entropy - entropy) / max(self.target_entropy, _EPS)
        log_t = self._log_temperature + self.adapt_rate * error
        self._log_temperature = min(max(log_t, math.log(self.min_temperature)), math.log(self.max_temperature))
        self._last_update_step = step
        return self.value

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Settings and state, as plain JSON-serialisable Python, enough to resume exactly."""
        return {
            "schedule": self.schedule,
            "start": self.start,
            "end": self.end,
            "total_steps": self.total_steps,
            "target_entropy": self.target_entropy,
            "min_temperature": self.min_temperature,
            "max_temperature": self.max_temperature,
            "adapt_rate": self.adapt_rate,
            "step": self._step,
            "log_temperature": self._log_temperature,
            "last_update_step": self._last_update_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """
        Restore from [`~LossTemperature.state_dict`]. As with `torch.optim.lr_scheduler`, the saved settings replace
        those given to `__init__`; they are validated again.
        """
        names = ("schedule", "start", "end", "total_steps", "target_entropy", "min_temperature", "max_temperature")
        required = (*names, "adapt_rate", "step", "log_temperature", "last_update_step")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(
                f"Loss temperature state is missing {missing}. Pass a dict from `LossTemperature.state_dict()`."
            )
        checked = LossTemperature(**{key: state[key] for key in names}, adapt_rate=state["adapt_rate"])
        self.__dict__.update(checked.__dict__)
        self._step = int(state["step"])
        self._log_temperature = float(state["log_temperature"])
        last = state["last_update_step"]
        self._last_update_step = None if last is None else int(last)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r}, value={self.value:.4g}, step={self._step})"
