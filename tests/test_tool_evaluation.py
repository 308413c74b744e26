"""The calculator task scored (`tool_evaluation.py`): a sampler that writes the ground truth turn by turn scores 100%
with one call per equation; a malformed call is counted and answered, and the rollout goes on."""

import pytest

from trl_onpolicy.tool_evaluation import evaluate_with_tools, tool_tokenizer
from trl_onpolicy.toy import generate_problems
from trl_onpolicy.toy.calculator import tool_messages, tool_row
from trl_onpolicy.toy.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tool_tokenizer(build_tokenizer())


class GroundTruth:
    """A sampler that writes each problem's ground-truth turn (found from the transcript so far): the evaluation must
    score it 100%, with one call per equation and nothing malformed."""

    def __init__(self, tok, problems, break_first_call=False):
        self.tok, self.problems, self.broken = tok, problems, break_first_call

    def turn(self, problem, k):
        message = [m for m in tool_messages(problem) if m["role"] == "assistant"][k]
        calls = message.get("tool_calls") or []
        text = message["content"] + "".join(f"calc(expression={c['function']['arguments']['expression']})"
                                            for c in calls)  # fmt: skip
        if self.broken and k == 0:
            text = text.replace("calc(expression=", "calc(")
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]

    def sample(self, prompt_ids, generation_config, tokenizer=None):
        from trl_onpolicy.samplers import Samples

        out = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            problem = next(p for p in self.problems if p["question"] in text)
            out.append(self.turn(problem, ids.count(self.tok.eos_token_id)))
        return Samples(out, [False] * len(out))


def test_the_evaluation_scores_the_ground_truth_perfectly(tok):
    problems = generate_problems(12, "eval", seed=5)
    scores = evaluate_with_tools(None, tok, problems, batch_size=5, sampler=GroundTruth(tok, problems))
    n_equations = sum(len(tool_row(p)["masked_spans"]) for p in problems) / len(problems)
    assert scores == {"exact_match": 1.0, "calls_per_problem": pytest.approx(n_equations), "malformed_per_problem": 0.0,
                      "failed_call_fraction": 0.0}  # fmt: skip


def test_the_evaluation_counts_a_malformed_call(tok):
    problems = generate_problems(4, "eval", seed=5)
    scores = evaluate_with_tools(None, tok, problems, sampler=GroundTruth(tok, problems, break_first_call=True))
    assert scores["malformed_per_problem"] == 1.0  # one per problem, answered with an error; the rest goes on
    assert scores["failed_call_fraction"] == pytest.approx(1 / scores["calls_per_problem"])
