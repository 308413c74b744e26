"""`OnPolicyDistillConfig`: the settings of on-policy distillation, on top of everything `trl.SFTConfig` holds.

Their checks are in `config_checks.py`; what the config shares with `SFTConfig` (`loss_type`) in `config_sft.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from trl import SFTConfig

from . import config_sft
from .config_checks import LOSS_TYPES, check_config, parse_text_values
from .lmbda_schedule import SCHEDULES as LMBDA_SCHEDULES
from .temperature import SCHEDULES


@dataclass
class OnPolicyDistillConfig(SFTConfig):
    r"""
    Configuration class for the [`OnPolicyDistillTrainer`].

    A subclass of [`~trl.SFTConfig`]: every SFT setting keeps its meaning, so an SFT script becomes a distillation
    script by swapping the class names. Where a concept already has a name in TRL's `DistillationConfig` or
    `GKDConfig`, the same name and meaning are used here (`teacher_model_name_or_path`, `lmbda`, `beta`, `seq_kd`,
    `temperature`, `max_completion_length`, ...).

    Parameters:
        > Parameters that control the teacher

        teacher_model_name_or_path (`str` or `dict[str, str]`, *optional*):
            The teacher, used when the trainer is given no `teacher_model`: a Hub id or local path (a model in this
            process), an `http(s)://` URL (a teacher server: `vllm serve` or `trl-onpolicy serve-teacher`), the
            folder of a teacher cache (see [`~trl_onpolicy.teachers.TeacherCache`]), or a dict (or its JSON) of named
            teachers of those kinds (see `teacher_mixture`).
        teacher_model_revision (`str`, *optional*):
            Revision of the teacher (branch, tag or commit).
        teacher_model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the teacher is loaded from a string.
            `trust_remote_code` follows the config's `trust_remote_code` (off unless you turn it on).
        teacher_top_k (`int`, *optional*):
            Keep only the teacher's top-k log-probs per position plus one tail bucket holding the rest of the mass, the
            form a remote or cached teacher returns. `None` uses the full vocabulary (a server then sends its top 20).
        teacher_model_kind (`str`, *optional*, defaults to `"separate"`):
            Which network teaches: `"separate"` (`teacher_model`, or a LoRA student's base network when none is
            given), or the student itself: `"base"` (its weights when training started), `"live"` (its current
            weights; needs privileged context) or `"ema"` (a moving average of its weights). See
            [`~trl_onpolicy.teachers.SelfTeacher`].
        teacher_update_rate (`float`, *optional*, defaults to `0.05`):
            With `teacher_model_kind="ema"`: `ema <- ema + rate * (student - ema)`; `1.0` copies the student.
        teacher_sync_steps (`int`, *optional*, defaults to `1`):
            With `teacher_model_kind="ema"`: optimizer steps between two updates of the EMA.
        teacher_prompt_template (`str`, *optional*, defaults to `"{prompt}\n\n{privileged_context}"`):
            How a row's `privileged_context` column joins its prompt into the teacher's prompt (the student never sees
            it); a `teacher_prompt` column gives the teacher's whole prompt instead. See
            [`~trl_onpolicy.teacher_prompts`].

        > Parameters that control a teacher of another tokenizer (cross-tokenizer distillation, TRL GOLD's names)

        teacher_tokenizer_name_or_path (`str`, *optional*):
            The teacher's tokenizer, when it differs from the student's: the teacher (a model or a server) is then
            wrapped in a [`~trl_onpolicy.teachers.CrossTokenizerTeacher`], which re-tokenizes each rollout and aligns
            the two tokenizations, and the loss is ULD over aligned spans, or with `loss_type="sampled_reverse_kl"` the
            sampled reverse KL of each span's text (the other loss types are not used).
        uld_use_hybrid_loss (`bool`, *optional*, defaults to `False`):
            The hybrid loss: the generalized JSD (`beta`) on the tokens whose text is the same in both vocabularies,
            ULD on the rest.
        uld_hybrid_matched_weight (`float`, *optional*), uld_hybrid_unmatched_weight (`float`, *optional*):
            The hybrid loss's two weights, both or neither; neither: the matched vocabulary's share of the teacher's.
        uld_crossentropy_weight (`float`, *optional*, defaults to `0.0`), uld_distillation_weight (`float`, *optional*, defaults to `1.0`):
            GOLD's weights of the loss against a teacher of another tokenizer: `uld_distillation_weight` times the span
            loss plus `uld_crossentropy_weight` times the student's negative log-likelihood of every completion token
            (at the loss temperature), the cross-entropy that anchors ULD to the text in Boizard et al.; useful on
            dataset completions (`lmbda=0`), where the text is the reference.
        uld_min_alignment_rate (`float`, *optional*, defaults to `0.0`):
            Refuse a batch whose fraction of student tokens in one-to-one spans is below this floor (a warning is
            logged once below 0.5).

        > Parameters that control a teacher server

        teacher_server_model (`str`, *optional*):
            Model name sent to the server; defaults to the first one its `/v1/models` lists.
        teacher_server_timeout (`float`, *optional*, defaults to `60.0`):
            Seconds a scoring request may take before it is retried.
        teacher_server_max_retries (`int`, *optional*, defaults to `5`):
            Retries of a request after a connection error, a timeout or a 5xx answer, with exponential backoff; then
            training stops with an error naming the URL and what failed.
        teacher_server_batch_size (`int`, *optional*, defaults to `8`):
            Sequences per scoring request.
        teacher_server_concurrency (`int`, *optional*, defaults to `4`):
            Scoring requests in flight at once.
        teacher_server_api_key_env (`str`, *optional*, defaults to `"TRL_ONPOLICY_TEACHER_API_KEY"`):
            Name of the environment variable holding the server's API key (sent as a bearer token, never logged).

        > Parameters that control several teachers

        teacher_mixture (`str`, *optional*, defaults to `"route"`):
            How a dict of teachers makes the target: `"route"` (each row is scored by the teacher its
            `teacher_routing_column` names), `"weighted"` (every token scored by all teachers; the target is the
            mixture with `teacher_weights`) or `"confidence"` (the mixture weighted per token by each teacher's
            confidence, `softmax(-entropy)` over the teachers).
        teacher_routing_column (`str`, *optional*, defaults to `"teacher"`):
            Dataset column naming each row's teacher for `teacher_mixture="route"`.
        teacher_weights (`dict[str, float]`, *optional*):
            Weights of `teacher_mixture="weighted"`, summing to 1; equal weights when unset.

        > Parameters that control hidden-state matching

        hidden_state_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an extra loss term matching the student's hidden states to the teacher's on completion tokens
            (local teacher only); `0` turns it off.
        hidden_state_layers (`list[str]`, *optional*):
            Layer map as `"student:teacher"` pairs of `hidden_states` indices (0 is the embeddings), e.g.
            `["2:4", "4:8"]`. Defaults to every student layer mapped to the evenly spaced teacher layer.
        hidden_state_distance (`str`, *optional*, defaults to `"mse"`):
            `"mse"` (mean squared error over the hidden dimension) or `"cosine"` (1 - cosine similarity). Where widths
            differ, a learned linear projection maps the teacher's states to the student's width; it is trained with
            the student and saved beside it as `hidden_state_projector.safetensors`.

        > Parameters that control where completions come from

        lmbda (`float`, *optional*, defaults to `1.0`):
            Probability, drawn per generation batch, that the student samples the completions (on-policy). Otherwise
            the teacher samples them (`seq_kd=True`) or the dataset's completions are used (supervised KD). GKD's
            name; its default there is 0.5, ours is fully on-policy. It may follow a schedule (`lmbda_schedule`).
        seq_kd (`bool`, *optional*, defaults to `False`):
            When the batch is not on-policy, let the teacher write the completions (sequence-level KD).
        num_generations (`int`, *optional*, defaults to `1`):
            Completions sampled per prompt.
        num_iterations (`int`, *optional*, defaults to `1`):
            Optimizer steps that each batch of rollouts trains (GRPO's `num_iterations`, its mu). A step's rollouts are
            sampled and scored by the teacher once, then reused, with those scores, by the next `num_iterations - 1`
            optimizer steps; the data loader's prompts for those steps are not used (GRPO repeats them in its
            sampler instead). It pays off when generation and scoring dominate a step (CPU, a slow teacher); the cost
            is staler rollouts, sampled by a student up to `num_iterations - 1` updates older. The full-distribution
            and top-k divergences need no correction (they compare the two distributions at states the student
            reached slightly earlier); `"sampled_reverse_kl"` weights each token by the importance ratio
            `q / q_old` (times the vLLM weight of `vllm_importance_sampling_correction`). The loss temperature is
            held while a batch is reused (its scores were computed at it).
        steps_per_generation (`int` or `str`, *optional*, defaults to `1`):
            Optimizer steps whose rollouts are generated at once, as a pool (TRL GRPO's name): at its first step the
            pool's prompts are drawn and completed in batched sampler calls; each step trains on its own slice, up to
            `steps_per_generation - 1` updates old. `"round"`: one pool per round (`num_rounds`). See
            `rollout_pool.py`.
        generation_batch_size (`int`, *optional*):
            Dataset rows per sampler call, per process, when a pool is generated; `None`: one call per step's rows.
        max_completion_length (`int`, *optional*, defaults to `256`):
            Maximum number of generated tokens. Prompts are cut from the left to `max_length - max_completion_length`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the rollouts (only the rollouts; the loss has its own temperature below).
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling for the rollouts.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k sampling for the rollouts; `0` disables it.
        min_p (`float`, *optional*):
            Min-p sampling for the rollouts.
        repetition_penalty (`float`, *optional*, defaults to `1.0`):
            Repetition penalty for the rollouts.
        generation_kwargs (`dict[str, Any]`, *optional*):
            Extra `GenerationConfig` fields for transformers generation (the student without vLLM, and the teacher
            with `seq_kd`); they override the ones above. The KV cache is always on. They never reach vLLM.
        stop_strings (`list[str]`, *optional*):
            Generation stops at any of these strings; the completion keeps the stop string.
        use_vllm (`bool`, *optional*, defaults to `False`):
            Sample the student's rollouts with vLLM (requires the `vllm` extra) through TRL's `VLLMGeneration`; the
            student's weights are pushed to vLLM once per optimizer step.
        vllm_mode (`str`, *optional*, defaults to `"colocate"`):
            `"colocate"`: a vLLM engine in each training process; `"server"`: `trl vllm-serve` elsewhere. The other
            `vllm_*` fields are TRL's, with TRL's defaults: `vllm_model_impl`, `vllm_enable_sleep_mode`,
            `vllm_server_base_url`, `vllm_server_host`, `vllm_server_port`, `vllm_server_timeout`, `vllm_group_port`
            (server mode); `vllm_gpu_memory_utilization` (0.3), `vllm_max_model_length`, `vllm_tensor_parallel_size`
            (colocate mode).
        vllm_generation_kwargs (`dict[str, Any]`, *optional*):
            Extra vLLM `SamplingParams` fields for the vLLM rollouts, e.g. `{"seed": 0, "presence_penalty": 0.5}`; they
            override the sampling fields above there. `GenerationConfig`-only fields are refused here, and `n`,
            `max_tokens` and `logprobs` are set by the trainer. (TRL's GRPO sends one `generation_kwargs` to whichever
            engine samples, so a key the other engine does not know fails or is dropped.)
        vllm_importance_sampling_correction (`bool`, *optional*, defaults to `True`):
            vLLM samples with its own copy of the student (often bf16, other kernels), so its tokens are not exactly
            the student's samples. vLLM's log-prob `mu` of each sampled token is kept, and with
            `loss_type="sampled_reverse_kl"` each token is weighted by the truncated importance-sampling weight
            `min(q / mu, vllm_importance_sampling_clip_max)`, `q` the student's probability of the token at the loss
            temperature (on reused rollouts, the student's at their first use), as TRL's GRPO does with
            `vllm_importance_sampling_mode="token_truncate"`. The full-distribution losses are not weighted (see
            [`~trl_onpolicy.divergences.truncated_importance_weights`]). vLLM reports the log-probs of its processed
            distribution: a server must run with `--logprobs-mode processed_logprobs` (`trl vllm-serve`'s default).
        vllm_importance_sampling_clip_max (`float`, *optional*, defaults to `3.0`):
            The cap C of that weight (TRL's name and default); `None` leaves the ratio uncapped.

        > Parameters that control multi-turn rollouts (the trainer's `tools` or `environment_factory`)

        max_turns (`int`, *optional*):
            Student turns per rollout at most; None: until the environment ends the conversation (a turn without a
            tool call, for `tools`) or `max_completion_length`, which bounds the whole transcript after the prompt.
        max_tool_calling_iterations (`int`, *optional*):
            Rounds of tool calls per rollout at most (TRL's name); the turn after the last round ends the rollout
            and its calls are not run. None: no limit but `max_turns` and the token budget.
        tool_call_timeout (`float`, *optional*, defaults to `30.0`):
            Seconds one tool call may run; a later one is answered with a timeout error and the rollout goes on.

        > Parameters that control the curriculum

        lmbda_schedule (`str`, *optional*, defaults to `"constant"`):
            How `lmbda` moves over training: `"constant"` (`lmbda` at every step), `"linear"` or `"cosine"` (from
            `lmbda_start` at the first step to `lmbda_end` at the last), or `"step"` (one value per round, from
            `lmbda_start` in the first to `lmbda_end` in the last; needs `num_rounds >= 2`). E.g. `0.0` to `1.0`
            starts on the teacher's or the dataset's text while the student is weak and ends on its own samples.
        lmbda_start (`float`, *optional*):
            `lmbda` at the first step of a schedule; defaults to `lmbda`.
        lmbda_end (`float`, *optional*):
            `lmbda` at the last step of a schedule; defaults to `lmbda_start`.
        lmbda_schedule_steps (`int`, *optional*):
            Optimizer steps over which `"linear"` and `"cosine"` move from `lmbda_start` to `lmbda_end`; `lmbda_end`
            holds after them. Defaults to the run's `max_steps`. Set it when the run is stopped by time or compute
            rather than by `max_steps`, or to reach `lmbda_end` early.

        > Parameters that control the loss

        loss_type (`str`, *optional*, defaults to `"jsd"`):
            Divergence between teacher and student over completion tokens: `"jsd"` (generalized JSD with `beta`),
            `"forward_kl"`, `"reverse_kl"`, `"skew_forward_kl"`, `"skew_reverse_kl"` (DistiLLM, with `skew_alpha`), or
            `"sampled_reverse_kl"` (the sampled token's reverse KL as a policy-gradient advantage; the teacher only
            needs the sampled token's log-prob). This replaces SFT's `loss_type` (`"nll"`/`"dft"`).
        beta (`float`, *optional*, defaults to `0.5`):
            Generalized JSD interpolation: `0.0` is forward KL, `1.0` reverse KL.
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            Skew of the skewed KL losses, in `[0, 1)`; `0` is the plain KL.
        reward_scale (`float`, *optional*, defaults to `1.0`):
            The lambda of Generalized On-Policy Distillation for `"sampled_reverse_kl"`: the weight of
            `log(teacher / reference)` in the per-token reward. `1.0` with no reference model is standard OPD.
        reference_model_name_or_path (`str`, *optional*):
            Reference model of Generalized On-Policy Distillation; `None` uses the student itself (detached).
        reward_weights (`list[float]`, *optional*):
            With the trainer's `reward_funcs`: one weight per reward function (GRPO's name); 1 each by default.
        reward_weight (`float`, *optional*, defaults to `1.0`):
            With `reward_funcs`: the weight of the task reward's policy-gradient term beside the distillation term
            (see [`~trl_onpolicy.rewards`] and `docs/divergences.md`).
        loss_chunk_size (`int`, *optional*):
            Completion tokens whose loss is computed at once. Peak memory of the loss grows with this, not with the
            sequence length. `None` picks 4096 where the loss walks the vocabulary in tiles (every divergence but
            `"sampled_reverse_kl"` against a full teacher distribution, both output heads plain linear layers) and
            1024 where a chunk is projected to the whole vocabulary (`"sampled_reverse_kl"`, top-k or sampled-token
            teachers, soft-capped or adapter-wrapped heads, several teachers mixed).
        loss_vocab_tile (`int`, *optional*):
            Vocabulary columns per tile of the tiled loss, which never holds more than one tile's width of the
            `(chunk, V)` logits and writes their gradient in closed form. `None` picks about 0.5 M chunk x tile
            elements on CPU (cache-sized) and 16 M on GPUs (4096 columns for 4096 tokens); `0` projects every chunk to
            the whole vocabulary (the autograd path) for every loss.

        > Parameters that control the loss temperature

        loss_temperature_schedule (`str`, *optional*, defaults to `"constant"`):
            One of `"constant"`, `"linear"`, `"cosine"`, `"exponential"` (anneal from `temperature_start` to
            `temperature_end` over training) or `"adaptive"` (move toward `target_teacher_entropy`).
        temperature_start (`float`, *optional*, defaults to `1.0`):
            Loss temperature at the first step.
        temperature_end (`float`, *optional*):
            Loss temperature at the last step; defaults to `temperature_start`.
        target_teacher_entropy (`float`, *optional*):
            Target mean teacher entropy per token (nats) of the adaptive schedule.
        temperature_min (`float`, *optional*, defaults to `0.5`):
            Lower clamp of the adaptive schedule.
        temperature_max (`float`, *optional*, defaults to `10.0`):
            Upper clamp of the adaptive schedule.
        temperature_adapt_rate (`float`, *optional*, defaults to `0.1`):
            Step size of the adaptive controller on `log T`.
        temperature_grad_scale (`bool`, *optional*, defaults to `True`):
            Multiply the loss by `T**2` so gradient magnitudes do not shrink with the temperature (Hinton et al.).

        > Parameters that control rounds and robustness

        num_rounds (`int`, *optional*, defaults to `1`):
            Split training into this many rounds of equal steps. At each round end the callbacks' `on_round_end` fires
            on every process (the eval hook scores the student there) and a checkpoint is written.
        max_nonfinite_steps (`int`, *optional*, defaults to `5`):
            A NaN or inf loss or gradient skips the update and is counted; this many in a row stop training with an
            error that names what was seen.

        > Parameters that control saving

        save_merged_model (`bool`, *optional*, defaults to `False`):
            For a LoRA student, the final `save_model()` (and so `push_to_hub()`) writes the adapters merged into the
            base weights: a plain checkpoint that `AutoModelForCausalLM.from_pretrained` loads without PEFT.
            Checkpoints keep the adapters, so training resumes as usual.

    > [!NOTE]
    > Defaults that differ from [`~trl.SFTConfig`]: activation (gradient) checkpointing and `bf16` only where a CUDA
    > device is used (TRL's defaults there; nothing is forced on a CPU, where checkpointing only costs time; rollouts
    > are generated with the KV cache either way), `remove_unused_columns=False` (the trainer reads the raw columns),
    > `ddp_find_unused_parameters=False` (every trainable weight is used at every step). `fp16=True` needs a GPU: on a
    > CPU accelerate would quietly train in float32, so it is refused there (use `bf16=True`).
    """

    # Overridden defaults
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing`: trade compute for memory. Defaults to True on a "
            "CUDA device, False on a CPU."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Defaults to True only on a CUDA device that supports it."},
    )
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep the raw dataset columns: the trainer reads them."}
    )

    # Teacher
    teacher_model_name_or_path: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "The teacher when no `teacher_model` is passed: Hub id, path, server URL, cache folder, or dict."
        },
    )
    teacher_model_revision: str | None = field(default=None, metadata={"help": "Revision of the teacher."})
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for the teacher's `from_pretrained`."}
    )
    teacher_top_k: int | None = field(
        default=None, metadata={"help": "Keep the teacher's top-k log-probs plus a tail bucket; None = full vocab."}
    )
    teacher_model_kind: str = field(
        default="separate", metadata={"help": "'separate' (teacher_model), or the student itself: 'base', 'live', 'ema'."}
    )
    teacher_update_rate: float = field(default=0.05, metadata={"help": "EMA rate of an 'ema' self-teacher."})
    teacher_sync_steps: int = field(default=1, metadata={"help": "Optimizer steps between EMA updates."})
    teacher_prompt_template: str = field(
        default="{prompt}\n\n{privileged_context}",
        metadata={"help": "Joins a row's `privileged_context` to its prompt into the teacher's prompt."},
    )

    # A teacher of another tokenizer
    teacher_tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher's tokenizer when it differs from the student's (ULD loss)."}
    )
    uld_use_hybrid_loss: bool = field(default=False, metadata={"help": "JSD on the shared vocabulary, ULD on the rest."})
    uld_hybrid_matched_weight: float | None = field(default=None, metadata={"help": "Weight of the hybrid's JSD."})
    uld_hybrid_unmatched_weight: float | None = field(default=None, metadata={"help": "Weight of the hybrid's ULD."})
    uld_crossentropy_weight: float = field(default=0.0, metadata={"help": "Weight of the completion's NLL (GOLD)."})
    uld_distillation_weight: float = field(default=1.0, metadata={"help": "Weight of the span loss (GOLD)."})
    uld_min_alignment_rate: float = field(
        default=0.0, metadata={"help": "Refuse batches with fewer student tokens in one-to-one spans."}
    )

    # Teacher server
    teacher_server_model: str | None = field(default=None, metadata={"help": "Model name sent to the teacher server."})
    teacher_server_timeout: float = field(default=60.0, metadata={"help": "Seconds per scoring request."})
    teacher_server_max_retries: int = field(default=5, metadata={"help": "Retries of a failed request, with backoff."})
    teacher_server_batch_size: int = field(default=8, metadata={"help": "Sequences per scoring request."})
    teacher_server_concurrency: int = field(default=4, metadata={"help": "Scoring requests in flight at once."})
    teacher_server_api_key_env: str = field(
        default="TRL_ONPOLICY_TEACHER_API_KEY", metadata={"help": "Environment variable holding the server's API key."}
    )

    # Several teachers
    teacher_mixture: str = field(
        default="route", metadata={"help": "Several teachers: 'route' by a column, 'weighted' or 'confidence' mixing."}
    )
    teacher_routing_column: str = field(default="teacher", metadata={"help": "Column naming each row's teacher."})
    teacher_weights: dict[str, float] | str | None = field(
        default=None, metadata={"help": "Mixture weights per teacher name (sum to 1); equal when unset."}
    )

    # Hidden-state matching
    hidden_state_weight: float = field(default=0.0, metadata={"help": "Weight of the hidden-state term; 0 = off."})
    hidden_state_layers: list[str] | None = field(
        default=None, metadata={"help": "'student:teacher' layer pairs; default evenly spaced."}
    )
    hidden_state_distance: str = field(default="mse", metadata={"help": "'mse' or 'cosine'."})

    # Completions
    lmbda: float = field(default=1.0, metadata={"help": "Probability that the student writes the completions."})
    seq_kd: bool = field(default=False, metadata={"help": "Off-policy batches use teacher-written completions."})
    num_generations: int = field(default=1, metadata={"help": "Completions sampled per prompt."})
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer steps each batch of rollouts and teacher scores trains (GRPO's mu)."}
    )
    steps_per_generation: int | str | None = field(  # `| None`: HfArgumentParser then parses the flag as text
        default=1, metadata={"help": "Optimizer steps whose rollouts are generated at once (a pool), or 'round'."}
    )
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Dataset rows per sampler call, per process; None: one step's rows."}
    )
    max_completion_length: int = field(default=256, metadata={"help": "Maximum number of generated tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the rollouts."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the rollouts; 0 disables it."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling of the rollouts."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty of the rollouts."})
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra GenerationConfig fields; they override the ones above."}
    )
    stop_strings: list[str] | None = field(default=None, metadata={"help": "Stop generation at these strings."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (needs the `vllm` extra)."})
    vllm_mode: str = field(
        default="colocate", metadata={"help": "'colocate' (in process) or 'server' (trl vllm-serve)."}
    )
    vllm_model_impl: str = field(
        default="vllm", metadata={"help": "vLLM model implementation: 'vllm' or 'transformers'."}
    )
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Colocate: offload vLLM between steps."})
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "Server mode: base URL of trl vllm-serve."}
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host (without a base URL)."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port (without a base URL)."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server mode: seconds to wait for the server."}
    )
    vllm_group_port: int = field(default=51216, metadata={"help": "Server mode: port of the weight-sync group."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "Colocate: GPU memory share of vLLM."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "Colocate: vLLM's max_model_len."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Colocate: tensor-parallel size of vLLM."})
    vllm_generation_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra vLLM SamplingParams fields for the vLLM rollouts."}
    )
    vllm_importance_sampling_correction: bool = field(
        default=True, metadata={"help": "sampled_reverse_kl: weight vLLM's tokens by min(student / vLLM, clip_max)."}
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=3.0, metadata={"help": "Cap of the truncated importance-sampling weight; None: no cap."}
    )

    # Multi-turn rollouts
    max_turns: int | None = field(default=None, metadata={"help": "Student turns per rollout; None: no limit."})
    max_tool_calling_iterations: int | None = field(
        default=None, metadata={"help": "Rounds of tool calls per rollout; None: no limit."}
    )
    tool_call_timeout: float = field(default=30.0, metadata={"help": "Seconds one tool call may run."})

    # Curriculum
    lmbda_schedule: str = field(
        default="constant", metadata={"help": f"How `lmbda` moves over training, one of {', '.join(LMBDA_SCHEDULES)}."}
    )
    lmbda_start: float | None = field(default=None, metadata={"help": "`lmbda` at the first step; None: `lmbda`."})
    lmbda_end: float | None = field(default=None, metadata={"help": "`lmbda` at the last step; None: `lmbda_start`."})
    lmbda_schedule_steps: int | None = field(
        default=None, metadata={"help": "Steps from `lmbda_start` to `lmbda_end` (linear, cosine); None: max_steps."}
    )

    # Loss
    loss_type: str = field(
        default="jsd",
        metadata={"help": f"Divergence over completion tokens, one of {', '.join(LOSS_TYPES)}."},
    )
    beta: float = field(default=0.5, metadata={"help": "Generalized JSD: 0 = forward KL, 1 = reverse KL."})
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew of the skewed KL losses, in [0, 1)."})
    reward_scale: float = field(default=1.0, metadata={"help": "Generalized OPD lambda for sampled_reverse_kl."})
    reference_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model of Generalized OPD; None = the student, detached."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (the trainer's reward_funcs); 1 each."}
    )
    reward_weight: float = field(default=1.0, metadata={"help": "Weight of the task-reward term beside distillation."})
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Completion tokens per chunk of the loss; None: 4096 tiled, 1024 else."}
    )
    loss_vocab_tile: int | None = field(
        default=None, metadata={"help": "Vocabulary columns per tile of the loss; None: by device; 0: no tiles."}
    )

    # Loss temperature
    loss_temperature_schedule: str = field(
        default="constant", metadata={"help": f"Loss temperature schedule, one of {', '.join(SCHEDULES)}."}
    )
    temperature_start: float = field(default=1.0, metadata={"help": "Loss temperature at the first step."})
    temperature_end: float | None = field(default=None, metadata={"help": "Loss temperature at the last step."})
    target_teacher_entropy: float | None = field(
        default=None, metadata={"help": "Target teacher entropy per token (nats) of the adaptive schedule."}
    )
    temperature_min: float = field(default=0.5, metadata={"help": "Lower clamp of the adaptive schedule."})
    temperature_max: float = field(default=10.0, metadata={"help": "Upper clamp of the adaptive schedule."})
    temperature_adapt_rate: float = field(default=0.1, metadata={"help": "Adaptive controller step on log T."})
    temperature_grad_scale: bool = field(default=True, metadata={"help": "Multiply the loss by T**2."})

    # Rounds and robustness
    num_rounds: int = field(default=1, metadata={"help": "Split training into this many rounds."})
    max_nonfinite_steps: int = field(
        default=5, metadata={"help": "Stop after this many NaN/inf updates in a row (each one is skipped)."}
    )

    # Saving
    save_merged_model: bool = field(
        default=False,
        metadata={"help": "LoRA student: the final save (and push_to_hub) merges the adapters into plain weights."},
    )

    def __post_init__(self):
        config_sft.set_device_defaults(self)
        parse_text_values(self)  # lists and dicts that arrive as text from the command line
        with self.sft_loss_type():  # SFTConfig validates its own `loss_type` ("nll"/"dft"); ours is checked below
            super().__post_init__()
        if self.temperature_end is None:
            self.temperature_end = self.temperature_start
        check_config(self)

    def sft_loss_type(self):
        """Context manager: inside it, `loss_type` is SFT's own `"nll"`, for the SFT code that reads it; ours is
        restored on leaving, even by an exception (see [`~trl_onpolicy.config_sft.sft_loss_type`])."""
        return config_sft.sft_loss_type(self)

    @classmethod
    def from_args(cls, args, model) -> OnPolicyDistillConfig:
        """The trainer's `args` as an `OnPolicyDistillConfig`: None, an [`~trl.SFTConfig`] or a `TrainingArguments` is
        converted (see [`~trl_onpolicy.config_sft.from_args`])."""
        return config_sft.from_args(cls, args, model)

    def __repr__(self) -> str:  # the dataclass repr would show `hub_token`; TrainingArguments' masks it
        return TrainingArguments.__str__(self)

    def __getstate__(self):  # Trainer pickles the config into training_args.bin, which push_to_hub uploads
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    @property
    def max_prompt_length(self) -> int | None:
        """Tokens left for the prompt: `max_length - max_completion_length` (None when `max_length` is None)."""
        return None if self.max_length is None else self.max_length - self.max_completion_length
