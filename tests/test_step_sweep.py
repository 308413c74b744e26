"""`benchmarks/step_sweep.py` (issue 16: our step against its irreducible parts and TRL's step) at its `--quick` point,
and the plain parts it times (`benchmarks/_step_parts.py`) against the package's definitions.

One run of `step_sweep.py --quick` (~25 s on a shared 2-core machine) serves the report tests; each reads its JSON.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_onpolicy.rollouts import Rollouts, collate

ROOT = Path(__file__).resolve().parent.parent
SPREAD_KEYS = {"median", "q1", "q3", "min", "max", "n", "all"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("step-sweep") / "step_sweep.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # this checkout's package, not another
    cmd = [sys.executable, "benchmarks/step_sweep.py", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| tiny-v4096-c8 |" in proc.stdout  # the printed table has the point's row
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def parts():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        import _step_parts

        yield _step_parts


def assert_spread(s: dict, n: int) -> None:
    """Every statistic present, ordered, and computed from the pooled timed steps it keeps."""
    assert set(s) == SPREAD_KEYS and s["n"] == n == len(s["all"])
    assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert s["median"] == statistics.median(s["all"]) and (s["min"], s["max"]) == (min(s["all"]), max(s["all"]))


def test_report_has_setup_environment_and_every_method(report):
    assert report["setup"]["repeats"] == 1 and report["setup"]["timed_steps"] == 2
    assert report["setup"]["warmup_steps"] == 2 and report["setup"]["wall_s"] > 0
    assert report["environment"]["commit"] and report["environment"]["threads"] == 1
    (point,) = report["points"]
    assert (point["name"], point["vocab"], point["completion_length"]) == ("tiny-v4096-c8", 4096, 8)
    assert point["shapes"] == [[2, 64], [2, 128]]
    for name in ("ours", "trl"):
        r = point[name]
        for key in ("step_s", "generation_s", "teacher_s", "update_s"):
            assert_spread(r[key], 2)
        for i in range(2):  # update = step - generation - teacher, per step
            parts = r["generation_s"]["all"][i] + r["teacher_s"]["all"][i] + r["update_s"]["all"][i]
            assert parts == pytest.approx(r["step_s"]["all"][i])
        assert 0 < r["mean_completion_length"] <= 8  # completions of at most C = 8 tokens (EOS is 1 in 4096)
        assert r["peak_MiB"] == pytest.approx(r["resting_MiB"] + r["working_MiB"]) and r["working_MiB"] > 0
        assert len(r["losses"]) == 1 and all(0 < x < 0.7 for x in r["losses"][0])  # a JSD at beta 0.5 is < log 2
    assert point["ours"]["logged_time"][0]["generation"] > 0  # the trainer's own clock, a cross-check
    for part in ("generate", "sample", "teacher", "update"):
        assert_spread(point["parts"][part], 2)
    for sampler in ("generate", "sample"):
        assert 0 < point["parts"][f"{sampler}_mean_completion_length"] <= 8
    assert len(point["parts"]["losses"][0]) == 2 and all(0 < x < 0.7 for x in point["parts"]["losses"][0])


def test_ratios_are_of_the_medians(report):
    (point,) = report["points"]
    ours, parts, trl, ratios = point["ours"], point["parts"], point["trl"], point["ratios"]
    sum_of_parts = parts["sample"]["median"] + parts["teacher"]["median"] + parts["update"]["median"]
    assert parts["sum_s"] == sum_of_parts
    assert ratios == {
        "overhead_ours_over_sum_of_parts": ours["step_s"]["median"] / sum_of_parts,
        "trl_over_ours": trl["step_s"]["median"] / ours["step_s"]["median"],
        "generation_speedup_generate_over_sample": parts["generate"]["median"] / parts["sample"]["median"],
        "peak_memory_ours_over_trl": ours["peak_MiB"] / trl["peak_MiB"],
    }


def test_completion_hidden_gives_the_states_that_predict_each_completion_token(parts):
    """Left-padded prompts and right-padded completions of different lengths: the head over the `(N, H)` states gives
    the full model's logits one column before each completion token, in the tokens' order, the order in which the
    update reads its targets."""
    model = parts.llama(0, 2, 32, 64).eval()  # the benchmark's own Llama: 2 layers x 32, V = 64
    prompts, completions = [[5, 6, 7], [8, 9, 10, 11, 12]], [[13, 14], [15, 16, 17, 2]]
    batch = collate(Rollouts(prompts, completions, "student"), pad_id=0)
    with torch.no_grad():
        got = model.lm_head(parts.completion_hidden(model, batch))  # (N, V)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits  # fmt: skip
    want = torch.cat([full[0, 4:6], full[1, 4:8]])  # P = 5: completions start at column 5, predicted from 4 on
    assert got.shape == (6, model.config.vocab_size)
    torch.testing.assert_close(got, want)
    assert batch["completion_ids"][batch["completion_mask"].bool()].tolist() == [13, 14, 15, 16, 17, 2]
