"""The cross-tokenizer benchmark's summary (`benchmarks/cross_tokenizer.py`): per method, in seed order, with the
alignment rate and the CPU-s the alignment took."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # cross_tokenizer.py imports quality.py as a sibling
_spec = importlib.util.spec_from_file_location("cross_tokenizer_benchmark", BENCHMARKS / "cross_tokenizer.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def run(method, seed, scores, rate):
    points = [{"cpu_s": 120.0 * (i + 1), "step": 50 * (i + 1), "accuracy": em,
               "phases": {"generation": 10.0, "teacher": 20.0, "alignment": 3.0 * (seed + 1)}}
              for i, em in enumerate(scores)]  # fmt: skip
    return {"method": method, "seed": seed, "points": points, "alignment_rate": [rate, rate]}


def test_summary_per_method_in_seed_order():
    runs = [run("cross_uld", 1, [0.3, 0.5], 0.26), run("cross_uld", 0, [0.2, 0.4], 0.24), run("same_jsd", 0, [0.3, 0.6],
                                                                                               None)]  # fmt: skip
    summary = bench.summarise({}, runs)["methods"]
    cross = summary["cross_uld"]
    assert cross["seeds"] == [0, 1] and cross["points"][1]["per_seed"] == [0.4, 0.5]
    assert cross["points"][1]["exact_match"]["mean"] == pytest.approx(0.45)
    assert cross["alignment_rate"] == [0.24, 0.26] and cross["phases_s"]["alignment"] == pytest.approx(4.5)
    assert summary["same_jsd"]["alignment_rate"] == [None] and list(summary) == ["same_jsd", "cross_uld"]
