"""Teacher backends behind one small interface ([`Teacher`]), and the one function that picks a backend."""

from __future__ import annotations

import logging
import os

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedModel

from .._compat import is_peft_model
from ..frozen_models import load_frozen_model, vocab_size
from ..heads import CHUNK_SIZE
from .base import Teacher, TeacherScores
from .cache import TeacherCache
from .cache_build import build_teacher_cache
from .cache_format import CacheError, is_teacher_cache
from .cross_tokenizer import CrossTokenizerTeacher
from .ensemble import EnsembleTeacher
from .local import LocalTeacher
from .self_teacher import SelfTeacher, SelfTeacherUpdate
from .server import ServerTeacher, TeacherServerError

logger = logging.getLogger(__name__)

__all__ = [
    "CacheError",
    "CrossTokenizerTeacher",
    "EnsembleTeacher",
    "LocalTeacher",
    "SelfTeacher",
    "SelfTeacherUpdate",
    "ServerTeacher",
    "Teacher",
    "TeacherCache",
    "TeacherScores",
    "TeacherServerError",
    "build_teacher",
    "build_teacher_cache",
    "check_cached_rows",
    "compared_vocab_size",
    "local_models",
    "micro_batch_rows",
]


def compared_vocab_size(student_vocab: int, teacher_vocab: int | None, tokenizer_vocab: int) -> int:
    """
    The number of logit columns to compare. Equal sizes compare everything. Different sizes are fine when both cover
    the tokenizer (embedding matrices padded to different sizes, as Qwen2.5's 151,936 vs 152,064): only the
    tokenizer's real vocabulary is compared. Otherwise the models do not share a tokenizer and the error says so.
    """
    if teacher_vocab is None or teacher_vocab == student_vocab:
        return student_vocab
    if min(student_vocab, teacher_vocab) >= tokenizer_vocab:
        return tokenizer_vocab
    raise ValueError(
        f"Vocabulary mismatch: the student's output layer has {student_vocab} tokens and the teacher's "
        f"{teacher_vocab}, and the tokenizer has {tokenizer_vocab}. Distillation compares the two distributions token "
        "by token, so the teacher and the student must share a tokenizer: pick a teacher from the student's model "
        "family, or set `teacher_tokenizer_name_or_path` to the teacher's tokenizer (cross-tokenizer distillation: ULD "
        "over aligned spans)."
    )


def _check_tokenizer(path: str, tokenizer, revision: str | None, trust_remote_code: bool) -> None:
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # no tokenizer saved beside the teacher: nothing to compare
        return
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The teacher at {path!r} uses a different tokenizer than the student ({len(teacher_tokenizer)} vs "
            f"{len(tokenizer)} tokens, or the same size with other token ids). Distillation compares the two "
            "distributions token by token: pick a teacher that shares the student's tokenizer, or set "
            "`teacher_tokenizer_name_or_path` to the teacher's tokenizer (cross-tokenizer distillation: ULD over aligned "
            "spans)."
        )


def load_teacher_model(path: str, args, tokenizer) -> PreTrainedModel:
    """Load a teacher from the Hub or a local path with `args.teacher_model_init_kwargs`."""
    init_kwargs = dict(args.teacher_model_init_kwargs or {})
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    init_kwargs.setdefault("revision", args.teacher_model_revision)
    _check_tokenizer(path, tokenizer, init_kwargs["revision"], init_kwargs["trust_remote_code"])
    return load_frozen_model(path, **init_kwargs)  # FSDP RAM-efficient loading: read by the main process only


def micro_batch_rows(args) -> int:
    """Rollouts in one micro-batch of the student (`per_device_train_batch_size * num_generations`): what a local
    teacher or reference model scores per forward pass."""
    return args.per_device_train_batch_size * args.num_generations


def local_models(teacher: Teacher) -> list:
    """The models a teacher runs in this process (its own, not a LoRA student's base network), for checks."""
    members = teacher.members if isinstance(teacher, EnsembleTeacher) else [teacher]
    members = [m.teacher if isinstance(m, CrossTokenizerTeacher) else m for m in members]  # its model, in its tokens
    return [m.model for m in members if isinstance(m, LocalTeacher) and not m.own_student]


def _is_url(value) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _refuse_unused_init_kwargs(args) -> None:
    """`teacher_model_init_kwargs` only apply to a teacher loaded here; with a model object they would do nothing (TRL's
    `DistillationTrainer` refuses them too)."""
    if args.teacher_model_init_kwargs:
        raise ValueError(
            f"teacher_model_init_kwargs={args.teacher_model_init_kwargs!r} is set, but the teacher was passed as an "
            "already loaded model, so they would be ignored. Either load the teacher with them yourself "
            "(`AutoModelForCausalLM.from_pretrained(path, **kwargs)`) and unset `teacher_model_init_kwargs`, or pass "
            "the teacher's id or path (`teacher_model=` or `teacher_model_name_or_path`) so the trainer loads it "
            "with them."
        )


def _one_teacher(spec, args, tokenizer, chunk_size: int) -> Teacher:
    """One backend from a spec: a `Teacher`, a model, a server URL, a cache folder, or a model id or path.
    `chunk_size`: positions a local teacher projects to the whole vocabulary at once (top-k, sampled tokens); a local
    teacher scores the student's micro-batch per forward pass (see [`micro_batch_rows`])."""
    rows = micro_batch_rows(args)
    if isinstance(spec, TeacherCache):
        spec.check_config(args)  # lmbda, temperature and top-k must fit what the cache holds
        return spec
    if isinstance(spec, Teacher):
        return spec
    if _is_url(spec):
        return ServerTeacher.from_config(spec, args, tokenizer)
    if isinstance(spec, (str, os.PathLike)):
        if is_teacher_cache(spec):
            return TeacherCache.from_config(spec, args, tokenizer)
        model = load_teacher_model(str(spec), args, tokenizer)
        return LocalTeacher(model, chunk_size=chunk_size, micro_batch_size=rows)
    if isinstance(spec, PreTrainedModel) or is_peft_model(spec):
        _refuse_unused_init_kwargs(args)
        return LocalTeacher(spec, chunk_size=chunk_size, micro_batch_size=rows)
    raise TypeError(
        "A teacher must be a model id or path, a server URL, a teacher-cache folder, a `PreTrainedModel`, or a "
        f"`trl_onpolicy.teachers.Teacher`, got {type(spec).__name__}."
    )


def _teacher_tokenizer(teacher_model, args):
    """`teacher_tokenizer_name_or_path` loaded (None when unset); refused with a teacher it cannot wrap."""
    path = args.teacher_tokenizer_name_or_path
    if path is None:
        return None
    if args.teacher_model_kind != "separate" or isinstance(teacher_model, (dict, Teacher)) or teacher_model is None:
        kind = "the student itself" if args.teacher_model_kind != "separate" else type(teacher_model).__name__
        raise ValueError(
            f"`teacher_tokenizer_name_or_path` wraps one teacher model or server of another tokenizer, got {kind}. "
            "Give a model id, path, model or server URL as the teacher (several teachers of other tokenizers, a "
            "teacher cache in another tokenizer and self-teachers are not supported), or wrap a `Teacher` yourself "
            "in `CrossTokenizerTeacher`."
        )
    if isinstance(teacher_model, (str, os.PathLike)) and not _is_url(teacher_model) and is_teacher_cache(teacher_model):
        raise ValueError("`teacher_tokenizer_name_or_path` wraps a live teacher, but the teacher is a cache. A cache "
                         "for a teacher of another tokenizer is built with the teacher's tokenizer (`trl-onpolicy "
                         "cache-teacher ... --student-tokenizer`, `build_teacher_cache(..., teacher_tokenizer=)`) and "
                         "then holds the aligned spans: train from it without `teacher_tokenizer_name_or_path`.")  # fmt: skip
    return AutoTokenizer.from_pretrained(path, revision=args.teacher_model_revision,
                                         trust_remote_code=args.trust_remote_code)  # fmt: skip


def check_cached_rows(teacher: Teacher, dataset, args) -> None:
    """A teacher cache must hold every row of a map-style training set, as this run cuts them (see
    [`TeacherCache.check_rows`]); checked when the trainer is built, not at the first step that misses one."""
    if isinstance(teacher, TeacherCache) and isinstance(dataset, Dataset):
        teacher.check_rows(dataset, args)


def build_teacher(teacher_model, args, student, tokenizer) -> tuple[Teacher, int]:
    """
    The teacher backend for `teacher_model` (or `args.teacher_model_name_or_path` when it is None):

    - a [`Teacher`] is used as is;
    - an `http(s)://` URL is a teacher server ([`ServerTeacher`]);
    - a folder holding a teacher cache is read from disk ([`TeacherCache`]);
    - a model id or path is loaded here; a [`~transformers.PreTrainedModel`] is wrapped in a [`LocalTeacher`];
    - a dict of those is an [`EnsembleTeacher`] (`args.teacher_mixture`, `teacher_routing_column`,
      `teacher_weights`);
    - no teacher and a LoRA student: the student with its adapters disabled (self-distillation);
    - `args.teacher_model_kind` other than `"separate"`: the student itself ([`SelfTeacher`]), and no teacher may be
      given.

    Returns the teacher and the number of logit columns the loss compares (see [`compared_vocab_size`]).
    """
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    chunk_size = args.loss_chunk_size or CHUNK_SIZE
    teacher_tokenizer = _teacher_tokenizer(teacher_model, args)
    if args.teacher_model_kind != "separate":
        if teacher_model is not None:
            raise ValueError(
                f"`teacher_model_kind={args.teacher_model_kind!r}` makes the student its own teacher, but a teacher "
                f"was also given ({type(teacher_model).__name__}). Pass no `teacher_model`, or set "
                "`teacher_model_kind='separate'`."
            )
        teacher = SelfTeacher(student, args.teacher_model_kind, args.teacher_update_rate, args.teacher_sync_steps,
                              chunk_size, micro_batch_rows(args))  # fmt: skip
    elif isinstance(teacher_model, dict):
        members = {str(name): _one_teacher(spec, args, tokenizer, chunk_size) for name, spec in teacher_model.items()}
        teacher = EnsembleTeacher(
            members, args.teacher_mixture, args.teacher_routing_column, args.teacher_weights, chunk_size
        )
    elif teacher_model is None and is_peft_model(student):
        logger.info("No teacher given: the LoRA student's base network (adapters disabled) is the teacher.")
        teacher = LocalTeacher(
            student, disable_adapters=True, chunk_size=chunk_size, micro_batch_size=micro_batch_rows(args)
        )
    elif teacher_model is None:
        raise ValueError(
            "No teacher: pass `teacher_model=` to the trainer or set `teacher_model_name_or_path` in the config "
            "(or train a LoRA student, whose base network can serve as its own teacher)."
        )
    else:
        teacher = _one_teacher(teacher_model, args, teacher_tokenizer or tokenizer, chunk_size)
    if teacher_tokenizer is not None:
        teacher = CrossTokenizerTeacher(
            teacher, tokenizer, teacher_tokenizer, args.teacher_top_k, args.uld_min_alignment_rate,
            hybrid=args.uld_use_hybrid_loss, matched_weight=args.uld_hybrid_matched_weight,
            unmatched_weight=args.uld_hybrid_unmatched_weight,
        )  # fmt: skip
    student_vocab = vocab_size(student)  # from the config: a ZeRO-3 partitioned weight reads shape (0,)
    members = teacher.members if isinstance(teacher, EnsembleTeacher) else [teacher]
    vocab = min(compared_vocab_size(student_vocab, t.vocab_size, len(tokenizer)) for t in members)
    for member in members:
        if hasattr(member, "compare_vocab"):
            member.compare_vocab = vocab
    return teacher, vocab
