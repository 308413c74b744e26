"""Samplers: whatever writes completions for prompts, behind one call.

A [`Sampler`] takes prompt token ids and returns [`Samples`]: the completion ids (cut after the first EOS, see
[`~trl_onpolicy.rollouts.finish_completion`]), whether each ran to the length limit, and, where the sampler reports
them, its own log-probs of the tokens it drew. The trainer picks one per step by the completion source and never
branches on how it samples:

- [`GenerateSampler`]: `model.generate` on a model lent by a context manager (the student, unwrapped for generation);
- [`~trl_onpolicy.vllm_rollouts.VLLMSampler`]: the student through vLLM (colocated or a server), with log-probs;
- [`TeacherSampler`]: the teacher writes (`seq_kd`), through its backend's `generate`.

A multi-turn sampler (tools, environments) is one more implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple, Protocol

from transformers import GenerationConfig

from .rollouts import sample


class Samples(NamedTuple):
    """
    One completion per prompt.

    Args:
        completion_ids (`list[list[int]]`): Completion token ids, ending with EOS unless truncated.
        truncated (`list[bool]`): Whether a completion hit `max_new_tokens` without an EOS or a stop string.
        logps (`list[list[float]]`, *optional*): The sampler's own log-prob of each completion token (NaN where it
            gave none), or None when it reports none (see [`~trl_onpolicy.rollouts.Rollouts.sampling_logps`]).
    """

    completion_ids: list[list[int]]
    truncated: list[bool]
    logps: list[list[float]] | None = None


class Sampler(Protocol):
    def sample(self, prompt_ids: list[list[int]], generation_config: GenerationConfig, tokenizer=None) -> Samples:
        """One completion per prompt in `prompt_ids`, sampled as `generation_config` says (stop strings need the
        `tokenizer`)."""
        ...


class GenerateSampler:
    """
    Samples with `model.generate` (KV cache on, left padding; see [`~trl_onpolicy.rollouts.sample`]).

    Args:
        lend_model (`Callable[[], AbstractContextManager]`): Lends the model to generate with for one call (e.g.
            TRL's `unwrap_model_for_generation`, which gathers a ZeRO-3 student's weights).
    """

    def __init__(self, lend_model: Callable[[], AbstractContextManager]):
        self.lend_model = lend_model

    def sample(self, prompt_ids: list[list[int]], generation_config: GenerationConfig, tokenizer=None) -> Samples:
        with self.lend_model() as model:
            return Samples(*sample(model, prompt_ids, generation_config, tokenizer))


class TeacherSampler:
    """The teacher writes the completions (`seq_kd=True`) through its backend's `generate` (see
    [`~trl_onpolicy.teachers.Teacher.generate`], which raises for a backend that cannot write)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def sample(self, prompt_ids: list[list[int]], generation_config: GenerationConfig, tokenizer=None) -> Samples:
        return Samples(*self.teacher.generate(prompt_ids, generation_config, tokenizer))
