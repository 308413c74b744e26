"""Rounds: training split into `num_rounds` shares of `max_steps` optimizer steps.

The callback handler ends each round (`on_round_end`, a checkpoint) at [`round_ends`]; the `"step"` schedule of
`lmbda` holds one value per round ([`round_of`]). Steps are counted as the Trainer's `global_step`: round ends are
1-based (the step just finished), [`round_of`] takes the 0-based step about to be trained.
"""

from __future__ import annotations


def round_ends(max_steps: int, num_rounds: int) -> list[int]:
    """Global steps at which rounds end: `num_rounds` equal shares of `max_steps` (fewer rounds, without empty ones,
    when `num_rounds > max_steps`)."""
    return sorted({max(1, round(max_steps * (r + 1) / num_rounds)) for r in range(num_rounds)})


def round_of(step: int, max_steps: int, num_rounds: int) -> tuple[int, int]:
    """The 0-based round that trains the 0-based `step` (the step after `global_step == step`), and the number of
    rounds there are. Steps past the last round end are in the last round."""
    ends = round_ends(max_steps, num_rounds)
    return min(sum(end <= step for end in ends), len(ends) - 1), len(ends)
