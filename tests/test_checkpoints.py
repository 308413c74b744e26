"""Which checkpoint `resume_from_checkpoint` means (`checkpoints.py`): `true` / `last`, a run folder, a checkpoint
folder; the errors list what exists; and the resume command printed after a SIGTERM."""

from pathlib import Path

import pytest

from trl_onpolicy.checkpoints import STATE_FILE, resolve_resume_from_checkpoint, resume_command


def _fake_checkpoint(folder: Path, whole: bool = True) -> str:
    """A checkpoint folder with what `is_whole` looks at; a not-whole one has its trainer state cut mid-write."""
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "trainer_state.json").write_text('{"global_step": 1}' if whole else '{"global_st')
    return str(folder)


@pytest.fixture
def run_folder(tmp_path):
    """checkpoint-2 and checkpoint-4 whole, checkpoint-6 cut mid-write (checkpoint-10 sorts by number, not name)."""
    for step in (2, 4):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    _fake_checkpoint(tmp_path / "checkpoint-6", whole=False)
    return tmp_path


@pytest.mark.parametrize("value", [True, "true", "True", "last", "LAST"])
def test_true_and_last_mean_the_last_whole_checkpoint_in_output_dir(run_folder, value):
    assert resolve_resume_from_checkpoint(value, str(run_folder)) == str(run_folder / "checkpoint-4")


def test_a_run_folder_means_its_last_whole_checkpoint(run_folder, tmp_path_factory):
    elsewhere = str(tmp_path_factory.mktemp("other-output-dir"))
    assert resolve_resume_from_checkpoint(str(run_folder), elsewhere) == str(run_folder / "checkpoint-4")
    assert resolve_resume_from_checkpoint(run_folder, elsewhere) == str(run_folder / "checkpoint-4")  # a Path
    checkpoint = str(run_folder / "checkpoint-2")
    assert resolve_resume_from_checkpoint(checkpoint, elsewhere) == checkpoint  # a checkpoint is itself
    (run_folder / "checkpoint-10").mkdir()  # by step number, not by name; an empty folder is not whole
    _fake_checkpoint(run_folder / "checkpoint-12")
    assert resolve_resume_from_checkpoint("last", str(run_folder)) == str(run_folder / "checkpoint-12")


@pytest.mark.parametrize("value", [None, False, "false", "False"])
def test_unset_or_false_starts_fresh(run_folder, value):
    assert resolve_resume_from_checkpoint(value, str(run_folder)) is None


def test_a_missing_path_is_an_error_that_lists_the_checkpoints(run_folder):
    with pytest.raises(FileNotFoundError) as error:
        resolve_resume_from_checkpoint("/nonexistent", str(run_folder))
    assert str(error.value) == (
        f"resume_from_checkpoint '/nonexistent' does not exist; output_dir '{run_folder}' holds checkpoint-6 "
        "(incomplete), checkpoint-4, checkpoint-2. Give a checkpoint-N folder, a run folder holding them, or `true` "
        "for the last whole checkpoint in output_dir, or leave resume_from_checkpoint unset to start fresh."
    )


def test_true_without_a_whole_checkpoint_is_an_error(tmp_path):
    """As transformers does for `resume_from_checkpoint=True` (`No valid checkpoint found in output directory`)."""
    _fake_checkpoint(tmp_path / "checkpoint-3", whole=False)
    with pytest.raises(ValueError) as error:
        resolve_resume_from_checkpoint("true", str(tmp_path))
    assert str(error.value) == (
        f"resume_from_checkpoint='true' resumes from the last whole checkpoint in output_dir, but output_dir "
        f"'{tmp_path}' holds checkpoint-3 (incomplete). Check `output_dir`, give a checkpoint folder, or leave "
        "resume_from_checkpoint unset to start fresh."
    )
    with pytest.raises(ValueError, match="but output_dir '/nonexistent-out' does not exist"):
        resolve_resume_from_checkpoint(True, "/nonexistent-out")


def test_an_incomplete_or_unrelated_folder_is_an_error(run_folder, tmp_path_factory):
    with pytest.raises(ValueError, match=r"checkpoint-6' is incomplete .* Resume from .*checkpoint-4 instead"):
        resolve_resume_from_checkpoint(str(run_folder / "checkpoint-6"), str(run_folder))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match=r"is neither a checkpoint \(no trainer_state.json\) nor a run folder"):
        resolve_resume_from_checkpoint(str(empty), str(run_folder))


def test_resume_command_replaces_the_flag():
    command = ["trl-onpolicy", "distill", "--config", "my recipe.yaml", "--resume_from_checkpoint", "true", "--x", "1"]
    assert resume_command(command, "out/checkpoint-7") == (
        "trl-onpolicy distill --config 'my recipe.yaml' --x 1 --resume_from_checkpoint out/checkpoint-7"
    )
    assert resume_command(["p", "--resume_from_checkpoint=a"], "b") == "p --resume_from_checkpoint b"
