"""Slips in a chain of thought: judging which line of a completion is wrong, and training chains that contain a
slip followed by its correction.

A line is judged by its own equation `a op b = c` (the first one on the line; a line without one is not judged):
it is **wrong** when `c != a op b`, or when `a` is not the value the chain carries, i.e. the result `c` written on
the previous line that has an equation (the chain's own previous value, right or wrong), or, for the first
equation, the first integer of the question (every problem's first equation starts from it: "Mia has 7 pens" ->
`7 ...`, "4 bags with 3 ..." -> `4 x 3`, "8 small and 7 big" -> `8 + 7`). The right operand `b` is not judged
(a misread `b` gives a consistent chain that answers another question); nor is the `####` line. A correction line
(below) is judged against the value carried into the line it corrects. `first_departure` is a stricter judge: the
first equation that is not the reference chain's.

A training chain with a slip (`slip_row`) has one equation line rewritten with a plausible wrong value, then a
correction line in one fixed format, then the rest of the original chain, which goes on from the right value:

    Mia buys 5 more: 7 + 5 = 13.        <- the slip: context, masked out of the loss (`masked_span`)
    Wait, 7 + 5 = 12.                   <- the correction: a target
    Mia gives away 3: 12 - 3 = 9.
    #### 9

That is the `"correction"` style. In the `"silent"` style the correction line is left out: the chain goes straight
on from the right value, as a writer does who misstated a line and kept the right value in mind (the slip is still
masked out of the loss, so the model learns only to carry the right value past a wrong line, never to write one):

    Mia buys 5 more: 7 + 5 = 13.        <- the slip: context, masked out of the loss
    Mia gives away 3: 12 - 3 = 9.       <- a target: carries 12, not the 13 written above
    #### 9

The slip is one of three kinds, drawn with equal odds: the result off by 1-3 (`result`), the result of another
operation on the same operands (`operation`), or a left operand off by 1-3 carried consistently into the result
(`operand`). Every value stays in [0, 99] (one token each) and differs from the right one; when a kind has no such
value another kind is drawn. The final `#### <int>` line is unchanged, so `is_correct` grades as before.
"""

from __future__ import annotations

import random
import re

from .task import _EQUATION, to_prompt_completion

APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
SLIP_KINDS = ("result", "operation", "operand")
MAX_SLIP_VALUE = 99  # every number below 100 is one token of the toy tokenizer
CORRECTION_PREFIX = "Wait, "
CORRECTION = CORRECTION_PREFIX + "{a} {op} {b} = {c}."
RECOVERY_STYLES = ("correction", "silent")


# ----------------------------------------------------------------------------- judging


def first_number(question: str) -> int | None:
    """The first integer of the question: the left operand of a correct chain's first equation."""
    match = re.search(r"\d+", question)
    return None if match is None else int(match.group())


def wrong_lines(question: str, completion: str) -> list[int]:
    """Indices (into `completion.split("\\n")`) of the lines judged wrong, as the module docstring defines. A
    correction line ("Wait, ...") restates the line before it, so its left operand is judged against the value
    carried into that line; the chain then carries the correction's result."""
    carried = into_previous = first_number(question)
    wrong = []
    for i, line in enumerate(completion.split("\n")):
        match = _EQUATION.search(line)
        if match is None:
            continue
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        expected = into_previous if line.startswith(CORRECTION_PREFIX) else carried
        if APPLY[op](a, b) != c or a != expected:
            wrong.append(i)
        into_previous, carried = expected, c
    return wrong


def first_wrong_line(question: str, completion: str) -> int | None:
    """The index of the first wrong line of `completion` (see `wrong_lines`), or None when no line is wrong."""
    wrong = wrong_lines(question, completion)
    return wrong[0] if wrong else None


def first_departure(answer: str, completion: str) -> int | None:
    """The index (into `completion.split("\\n")`) of the first line whose equation is not the reference chain's
    equation of the same rank in `answer` (a stricter judge than `first_wrong_line`: a misread `b` or another
    operation also counts), or None when every equation of the completion is the reference's."""
    reference = [m.groups() for m in _EQUATION.finditer(answer)]
    rank = 0
    for i, line in enumerate(completion.split("\n")):
        match = _EQUATION.search(line)
        if match is None:
            continue
        if rank >= len(reference) or match.groups() != reference[rank]:
            return i
        rank += 1
    return None


# ----------------------------------------------------------------------------- training chains


def _slipped(rng: random.Random, kind: str, a: int, op: str, b: int, c: int) -> tuple[int, int] | None:
    """A wrong `(a', c')` of `kind` for the right equation `a op b = c`, or None when the kind has no valid value."""
    if kind == "result":
        options = [(a, c + d) for d in (-3, -2, -1, 1, 2, 3)]
    elif kind == "operation":
        options = [(a, APPLY[other](a, b)) for other in APPLY if other != op]
    else:
        options = [(a + d, APPLY[op](a + d, b)) for d in (-3, -2, -1, 1, 2, 3)]
    options = [(x, y) for x, y in options if 0 <= x <= MAX_SLIP_VALUE and 0 <= y <= MAX_SLIP_VALUE and y != c]
    return rng.choice(options) if options else None


def slip_row(problem: dict, rng: random.Random, style: str = "correction") -> dict:
    """`to_prompt_completion(problem)` with one equation line (drawn from `rng`) replaced by a slip, followed by its
    correction (`style="correction"`) or by the rest of the chain straight away (`"silent"`; see the module
    docstring), plus `masked_span`: the `[start, end)` characters of the completion that hold the wrong line and its
    newline (context, not a target), and `slip`: `{"line", "kind", "wrong", "right"}`."""
    if style not in RECOVERY_STYLES:
        raise ValueError(f"style must be one of {RECOVERY_STYLES}, got {style!r}")
    row = to_prompt_completion(problem)
    lines = row["completion"].split("\n")  # lines[0] keeps the completion's leading space
    steps = [i for i, line in enumerate(lines) if _EQUATION.search(line)]
    if not steps:
        raise ValueError(f"the problem's answer has no equation to slip on: {problem['answer']!r}")
    i = rng.choice(steps)
    match = _EQUATION.search(lines[i])
    a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
    kinds = list(SLIP_KINDS)
    rng.shuffle(kinds)
    for kind in kinds:  # the first kind (in a random order) that has a valid wrong value
        slip = _slipped(rng, kind, a, op, b, c)
        if slip is not None:
            break
    else:  # every kind fails only for degenerate operands; the generator never makes them
        raise ValueError(f"no valid slip for {lines[i]!r}")
    wrong = lines[i][: match.start()] + f"{slip[0]} {op} {b} = {slip[1]}" + lines[i][match.end() :]
    correction = [CORRECTION.format(a=a, op=op, b=b, c=c)] if style == "correction" else []
    new_lines = lines[:i] + [wrong, *correction] + lines[i + 1 :]
    start = sum(len(line) + 1 for line in lines[:i])
    return {
        **row,
        "completion": "\n".join(new_lines),
        "masked_span": [start, start + len(wrong) + 1],
        "slip": {"line": i, "kind": kind, "wrong": f"{slip[0]} {op} {b} = {slip[1]}", "right": f"{a} {op} {b} = {c}"},
    }
