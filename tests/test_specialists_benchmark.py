"""The specialists benchmark's bookkeeping (`benchmarks/specialists.py`): two half-budget specialists make one point
(CPU-s summed, accuracy the mean over the domains), and the summary keeps each domain and the classifier's routing."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # specialists.py imports quality.py as a sibling
_spec = importlib.util.spec_from_file_location("specialists_benchmark", BENCHMARKS / "specialists.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def point(cpu_s, step, accuracy, generation=10.0):
    return {"cpu_s": cpu_s, "step": step, "accuracy": accuracy, "phases": {"generation": generation, "teacher": 5.0}}


def test_two_specialists_make_one_point():
    combined = bench.combine([point(61.0, 30, 0.5), point(62.0, 20, 0.2, generation=20.0)])
    assert combined["cpu_s"] == 123.0 and combined["step"] == 50
    assert combined["accuracy"] == pytest.approx(0.35)
    assert combined["per_domain"] == {"standard": 0.5, "hard": 0.2}
    assert combined["phases"] == {"generation": 30.0, "teacher": 10.0}


def test_summary_keeps_domains_and_the_routed_scores():
    def run(method, seed, scores, routed=None):
        points = [{**point(120.0 * (i + 1), 40 * (i + 1), (s + h) / 2), "per_domain": {"standard": s, "hard": h}}
                  for i, (s, h) in enumerate(scores)]  # fmt: skip
        record = {"method": method, "seed": seed, "points": points}
        if routed:
            record["routed"] = routed
        return record

    routed = [{"classifier_cpu_s": 1.0, "standard": 0.6, "hard": 0.2, "router_accuracy_standard": 1.0,
               "router_accuracy_hard": 0.9},
              {"classifier_cpu_s": 3.0, "standard": 0.4, "hard": 0.4, "router_accuracy_standard": 0.8,
               "router_accuracy_hard": 1.0}]  # fmt: skip
    runs = [run("specialists", 1, [(0.3, 0.1), (0.5, 0.3)], routed[1]), run("specialists", 0, [(0.2, 0.0), (0.6, 0.2)],
            routed[0]), run("generalist_2x128", 0, [(0.3, 0.1), (0.4, 0.1)])]  # fmt: skip
    summary = bench.summarise({}, runs)["methods"]
    last = summary["specialists"]["points"][1]
    assert summary["specialists"]["seeds"] == [0, 1] and last["per_seed"] == [0.4, 0.4]
    assert last["standard"] == pytest.approx(0.55) and last["hard"] == pytest.approx(0.25)
    by_classifier = summary["specialists"]["routed_by_classifier"]
    assert by_classifier["mean"] == pytest.approx(0.4) and by_classifier["router_accuracy_hard"] == pytest.approx(0.95)
    assert by_classifier["classifier_cpu_s"] == pytest.approx(2.0)
    assert "routed_by_classifier" not in summary["generalist_2x128"]
