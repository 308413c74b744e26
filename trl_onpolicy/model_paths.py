"""Checking a model's name before anything is loaded: which model (student, teacher, reference) cannot be found.

transformers reads a name that is not an existing folder as a Hub id, so a mistyped local path
(`./no-such-teacher`) fails with "Repo id must be in the form 'repo_name' or 'namespace/repo_name'", and an offline
Hub id fails only after the other models have loaded. [`check_model_name`] says instead, before any loading:

- a name that is not an existing path and cannot be a Hub id (it starts with `./`, `../`, `/` or `~`, or has more
  than one `/`): the local path does not exist;
- a Hub id (`name` or `namespace/name`) when the Hub is offline (`HF_HUB_OFFLINE=1` or `TRANSFORMERS_OFFLINE=1`) and
  the Hugging Face cache does not hold it: it cannot be fetched.

Online, a Hub id is left to the Hub client, whose errors (not found, gated) are already clear. [`check_model_names`]
checks a run's student, teacher(s) and reference model at once; the trainer calls it first thing
([`check_trainer_models`]), `trl-onpolicy distill` before anything loads (with the flags' names).
"""

from __future__ import annotations

import os

LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
TRUTHY = ("1", "ON", "YES", "TRUE")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub model id (`name` or `namespace/name`), by the Hub client's own rule."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(LOCAL_PREFIXES) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    """Whether the Hub may not be contacted (the variables transformers and the Hub client read)."""
    return any(os.environ.get(name, "").upper() in TRUTHY for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """Whether the Hugging Face cache holds `repo_id`'s model config (a full model's or a LoRA adapter's)."""
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str)
        for name in ("config.json", "adapter_config.json")
    )


def check_model_name(name, role: str, flag: str | None = None, revision: str | None = None) -> None:
    """
    Raise a `FileNotFoundError` naming the `role` model (and its `flag`) when `name` is a local path that does not
    exist, or a Hub id the offline Hub cannot give (see the module docstring). Anything that is not a string or path
    (a loaded model, a teacher object, a dict of teachers) is left alone.

    Args:
        name (`str` or `os.PathLike`): A local folder or a Hub id.
        role (`str`): Which model it is, for the message: `"student"`, `"teacher"`, `"reference"`, ...
        flag (`str`, *optional*): The flag or argument that gave it, e.g. `"--teacher_model_name_or_path"`.
        revision (`str`, *optional*): The Hub revision asked for (the cache is checked at it).
    """
    if not isinstance(name, (str, os.PathLike)):
        return
    name = os.fspath(name)
    if os.path.exists(name):
        return
    given = f"The {role} model{f' ({flag})' if flag else ''} {name!r}"
    if not is_hub_id(name):
        tilde = " (`~` is not expanded here: write the full path)" if name.startswith("~") else ""
        raise FileNotFoundError(
            f"{given} is a local path that does not exist: {os.path.abspath(name)}{tilde}. Check the path; a Hub "
            "model is named `namespace/name`."
        )
    if hub_offline() and not in_hub_cache(name, revision):
        raise FileNotFoundError(
            f"{given} is not a local folder, and it is a Hub id that cannot be fetched: the Hub is offline "
            "(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) and the Hugging Face cache does not hold it. Give a local folder, "
            f"or download it once online (`hf download {name}`)."
        )


def check_model_names(student, teacher, reference, flags=(None, None, None), revisions=(None, None)) -> None:
    """
    [`check_model_name`] for a run's three models. `teacher` may be a `teacher_model_name_or_path` of any form: a
    server URL is skipped, a dict of teachers is checked member by member. `flags` name the three for the message;
    `revisions` are the student's and the teacher's (also the reference's: it loads as a teacher does).
    """
    check_model_name(student, "student", flags[0], revisions[0])
    for name, member in teacher.items() if isinstance(teacher, dict) else [(None, teacher)]:
        if isinstance(member, str) and member.startswith(("http://", "https://")):
            continue
        flag = flags[1] if name is None else f"{flags[1] or 'teacher_model_name_or_path'}, member {name!r}"
        check_model_name(member, "teacher", flag, revisions[1])
    check_model_name(reference, "reference", flags[2], revisions[1])


def check_trainer_models(model, teacher_model, args) -> None:
    """[`check_model_names`] for the trainer's arguments: `model`, `teacher_model` (or the config's
    `teacher_model_name_or_path`) and the config's `reference_model_name_or_path`, at the revisions it asks for."""
    init_kwargs = args.model_init_kwargs if isinstance(args.model_init_kwargs, dict) else {}
    teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
    revisions = (init_kwargs.get("revision"), args.teacher_model_revision)
    check_model_names(model, teacher, args.reference_model_name_or_path, revisions=revisions)
