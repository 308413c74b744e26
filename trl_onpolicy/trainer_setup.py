"""What [`~trl_onpolicy.OnPolicyDistillTrainer`] checks and builds once, when it is made: the pad token, the sources of
off-policy completions, the reference model, one half-precision format per run, multi-turn rollouts (tools or an
environment)."""

from __future__ import annotations

import logging

from datasets import Dataset
from transformers import AutoTokenizer

from . import precision
from ._compat import add_response_schema, is_peft_model, supports_tool_calling
from .environments import tool_environment_factory
from .lmbda_schedule import describe, lmbda_range
from .multi_turn import MultiTurnRollouts
from .prompts import column_names, prepare_dataset
from .rewards import Rewards
from .span_loss import SpanLoss
from .teacher_prompts import (
    DEFAULT_TEACHER_PROMPT_TEMPLATE,
    add_native_teacher_prompt_ids,
    add_teacher_prompt_ids,
    has_privileged_columns,
)
from .teachers import (
    CrossTokenizerTeacher,
    EnsembleTeacher,
    LocalTeacher,
    TeacherCache,
    load_teacher_model,
    local_models,
    micro_batch_rows,
)
from .tool_calls import tool_map, tool_schemas

logger = logging.getLogger(__name__)


def ensure_pad_token(processing_class, model, args):
    """The processing class (loaded from the student's name when None) with a pad token (its EOS when it has none)."""
    if processing_class is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        processing_class = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer.pad_token is None:
        logger.warning("The tokenizer has no pad token: using its eos token %r for padding.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return processing_class


def prepare(dataset, processing_class, args, formatting_func, dataset_name, chat_template_kwargs=None):
    """A dataset tokenized into prompt and completion ids (the trainer's `_prepare_dataset`; conversational prompts
    show the tools' schemas, `chat_template_kwargs={"tools": ...}`); `formatting_func` is refused (the prompt must
    stay separate from the completion)."""
    if formatting_func is not None:
        raise ValueError(
            "`formatting_func` is not supported: on-policy distillation needs the prompt separate from the "
            "completion. Map your dataset to `prompt`/`completion` (or `messages`) columns instead."
        )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    dataset = prepare_dataset(dataset, tokenizer, args.max_prompt_length, args.max_completion_length, dataset_name,
                              args.dataset_num_proc, chat_template_kwargs)  # fmt: skip
    return add_teacher_prompt_ids(dataset, tokenizer, args.teacher_prompt_template, args.max_prompt_length,
                                  dataset_name, args.dataset_num_proc)  # fmt: skip


def native_teacher_prompts(teacher, args, train_dataset, eval_dataset):
    """The datasets with each conversational prompt in a teacher of another tokenizer's own chat template (see
    `teacher_prompts.add_native_teacher_prompt_ids`); unchanged for any other teacher."""
    if not isinstance(teacher, CrossTokenizerTeacher):
        return train_dataset, eval_dataset

    def add(dataset, name):
        return None if dataset is None else add_native_teacher_prompt_ids(
            dataset, teacher.teacher_tokenizer, args.teacher_prompt_template, name, args.dataset_num_proc)

    if isinstance(eval_dataset, dict):
        return add(train_dataset, "train"), {k: add(v, k) for k, v in eval_dataset.items()}
    return add(train_dataset, "train"), add(eval_dataset, "eval")


def check_completion_sources(args, dataset, prepared) -> None:
    """Off-policy batches (some step's `lmbda` below 1 over the schedule) need completions: from the teacher
    (`seq_kd`) or from the dataset (`dataset` as given, `prepared` tokenized)."""
    if lmbda_range(args)[0] >= 1.0 or args.seq_kd:
        return
    columns = column_names(dataset)
    if "completion" not in columns and "messages" not in columns:
        raise ValueError(
            f"{describe(args)} makes some batches off-policy, which need completions, but the dataset "
            f"has none (columns: {columns}). Set `seq_kd=True` to let the teacher write them, set `lmbda=1.0`, "
            "or add a `completion` column."
        )
    if isinstance(prepared, Dataset):
        empty = [i for i, ids in enumerate(prepared["completion_ids"]) if len(ids) == 0]
        if empty:
            raise no_completion_error(args, empty, len(prepared))


def no_completion_error(args, empty: list[int], total: int) -> ValueError:
    return ValueError(
        f"{describe(args)} makes some batches off-policy, which use the dataset's completions, but "
        f"{len(empty)} of {total} rows have no completion (rows {empty[:5]}: a `messages` row that does not end with "
        "an assistant turn, or a None `completion`). Set `seq_kd=True` to let the teacher write them, set "
        "`lmbda=1.0`, or filter these rows out."
    )


def build_reference(args, tokenizer, vocab_size: int, accelerator) -> LocalTeacher | None:
    """The reference model of `sampled_reverse_kl`'s reward-scaled form, placed for the launcher; None if unset."""
    if args.reference_model_name_or_path is None:
        return None
    reference = load_teacher_model(args.reference_model_name_or_path, args, tokenizer)
    return LocalTeacher(
        reference, vocab_size=vocab_size, micro_batch_size=micro_batch_rows(args)
    ).prepare(accelerator)  # sharded where the launcher shards (see frozen_models.py)


def check_dtypes(accelerator, student, teacher, reference) -> None:
    """One half-precision format per run (see [`~trl_onpolicy.precision.check_teacher_dtype`])."""
    autocast = precision.autocast_dtype(accelerator)
    frozen = [("teacher", m) for m in local_models(teacher)]
    frozen += [("reference model", reference.model)] if reference is not None else []
    for what, model in frozen:
        precision.check_teacher_dtype(student.dtype, model.dtype, autocast, what)


def check_teacher_columns(teacher, args, dataset, student) -> None:
    """What the teacher needs of the dataset: a routing column for routed teachers; privileged context for a
    self-teacher, which starts as the student (all but the base network of a LoRA student, adapters off): without
    it, it sees what the student sees and says what the student says, so the loss is zero and stays zero."""
    columns, privileged = column_names(dataset), has_privileged_columns(dataset)
    if isinstance(teacher, EnsembleTeacher):
        teacher.check_columns(columns)
    if args.teacher_prompt_template != DEFAULT_TEACHER_PROMPT_TEMPLATE and not privileged:
        raise ValueError(
            f"`teacher_prompt_template` is set ({args.teacher_prompt_template!r}) but the train dataset has no "
            f"`privileged_context` column to fill it with (columns: {columns}). Add the column, or leave "
            "`teacher_prompt_template` at its default."
        )
    kind = args.teacher_model_kind
    if kind == "separate" or kind == "base" and is_peft_model(student) or privileged:
        return
    raise ValueError(
        f"`teacher_model_kind={kind!r}` makes the student its own teacher, and that teacher starts as the student "
        "itself: without privileged context it sees what the student sees and says what the student says, so there "
        "is nothing to learn. Give the rows a `privileged_context` (or `teacher_prompt`) column (self-distillation "
        "with privileged information), or train a LoRA student with `teacher_model_kind='base'` (its base network)."
    )


def build_rewards(reward_funcs, args, tokenizer) -> Rewards | None:
    """The task rewards of `reward_funcs` (a callable, a model or its id, or a list of them), checked against the
    config; None without any."""
    if reward_funcs is None or reward_funcs == []:
        if args.reward_weights is not None:
            raise ValueError(
                "`reward_weights` is set but the trainer was given no `reward_funcs`: pass them, or unset it."
            )
        return None
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if args.num_generations < 2:
        raise ValueError(
            f"`reward_funcs` need a group of completions per prompt to compare (GRPO's group advantage), but "
            f"`num_generations={args.num_generations}`. Set `num_generations` to 2 or more (e.g. 4)."
        )
    if args.reward_weights is not None and len(args.reward_weights) != len(funcs):
        raise ValueError(
            f"`reward_weights` has {len(args.reward_weights)} weights for {len(funcs)} reward functions: give one "
            "weight per function, in the same order."
        )
    return Rewards(funcs, args.reward_weights, args.reward_weight, tokenizer, args.trust_remote_code)


def check_tools(tools, environment_factory, processing_class, parse_response) -> list[dict] | None:
    """The tools' JSON schemas (None without tools), once the chat template is known to render tool calls and a
    parser can read them from the student's turns; each refusal names its fix."""
    if tools and environment_factory is not None:
        raise ValueError(
            "Pass either `tools` or `environment_factory`, not both: tools are an environment (`ToolEnvironment`). "
            "To give an environment tools, run them in its `step` with `trl_onpolicy.tool_calls.run_tool_calls`."
        )
    if not tools:
        return None
    schemas = tool_schemas(tool_map(list(tools)))
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if not supports_tool_calling(processing_class):
        raise ValueError(
            "`tools` were given, but the tokenizer's chat template cannot render a tool-calling conversation (user -> "
            "assistant with `tool_calls` -> tool). Use a tokenizer whose chat template supports tools (most "
            "instruction-tuned models' do), or set `tokenizer.chat_template` to one that does."
        )
    if parse_response is None and getattr(tokenizer, "response_template", None) is None:
        try:
            add_response_schema(tokenizer)  # TRL knows the response format of common chat templates
        except ValueError:
            pass
        if getattr(tokenizer, "response_template", None) is None:
            raise ValueError(
                "`tools` were given, but nothing can read tool calls from the student's turns: the tokenizer has no "
                "`response_template` and TRL knows none for its chat template. Set `tokenizer.response_template` "
                "(see transformers' response parsing docs) or pass `parse_response=` (a function from a turn's text "
                "to an assistant message with `tool_calls`)."
            )
    return schemas


def build_multi_turn(tools, environment_factory, parse_response, schemas, args, tokenizer) -> MultiTurnRollouts | None:
    """The multi-turn rollout writer of the trainer's `tools` or `environment_factory` (None: single-turn)."""
    if not tools and environment_factory is None:
        return None
    factory = environment_factory or tool_environment_factory(list(tools), args.max_tool_calling_iterations,
                                                                 args.tool_call_timeout)  # fmt: skip
    if not callable(factory):
        raise ValueError(  # noqa: TRY004 (a configuration error, as the others)
            f"`environment_factory` must be a callable that makes one environment, got {factory!r:.100}."
        )
    max_turns = args.max_turns if args.max_turns is not None else args.max_completion_length  # a turn holds a token
    return MultiTurnRollouts(factory, tokenizer, max_turns, args.max_completion_length, schemas, parse_response)


def check_multi_turn_sources(multi_turn, teacher, args) -> None:
    """Multi-turn rollouts are written during training: a teacher cache cannot score them, and a run whose every
    completion is the dataset's never writes one."""
    if multi_turn is None:
        return
    if isinstance(teacher, CrossTokenizerTeacher):  # a settings conflict, refused as the others here are
        raise ValueError(  # noqa: TRY004
            "A teacher of another tokenizer (`CrossTokenizerTeacher`) scores single-turn completions only: a "
            "multi-turn transcript (`tools`, `environment_factory`) cannot be re-tokenized turn by turn yet. Use a "
            "teacher that shares the student's tokenizer."
        )
    if not teacher.scores_any_completion:
        raise ValueError(
            "A teacher cache holds the scores of the dataset's own completions, but with `tools` or "
            "`environment_factory` every rollout is a transcript written during training (the tools' answers too), "
            "which no cache can hold. Use a local or served teacher."
        )
    if lmbda_range(args)[1] == 0 and not args.seq_kd:
        raise ValueError(
            f"`tools` or `environment_factory` were given, but every completion comes from the dataset ({describe(args)}"
            ", `seq_kd=False`), so no rollout is ever multi-turn. Set `lmbda` > 0 (the student writes) or "
            "`seq_kd=True` (the teacher writes, calling the tools too)."
        )


def span_loss(teacher, args) -> SpanLoss | None:
    """The loss against a teacher of another tokenizer ([`CrossTokenizerTeacher`], or a teacher cache built for one:
    ULD only, the hybrid loss needs the live teacher's tokenizer), else None: the sampled reverse
    KL of each span's text (`loss_type="sampled_reverse_kl"`), else ULD or the hybrid loss. Hidden-state matching is
    refused where every backend without hidden states is."""
    spans_cache = isinstance(teacher, TeacherCache) and teacher.spans  # built for a teacher of another tokenizer
    gold = {"crossentropy_weight": args.uld_crossentropy_weight, "distillation_weight": args.uld_distillation_weight}
    if not isinstance(teacher, CrossTokenizerTeacher) and not spans_cache:
        if gold != {"crossentropy_weight": 0.0, "distillation_weight": 1.0}:
            raise ValueError(f"`uld_crossentropy_weight` and `uld_distillation_weight` weigh the loss against a teacher "
                             f"of another tokenizer, but this teacher shares the student's ({gold}). Leave them at 0 "
                             "and 1, or set `teacher_tokenizer_name_or_path`.")  # fmt: skip
        return None
    if args.seq_kd:
        raise ValueError("`seq_kd=True` has the teacher write completions, but a teacher of another tokenizer writes "
                         "in its own tokens, which the student cannot train on. Set `seq_kd=False` (the student's or "
                         "the dataset's completions).")  # fmt: skip
    if args.num_iterations > 1 or args.use_vllm and args.vllm_importance_sampling_correction:
        raise ValueError("The loss against a teacher of another tokenizer is per span, and takes no per-token "
                         "importance weight yet: set `num_iterations=1`, and `vllm_importance_sampling_correction="
                         "False` with vLLM.")  # fmt: skip
    if args.loss_type == "sampled_reverse_kl":
        if getattr(teacher, "hybrid", False):
            raise ValueError("`uld_use_hybrid_loss` compares distributions; `loss_type='sampled_reverse_kl'` compares "
                             "the sampled text only. Pick one.")  # fmt: skip
        return SpanLoss(sampled=True, reward_scale=args.reward_scale, **gold)
    if spans_cache or not teacher.hybrid:
        return SpanLoss(**gold)
    if not 0.0 < args.beta < 1.0:
        raise ValueError(f"The hybrid loss's JSD compares sub-probability measures and needs 0 < beta < 1, got "
                         f"beta={args.beta}.")  # fmt: skip
    student_ids, teacher_ids = teacher.matched
    return SpanLoss(True, args.beta, teacher.matched_weight, teacher.unmatched_weight, student_ids, teacher_ids,
                    len(teacher.teacher_tokenizer), **gold)  # fmt: skip
