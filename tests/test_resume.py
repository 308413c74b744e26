"""Exact resume, a process killed with SIGKILL, and SIGTERM: what a checkpoint holds and what survives.

The run (see `resume_script.py`) samples on-policy, adapts its loss temperature every step, ends rounds, and carries a
callback history, so a resume that misses any RNG stream or state gives different losses or weights.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import resume_script as script

from trl_onpolicy.checkpoints import (
    STATE_FILE,
    is_whole,
    last_whole_checkpoint,
)

SCRIPT = Path(__file__).with_name("resume_script.py")


def assert_same_run(a: dict, b: dict, steps):
    for run in (a, b):  # a run read back from JSON has string keys
        for key in ("losses", "temperatures"):
            run[key] = {int(step): value for step, value in run[key].items()}
    for step in steps:
        assert math.isclose(a["losses"][step], b["losses"][step], rel_tol=1e-6), (step, a["losses"], b["losses"])
        assert a["temperatures"][step] == pytest.approx(b["temperatures"][step], rel=1e-12)
    for name, value in a["weights"].items():
        assert math.isclose(value, b["weights"][name], rel_tol=1e-6, abs_tol=1e-9), name
    assert a["history"] == b["history"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run: 6 steps, rounds ending at steps 3 and 6."""
    return script.run(str(tmp_path_factory.mktemp("straight")), max_steps=6)


@pytest.mark.parametrize("stop_at", [2, 3, 4])  # mid-round, at the round end, mid-second-round
def test_resume_from_any_checkpoint_equals_the_straight_run(tmp_path, straight, stop_at):
    first = script.run(str(tmp_path), max_steps=6, save_steps=1)  # checkpoints at every step
    assert_same_run(first, straight, range(1, 7))  # the run is deterministic: the comparison can only fail on resume
    for step in range(stop_at + 1, 7):  # as if the process had stopped right after checkpoint `stop_at`
        os.rename(tmp_path / f"checkpoint-{step}", tmp_path / f"later-{step}")
    resumed = script.run(str(tmp_path), max_steps=6, resume=str(tmp_path / f"checkpoint-{stop_at}"))
    assert resumed["global_step"] == 6
    assert_same_run(resumed, straight, range(stop_at + 1, 7))
    assert sorted(resumed["losses"]) == [1, 2, 3, 4, 5, 6]  # the log is continued, not restarted


def test_incomplete_checkpoint_is_skipped(tmp_path, caplog):
    script.run(str(tmp_path), max_steps=2)
    assert is_whole(str(tmp_path / "checkpoint-2"))
    (tmp_path / "checkpoint-3").mkdir()  # a process killed while writing step 3's checkpoint
    (tmp_path / "checkpoint-3" / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3, "log_hi')  # cut mid-write
    assert last_whole_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-3: it is incomplete" in caplog.text


def _launch(output_dir, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--output-dir", str(output_dir), "--max-steps", "6", "--out", str(out)]
    return subprocess.Popen([*command, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process, timeout=120.0):
    start = time.monotonic()
    while not (path.is_dir() and is_whole(str(path))):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_mid_run_then_resume_ends_where_the_straight_run_does(tmp_path, straight):
    process = _launch(tmp_path, tmp_path / "killed.json", "--step-sleep", "0.6")
    _wait_for(tmp_path / "checkpoint-2", process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and not (tmp_path / "killed.json").exists()
    last = last_whole_checkpoint(str(tmp_path))
    assert last is not None and int(last.rsplit("-", 1)[1]) in range(2, 6)
    resumed = _launch(tmp_path, tmp_path / "resumed.json", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-3000:]
    result = json.loads((tmp_path / "resumed.json").read_text())
    assert result["global_step"] == 6
    assert_same_run(result, straight, range(int(last.rsplit("-", 1)[1]) + 1, 7))


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    process = _launch(tmp_path, tmp_path / "out.json", "--step-sleep", "0.6")
    _wait_for(tmp_path / "checkpoint-1", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, process.stdout.read()[-3000:]  # a clean exit, not a kill
    result = json.loads((tmp_path / "out.json").read_text())
    assert 1 <= result["global_step"] < 6  # stopped early
    assert last_whole_checkpoint(str(tmp_path)) == str(tmp_path / f"checkpoint-{result['global_step']}")


# --------------------------------------------------------------------------------------------------- which checkpoint


def test_the_trainer_resumes_from_a_run_folder(tmp_path, straight):
    """The Python API has the same meaning: `train(resume_from_checkpoint=<run folder>)` and `"last"` take its last whole
    checkpoint; a missing path fails before any step."""
    script.run(str(tmp_path), max_steps=6, save_steps=1)
    for step in (4, 5, 6):  # as if the process had stopped right after checkpoint 3
        os.rename(tmp_path / f"checkpoint-{step}", tmp_path / f"later-{step}")
    resumed = script.run(str(tmp_path), max_steps=6, resume=str(tmp_path))
    assert resumed["global_step"] == 6
    assert_same_run(resumed, straight, range(4, 7))
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint '/nonexistent' does not exist"):
        script.run(str(tmp_path / "fresh"), max_steps=6, resume="/nonexistent")
    assert not list((tmp_path / "fresh").glob("checkpoint-*"))  # no step was trained
