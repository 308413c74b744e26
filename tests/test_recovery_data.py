"""Training chains with a slip and its correction (`toy.slips`), the judge of wrong lines, the masked loss, the
recipe option that turns them on, and the token cuts of `benchmarks/recovery.py`."""

import dataclasses
import importlib.util
import random
import re
from pathlib import Path

import pytest
import torch

from trl_onpolicy.toy import recipe as recipe_module
from trl_onpolicy.toy.models import build_model, encode_rows
from trl_onpolicy.toy.recipe import TEACHER_RECIPE, Recipe, _key, batch_rows, supervised_loss
from trl_onpolicy.toy.slips import SLIP_KINDS, first_departure, first_wrong_line, slip_row, wrong_lines
from trl_onpolicy.toy.task import final_answer, generate_problems, is_correct, to_prompt_completion
from trl_onpolicy.toy.tokenizer import build_tokenizer

LINE = re.compile(r"^(.*): (\d+) ([+\-x]) (\d+) = (\d+)\.$")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
QUESTION = "Mia has 7 pens. She buys 5 more. Then she gives away 3. How many pens does Mia have now?"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def slipped():
    rng = random.Random(0)
    return [(p, slip_row(p, rng)) for p in generate_problems(300, "train", seed=5, min_steps=1, max_steps=6)]


# ----------------------------------------------------------------------------- the judge


@pytest.mark.parametrize(
    ("completion", "wrong"),
    [
        (" Mia buys 5 more: 7 + 5 = 12.\nMia gives away 3: 12 - 3 = 9.\n#### 9", []),
        (" Mia buys 5 more: 7 + 5 = 13.\nMia gives away 3: 13 - 3 = 10.\n#### 10", [0]),  # result; then consistent
        (" Mia buys 5 more: 7 + 5 = 12.\nMia gives away 3: 13 - 3 = 10.\n#### 10", [1]),  # operand not carried
        (" Mia buys 5 more: 6 + 5 = 11.\nMia gives away 3: 11 - 3 = 8.\n#### 8", [0]),  # first operand misread
        (" Mia buys 4 more: 7 + 4 = 11.\nMia gives away 3: 11 - 3 = 8.\n#### 8", []),  # a misread b is not judged
        (" Mia buys 5 more: 7 + 5 = 13.\nWait, 7 + 5 = 12.\nMia gives away 3: 12 - 3 = 9.\n#### 9", [0]),
        (" Mia buys 5 more: 8 + 5 = 13.\nWait, 7 + 5 = 12.\nMia gives away 3: 12 - 3 = 9.\n#### 9", [0]),
        (" Mia buys 5 more: 7 + 5 = 13.\nWait, 13 + 5 = 18.\n#### 18", [0, 1]),  # a wrong correction
        (" Mia buys 5 more.\n#### 12", []),  # no equation, nothing judged
    ],
)
def test_wrong_lines_by_the_definition(completion, wrong):
    assert wrong_lines(QUESTION, completion) == wrong
    assert first_wrong_line(QUESTION, completion) == (wrong[0] if wrong else None)


def test_first_departure_is_the_first_equation_unlike_the_reference():
    answer = "Mia buys 5 more: 7 + 5 = 12.\nMia gives away 3: 12 - 3 = 9.\n#### 9"
    assert first_departure(answer, " Mia buys 5 more: 7 + 5 = 12.\nMia gives away 3: 12 - 3 = 9.\n#### 9") is None
    assert first_departure(answer, " Mia buys 4 more: 7 + 4 = 11.\nMia gives away 3: 11 - 3 = 8.\n#### 8") == 0
    assert first_departure(answer, " Mia buys 5 more: 7 + 5 = 12.\nx\nMia uses 3: 12 + 3 = 15.\n#### 15") == 2
    assert first_departure(answer, " A: 7 + 5 = 12.\nB: 12 - 3 = 9.\nC: 9 - 1 = 8.\n#### 8") == 2  # an extra step


# ----------------------------------------------------------------------------- the generator


def test_slip_rows_hold_one_wrong_line_then_its_correction(slipped):
    kinds = set()
    for problem, row in slipped:
        original = to_prompt_completion(problem)["completion"].split("\n")
        lines = row["completion"].split("\n")
        i = row["slip"]["line"]
        assert lines[:i] == original[:i] and lines[i + 2 :] == original[i + 1 :]  # the rest of the chain unchanged
        right, wrong = LINE.match(original[i].strip()), LINE.match(lines[i].strip())
        assert wrong[1] == right[1] and wrong[4] == right[4] and wrong[3] == right[3]  # same text, op and b
        a, op, b, c = int(wrong[2]), wrong[3], int(wrong[4]), int(wrong[5])
        assert APPLY[op](a, b) != c or a != int(right[2])  # the slip is wrong by the definition...
        assert c != int(right[5]) and 0 <= a <= 99 and 0 <= c <= 99  # ...carries a wrong value, one token each
        assert lines[i + 1] == f"Wait, {right[2]} {op} {right[4]} = {right[5]}."  # the correction: the right line
        assert wrong_lines(problem["question"], row["completion"]) == [i]  # the correction itself is judged right
        assert final_answer(row["completion"]) == final_answer(problem["answer"])
        assert is_correct(row["completion"], problem)
        kinds.add(row["slip"]["kind"])
    assert kinds == set(SLIP_KINDS)


def test_silent_slips_go_straight_on_from_the_right_value():
    problems = generate_problems(300, "train", seed=5, min_steps=1, max_steps=6)
    rng_a, rng_b = random.Random(0), random.Random(0)
    for problem in problems:
        corrected, silent = slip_row(problem, rng_a), slip_row(problem, rng_b, style="silent")
        assert silent["slip"] == corrected["slip"]  # the same draws: only the correction line differs
        lines, i = corrected["completion"].split("\n"), corrected["slip"]["line"]
        assert silent["completion"] == "\n".join(lines[: i + 1] + lines[i + 2 :])
        assert silent["masked_span"] == corrected["masked_span"]
        assert silent["completion"][slice(*silent["masked_span"])] == lines[i] + "\n"
        original = to_prompt_completion(problem)["completion"].split("\n")
        assert silent["completion"].split("\n")[i + 1 :] == original[i + 1 :]  # carries the right value on
        assert is_correct(silent["completion"], problem)


def test_unknown_recovery_style_is_refused():
    problem = generate_problems(1, "train", seed=5)[0]
    with pytest.raises(ValueError, match=re.escape("style must be one of ('correction', 'silent'), got 'quiet'")):
        slip_row(problem, random.Random(0), style="quiet")
    with pytest.raises(ValueError, match=re.escape("recovery_style must be one of ('correction', 'silent'), got 'x'")):
        Recipe(num_layers=1, hidden_size=32, steps=1, recovery_style="x")


def test_masked_span_is_exactly_the_wrong_line_and_its_newline(slipped):
    for _, row in slipped:
        start, end = row["masked_span"]
        lines = row["completion"].split("\n")
        i = row["slip"]["line"]
        assert row["completion"][start:end] == lines[i] + "\n"
        assert row["completion"][:start] == "".join(line + "\n" for line in lines[:i])


def test_batch_rows_put_the_slips_after_the_mc_rows():
    problems = generate_problems(32, "train", seed=1)
    recipe = Recipe(num_layers=1, hidden_size=32, steps=1, mc_fraction=0.125, correction_fraction=0.25)
    rows = batch_rows(problems, recipe, step=3)
    assert [("masked_span" in r) for r in rows] == [False] * 4 + [True] * 8 + [False] * 20
    assert all(r["prompt"].endswith("\nAnswer:") and " A. " not in r["prompt"] for r in rows[4:])
    assert rows == batch_rows(problems, recipe, step=3) and rows != batch_rows(problems, recipe, step=4)
    plain = batch_rows(problems, dataclasses.replace(recipe, mc_fraction=0.0, correction_fraction=0.0), step=3)
    assert plain == [to_prompt_completion(p) for p in problems]  # the default recipe's batches as before
    silent = batch_rows(problems, dataclasses.replace(recipe, recovery_style="silent"), step=3)
    assert sum("Wait," in r["completion"] for r in rows) == 8 and not any("Wait," in r["completion"] for r in silent)
    assert [r.get("slip") for r in silent] == [r.get("slip") for r in rows]


# ----------------------------------------------------------------------------- masking in the loss


def test_encode_rows_masks_the_tokens_of_the_span_and_keeps_the_tokenization(tok, slipped):
    rows = [row for _, row in slipped[:40]]
    batch = encode_rows(tok, rows)
    for k, row in enumerate(rows):
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        whole = tok(row["completion"], add_special_tokens=False)["input_ids"]  # tokenized in one piece
        n = len(prompt) + len(whole) + 1
        assert batch["input_ids"][k, :n].tolist() == prompt + whole + [tok.eos_token_id]
        # Naive reference: a completion token is masked iff its characters lie inside the span.
        start, end = row["masked_span"]
        expected = []
        for j, token in enumerate(whole):
            left, right = len(tok.decode(whole[:j])), len(tok.decode(whole[: j + 1]))
            expected.append(-100 if start <= left and right <= end else token)
        assert batch["labels"][k, :n].tolist() == [-100] * len(prompt) + expected + [tok.eos_token_id]
        assert tok.decode([t for t in expected if t != -100]) == row["completion"].replace(
            row["completion"][start:end], "", 1)


def test_supervised_loss_matches_a_per_token_reference_and_the_mask_matters(tok, slipped):
    torch.manual_seed(0)
    model = build_model(1, 32, tok, seed=0)
    rows = [slipped[0][1], slipped[1][1], to_prompt_completion(slipped[2][0])]
    batch = encode_rows(tok, rows)
    loss = supervised_loss(model, batch)
    total, count, masked_total, masked_count = 0.0, 0, 0.0, 0
    for row in rows:  # one unpadded sequence at a time, every target token by hand
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        start, end = row.get("masked_span", (0, 0))
        text = row["completion"]
        pieces = [tok(t, add_special_tokens=False)["input_ids"] if t else [] for t in
                  (text[:start], text[start:end], text[end:])]  # fmt: skip
        ids = prompt + pieces[0] + pieces[1] + pieces[2] + [tok.eos_token_id]
        targets = range(len(prompt), len(ids))
        skip = range(len(prompt) + len(pieces[0]), len(prompt) + len(pieces[0]) + len(pieces[1]))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        for t in targets:
            if t not in skip:
                total -= logprobs[t - 1, ids[t]].item()
                count += 1
            else:
                masked_total -= logprobs[t - 1, ids[t]].item()
                masked_count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # Without the span the same ids are all targets: the masked tokens' NLL is what the mask took out.
    unmasked = encode_rows(tok, [{k: v for k, v in r.items() if k != "masked_span"} for r in rows])
    assert torch.equal(unmasked["input_ids"], batch["input_ids"]) and masked_count > 10
    expected = (total + masked_total) / (count + masked_count)
    assert supervised_loss(model, unmasked).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- the recipe option


def test_cache_names_of_recipes_before_the_option_are_unchanged(monkeypatch):
    student = Recipe(num_layers=2, hidden_size=128, steps=300, min_lr_ratio=recipe_module.STUDENT_MIN_LR_RATIO)
    assert _key(student) == "3a43195e"  # the 2 x 128 student's cache name before correction_fraction existed
    assert _key(dataclasses.replace(student, correction_fraction=0.25)) != "3a43195e"
    names = []
    monkeypatch.setattr(recipe_module, "load_or_train", lambda name, recipe, **kw: names.append((name, recipe)))
    recipe_module.load_or_train_teacher()
    recipe_module.load_or_train_teacher(correction_fraction=0.25)
    assert names[0] == (f"teacher-{recipe_module.RECIPE_VERSION}", TEACHER_RECIPE)
    assert names[1][0] == f"teacher-{recipe_module.RECIPE_VERSION}-a0ee5dc1"
    assert names[1][1].correction_fraction == 0.25
    silent = dataclasses.replace(TEACHER_RECIPE, correction_fraction=0.25, recovery_style="silent")
    assert _key(silent) not in ("a0ee5dc1", _key(TEACHER_RECIPE))  # its own cache name; the others keep theirs


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"correction_fraction": 1.5}, "correction_fraction must be in [0, 1 - mc_fraction] = [0, 1], got 1.5"),
        ({"mc_fraction": 0.5, "correction_fraction": 0.75},
         "correction_fraction must be in [0, 1 - mc_fraction] = [0, 0.5], got 0.75"),
    ],
)  # fmt: skip
def test_bad_correction_fraction_is_refused(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Recipe(num_layers=1, hidden_size=32, steps=1, **kw)


# ----------------------------------------------------------------------------- the benchmark's cuts


def _recovery_benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "recovery.py"
    spec = importlib.util.spec_from_file_location("recovery_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_cuts_at_the_newline_tokens_around_the_first_wrong_line(tok):
    recovery = _recovery_benchmark()
    problem = {"question": QUESTION, "answer": "Mia buys 5 more: 7 + 5 = 12.\nMia gives away 3: 12 - 3 = 9.\n#### 9"}
    lines = [" Mia buys 5 more: 7 + 5 = 12.\n", "Mia gives away 3: 12 - 3 = 10.\n", "#### 10"]
    ids = [tok(line, add_special_tokens=False)["input_ids"] for line in lines]
    completion = ids[0] + ids[1] + ids[2]
    cut = recovery.line_cuts(tok, "arithmetic", problem, completion)
    assert (cut["line"], cut["before"], cut["after"]) == (1, len(ids[0]), len(ids[0]) + len(ids[1]))
    assert (cut["wrong_value"], cut["newline_added"]) == (10, False)
    assert tok.decode(completion[cut["before"] : cut["after"]]) == lines[1]
    truncated = ids[0] + tok("Mia gives away 3: 12 - 3 = 10.", add_special_tokens=False)["input_ids"]
    assert recovery.line_cuts(tok, "arithmetic", problem, truncated)["newline_added"] is True
    assert recovery.line_cuts(tok, "arithmetic", problem, ids[0]) is None
    misread = tok(" Mia buys 4 more: 7 + 4 = 11.\n", add_special_tokens=False)["input_ids"]
    assert recovery.line_cuts(tok, "arithmetic", problem, misread) is None
    assert recovery.line_cuts(tok, "reference", problem, misread)["line"] == 0
