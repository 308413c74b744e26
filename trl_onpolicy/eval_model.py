"""lm-eval's `HFLM` for a model whose context is shorter than what a task asks it to generate.

lm-eval gives every generation task `max_gen_toks` new tokens (256 unless the task or `gen_kwargs` says otherwise) and
refuses, per request, a model whose maximum sequence length is not larger ("requested max tokens to generate (256) must
be less than model's maximum sequence length (256)"); during training that failure was logged and the round's scores
lost, every round. [`ContextCappedHFLM`] caps such a request at half the context instead (the prompt keeps its last
tokens in the other half, as lm-eval truncates it) and warns once per task with the fix. We cap rather than refuse:
the student's context is a fact of the model, a run should not stop over its evaluation, and the warning says how to
choose the length (`gen_kwargs={"max_gen_toks": N}`, `trl-onpolicy eval --max-gen-toks N`).

lm-eval also warns, at every evaluation, that a model passed as an object must not be launched "via accelerate" and
that it assumes a single-process evaluation. Both are expected here: the main process evaluates the unwrapped student
alone while the other processes wait (see [`~trl_onpolicy.eval.LmEvalCallback`]), which is what lm-eval then does
(rank 0 of a world of 1). Those two messages, and only those, are filtered out while the `HFLM` is built.
"""

from __future__ import annotations

import logging

from lm_eval.models.huggingface import HFLM

logger = logging.getLogger(__name__)

EXPECTED_WARNINGS = (  # lm-eval's, for a model passed as an object (see the module docstring)
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)
LENGTH_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's priority order


class _DropExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(EXPECTED_WARNINGS)


class ContextCappedHFLM(HFLM):
    """`HFLM` whose generation requests fit the model's context (see the module docstring)."""

    def __init__(self, *args, warned: set[str] | None = None, **kwargs):
        lm_eval_logger, expected = logging.getLogger(HFLM.__module__), _DropExpectedWarnings()
        lm_eval_logger.addFilter(expected)
        try:
            super().__init__(*args, **kwargs)
        finally:
            lm_eval_logger.removeFilter(expected)
        self.warned = set() if warned is None else warned  # tasks already warned about (shared across evaluations)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        cap = max(1, self.max_length // 2)
        for request in requests:
            context, gen_kwargs, *rest = request.args
            wanted = next((gen_kwargs[k] for k in LENGTH_KEYS if gen_kwargs.get(k) is not None), self.max_gen_toks)
            if int(wanted) < self.max_length:
                continue
            kept = {k: v for k, v in gen_kwargs.items() if k not in LENGTH_KEYS}
            request.arguments = (context, {**kept, "max_gen_toks": cap}, *rest)
            if request.task_name not in self.warned:
                self.warned.add(request.task_name)
                logger.warning(
                    "Task %r asks for up to %d generated tokens but the model's maximum sequence length is %d: "
                    "generating at most %d tokens (the prompt keeps its last %d). Scores can be lower than with a "
                    "longer context. To choose the length, set gen_kwargs={'max_gen_toks': N} on LmEvalCallback "
                    "(trl-onpolicy eval --max-gen-toks N) with N < %d.",
                    request.task_name, int(wanted), self.max_length, cap, self.max_length - cap, self.max_length,
                )  # fmt: skip
        return super().generate_until(requests, disable_tqdm)
