"""The checks `OnPolicyDistillConfig.__post_init__` runs: one function per concern, each error naming the bad value.

`check_config` runs them in order (loss, rollouts, rollout pools, the `lmbda` curriculum, vLLM, teachers, loss
temperature, rounds, inherited SFT settings); the first failed check raises a `ValueError`. The allowed values of the
string fields live here too (`LOSS_TYPES`, `MIXTURES`); the schedules are `temperature.SCHEDULES` and
`lmbda_schedule.SCHEDULES`.
"""

from __future__ import annotations

import json
import logging
import math

from .lmbda_schedule import SCHEDULES as LMBDA_SCHEDULES
from .teacher_prompts import check_template
from .teachers.self_teacher import KINDS as TEACHER_KINDS
from .temperature import SCHEDULES
from .vllm_rollouts import check_sampling_kwargs

logger = logging.getLogger(f"{__package__}.config")  # the config's warnings, under the config's name

MIXTURES = ("route", "weighted", "confidence")
LOSS_TYPES = ("jsd", "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "sampled_reverse_kl")


def check(ok: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `ok`."""
    if not ok:
        raise ValueError(message)


def parse_text_values(config) -> None:
    """Values that arrive as text from the command line, made what the fields hold: one stop string -> a list, a JSON
    object -> a dict (`teacher_model_name_or_path`, `teacher_weights`, `generation_kwargs`,
    `vllm_generation_kwargs`), digits -> an int (`steps_per_generation`)."""
    if isinstance(config.stop_strings, str):
        config.stop_strings = [config.stop_strings]
    if isinstance(config.steps_per_generation, str) and config.steps_per_generation.strip().isdigit():
        config.steps_per_generation = int(config.steps_per_generation)
    for name in ("teacher_model_name_or_path", "teacher_weights", "generation_kwargs", "vllm_generation_kwargs"):
        value = getattr(config, name)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            setattr(config, name, json.loads(value))


def check_config(config) -> None:
    """Every check of an `OnPolicyDistillConfig`, after `SFTConfig.__post_init__` has run."""
    check_loss(config)
    check_rollouts(config)
    check_pools(config)
    check_curriculum(config)
    check_multi_turn(config)
    check_vllm(config)
    check_teachers(config)
    check_loss_temperature(config)
    check_rounds(config)
    check_sft_settings(config)


def check_loss(config) -> None:
    """The divergence, its parameters, its chunking, the task reward's weights, and the hidden-state term."""
    check(config.reward_weight >= 0, f"`reward_weight` must be >= 0, got {config.reward_weight}.")
    check(config.loss_type in LOSS_TYPES, f"`loss_type` must be one of {LOSS_TYPES}, got {config.loss_type!r}.")
    check(
        0.0 <= config.beta <= 1.0,
        f"`beta` must be in [0.0, 1.0] (0 = forward KL, 1 = reverse KL), got {config.beta}.",
    )
    check(0.0 <= config.skew_alpha < 1.0, f"`skew_alpha` must be in [0.0, 1.0), got {config.skew_alpha}.")
    check(
        config.loss_chunk_size is None or config.loss_chunk_size >= 1,
        f"`loss_chunk_size` must be None (automatic) or >= 1, got {config.loss_chunk_size}.",
    )
    check(
        config.loss_vocab_tile is None or config.loss_vocab_tile >= 0,
        f"`loss_vocab_tile` must be None (automatic), 0 (no tiles) or >= 1, got {config.loss_vocab_tile}.",
    )
    check(config.hidden_state_weight >= 0, f"`hidden_state_weight` must be >= 0, got {config.hidden_state_weight}.")
    check(
        config.hidden_state_distance in ("mse", "cosine"),
        f"`hidden_state_distance` must be 'mse' or 'cosine', got {config.hidden_state_distance!r}.",
    )


def check_rollouts(config) -> None:
    """Where completions come from, how they are sampled, how long they may be, and how often they are reused."""
    check(0.0 <= config.lmbda <= 1.0, f"`lmbda` must be a probability in [0.0, 1.0], got {config.lmbda}.")
    check(config.temperature > 0.0, f"`temperature` (sampling) must be > 0, got {config.temperature}.")
    check(0.0 < config.top_p <= 1.0, f"`top_p` must be in (0.0, 1.0], got {config.top_p}.")
    check(config.top_k >= 0, f"`top_k` must be >= 0 (0 disables it), got {config.top_k}.")
    check(config.num_generations >= 1, f"`num_generations` must be >= 1, got {config.num_generations}.")
    check(
        isinstance(config.num_iterations, int) and config.num_iterations >= 1,
        f"`num_iterations` must be an integer >= 1 (1 = fresh rollouts every optimizer step), got "
        f"{config.num_iterations!r}.",
    )
    check(
        config.max_completion_length >= 1,
        f"`max_completion_length` must be >= 1, got {config.max_completion_length}.",
    )
    check(
        config.max_length is None or config.max_length > config.max_completion_length,
        f"`max_length` ({config.max_length}) must exceed `max_completion_length` ({config.max_completion_length}): "
        "the prompt gets `max_length - max_completion_length` tokens.",
    )


def check_pools(config) -> None:
    """Rollout pools (`steps_per_generation`, `generation_batch_size`) and what they cannot be combined with."""
    value = config.steps_per_generation
    check(
        value == "round" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
        f"`steps_per_generation` must be an integer >= 1 (1 = fresh rollouts every optimizer step) or 'round' (one "
        f"pool per round of `num_rounds`), got {value!r}.",
    )
    check(
        config.generation_batch_size is None or config.generation_batch_size >= 1,
        f"`generation_batch_size` must be None (one sampler call per step's rows) or >= 1, got "
        f"{config.generation_batch_size}.",
    )
    if value == 1:
        return
    check(
        config.num_iterations == 1,
        f"`steps_per_generation={value!r}` and `num_iterations={config.num_iterations}` both reuse rollouts across "
        "optimizer steps; choose one: `steps_per_generation` trains each step on its own prompts from a pool "
        "generated ahead, `num_iterations` trains several steps on one step's batch. Set the other to 1.",
    )
    check(
        config.loss_type != "sampled_reverse_kl",
        f"`loss_type='sampled_reverse_kl'` cannot train on pooled rollouts (`steps_per_generation={value!r}`): its "
        "importance weight needs the log-probs of the student that sampled the tokens, which `generate` does not "
        "return, and a pooled step trains a student that has moved since. Use `num_iterations` instead (it keeps "
        "those log-probs at a batch's first use) or a full-distribution loss (`jsd`, `forward_kl`, `reverse_kl`).",
    )
    check(
        value != "round" or config.num_rounds > 1,
        "`steps_per_generation='round'` with `num_rounds=1` would generate one pool for the whole run, trained on "
        "by a student that never samples again. Set `num_rounds` to the number of pools (e.g. `num_rounds=4`), or "
        "give `steps_per_generation` an integer.",
    )


def check_curriculum(config) -> None:
    """The schedule of `lmbda`: a known one, its endpoints only where it moves, probabilities, rounds for `"step"`."""
    schedule = config.lmbda_schedule
    check(schedule in LMBDA_SCHEDULES, f"`lmbda_schedule` must be one of {LMBDA_SCHEDULES}, got {schedule!r}.")
    given = [name for name in ("lmbda_start", "lmbda_end") if getattr(config, name) is not None]
    names = " and ".join(f"`{name}`" for name in given)
    check(
        schedule != "constant" or not given,
        f"{names} {'is' if len(given) == 1 else 'are'} set, but `lmbda_schedule='constant'` uses `lmbda` "
        f"({config.lmbda}) at every step. Set `lmbda_schedule` to 'linear', 'cosine' or 'step' to move from "
        "`lmbda_start` to `lmbda_end`, or set only `lmbda`.",
    )
    for name in given:
        value = getattr(config, name)
        check(0.0 <= value <= 1.0, f"`{name}` must be a probability in [0.0, 1.0], got {value}.")
    check(
        schedule != "step" or config.num_rounds >= 2,
        f"`lmbda_schedule='step'` holds one `lmbda` per round, but `num_rounds` is {config.num_rounds}. Set "
        "`num_rounds` >= 2 (one stair per round), or use `lmbda_schedule='linear'`.",
    )
    horizon = config.lmbda_schedule_steps
    if horizon is not None:
        check(
            schedule in ("linear", "cosine"),
            f"`lmbda_schedule_steps` ({horizon}) is the horizon of a 'linear' or 'cosine' schedule, but "
            f"`lmbda_schedule` is {schedule!r}. Set `lmbda_schedule='linear'` or 'cosine', or leave "
            "`lmbda_schedule_steps` unset ('step' follows the rounds).",
        )
        check(
            isinstance(horizon, int) and horizon >= 1,
            f"`lmbda_schedule_steps` must be a positive number of optimizer steps, got {horizon!r}.",
        )


def check_multi_turn(config) -> None:
    """Turn and tool-call limits are counts, the tool timeout a positive number of seconds."""
    check(config.max_turns is None or config.max_turns >= 1,
          f"`max_turns` must be at least 1 (or None: no limit), got {config.max_turns}.")  # fmt: skip
    iterations = config.max_tool_calling_iterations
    check(iterations is None or iterations >= 0,
          f"`max_tool_calling_iterations` must be >= 0 (or None: no limit), got {iterations}.")  # fmt: skip
    check(config.tool_call_timeout > 0, f"`tool_call_timeout` must be > 0 seconds, got {config.tool_call_timeout}.")


def check_vllm(config) -> None:
    """vLLM's mode, its sampling fields, and the cap of its importance weight; warns when `generation_kwargs` would be
    mistaken for vLLM's."""
    check(
        config.vllm_mode in ("colocate", "server"),
        f"`vllm_mode` must be 'colocate' or 'server', got {config.vllm_mode!r}.",
    )
    clip = config.vllm_importance_sampling_clip_max
    if clip is not None and not clip >= 1.0:
        raise ValueError(
            f"`vllm_importance_sampling_clip_max` must be >= 1.0 or None (no cap), got {clip}: a cap below 1 "
            "would down-weight the tokens vLLM and the student agree on."
        )
    check_sampling_kwargs(config.vllm_generation_kwargs)
    if config.use_vllm and config.generation_kwargs and config.vllm_generation_kwargs is None:
        logger.warning(
            "`generation_kwargs` (%s) are transformers `GenerationConfig` fields: with `use_vllm=True` they apply "
            "only where transformers generates (the teacher with `seq_kd`). vLLM's rollouts take "
            "`vllm_generation_kwargs` (vLLM `SamplingParams` fields).",
            sorted(config.generation_kwargs),
        )


def check_self_teacher(config) -> None:
    """`teacher_model_kind` and its EMA settings; a self-teacher excludes a teacher of its own and, when it moves
    (live, ema), reusing a batch's scores."""
    kind = config.teacher_model_kind
    check(kind in TEACHER_KINDS, f"`teacher_model_kind` must be one of {TEACHER_KINDS}, got {kind!r}.")
    check(0.0 < config.teacher_update_rate <= 1.0,
          f"`teacher_update_rate` must be in (0, 1], got {config.teacher_update_rate}.")  # fmt: skip
    check(config.teacher_sync_steps >= 1, f"`teacher_sync_steps` must be >= 1, got {config.teacher_sync_steps}.")
    check(
        kind == "separate" or config.teacher_model_name_or_path is None,
        f"`teacher_model_kind={kind!r}` makes the student its own teacher, but `teacher_model_name_or_path` is also "
        f"set ({config.teacher_model_name_or_path!r}). Unset one of the two.",
    )
    check(
        kind not in ("live", "ema") or config.num_iterations == 1,
        f"`num_iterations={config.num_iterations}` reuses a batch's teacher scores for several steps, but a "
        f"`teacher_model_kind={kind!r}` teacher changes at every step. Set `num_iterations=1`.",
    )


def check_teachers(config) -> None:
    """The teacher's top-k and prompt template, the teacher server's client settings, and the mixture of several
    teachers."""
    check_template(config.teacher_prompt_template)
    check_self_teacher(config)
    check(
        config.teacher_top_k is None or config.teacher_top_k >= 1,
        f"`teacher_top_k` must be None (full vocabulary) or >= 1, got {config.teacher_top_k}.",
    )
    check(
        config.teacher_server_timeout > 0,
        f"`teacher_server_timeout` must be > 0, got {config.teacher_server_timeout}.",
    )
    check(
        config.teacher_server_max_retries >= 0,
        f"`teacher_server_max_retries` must be >= 0, got {config.teacher_server_max_retries}.",
    )
    check(
        config.teacher_server_batch_size >= 1 and config.teacher_server_concurrency >= 1,
        "`teacher_server_batch_size` and `teacher_server_concurrency` must be >= 1, got "
        f"{config.teacher_server_batch_size} and {config.teacher_server_concurrency}.",
    )
    check(
        config.teacher_mixture in MIXTURES,
        f"`teacher_mixture` must be one of {MIXTURES}, got {config.teacher_mixture!r}.",
    )
    check_cross_tokenizer(config)
    if config.teacher_weights is not None:
        check(isinstance(config.teacher_weights, dict), "`teacher_weights` must be a dict of teacher name -> weight.")
        weights = list(config.teacher_weights.values())
        check(
            all(w >= 0 for w in weights) and math.isclose(sum(weights), 1.0, abs_tol=1e-6),
            f"`teacher_weights` must be non-negative and sum to 1, got {config.teacher_weights} (sum "
            f"{sum(weights):.6g}). Divide each weight by the sum.",
        )


def check_cross_tokenizer(config) -> None:
    """The ULD settings of a teacher of another tokenizer: only with one, the hybrid's weights both or neither."""
    uld = [name for name in ("uld_use_hybrid_loss", "uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight")
           if getattr(config, name) not in (None, False)] + (["uld_min_alignment_rate"] if config.uld_min_alignment_rate
                                                              else [])  # fmt: skip
    check(
        config.teacher_tokenizer_name_or_path is not None or not uld,
        f"{', '.join(f'`{n}`' for n in uld)} set, but there is no teacher of another tokenizer: set "
        "`teacher_tokenizer_name_or_path` to the teacher's tokenizer, or leave the ULD settings at their defaults.",
    )
    weights = (config.uld_hybrid_matched_weight, config.uld_hybrid_unmatched_weight)
    check(
        (weights[0] is None) == (weights[1] is None) and all(w is None or w >= 0 for w in weights),
        f"`uld_hybrid_matched_weight` and `uld_hybrid_unmatched_weight` must be both None or both >= 0, got {weights}.",
    )
    check(0.0 <= config.uld_min_alignment_rate <= 1.0,
          f"`uld_min_alignment_rate` must be in [0, 1], got {config.uld_min_alignment_rate}.")  # fmt: skip
    gold = (config.uld_crossentropy_weight, config.uld_distillation_weight)
    check(min(gold) >= 0 and max(gold) > 0,
          f"`uld_crossentropy_weight` and `uld_distillation_weight` must be >= 0 and not both 0, got {gold}.")  # fmt: skip


def check_loss_temperature(config) -> None:
    """The schedule of the loss temperature and what it needs (`temperature_end` is already filled in)."""
    check(
        config.loss_temperature_schedule in SCHEDULES,
        f"`loss_temperature_schedule` must be one of {SCHEDULES}, got {config.loss_temperature_schedule!r}.",
    )
    check(
        config.temperature_start > 0 and config.temperature_end > 0,
        "Loss temperatures must be > 0, got "
        f"`temperature_start`={config.temperature_start} and `temperature_end`={config.temperature_end}.",
    )
    adaptive = config.loss_temperature_schedule == "adaptive"
    check(
        not adaptive or (config.target_teacher_entropy or 0) > 0,
        "`loss_temperature_schedule='adaptive'` needs `target_teacher_entropy` > 0 (nats per token), got "
        f"{config.target_teacher_entropy}.",
    )
    check(
        not adaptive or config.loss_type != "sampled_reverse_kl",
        "`loss_temperature_schedule='adaptive'` steers by the teacher's entropy, which `loss_type="
        "'sampled_reverse_kl'` never measures (the teacher scores only the sampled tokens): use a fixed schedule "
        "or another loss.",
    )


def check_rounds(config) -> None:
    """Rounds of training and the tolerance for non-finite steps."""
    check(config.num_rounds >= 1, f"`num_rounds` must be >= 1, got {config.num_rounds}.")
    check(config.max_nonfinite_steps >= 1, f"`max_nonfinite_steps` must be >= 1, got {config.max_nonfinite_steps}.")


def check_sft_settings(config) -> None:
    """Settings inherited from `SFTConfig` / `TrainingArguments` that on-policy distillation cannot honour."""
    check(
        not (config.fp16 and config.device.type == "cpu"),
        "`fp16=True` needs a GPU: on a CPU accelerate has no float16 mixed precision and would quietly train in "
        "float32. Set `bf16=True` (bfloat16 autocast runs on CPUs) or `fp16=False`.",
    )
    check(
        not (config.packing or config.padding_free),
        "`packing` and `padding_free` do not apply to on-policy distillation: completions are generated per step. "
        "Set `packing=False` and `padding_free=False`.",
    )
