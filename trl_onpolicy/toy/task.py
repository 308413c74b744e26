"""A seeded generator of arithmetic word problems in GSM8K's format: the embedded default task.

Each problem is a short story about one person and one kind of object; every sentence after the first changes the
count by `+`, `-` or `x` a small number. The answer is a chain of thought with one line per step, each line ending in
one equation `a op b = c`, then GSM8K's final line `#### <int>`:

    Question: Mia has 7 pens. She buys 5 more. Then she gives away 3. How many pens does Mia have now?
    Answer: Mia buys 5 more: 7 + 5 = 12.
    Mia gives away 3: 12 - 3 = 9.
    #### 9

How it departs from GSM8K: the numbers are kept small (every operand and result is an integer in [0, 50], an
operand of `+`/`-` at most 9: tables small enough for a tiny model to learn in minutes, and every number is one token
of the toy tokenizer) and the sentences are short, because sequence length drives the cost of generation on a CPU.
`min_steps`/`max_steps` (up to 8 and beyond) set the difficulty.

Train and eval never overlap: a question belongs to the eval split when a stable hash of its text falls in the
eval bucket (1 in 5), and the generator rejects questions of the other split. The same seed always gives the same
problems (Python's `random.Random` seeded with an int, no `hash()` of strings).
"""

from __future__ import annotations

import hashlib
import random
import re

import datasets

MAX_VALUE = 50  # every operand and every intermediate result stays in [0, MAX_VALUE]
MAX_OPERAND = 9  # operands of + and - (x takes 2 to 4)
EVAL_BUCKETS = 5  # a question is in "eval" when its hash % EVAL_BUCKETS == 0, else in "train"

# (name, subject pronoun, object pronoun)
PEOPLE = [
    ("Tom", "He", "him"), ("Mia", "She", "her"), ("Sam", "He", "him"), ("Ana", "She", "her"), ("Leo", "He", "him"),
    ("Zoe", "She", "her"), ("Ben", "He", "him"), ("Eva", "She", "her"), ("Max", "He", "him"), ("Lily", "She", "her"),
    ("Omar", "He", "him"), ("Nina", "She", "her"), ("Raj", "He", "him"), ("Kim", "She", "her"), ("Ali", "He", "him"),
    ("Ivy", "She", "her"),
]
OBJECTS = [
    "apples", "pens", "books", "cards", "shells", "stamps", "marbles", "coins", "eggs", "cookies", "stickers",
    "flowers", "rocks", "toys", "candies", "bottles", "cups", "balls",
]
CONTAINERS = ["boxes", "bags", "jars", "packs", "baskets"]

# Phrases for one step. "q" is the sentence in the question, "cot" the start of the chain-of-thought line.
# {P} subject pronoun, {p} the same in lower case, {o} object pronoun, {n} name, {b} operand, {obj} object.
ADD = [
    {"q": "{P} buys {b} more.", "cot": "{n} buys {b} more"},
    {"q": "{P} finds {b} more.", "cot": "{n} finds {b} more"},
    {"q": "A friend gives {o} {b} more.", "cot": "A friend gives {b} more"},
    {"q": "{P} gets {b} more {obj}.", "cot": "{n} gets {b} more"},
    {"q": "{P} wins {b} more.", "cot": "{n} wins {b} more"},
]
SUB = [
    {"q": "{P} gives away {b}.", "cot": "{n} gives away {b}"},
    {"q": "{P} loses {b} of them.", "cot": "{n} loses {b}"},
    {"q": "{P} sells {b}.", "cot": "{n} sells {b}"},
    {"q": "{P} uses {b} {obj}.", "cot": "{n} uses {b}"},
    {"q": "{P} gives {b} to a friend.", "cot": "{n} gives {b} away"},
]
MUL = [
    {"q": "{P} ends up with {b} times as many.", "cot": "{b} times as many"},
    {"q": "The number of {obj} grows {b} times.", "cot": "It grows {b} times"},
    {"q": "{P} gets {b} times as many {obj}.", "cot": "{n} gets {b} times as many"},
]
CONNECTORS = ["", "Then ", "Next, ", "After that, ", "Later, "]
QUESTIONS = [
    "How many {obj} does {n} have now?",
    "How many {obj} does {n} have in the end?",
    "How many {obj} are left?",
    "How many {obj} does {p} have now?",
]

_EQUATION = re.compile(r"(\d+) ([+\-x]) (\d+) = (\d+)")


# ----------------------------------------------------------------------------- generation


def _start(rng: random.Random, name: str, obj: str, with_equation: bool) -> tuple[str, list[str], int]:
    """The first sentence: either a plain count (no step) or a count that takes one equation (one step)."""
    if not with_equation:
        a = rng.randint(2, 20)
        return f"{name} has {a} {obj}.", [], a
    if rng.random() < 0.5:  # a groups of b
        container = rng.choice(CONTAINERS)
        a, b = rng.randint(2, 5), rng.randint(2, 9)
        q = f"{name} has {a} {container} with {b} {obj} in each."
        return q, [f"{name} has {a} {container} of {b}: {a} x {b} = {a * b}."], a * b
    a, b = rng.randint(2, 12), rng.randint(2, 12)  # two kinds of one object
    q = f"{name} has {a} small {obj} and {b} big {obj}."
    return q, [f"{name} has {a} small and {b} big: {a} + {b} = {a + b}."], a + b


def _step(rng: random.Random, value: int) -> tuple[str, int, int]:
    """Choose an operation valid for the current value: (op, operand, result), all in [0, MAX_VALUE]."""
    ops = []
    if value <= MAX_VALUE - 1:
        ops.append("+")
    if value >= 1:
        ops.append("-")
    if 1 <= value <= MAX_VALUE // 2:
        ops.append("x")
    op = rng.choice(ops)
    if op == "+":
        b = rng.randint(1, min(MAX_OPERAND, MAX_VALUE - value))
        return op, b, value + b
    if op == "-":
        b = rng.randint(1, min(MAX_OPERAND, value))
        return op, b, value - b
    b = rng.randint(2, min(4, MAX_VALUE // value))
    return op, b, value * b


def _one_problem(rng: random.Random, n_steps: int) -> dict:
    name, pronoun, obj_pronoun = rng.choice(PEOPLE)
    obj = rng.choice(OBJECTS)
    fmt = {"n": name, "P": pronoun, "p": pronoun.lower(), "o": obj_pronoun, "obj": obj}
    start_with_equation = rng.random() < 0.4
    question, cot, value = _start(rng, name, obj, start_with_equation)
    sentences = [question]
    for i in range(n_steps - len(cot)):
        op, b, result = _step(rng, value)
        phrase = rng.choice({"+": ADD, "-": SUB, "x": MUL}[op])
        connector = rng.choice(CONNECTORS) if i > 0 else ""
        sentence = phrase["q"].format(b=b, **fmt)
        if connector:  # "Then she buys ...": sentences start with a pronoun, "A friend" or "The number"
            sentence = connector + sentence[0].lower() + sentence[1:]
        sentences.append(sentence)
        subject = phrase["cot"].format(b=b, **fmt)
        cot.append(f"{subject}: {value} {op} {b} = {result}.")
        value = result
    sentences.append(rng.choice(QUESTIONS).format(**fmt))
    return {"question": " ".join(sentences), "answer": "\n".join(cot + [f"#### {value}"])}


def split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text (never Python's salted `hash`)."""
    digest = hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def generate_problems(
    n: int, split: str = "train", seed: int = 0, min_steps: int = 2, max_steps: int = 4
) -> list[dict]:
    """`n` problems of `split` ("train" or "eval"), each `{"question", "answer"}`, with `min_steps..max_steps`
    equations in the chain of thought. Deterministic for a given `(split, seed, min_steps, max_steps)`; the two
    splits never share a question. Duplicates within a split are possible (the task is small), as in any sampler."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    # A different stream per split, so that eval problems are not a filtered view of the train stream.
    rng = random.Random(seed * 1_000_003 + (17 if split == "eval" else 0) + 7919 * min_steps + 104_729 * max_steps)
    problems = []
    while len(problems) < n:
        problem = _one_problem(rng, rng.randint(min_steps, max_steps))
        if split_of(problem["question"]) == split:
            problems.append(problem)
    return problems


# ----------------------------------------------------------------------------- scoring


def final_answer(text: str) -> str | None:
    """The integer after the last `####` (commas and spaces stripped, normalised: "007" -> "7"), else None."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    match = re.match(r"[ \t]*(-?\d[\d,]*)", text[idx + 4 :])
    if match is None:
        return None
    return str(int(match.group(1).replace(",", "")))


def is_correct(completion: str, problem: dict) -> bool:
    """Exact match of the final answers, as lm-eval's GSM8K `strict-match` does."""
    predicted = final_answer(completion)
    return predicted is not None and predicted == final_answer(problem["answer"])


def equations(answer: str) -> list[tuple[int, str, int, int]]:
    """The `(a, op, b, c)` of every `a op b = c` in a chain of thought, in order."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in _EQUATION.findall(answer)]


# ----------------------------------------------------------------------------- other formats


def to_multiple_choice(problem: dict, seed: int = 0) -> dict:
    """MMLU's format: the correct value and three distinct plausible distractors (the last step with a wrong
    operation, off by a small amount, off by ten), in a position drawn from `seed` and the question."""
    correct = int(final_answer(problem["answer"]))
    eqs = equations(problem["answer"])
    digest = hashlib.blake2b(problem["question"].encode("utf-8"), digest_size=8).digest()
    rng = random.Random(seed * 1_000_003 + int.from_bytes(digest, "little"))
    candidates = []
    if eqs:
        a, _, b, _ = eqs[-1]
        candidates += [a + b, a - b, a * b]  # the last step with another operation
    candidates = [c for c in candidates if c >= 0 and c != correct]
    rng.shuffle(candidates)
    near = [correct + d for d in (1, -1, 2, -2, 10, -10, 3, -3) if correct + d >= 0]
    rng.shuffle(near)
    distractors: list[int] = []
    for c in candidates[:1] + near + candidates[1:] + list(range(correct + 4, correct + 20)):
        if c not in distractors and c != correct:
            distractors.append(c)
        if len(distractors) == 3:
            break
    choices = distractors + [correct]
    rng.shuffle(choices)
    return {
        "question": problem["question"],
        "choices": [str(c) for c in choices],
        "answer": choices.index(correct),
        "subject": "arithmetic",
    }


MC_LETTERS = "ABCD"


def mc_prompt_text(mc: dict) -> str:
    """MMLU's prompt for a `to_multiple_choice` row, character for character what lm-eval renders from
    `toy_mmlu.yaml`'s `doc_to_text` ("question\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:"); the scored continuations are
    " A" .. " D" (lm-eval's default target delimiter " " + the letter)."""
    lines = [mc["question"].strip()] + [f"{MC_LETTERS[j]}. {c}" for j, c in enumerate(mc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def to_mc_prompt_completion(problem: dict, seed: int = 0) -> dict:
    """TRL's prompt-completion format in MMLU's rendering: the completion is the gold letter after a space (" B")."""
    mc = to_multiple_choice(problem, seed=seed)
    return {"prompt": mc_prompt_text(mc), "completion": " " + MC_LETTERS[mc["answer"]]}


def prompt_text(question: str) -> str:
    """GSM8K's lm-eval prompt."""
    return f"Question: {question}\nAnswer:"


def to_prompt_completion(problem: dict) -> dict:
    """TRL's prompt-completion format; the completion starts with the space that follows "Answer:"."""
    return {"prompt": prompt_text(problem["question"]), "completion": " " + problem["answer"]}


def mc_rows(n: int, mc_fraction: float, seed: int = 0) -> set[int]:
    """Which of `n` rows are in MMLU's format: exactly `round(n * mc_fraction)` of them, at positions drawn from
    `seed` (spread through the rows, so that any stretch of them mixes both formats)."""
    if not 0.0 <= mc_fraction <= 1.0:
        raise ValueError(f"mc_fraction must be in [0, 1], got {mc_fraction}")
    return set(random.Random(seed * 1_000_003 + 31).sample(range(n), round(n * mc_fraction)))


def make_dataset(n: int, split: str = "train", seed: int = 0, mc_fraction: float = 0.0, **kw) -> datasets.Dataset:
    """A `datasets.Dataset` with columns prompt, completion, question, answer (kw: min_steps, max_steps).

    `mc_fraction` of the rows (exactly `round(n * mc_fraction)`, see `mc_rows`) have prompt/completion in MMLU's
    format (`to_mc_prompt_completion`, choices placed with `seed`); question and answer are always the underlying
    GSM8K-format problem, so `final_answer(row["answer"])` is the gold value in either format."""
    mc = mc_rows(n, mc_fraction, seed)
    rows = [
        {**(to_mc_prompt_completion(p, seed=seed) if i in mc else to_prompt_completion(p)), **p}
        for i, p in enumerate(generate_problems(n, split=split, seed=seed, **kw))
    ]
    return datasets.Dataset.from_list(rows)
