"""The quality benchmark's arithmetic: compute-to-threshold interpolation and the per-method summary."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _points(*pairs):
    return [{"cpu_s": c, "accuracy": a} for c, a in pairs]


def test_reach_interpolates_between_the_evaluations_that_bracket_the_target():
    points = _points((0, 0.2), (30, 0.4), (60, 0.8))
    assert quality.reach(points, 0.6) == pytest.approx(45.0)  # halfway from 0.4 (30 s) to 0.8 (60 s)
    assert quality.reach(points, 0.4) == 30  # reached exactly at an evaluation
    assert quality.reach(points, 0.1) == 0  # the start already is there
    assert quality.reach(points, 0.81) is None  # never reached


def test_reach_takes_the_first_crossing_when_accuracy_falls_back():
    points = _points((0, 0.2), (10, 0.7), (20, 0.5), (30, 0.9))
    assert quality.reach(points, 0.6) == pytest.approx(8.0)


def _run(method, seed, accs, step_s=10.0):
    points = [
        {"cpu_s": step_s * (i + 1), "accuracy": a, "step": i + 1, "phases": {"generation": 1.0, "update": 2.0},
         "flops": {"student_train": 3.0}}
        for i, a in enumerate(accs)
    ]  # fmt: skip
    return {"method": method, "seed": seed, "points": points}


def test_summarise_gives_mean_spread_and_the_ratio_to_the_reference():
    prep = {"teacher_exact_match": 1.0, "student_exact_match": 0.0}
    runs = [
        _run("onpolicy_jsd", 0, [0.6, 0.9]),  # 60% at 10 s, 90% at 20 s
        _run("onpolicy_jsd", 1, [0.3, 0.9]),  # 60% at 15 s (halfway from 0.3 to 0.9), 90% at 20 s
        _run("offline_sft", 0, [0.9, 0.95]),  # 60% at 6.67 s, 90% at 10 s
        _run("offline_sft", 1, [0.5, 0.7]),  # 60% at 15 s, 90% never
    ]
    out = quality.summarise("standard", prep, runs)
    jsd, sft = out["onpolicy_jsd"], out["offline_sft"]
    assert jsd["final_accuracy"]["mean"] == pytest.approx(0.9)
    assert sft["final_accuracy"]["min"] == pytest.approx(0.7) and sft["final_accuracy"]["max"] == pytest.approx(0.95)
    assert jsd["cpu_s_to_60pct"]["mean"] == pytest.approx(12.5)
    assert sft["cpu_s_to_60pct"]["mean"] == pytest.approx((20 / 3 + 15) / 2)
    assert sft["cpu_s_to_60pct"]["ratio_to_onpolicy_jsd"] == pytest.approx((20 / 3 + 15) / 2 / 12.5)
    assert sft["cpu_s_to_90pct"] == {"per_seed": [10.0, None], "mean": None, "reached": 1,
                                     "ratio_to_onpolicy_jsd": None}  # fmt: skip
    assert jsd["phases_s"] == {"teacher_generation": 0.0, "generation": 1.0, "teacher": 0.0, "update": 2.0}
