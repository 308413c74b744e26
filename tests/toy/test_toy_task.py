"""The toy task: determinism, arithmetic checked from the chain of thought, disjoint splits, other formats."""

import re

import pytest

from trl_onpolicy.toy.task import (
    MAX_VALUE,
    final_answer,
    generate_problems,
    is_correct,
    make_dataset,
    mc_prompt_text,
    prompt_text,
    to_mc_prompt_completion,
    to_multiple_choice,
    to_prompt_completion,
)

EQUATION = re.compile(r"^(.*): (\d+) ([+\-x]) (\d+) = (\d+)\.$")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


def check_chain(problem, min_steps, max_steps):
    """Recompute the answer from the chain of thought, written independently of the generator."""
    *steps, last = problem["answer"].split("\n")
    assert min_steps <= len(steps) <= max_steps, problem
    previous = None
    for line in steps:
        match = EQUATION.match(line)
        assert match, f"not 'text: a op b = c.': {line!r}"
        a, op, b, c = int(match[2]), match[3], int(match[4]), int(match[5])
        assert APPLY[op](a, b) == c, line
        assert 0 <= c <= MAX_VALUE and 0 <= b <= MAX_VALUE, line
        if previous is not None:
            assert a == previous, f"step does not continue from {previous}: {line!r}"
        assert re.search(rf"\b{b}\b", problem["question"]), f"operand {b} not in the question"
        previous = c
    assert last == f"#### {previous}"
    assert final_answer(problem["answer"]) == str(previous)


def test_same_seed_same_problems_other_seed_differs():
    assert generate_problems(50, seed=3) == generate_problems(50, seed=3)
    assert generate_problems(50, seed=3) != generate_problems(50, seed=4)
    assert generate_problems(50, "eval", seed=3) == generate_problems(50, "eval", seed=3)
    assert generate_problems(10, seed=3) == generate_problems(50, seed=3)[:10]


@pytest.mark.parametrize("min_steps,max_steps", [(2, 4), (1, 1), (5, 8)])
def test_every_answer_follows_from_its_chain_of_thought(min_steps, max_steps):
    problems = generate_problems(500, "train", seed=1, min_steps=min_steps, max_steps=max_steps)
    for problem in problems:
        check_chain(problem, min_steps, max_steps)
    lengths = {len(p["answer"].split("\n")) - 1 for p in problems}
    assert lengths == set(range(min_steps, max_steps + 1))


def test_questions_are_varied():
    problems = generate_problems(500, seed=0)
    assert len({p["question"] for p in problems}) > 490
    assert len({p["question"].split()[0] for p in problems}) >= 10  # names
    assert {op for p in problems for op in re.findall(r" ([+\-x]) ", p["answer"])} == {"+", "-", "x"}


def test_train_and_eval_never_overlap():
    train = {p["question"] for p in generate_problems(4000, "train", seed=0)}
    train |= {p["question"] for p in generate_problems(1000, "train", seed=1, min_steps=1, max_steps=8)}
    evals = {p["question"] for p in generate_problems(1000, "eval", seed=0)}
    evals |= {p["question"] for p in generate_problems(500, "eval", seed=1, min_steps=1, max_steps=8)}
    assert len(evals) > 1000
    assert not train & evals


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, split="test")
    with pytest.raises(ValueError, match="min_steps=3"):
        generate_problems(1, min_steps=3, max_steps=2)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a: 1 + 2 = 3.\n#### 3", "3"),
        ("#### 1,234", "1234"),
        ("#### 5\n#### 6 and more", "6"),
        ("####   -4.", "-4"),
        ("####007", "7"),
        ("The answer is 5", None),
        ("#### five", None),
        ("", None),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_is_correct():
    problem = {"question": "q", "answer": "x: 2 + 3 = 5.\n#### 5"}
    assert is_correct(" x: 2 + 3 = 5.\n#### 5", problem)
    assert is_correct("whatever #### 5\n\nQuestion: more", problem)
    assert not is_correct(" x: 2 + 3 = 6.\n#### 6", problem)
    assert not is_correct(" x: 2 + 3 = 5.", problem)


def test_multiple_choice():
    positions = set()
    for i, problem in enumerate(generate_problems(300, seed=2, min_steps=1, max_steps=6)):
        mc = to_multiple_choice(problem, seed=i % 3)
        assert mc["question"] == problem["question"] and mc["subject"] == "arithmetic"
        assert len(mc["choices"]) == 4 and len(set(mc["choices"])) == 4
        assert all(c.isdigit() for c in mc["choices"]), mc
        assert mc["choices"][mc["answer"]] == final_answer(problem["answer"])
        assert mc == to_multiple_choice(problem, seed=i % 3)
        positions.add(mc["answer"])
    assert positions == {0, 1, 2, 3}


def test_prompt_formats_and_dataset():
    problem = generate_problems(1)[0]
    assert prompt_text("Q?") == "Question: Q?\nAnswer:"
    row = to_prompt_completion(problem)
    assert row == {"prompt": f"Question: {problem['question']}\nAnswer:", "completion": " " + problem["answer"]}
    ds = make_dataset(20, "eval", seed=5, max_steps=6)
    assert len(ds) == 20 and {"prompt", "completion", "question", "answer"} <= set(ds.column_names)
    assert ds[0]["question"] == generate_problems(20, "eval", seed=5, max_steps=6)[0]["question"]


def test_mc_prompt_format():
    mc = {"question": " Q? ", "choices": ["12", "3", "40", "7"], "answer": 2, "subject": "arithmetic"}
    assert mc_prompt_text(mc) == "Q?\nA. 12\nB. 3\nC. 40\nD. 7\nAnswer:"
    problem = generate_problems(1, seed=4)[0]
    row = to_mc_prompt_completion(problem, seed=1)
    mc = to_multiple_choice(problem, seed=1)
    assert row == {"prompt": mc_prompt_text(mc), "completion": " " + "ABCD"[mc["answer"]]}


def test_mc_prompt_is_what_lm_eval_shows_for_toy_mmlu(tmp_path):
    """The prompt and the scored continuations, taken from lm-eval's own `toy_mmlu` task object."""
    pytest.importorskip("lm_eval")
    from trl_onpolicy.tasks import prepare_tasks

    prepared = prepare_tasks(["toy_mmlu"], tmp_path, toy_eval_size=12, toy_seed=3)
    task = prepared.task_manager().load(prepared.names)["tasks"]["toy_mmlu"]
    docs = list(task.test_docs())
    problems = generate_problems(12, "eval", seed=3)
    assert len(docs) == len(problems) == 12
    for doc, problem in zip(docs, problems):
        row = to_mc_prompt_completion(problem, seed=3)
        assert row["prompt"] == task.doc_to_text(doc)
        choices = [task.config.target_delimiter + c for c in task.doc_to_choice(doc)]
        assert choices == [" A", " B", " C", " D"]
        assert row["completion"] == choices[task.doc_to_target(doc)]


@pytest.mark.parametrize("n,mc_fraction", [(40, 0.25), (40, 0.0), (7, 0.5), (10, 1.0)])
def test_mixed_dataset_has_the_requested_fraction(n, mc_fraction):
    ds = make_dataset(n, "train", seed=2, mc_fraction=mc_fraction)
    problems = generate_problems(n, "train", seed=2)
    is_mc = [not row["prompt"].startswith("Question: ") for row in ds]
    assert sum(is_mc) == round(n * mc_fraction)
    assert ds.column_names == ["prompt", "completion", "question", "answer"]
    for row, mc, problem in zip(ds, is_mc, problems):
        assert (row["question"], row["answer"]) == (problem["question"], problem["answer"])
        expected = to_mc_prompt_completion(problem, seed=2) if mc else to_prompt_completion(problem)
        assert {"prompt": row["prompt"], "completion": row["completion"]} == expected
    if n == 40 and mc_fraction == 0.25:  # spread through the rows, not one block
        assert 0 < sum(is_mc[: n // 2]) < n // 2
    assert make_dataset(n, "train", seed=2, mc_fraction=mc_fraction)["prompt"] == ds["prompt"]
    with pytest.raises(ValueError, match="mc_fraction must be in \\[0, 1\\], got 1.5"):
        make_dataset(4, mc_fraction=1.5)
