"""A teacher of another model family: its tokenizer differs from the student's (cross-tokenizer distillation).

[`CrossTokenizerTeacher`] wraps a backend that scores sequences in the teacher's own tokens (a [`LocalTeacher`] of the
teacher model, or a teacher server) and turns its scores into the student's positions:

1. each rollout's completion is decoded to text with the student's tokenizer and encoded with the teacher's, aligned
   with the student's tokens by [`~trl_onpolicy.token_alignment.teacher_completion`]; a conversational prompt is
   rendered with the teacher's own chat template (the trainer adds `teacher_native_prompt_ids` to the data, see
   `teacher_prompts.add_native_teacher_prompt_ids`), a plain one is the student's text re-encoded (as TRL's GOLD
   re-encodes every prompt, chat-template markers included);
2. the backend returns, at every teacher position, its top-k tokens and log-probs and the log-prob of the token there;
3. for each aligned span the teacher's span measure is its first token's top-k scaled by the probability of the rest
   of the span as written ([`~trl_onpolicy.cross_tokenizer_divergences.merge_spans`]; scaling keeps the order, so the
   top-k of the measure is the top-k of the first position), placed at the span's first student token with the span's
   length in student tokens: the spans form of [`TeacherScores`].

The loss then compares the student's span measure with it (ULD or hybrid ULD, see `trl_onpolicy.loss`). Spans whose
teacher side is empty (a completion cut inside a character) and rows below the alignment floor carry nothing.
"""

from __future__ import annotations

import logging

import torch

from ..token_alignment import matched_vocabulary, teacher_completion
from .base import Teacher, TeacherScores

logger = logging.getLogger(__name__)

CROSS_TOKENIZER_TOP_K = 64  # the teacher's span measures kept per span when the config sets no `teacher_top_k`


class CrossTokenizerTeacher(Teacher):
    """
    Scores a student's completions with a teacher whose tokenizer differs (see the module docstring).

    Args:
        teacher ([`Teacher`]): Scores sequences in the teacher's tokens and returns the top-k form.
        student_tokenizer, teacher_tokenizer: The two tokenizers.
        top_k (`int`, *optional*): The teacher's span-measure values kept per span; defaults to
            `CROSS_TOKENIZER_TOP_K`.
        min_alignment_rate (`float`, *optional*, defaults to `0.0`): A batch whose alignment rate (the fraction of
            student tokens in one-to-one spans) is below this floor raises a `ValueError`; below `warn_alignment_rate`
            it is logged once.
        warn_alignment_rate (`float`, *optional*, defaults to `0.5`).
        hybrid (`bool`, *optional*, defaults to `False`): The hybrid loss (GOLD's `uld_use_hybrid_loss`): JSD on the
            matched vocabulary, ULD on the rest; else ULD.
        matched_weight, unmatched_weight (`float`, *optional*): The hybrid loss's weights (GOLD's
            `uld_hybrid_matched_weight`, `uld_hybrid_unmatched_weight`); both None: the matched vocabulary's share.

    `alignment_rate` holds the rate of the last batch scored, for the logs. `matched` is the matched vocabulary (student
    ids, teacher ids) of the hybrid loss ([`~trl_onpolicy.token_alignment.matched_vocabulary`]).
    """

    name = "cross-tokenizer"

    def __init__(self, teacher: Teacher, student_tokenizer, teacher_tokenizer, top_k: int | None = None,
                 min_alignment_rate: float = 0.0, warn_alignment_rate: float = 0.5, hybrid: bool = False,
                 matched_weight: float | None = None, unmatched_weight: float | None = None):  # fmt: skip
        if (matched_weight is None) != (unmatched_weight is None):
            raise ValueError("Give both `matched_weight` and `unmatched_weight`, or neither (the matched vocabulary's "
                             "share of the teacher's then weighs the two terms).")  # fmt: skip
        self.hybrid, self.matched_weight, self.unmatched_weight = hybrid, matched_weight, unmatched_weight
        self.teacher, self.student_tokenizer, self.teacher_tokenizer = teacher, student_tokenizer, teacher_tokenizer
        self.top_k = top_k or CROSS_TOKENIZER_TOP_K
        self.min_alignment_rate, self.warn_alignment_rate = min_alignment_rate, warn_alignment_rate
        self.alignment_rate: float | None = None
        self._warned = False
        self._matched = None

    @property
    def matched(self) -> tuple[list[int], list[int]]:
        if self._matched is None:  # decodes both vocabularies once (a second or two for 150k tokens)
            self._matched = matched_vocabulary(self.student_tokenizer, self.teacher_tokenizer)
        return self._matched

    def prepare(self, accelerator) -> CrossTokenizerTeacher:
        self.teacher = self.teacher.prepare(accelerator)
        return self

    def to(self, device) -> CrossTokenizerTeacher:
        self.teacher = self.teacher.to(device)
        return self

    def describe(self) -> str:
        return f"{self.teacher.describe()}, with its own tokenizer (cross-tokenizer: ULD over aligned spans)"

    def score(self, batch, *, temperature=1.0, top_k=None, need="full", hidden_layers=None) -> TeacherScores:
        if hidden_layers:
            raise ValueError("Hidden-state matching needs a teacher that shares the student's tokenizer: the two "
                             "models' positions differ. Set `hidden_state_weight=0`.")  # fmt: skip
        rows, device = self._teacher_rows(batch), batch["input_ids"].device
        inputs = _layout([r[0] for r in rows], [r[1] for r in rows], self.teacher_tokenizer.pad_token_id or 0)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        scores = self.teacher.score(inputs, temperature=temperature, top_k=top_k or self.top_k, need="full")
        if scores.form != "topk":
            raise ValueError(f"The teacher under CrossTokenizerTeacher returned {scores.form!r} scores; it must "
                             "return the top-k form (`top_k` is always passed).")  # fmt: skip
        return self._spans(scores, [r[2] for r in rows], batch["completion_ids"].shape, temperature).to(device)

    def _teacher_rows(self, batch) -> list[tuple[list[int], list[int], object]]:
        """Per row: the teacher's prompt ids, its completion ids and the alignment with the student's tokens."""
        n_completion = batch["completion_ids"].shape[1]
        eos = {self.student_tokenizer.eos_token_id}
        rows, one_to_one, tokens = [], 0, 0
        native = iter(batch.get("teacher_native_prompt_ids") or [[]] * len(batch["input_ids"]))
        for ids, mask, completion, real in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                               batch["completion_ids"].tolist(), batch["completion_mask"].tolist()):  # fmt: skip
            if 0 in real[: sum(real)]:
                raise ValueError("Cross-tokenizer distillation scores single-turn completions only: a completion "
                                 "with environment tokens (`tools`, `environment_factory`) cannot be re-tokenized "
                                 "turn by turn yet.")  # fmt: skip
            teacher_prompt = next(native)
            if not teacher_prompt:  # a plain prompt: the student's text, re-encoded
                prompt = [t for t, m in zip(ids[: len(ids) - n_completion], mask) if m]
                text = self.student_tokenizer.decode(prompt)
                teacher_prompt = list(self.teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
            completion = completion[: sum(real)]
            teacher_ids, alignment = teacher_completion(self.student_tokenizer, self.teacher_tokenizer, completion,
                                                        eos, self.teacher_tokenizer.eos_token_id)  # fmt: skip
            rows.append((teacher_prompt, teacher_ids, alignment))
            one_to_one += sum(alignment.one_to_one())
            tokens += len(completion)
        self._check_rate(one_to_one / tokens if tokens else 1.0)
        return rows

    def _check_rate(self, rate: float) -> None:
        self.alignment_rate = rate
        if rate < self.min_alignment_rate:
            raise ValueError(
                f"Only {rate:.1%} of the student's tokens align one-to-one with the teacher's, below the floor "
                f"`min_alignment_rate={self.min_alignment_rate}`: the two tokenizers cut this text very differently, "
                "and every span the loss compares covers several tokens. Lower the floor to train anyway, or pick a "
                "teacher whose tokenizer is closer to the student's."
            )
        if rate < self.warn_alignment_rate and not self._warned:
            self._warned = True
            logger.warning("%.1f%% of the student's tokens align one-to-one with the teacher's tokens (below %.0f%%): "
                           "most spans the loss compares cover several tokens.", 100 * rate,
                           100 * self.warn_alignment_rate)  # fmt: skip

    def _spans(self, scores: TeacherScores, alignments, shape, temperature: float) -> TeacherScores:
        """The teacher's span measures (top-k) at each span's first student token, `(B, C, K)`."""
        k = scores.topk_ids.shape[-1]
        ids = torch.zeros((*shape, k), dtype=torch.long)  # (B, C, K)
        logps = torch.full((*shape, k), float("-inf"))  # (B, C, K)
        length = torch.zeros(shape, dtype=torch.long)  # (B, C)
        text_logps = torch.full(shape, float("nan"))  # (B, C) the teacher's log-prob of each span's text
        topk_ids, topk_logps, token_logps = scores.topk_ids.cpu(), scores.topk_logps.float().cpu(), scores.token_logps
        token_logps = token_logps.float().cpu()
        for row, alignment in enumerate(alignments):
            for (a, b), (c, d) in zip(alignment.student, alignment.teacher):
                if d == c:  # no teacher tokens: nothing to compare
                    continue
                rest = token_logps[row, c + 1 : d].sum()  # the rest of the teacher's span as written
                ids[row, a], logps[row, a], length[row, a] = topk_ids[row, c], topk_logps[row, c] + rest, b - a
                text_logps[row, a] = token_logps[row, c] + rest
        return TeacherScores(temperature, token_logps=text_logps, topk_ids=ids, topk_logps=logps, span_length=length)


def _layout(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """[`~trl_onpolicy.rollouts.collate`]'s layout for token lists: prompts padded left, completions right."""
    width_p, width_c = max(map(len, prompts), default=0), max(max(map(len, completions), default=0), 1)
    input_ids, attention, completion_ids, completion_mask = [], [], [], []
    for p, c in zip(prompts, completions):
        left, right = width_p - len(p), width_c - len(c)
        input_ids.append([pad_id] * left + p + c + [pad_id] * right)
        attention.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        completion_ids.append(c + [pad_id] * right)
        completion_mask.append([1] * len(c) + [0] * right)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention),
            "completion_ids": torch.tensor(completion_ids), "completion_mask": torch.tensor(completion_mask)}  # fmt: skip
