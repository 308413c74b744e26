"""The toy task with a calculator (`toy/calculator.py`): `calc`, the transcript rows and their masks, the template, the
turn parser."""

import re

import pytest
from transformers.utils import get_json_schema

from trl_onpolicy._compat import supports_tool_calling
from trl_onpolicy.tool_evaluation import tool_tokenizer
from trl_onpolicy.toy import generate_problems
from trl_onpolicy.toy.calculator import TOOLS_LINE, calc, parse_calc_turn, tool_messages, tool_row
from trl_onpolicy.toy.models import encode_rows
from trl_onpolicy.toy.task import to_prompt_completion
from trl_onpolicy.toy.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tool_tokenizer(build_tokenizer())


def test_calc_and_its_errors():
    assert [calc("7 + 5"), calc("12 - 3"), calc("4 x 4"), calc(" 6*7 ")] == ["12", "9", "16", "42"]
    with pytest.raises(ValueError, match=re.escape("not an operation on two whole numbers: '2 + 3 + 4'")):
        calc("2 + 3 + 4")
    assert get_json_schema(calc)["function"]["parameters"]["required"] == ["expression"]


def test_a_tool_row_is_the_plain_chain_with_each_value_asked_of_calc():
    problem = {"question": "Mia has 7 pens. She buys 5 more. Then she gives away 3. How many pens does Mia have now?",
               "answer": "Mia buys 5 more: 7 + 5 = 12.\nMia gives away 3: 12 - 3 = 9.\n#### 9"}  # fmt: skip
    row = tool_row(problem)
    assert row["prompt"] == TOOLS_LINE + to_prompt_completion(problem)["prompt"]
    assert row["completion"] == (" Mia buys 5 more: calc(expression=7 + 5)</s> = 12.\nMia gives away 3: "
                                 "calc(expression=12 - 3)</s> = 9.\n#### 9")  # fmt: skip
    assert [row["completion"][a:b] for a, b in row["masked_spans"]] == [" = 12", " = 9"]


def test_the_template_renders_the_messages_into_the_row(tok):
    """The transcript the trainer builds turn by turn is the text the teacher was trained on."""
    assert supports_tool_calling(tok)
    for problem in generate_problems(20, "eval", seed=3):
        row = tool_row(problem)
        rendered = tok.apply_chat_template(tool_messages(problem), tools=[get_json_schema(calc)], tokenize=False)
        assert rendered == row["prompt"] + row["completion"] + "</s>"


def test_the_tools_answers_are_not_targets(tok):
    problem = generate_problems(1, "eval", seed=0)[0]
    batch = encode_rows(tok, [tool_row(problem)])
    labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    masked = tok.decode([i for i, lab in zip(ids, labels) if lab == -100 and i != tok.pad_token_id])
    prompt = tool_row(problem)["prompt"]
    assert masked == prompt + "".join(
        tool_row(problem)["completion"][a:b] for a, b in tool_row(problem)["masked_spans"]
    )
    assert ids.count(tok.eos_token_id) == len(tool_row(problem)["masked_spans"]) + 1  # one per call, one at the end


@pytest.mark.parametrize(
    "text, expected",
    [
        (" Mia buys 5 more: calc(expression=7 + 5)", {"content": " Mia buys 5 more: ", "expression": "7 + 5"}),
        (".\n#### 9", {"content": ".\n#### 9"}),
    ],
)
def test_parse_calc_turn(text, expected):
    message = parse_calc_turn(text)
    assert message["content"] == expected["content"]
    calls = message.get("tool_calls") or []
    assert [c["function"]["arguments"]["expression"] for c in calls] == ([expected["expression"]] if "expression" in
                                                                          expected else [])  # fmt: skip


def test_a_malformed_call_is_an_error():
    with pytest.raises(ValueError, match="a call must end the turn as calc"):
        parse_calc_turn(" Mia buys 5 more: calc(7 + 5)")
