"""Student rollouts with vLLM (`use_vllm=True`), through TRL's own `VLLMGeneration`.

Two modes, as in TRL: `vllm_mode="colocate"` runs a vLLM engine inside each training process (sharing the GPU,
`vllm_gpu_memory_utilization` of it), `"server"` sends prompts to `trl vllm-serve` at `vllm_server_base_url` (or
`vllm_server_host:vllm_server_port`). The student's weights are pushed to vLLM once per optimizer step, before that
step's rollouts (never per micro-batch), and vLLM samples with the config's sampling settings plus
`vllm_generation_kwargs` (vLLM `SamplingParams` fields; `generation_kwargs`, transformers `GenerationConfig` fields,
never reach it).

The completions are finished as on the transformers path ([`~trl_onpolicy.rollouts.finish_completion`]): cut after the
first of any of the model's EOS ids, stop strings kept, `truncated` only when neither stopped them. vLLM's log-prob of
each sampled token (TRL's `logprobs=0`: the sampled token only) is kept as `Rollouts.sampling_logps`, the behaviour
policy of the truncated importance-sampling correction (`vllm_importance_sampling_correction`, see
[`~trl_onpolicy.divergences.truncated_importance_weights`]).
"""

from __future__ import annotations

import logging

from transformers import GenerationConfig

from ._compat import vllm_generation_class
from .rollouts import finish_completion
from .samplers import Samples

logger = logging.getLogger(__name__)

# `SamplingParams` fields the trainer sets itself, and from what
RESERVED = {
    "n": "`num_generations`",
    "max_tokens": "`max_completion_length`",
    "logprobs": "the trainer (the sampled token's log-prob, for the importance-sampling correction)",
}
# Fields of both transformers' `GenerationConfig` and vLLM's `SamplingParams`
SHARED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# `GenerationConfig`-only fields and what does their job for vLLM
COUNTERPARTS = {
    "max_new_tokens": "`max_completion_length`",
    "max_length": "`max_completion_length`",
    "min_new_tokens": "vLLM's `min_tokens`",
    "do_sample": "none needed: vLLM always samples, `temperature=0` is greedy",
    "stop_strings": "`stop_strings`, for both engines",
    "eos_token_id": "vLLM's `stop_token_ids`",
    "num_return_sequences": "`num_generations`",
    "bad_words_ids": "vLLM's `bad_words`, as strings",
}


def check_sampling_kwargs(kwargs) -> None:
    """Refuse `vllm_generation_kwargs` that are not a dict, that the trainer sets itself, or that name a transformers
    `GenerationConfig` field vLLM's `SamplingParams` does not take (it would raise at the first rollout)."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"`vllm_generation_kwargs` must be a dict of vLLM `SamplingParams` fields, got {type(kwargs).__name__}."
        )
    transformers_only = set(GenerationConfig().to_dict()) - set(SHARED)
    for key in kwargs:
        if key in RESERVED:
            raise ValueError(f"`vllm_generation_kwargs` cannot set `{key}`: it comes from {RESERVED[key]}.")
        if key in transformers_only:
            hint = f" (for vLLM: {COUNTERPARTS[key]})" if key in COUNTERPARTS else ""
            raise ValueError(
                f"`vllm_generation_kwargs` takes vLLM `SamplingParams` fields, and `{key}` is a transformers "
                f"`GenerationConfig` field{hint}. Put transformers fields in `generation_kwargs`."
            )


def sampling_kwargs(args, generation_config: GenerationConfig) -> dict:
    """`SamplingParams` fields beyond those `VLLMGeneration` sets: stop at the EOS ids and stop strings transformers
    generation stops at, and keep the stop string in the text as it does; `vllm_generation_kwargs` override them."""
    eos = generation_config.eos_token_id
    kwargs = {
        "stop_token_ids": list(eos) if isinstance(eos, list) else [] if eos is None else [eos],
        "include_stop_str_in_output": True,
    }
    if args.stop_strings:
        kwargs["stop"] = list(args.stop_strings)
    kwargs.update(args.vllm_generation_kwargs or {})
    return kwargs


def build_vllm(trainer):
    """TRL's `VLLMGeneration` for the trainer's student and config (raises the ImportError naming the extra)."""
    args = trainer.args
    _warn_if_weights_compare_processed(args)
    return vllm_generation_class()(
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        server_timeout=args.vllm_server_timeout,
        group_port=args.vllm_group_port,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=max_num_seqs(args),
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        model_impl=args.vllm_model_impl,
        trust_remote_code=args.trust_remote_code,
        repetition_penalty=args.repetition_penalty,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p or 0.0,
        max_completion_length=args.max_completion_length,
        logprobs=0,  # the sampled token's log-prob only: the behaviour policy of the importance-sampling correction
        generation_kwargs=sampling_kwargs(args, trainer.generation_config),
    )


def max_num_seqs(args) -> int:
    """Sequences one colocated engine samples at once: a step's completions on this process, times the tensor-parallel
    group, whose ranks' prompts are gathered into one `generate` (TRL's GRPO: per-device batch x tensor-parallel size
    x steps per generation, its per-device batch counting completions)."""
    completions = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_generations
    return completions * args.vllm_tensor_parallel_size


def applies_correction(args) -> bool:
    """Whether vLLM's log-probs weight the loss (the sampled-token policy gradient only)."""
    return args.vllm_importance_sampling_correction and args.loss_type == "sampled_reverse_kl"


def _warn_if_weights_compare_processed(args) -> None:
    """vLLM returns log-probs of its processed distribution; the loss's are the whole one's at the loss temperature."""
    schedule = (args.temperature_start, args.temperature_end)
    processed = [name for name, on in (
        ("temperature", any(t != args.temperature for t in schedule)), ("top_p", args.top_p < 1.0),
        ("top_k", args.top_k > 0), ("min_p", bool(args.min_p)), ("repetition_penalty", args.repetition_penalty != 1.0),
    ) if on]  # fmt: skip
    if applies_correction(args) and processed:
        logger.warning(
            "The importance weight compares vLLM's log-prob of each token, from its processed sampling distribution "
            "(%s), with the student's at the loss temperature over the whole vocabulary: the weight also carries that "
            "difference, and `vllm_importance_sampling_clip_max` truncates it. Sample at the loss temperature with "
            "no top-k/top-p/min-p/repetition penalty for a weight that measures vLLM's mismatch alone.",
            ", ".join(processed),
        )


def sampled_token_logps(token_ids: list[int], position_logps, position_ids) -> list[float]:
    """vLLM's log-prob of each sampled token: the entry of its id among each position's returned log-probs (`(len, k)`
    lists; with `logprobs=0`, k = 1 and the entry is the sampled token's); NaN where vLLM gave none."""
    out = []
    for t, token in enumerate(token_ids):
        values = position_logps[t] if t < len(position_logps) else []
        ids = position_ids[t] if position_ids is not None else [token] * len(values)
        value = next((v for i, v in zip(ids, values) if i == token), None)
        out.append(float("nan") if value is None else float(value))
    return out


class VLLMSampler:
    """Samples the student's completions with vLLM, syncing the weights once per optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.engine = build_vllm(trainer)
        self._synced_step = -1
        self._check_server_logprobs_mode()

    def _check_server_logprobs_mode(self) -> None:
        """A server must report processed log-probs (after temperature and top-k/top-p), as TRL's GRPO checks."""
        args = self.trainer.args
        if args.vllm_mode != "server" or not applies_correction(args) or not self.trainer.accelerator.is_main_process:
            return
        client = getattr(self.engine, "vllm_client", None)
        if client is None or not hasattr(client, "get_server_info"):
            return
        mode = client.get_server_info()["model_config"]["logprobs_mode"]
        if mode != "processed_logprobs":
            logger.warning(
                "The vLLM server runs with `--logprobs-mode %s`, so its log-probs are not those it sampled from and "
                "the importance-sampling correction is biased. Restart it with `--logprobs-mode processed_logprobs`, "
                "or set `vllm_importance_sampling_correction=False`.",
                mode,
            )

    def sample(
        self, prompt_ids: list[list[int]], generation_config: GenerationConfig, tokenizer=None
    ) -> Samples:
        """
        One completion per prompt, finished as the transformers path finishes them (a
        [`~trl_onpolicy.samplers.Sampler`]).

        Returns:
            [`~trl_onpolicy.samplers.Samples`]: `logps` holds vLLM's log-prob of each completion token (NaN where it
            gave none), or is `None` when vLLM returned no log-probs.
        """
        step = self.trainer.state.global_step
        if step != self._synced_step:
            self.engine.sync_weights()
            self._synced_step = step
        _, completion_ids, logprobs, logprob_ids = self.engine.generate(
            prompts=prompt_ids, images=None, num_generations=1
        )
        completions, truncated, sampling_logps = [], [], []
        for i, ids in enumerate(completion_ids):
            ids, cut = finish_completion(list(ids), generation_config, tokenizer)
            completions.append(ids)
            truncated.append(cut)
            if logprobs is not None:
                position_ids = None if logprob_ids is None else logprob_ids[i]
                sampling_logps.append(sampled_token_logps(ids, logprobs[i], position_ids))
        return Samples(completions, truncated, sampling_logps if logprobs is not None else None)
