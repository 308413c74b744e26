"""The tools benchmark's pieces that are not the runs: a rollout's completion back into the messages SFT trains on,
and the summary per method and point in seed order."""

import importlib.util
import sys
from pathlib import Path

import pytest

from trl_onpolicy.tool_evaluation import tool_tokenizer
from trl_onpolicy.toy import generate_problems
from trl_onpolicy.toy.calculator import tool_messages, tool_row
from trl_onpolicy.toy.models import encode_rows
from trl_onpolicy.toy.tokenizer import build_tokenizer

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # tools.py imports quality.py as a sibling
_spec = importlib.util.spec_from_file_location("tools_benchmark", BENCHMARKS / "tools.py")
tools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tools)


def test_a_transcript_becomes_the_messages_it_was_rendered_from():
    """The ground-truth transcript as the trainer lays it out (ids and tool_mask) comes back as its messages."""
    tok = tool_tokenizer(build_tokenizer())
    for problem in generate_problems(10, "eval", seed=1):
        batch = encode_rows(tok, [tool_row(problem)])
        prompt_len = len(tok(tool_row(problem)["prompt"], add_special_tokens=False)["input_ids"])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        completion, mask = ids[prompt_len:], [int(lab != -100) for lab in labels[prompt_len:]]
        expected = [{k: v for k, v in m.items() if k != "name"} for m in tool_messages(problem)[1:]]
        got = [{k: v for k, v in m.items() if k != "name"} for m in tools.transcript_messages(tok, completion, mask)]
        assert got == expected


def test_summary_per_method_in_seed_order():
    def run(method, seed, scores):
        points = [{"cpu_s": 120.0 * (i + 1), "step": 10 * (i + 1), "phases": {"update": 1.0},
                   "accuracy": {"exact_match": em, "calls_per_problem": c, "malformed_per_problem": 0.0}}
                  for i, (em, c) in enumerate(scores)]  # fmt: skip
        return {"method": method, "seed": seed, "points": points, "pool_exact_match": None}

    runs = [run("onpolicy_tools", 1, [(0.2, 1.0), (0.4, 2.0)]), run("onpolicy_tools", 0, [(0.1, 0.0), (0.3, 3.0)])]
    summary = tools.summarise({"teacher": {}, "student": {}}, runs)["methods"]["onpolicy_tools"]
    assert summary["seeds"] == [0, 1] and summary["points"][1]["per_seed"] == [0.3, 0.4]
    assert summary["points"][1]["exact_match"]["mean"] == pytest.approx(0.35)
    assert summary["points"][1]["calls_per_problem"]["mean"] == pytest.approx(2.5)
