"""`trl-onpolicy compare`: the table and recommendation pinned on hand-made points; the command end to end on the
embedded task (toy dataset, toy lm-eval tasks, toy-architecture models) with a budget of a few CPU-seconds; and the
exact messages for bad input, given before any model loads."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_onpolicy.commands import cli
from trl_onpolicy.commands.compare import NO_EVAL_TASKS, _methods
from trl_onpolicy.pilot_report import format_recommendation, format_table, recommend, summarise

ROOT = Path(__file__).resolve().parents[1]


def _pilot(method, seed, scores, step_s=5.0):
    points = [{"cpu_s": step_s * i, "step": 10 * i, "scores": {"toy_gsm8k": s, "toy_mmlu": 0.25},
               "phases": {"generation": 1.0 * i, "update": 2.0 * i}, "flops": {"student_train": 1e9 * i}}
              for i, s in enumerate(scores)]  # fmt: skip
    return {"method": method, "seed": seed, "points": points}


# ------------------------------------------------------------------------------------------------ pure parts


def test_a_lead_over_two_standard_errors_is_a_clear_recommendation():
    pilots = [_pilot("onpolicy", 0, [0.2, 0.5, 0.6]), _pilot("offline", 0, [0.2, 0.3, 0.4])]
    summary = summarise(pilots, "toy_gsm8k", "cpu_s", target=0.9)
    assert summary["onpolicy"]["final"] == 0.6 and summary["onpolicy"]["final_std"] is None
    assert summary["onpolicy"]["to_target"] == pytest.approx(7.0)  # 0.54 is 40% of the way from 0.5 (5 s) to 0.6
    assert summary["offline"]["to_target"] is None
    assert summary["onpolicy"]["phases"] == {"generation": 2.0, "update": 4.0}
    rec = recommend(summary, "toy_gsm8k", "cpu_s", 0.9, n_eval=200)
    assert rec["standard_error"] == pytest.approx(math.sqrt(2 * 0.5 * 0.5 / 200))  # pooled p = 0.5: 0.05
    assert (rec["method"], rec["strong"], rec["lead"]) == ("onpolicy", True, pytest.approx(0.2))
    assert format_recommendation(rec) == (
        "Recommendation: onpolicy.\n"
        "- final toy_gsm8k: onpolicy 0.600, offline 0.400 (after ~10.0 charged CPU-s each)\n"
        "- CPU-s to 90% of the best final score: onpolicy 7.0, offline never\n"
        "- lead over offline: 0.200 vs 2 standard errors = 0.100 (from a proportion over 200 eval examples): clear\n"
        "- one seed per method: the run-to-run noise is not measured (--seeds 0,1,2 measures it)\n"
    )
    assert format_table(summary, "toy_gsm8k", "cpu_s", [5.0, 10.0], 0.9).splitlines() == [
        "toy_gsm8k by charged compute",
        "",
        "| method | seeds | start | @5 CPU-s | @10 CPU-s | final | CPU-s to 90% of best | steps | GFLOP |",
        "|---|---|---|---|---|---|---|---|---|",
        "| onpolicy | 1 | 0.200 | 0.500 | 0.600 | 0.600 | 7.0 | 20 | 2.0 |",
        "| offline | 1 | 0.200 | 0.300 | 0.400 | 0.400 | never | 20 | 2.0 |",
    ]


def test_a_lead_within_the_noise_is_a_weak_recommendation():
    pilots = [_pilot("mixed", 0, [0.2, 0.45]), _pilot("onpolicy", 0, [0.2, 0.5])]
    rec = recommend(summarise(pilots, "toy_gsm8k", "cpu_s", 0.9), "toy_gsm8k", "cpu_s", 0.9, n_eval=200)
    assert (rec["method"], rec["runner_up"], rec["strong"]) == ("onpolicy", "mixed", False)
    assert rec["evidence"][2] == (
        "lead over mixed: 0.050 vs 2 standard errors = 0.100 (from a proportion over 200 eval examples): within the "
        "noise: weak, run longer (--budget) or with more seeds (--seeds)"
    )
    assert format_recommendation(rec).startswith("Recommendation: onpolicy (weak).\n")


def test_with_seeds_the_spread_over_seeds_is_the_noise_when_it_is_larger():
    pilots = [_pilot("onpolicy", s, [0.2, v]) for s, v in enumerate((0.9, 0.5))]
    pilots += [_pilot("offline", s, [0.2, v]) for s, v in enumerate((0.4, 0.4))]
    summary = summarise(pilots, "toy_gsm8k", "cpu_s", 0.9)
    assert summary["onpolicy"]["final"] == pytest.approx(0.7) and summary["onpolicy"]["seeds"] == [0, 1]
    assert summary["onpolicy"]["final_std"] == pytest.approx(math.sqrt(0.08))  # stdev of 0.9, 0.5
    rec = recommend(summary, "toy_gsm8k", "cpu_s", 0.9, n_eval=1000)
    assert rec["standard_error"] == pytest.approx(math.sqrt(0.08 / 2 + 0.0))  # 0.2 > the binomial 0.022
    assert not rec["strong"]  # lead 0.3 < 2 x 0.2
    assert "(from a proportion over 1000 eval examples and the spread over 2 and 2 seeds)" in rec["evidence"][2]
    assert not any("one seed per method" in line for line in rec["evidence"])


def test_without_a_noise_estimate_the_recommendation_is_weak():
    pilots = [_pilot("onpolicy", 0, [0.2, 0.9]), _pilot("offline", 0, [0.2, 0.1])]
    rec = recommend(summarise(pilots, "toy_gsm8k", "cpu_s", 0.9), "toy_gsm8k", "cpu_s", 0.9, n_eval=None)
    assert rec["standard_error"] is None and not rec["strong"]
    assert "the noise is unknown" in rec["evidence"][2]


def test_methods_take_overrides_of_recipe_fields():
    assert _methods("offline,onpolicy:loss_type=reverse_kl,beta=1.0,mixed") == [
        ("offline", []),
        ("onpolicy:loss_type=reverse_kl,beta=1.0", ["--loss_type", "reverse_kl", "--beta", "1.0"]),
        ("mixed", []),
    ]


# ------------------------------------------------------------------------------------------------ bad input


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "trl_onpolicy.commands.cli", "compare", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "0"], "trl-onpolicy compare: error: argument --budget: must be > 0.0, got 0"),
        (["--budget", "-5"], "trl-onpolicy compare: error: argument --budget: must be > 0.0, got -5"),
        (["--budget", "5", "--methods", "offline,sft"],
         ("trl-onpolicy compare: error: argument --methods: unknown method 'sft': use offline, onpolicy, mixed, "
          "optionally with recipe fields, e.g. onpolicy:loss_type=reverse_kl,beta=1.0")),
        (["--budget", "5", "--methods", "onpolicy,mixed,onpolicy"],
         ("trl-onpolicy compare: error: argument --methods: method(s) onpolicy given twice (--seeds runs a method "
          "again)")),
        (["--budget", "5", "--methods", "onpolicy:beta"],
         "trl-onpolicy compare: error: argument --methods: 'onpolicy:beta': write overrides as key=value, got 'beta'"),
    ],
)  # fmt: skip
def test_bad_flags_fail_before_any_work(flags, message, tmp_path):
    proc = _cli([*flags, "--output_dir", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_recipe_without_eval_tasks_is_refused_with_the_fix(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "toy", "teacher_model_name_or_path": "toy",
                                      "dataset_name": "toy"}))  # fmt: skip
    assert cli.main(["compare", "--config", str(recipe), "--budget", "5", "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"trl-onpolicy compare: error: {NO_EVAL_TASKS.format(recipe=recipe)}\n(add --debug for the traceback)\n"
    )
    assert "add `eval_tasks: toy_gsm8k`" in err and not (tmp_path / "o").exists()


def test_a_misspelt_override_names_the_field(tmp_path, capsys):
    assert cli.main(["compare", "--budget", "5", "--methods", "onpolicy:lmdba=0.3"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        "trl-onpolicy compare: error: Unknown field `lmdba` on the command line (did you mean `lmbda`?). See "
        "`trl-onpolicy distill --help-all` for every field."
    )


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def toy_recipe(tmp_path_factory):
    """The embedded task (toy dataset and lm-eval tasks) with toy-architecture models at their initialisation (the
    trained toy teacher and student take minutes to build), as a recipe of a few tiny steps."""
    from trl_onpolicy.toy.models import build_model
    from trl_onpolicy.toy.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("compare")
    tok = build_tokenizer()
    for name, layers, hidden, seed in (("student", 1, 32, 0), ("teacher", 2, 48, 1)):
        build_model(layers, hidden, tok, seed=seed).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    recipe = {
        "model_name_or_path": str(folder / "student"), "teacher_model_name_or_path": str(folder / "teacher"),
        "dataset_name": "toy", "max_train_samples": 64, "eval_tasks": "toy_gsm8k,toy_mmlu", "eval_limit": 4,
        "num_threads": 1, "per_device_train_batch_size": 4, "max_completion_length": 16, "max_length": 256,
        "learning_rate": 1e-3, "use_cpu": True, "seed": 0,
    }  # fmt: skip
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_compare_runs_every_pilot_from_the_same_student_within_its_budget(toy_recipe, tmp_path, capsys):
    """30 s here (60 s on 2 busy cores): 4 CPU-s of training, 6 evaluations of 4 + 4 examples, 2 model loads."""
    out = tmp_path / "out"
    code = cli.main(["compare", "--config", str(toy_recipe), "--methods", "offline,onpolicy", "--budget", "2",
                     "--evals", "2", "--output_dir", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    assert set(result) == {"setup", "pilots", "summary", "recommendation", "environment"}
    setup = result["setup"]
    assert (setup["methods"], setup["checkpoints"], setup["unit"], setup["eval_examples"]) == (
        ["offline", "onpolicy"],
        [1.0, 2.0],
        "cpu_s",
        4,
    )
    assert setup["seq_kd_for_offline"] is False  # the toy dataset has completions: offline uses them
    offline, onpolicy = result["pilots"]
    assert offline["initial_param_checksum"] == onpolicy["initial_param_checksum"]
    assert offline["points"][0]["scores"] == onpolicy["points"][0]["scores"]  # the same start, scored the same
    for pilot in result["pilots"]:
        points = pilot["points"]
        assert points[0]["step"] == 0 and points[0]["cpu_s"] == 0.0 and len(points) == 3
        assert all(p["cpu_s"] >= c for p, c in zip(points[1:], setup["checkpoints"]))
        assert points[-1]["cpu_s"] <= 2.0 + pilot["last_step_s"] + 0.01  # stopped within one step of the budget
        assert set(points[-1]["scores"]) == {"toy_gsm8k", "toy_mmlu"}
        assert points[-1]["flops"]["student_train"] > 0 and points[-1]["flops"]["teacher_forward"] > 0
    assert "generation" not in offline["points"][-1]["phases"]  # lmbda=0: the student never writes
    assert onpolicy["points"][-1]["phases"]["generation"] > 0
    table = (out / "compare.md").read_text()
    assert "| method | seeds | start | @1 CPU-s | @2 CPU-s | final | CPU-s to 90% of best | steps | GFLOP |" in table
    assert "\nRecommendation: " in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "[compare] pilot 1/2: offline, seed 0" in printed and "[onpolicy, seed 0] done: " in printed
    assert printed.rstrip().endswith(f"Wrote compare.json, compare.md and compare.png to {out}.")


def test_offline_without_completions_is_charged_as_teacher_generation(toy_recipe, tmp_path):
    from trl_onpolicy.toy import make_dataset

    prompts = tmp_path / "prompts.jsonl"
    make_dataset(16, "train").select_columns(["prompt"]).to_json(prompts)
    out = tmp_path / "out"
    code = cli.main(["compare", "--config", str(toy_recipe), "--dataset_name", str(prompts), "--methods", "offline",
                     "--budget", "1", "--evals", "1", "--output_dir", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["setup"]["seq_kd_for_offline"] is True
    phases = result["pilots"][0]["points"][-1]["phases"]
    assert phases["teacher_generation"] > 0 and "generation" not in phases
    assert result["recommendation"]["evidence"][-1] == "one method only: nothing to compare it with"
