"""The privileged-context benchmark's summary: per study and method, each score's spread at each point, in seed
order; the reward function it shares with TRL's GRPOTrainer."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # privileged.py imports quality.py as a sibling
_spec = importlib.util.spec_from_file_location("privileged", BENCHMARKS / "privileged.py")
privileged = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(privileged)


def _run(study, method, seed, scores):
    points = [{"cpu_s": 40.0 * (i + 1), "step": 10 * (i + 1), "scores": s} for i, s in enumerate(scores)]
    return {"study": study, "method": method, "seed": seed, "points": points}


def test_summary_per_study_method_and_point_in_seed_order():
    runs = [
        _run("rewards", "grpo_reward", 1, [{"exact_match": 0.3}, {"exact_match": 0.4}, {"exact_match": 0.6}]),
        _run("rewards", "grpo_reward", 0, [{"exact_match": 0.1}, {"exact_match": 0.2}, {"exact_match": 0.2}]),
        _run("constitution", "onpolicy_constitution", 0,
             [{"exact_match": 0.2, "refusal": 0.0}, {"exact_match": 0.3, "refusal": 0.5},
              {"exact_match": 0.4, "refusal": 1.0}]),
    ]  # fmt: skip
    summary = privileged.summarise(runs)
    grpo = summary["rewards"]["grpo_reward"]
    assert grpo["cpu_s"] == [40.0, 80.0, 120.0] and grpo["steps"] == [30, 30]
    assert grpo["exact_match"][2]["seeds"] == [0.2, 0.6]  # seed 0 first
    assert grpo["exact_match"][2]["mean"] == pytest.approx(0.4)
    assert (grpo["exact_match"][2]["min"], grpo["exact_match"][2]["max"]) == (0.2, 0.6)
    assert summary["constitution"]["onpolicy_constitution"]["refusal"][1]["mean"] == 0.5


def test_the_reward_is_the_exact_match_of_the_final_answer():
    answers = ["Tom buys 2 more: 3 + 2 = 5.\n#### 5", "#### 12"]
    assert privileged.exact_match(["p", "q"], [" 3 + 2 = 5.\n#### 5", " #### 13"], answer=answers) == [1.0, 0.0]
    assert privileged.exact_match(["p"], [" I can't help with that.\n#### refused"], answer=["#### 4"]) == [0.0]
