"""A custom teacher backend: a `trl_onpolicy.teachers.Teacher` subclass that wraps another backend and logs.

    python examples/custom_teacher.py      # offline: the built-in toy teacher and student, 20 steps on a CPU

A backend's whole job is `score(batch, *, temperature, top_k, need, hidden_layers) -> TeacherScores`:

- `batch` holds `input_ids` and `attention_mask` `(B, P + C)` (prompts left-padded to `P`, completions right-padded to
  `C`), `completion_ids` and `completion_mask` `(B, C)`, and `rows` (the dataset row of every completion);
- it returns the teacher's log-probs for the completion tokens at the loss `temperature`, in one of three forms:
  full (`hidden` `(B, C, H)` + `head`, projected to the vocabulary lazily by the loss), top-k (`topk_ids`,
  `topk_logps` `(B, C, K)`; asked for with `top_k`), or the sampled tokens only (`token_logps` `(B, C)`; enough
  when `need == "token"`, i.e. `loss_type="sampled_reverse_kl"`).

`LoggingTeacher` passes the call to the backend it wraps and records, per scoring call, how many completion tokens
were scored, the mean log-prob the teacher gives the sampled tokens (how much the teacher likes what the student
wrote: it should rise as the student learns) and the seconds spent. The same shape fits a backend of your own (a
different inference server, a rule-based scorer, a reweighting of two teachers): pass it as `teacher_model=`.

The trainer calls `teacher.to(device)` once; the base class does nothing, so a backend that holds a model forwards it
(as `LoggingTeacher.to` does below).
"""

from __future__ import annotations

import logging
import time

import torch

from trl_onpolicy.teachers import Teacher, TeacherScores

logger = logging.getLogger(__name__)


class LoggingTeacher(Teacher):
    """
    Wraps a teacher backend and records one entry per `score` call in `self.records`:
    `{"tokens", "mean_token_logp", "form", "seconds"}`.

    Args:
        inner (`Teacher`): The backend that does the scoring, e.g. `LocalTeacher(model)`.
    """

    name = "logging"

    def __init__(self, inner: Teacher):
        self.inner = inner
        self.records: list[dict] = []
        self.scores_any_completion = inner.scores_any_completion

    # The trainer tells the backend how many logit columns the loss compares (padded embedding matrices).
    @property
    def compare_vocab(self):
        return getattr(self.inner, "compare_vocab", None)

    @compare_vocab.setter
    def compare_vocab(self, value):
        self.inner.compare_vocab = value

    @property
    def vocab_size(self) -> int | None:
        return self.inner.vocab_size

    def to(self, device):
        self.inner.to(device)
        return self

    def score(self, batch, *, temperature=1.0, top_k=None, need="full", hidden_layers=None) -> TeacherScores:
        start = time.perf_counter()
        scores = self.inner.score(batch, temperature=temperature, top_k=top_k, need=need, hidden_layers=hidden_layers)
        mask = batch["completion_mask"].bool()  # (B, C)
        token_logps = scores.token_logps
        if token_logps is None:  # the full form: project to the vocabulary once, for the log only
            token_logps = scores.reduce(batch["completion_ids"], chunk_size=1024).token_logps  # (B, C)
        tokens = int(mask.sum())
        mean = float(token_logps[mask.to(token_logps.device)].mean()) if tokens else float("nan")
        record = {"tokens": tokens, "mean_token_logp": mean, "form": scores.form,
                  "seconds": time.perf_counter() - start}  # fmt: skip
        self.records.append(record)
        logger.info("teacher scored %d tokens, mean log-prob %.3f (%s form)", tokens, mean, scores.form)
        return scores

    def generate(self, prompt_ids, generation_config, tokenizer=None):  # only for seq_kd=True
        return self.inner.generate(prompt_ids, generation_config, tokenizer)


def main(argv: list[str] | None = None):
    from trl import TrlParser

    from trl_onpolicy import LocalTeacher, OnPolicyDistillConfig, OnPolicyDistillTrainer, toy

    parser = TrlParser(OnPolicyDistillConfig)  # every config field is a flag: --max_steps, --resume_from_checkpoint
    parser.set_defaults(output_dir="custom-teacher-out", max_steps=20, per_device_train_batch_size=32,
                        learning_rate=1e-3, max_completion_length=96, logging_steps=5, report_to=[])  # fmt: skip
    (args,) = parser.parse_args_and_config(argv)

    torch.set_num_threads(1)  # tiny models generate fastest on one thread
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    teacher_model, tokenizer, _ = toy.load_or_train_teacher()
    student, _, _ = toy.load_or_train_student()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = LoggingTeacher(LocalTeacher(teacher_model.to(device)))
    trainer = OnPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=toy.make_dataset(640, split="train").select_columns(["prompt"]),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # `true`: the last whole checkpoint
    first, last = teacher.records[0]["mean_token_logp"], teacher.records[-1]["mean_token_logp"]
    print(
        f"Mean teacher log-prob of the student's tokens: {first:.3f} at the first step, {last:.3f} at step "
        f"{trainer.state.global_step}."
    )


if __name__ == "__main__":
    main()
