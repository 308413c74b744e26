"""Student rollouts with vLLM (`use_vllm=True`), through TRL's own `VLLMGeneration`.

Two modes, as in TRL: `vllm_mode="colocate"` runs a vLLM engine inside each training process (sharing the GPU,
`vllm_gpu_memory_utilization` of it), `"server"` sends prompts to `trl vllm-serve` at `vllm_server_base_url` (or
`vllm_server_host:vllm_server_port`). The student's weights are pushed to vLLM once per optimizer step, before that
step's rollouts (never per micro-batch), and vLLM samples with the config's sampling settings. Everything after
sampling (teacher scores, loss) is the same as with transformers generation.
"""

from __future__ import annotations

from ._compat import vllm_generation_class


def build_vllm(trainer):
    """TRL's `VLLMGeneration` for the trainer's student and config (raises the ImportError naming the extra)."""
    args = trainer.args
    generation_kwargs = dict(args.generation_kwargs or {})
    if args.stop_strings:
        generation_kwargs.setdefault("stop", list(args.stop_strings))
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
        max_num_seqs=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_generations,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        model_impl=args.vllm_model_impl,
        trust_remote_code=args.trust_remote_code,
        repetition_penalty=args.repetition_penalty,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p or 0.0,
        max_completion_length=args.max_completion_length,
        logprobs=None,  # the teacher scores the tokens; vLLM's own log-probs are not used
        generation_kwargs=generation_kwargs,
    )


class VLLMSampler:
    """Samples the student's completions with vLLM, syncing the weights once per optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.engine = build_vllm(trainer)
        self._synced_step = -1

    def sample(self, prompt_ids: list[list[int]], eos_ids: set[int]) -> tuple[list[list[int]], list[bool]]:
        """Completions (cut after the first EOS) and whether each one ran to `max_completion_length` unstopped."""
        step = self.trainer.state.global_step
        if step != self._synced_step:
            self.engine.sync_weights()
            self._synced_step = step
        _, completion_ids, _, _ = self.engine.generate(prompts=prompt_ids, images=None, num_generations=1)
        limit = self.trainer.args.max_completion_length
        completions, truncated = [], []
        for ids in completion_ids:
            ids = list(ids)
            stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
            ids = ids if stop is None else ids[: stop + 1]
            completions.append(ids)
            truncated.append(stop is None and len(ids) >= limit)
        return completions, truncated
