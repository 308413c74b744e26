"""`check_model_name`: a missing local model path, or a Hub id the offline Hub cannot give, is one error naming the
model before anything loads; what exists, what is cached, and (online) any Hub id pass."""

import os

import pytest
from huggingface_hub import constants

from trl_onpolicy import OnPolicyDistillTrainer
from trl_onpolicy.model_paths import check_model_name, is_hub_id


@pytest.mark.parametrize(
    ("name", "hub_form"),
    [("gpt2", True), ("Qwen/Qwen2.5-0.5B-Instruct", True), ("./no-such", False), ("../no-such", False),
     ("/abs/no-such", False), ("~/no-such", False), ("runs/a/checkpoint-2", False), ("bad--name", False)],
)  # fmt: skip
def test_hub_id_form(name, hub_form):
    assert is_hub_id(name) is hub_form


@pytest.mark.parametrize("name", ["./no-such-teacher", "../no-such-teacher", "runs/a/b"])
def test_a_missing_local_path_names_the_model_and_the_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        check_model_name(name, "teacher", "--teacher_model_name_or_path")
    assert str(error.value) == (
        f"The teacher model (--teacher_model_name_or_path) {name!r} is a local path that does not exist: "
        f"{os.path.abspath(name)}. Check the path; a Hub model is named `namespace/name`."
    )


def test_a_tilde_path_says_it_is_not_expanded():
    with pytest.raises(FileNotFoundError) as error:
        check_model_name("~/no-such", "reference")
    assert str(error.value).startswith("The reference model '~/no-such' is a local path that does not exist: ")
    assert "(`~` is not expanded here: write the full path)" in str(error.value)


def test_existing_folders_and_non_strings_pass(tmp_path):
    check_model_name(str(tmp_path), "student", "--model_name_or_path")
    check_model_name(tmp_path, "student")  # an os.PathLike
    check_model_name(None, "reference")  # not given
    check_model_name({"a": "./no-such"}, "teacher")  # a dict is checked member by member by the caller
    check_model_name(object(), "teacher")  # a loaded model


def test_offline_a_hub_id_must_be_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        check_model_name("org/model", "student", "--model_name_or_path")
    assert str(error.value).startswith(
        "The student model (--model_name_or_path) 'org/model' is not a local folder, and it is a Hub id that cannot "
        "be fetched: the Hub is offline"
    )
    assert "`hf download org/model`" in str(error.value)
    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc123"  # the Hub client's cache layout
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("abc123")
    check_model_name("org/model", "student")  # cached: passes
    with pytest.raises(FileNotFoundError, match="cannot be fetched"):
        check_model_name("org/model", "student", revision="v2")  # another revision is not cached


def test_online_a_hub_id_is_left_to_the_hub_client(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    check_model_name("org/model-that-may-exist", "teacher")  # no network call here; from_pretrained will ask


def test_the_trainer_names_a_missing_teacher_before_loading_the_student(tmp_path, monkeypatch):
    """The Python API: `OnPolicyDistillTrainer(model=<path>, ...)` with a teacher path that does not exist fails on the
    teacher first (it used to load the student, then fail with the Hub client's repo-id message)."""
    import tiny_models

    monkeypatch.chdir(tmp_path)
    student = tmp_path / "student"
    tiny_models.model(tiny_models.tokenizer()).save_pretrained(student)
    loads = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loads.append(a))
    config = tiny_models.config(tmp_path / "out", teacher_model_name_or_path="./no-such-teacher")
    with pytest.raises(FileNotFoundError, match=r"^The teacher model './no-such-teacher' is a local path that does not"):
        OnPolicyDistillTrainer(model=str(student), args=config, train_dataset=tiny_models.dataset())
    with pytest.raises(FileNotFoundError, match=r"^The reference model '\.\./no-ref' is a local path"):
        config.teacher_model_name_or_path, config.reference_model_name_or_path = str(student), "../no-ref"
        OnPolicyDistillTrainer(model=str(student), args=config, train_dataset=tiny_models.dataset())
    with pytest.raises(FileNotFoundError, match=r"^The student model 'no-student/' is a local path"):
        OnPolicyDistillTrainer(model="no-student/", args=config, train_dataset=tiny_models.dataset())
    assert loads == []  # nothing was loaded
