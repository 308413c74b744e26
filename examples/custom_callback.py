"""A custom generation callback: a `trl_onpolicy.DistillCallback` whose `on_rollouts` filters or edits completions.

    python examples/custom_callback.py     # offline: the built-in toy teacher and student, 20 steps on a CPU

`on_rollouts(args, state, control, rollouts)` runs on every process after the completions of a step are sampled and
before the teacher scores them. Return `None` to keep them, or a `Rollouts` (`rollouts.select(indices)` to filter,
`dataclasses.replace(rollouts, completion_ids=...)` to edit; with vLLM, edit `sampling_logps` alike, NaN for a token
vLLM did not sample) to replace them. A filter must keep at least one
completion per step. The loss is normalised by the step's token count after the callback, so dropping rows changes
nothing else. Callbacks run in the order they were added and each sees what the previous one returned, so a filter
and an editor combine: `callbacks=[DropTruncated(), CutAfterAnswer()]`.

Two examples:

- `DropTruncated` drops completions that hit `max_completion_length` without stopping (a half-written answer teaches
  the student to ramble: the teacher scores it, but nothing after the cut is ever seen);
- `CutAfterAnswer` edits completions: everything after the first GSM8K answer line (`#### <number>`) is cut and EOS is
  put after it, so the student is not trained on what it babbles after answering.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from trl_onpolicy import DistillCallback


class DropTruncated(DistillCallback):
    """Drops truncated completions (keeps them all when every one is truncated); counts what it kept and dropped."""

    def __init__(self):
        self.kept, self.dropped = 0, 0

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        keep = [i for i, truncated in enumerate(rollouts.truncated) if not truncated]
        if not keep or len(keep) == len(rollouts):  # nothing to drop, or nothing left: keep the step as it is
            self.kept += len(rollouts)
            return None
        self.kept, self.dropped = self.kept + len(keep), self.dropped + len(rollouts) - len(keep)
        return rollouts.select(keep)


class CutAfterAnswer(DistillCallback):
    """Cuts each completion after the first line matching `pattern` (default: GSM8K's `#### <number>` + newline)."""

    def __init__(self, tokenizer, pattern: str = r"####\s*-?[\d,.]+\s*\n"):
        self.tokenizer, self.pattern = tokenizer, re.compile(pattern)
        self.edited = 0

    def _cut(self, ids: list[int]) -> list[int] | None:
        """The shortest prefix of `ids` whose text matches, plus EOS; None when the text never matches."""
        if not self.pattern.search(self.tokenizer.decode(ids, skip_special_tokens=True)):
            return None
        for end in range(1, len(ids) + 1):  # token by token: the kept tokens are exactly the sampled ones
            if self.pattern.search(self.tokenizer.decode(ids[:end], skip_special_tokens=True)):
                eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
                return ids[:end] + eos if end < len(ids) else None
        return None

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        completions, truncated, logps = [], [], []
        for i, (ids, was_truncated) in enumerate(zip(rollouts.completion_ids, rollouts.truncated)):
            cut = self._cut(ids)
            completions.append(ids if cut is None else cut)
            truncated.append(was_truncated if cut is None else False)
            self.edited += cut is not None
            if rollouts.sampling_logps is not None:  # vLLM's log-probs: cut alike; the added EOS was not sampled
                sampled = rollouts.sampling_logps[i]
                kept = len(cut) - (self.tokenizer.eos_token_id is not None) if cut is not None else len(ids)
                logps.append(sampled[:kept] + [math.nan] * (len(completions[-1]) - kept))
        logps = logps if rollouts.sampling_logps is not None else None
        return dataclasses.replace(rollouts, completion_ids=completions, truncated=truncated, sampling_logps=logps)


def main(argv: list[str] | None = None):
    from trl import TrlParser

    from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer, toy

    parser = TrlParser(OnPolicyDistillConfig)  # every config field is a flag: --max_steps, --resume_from_checkpoint
    parser.set_defaults(output_dir="custom-callback-out", max_steps=20, per_device_train_batch_size=32,
                        learning_rate=1e-3, max_completion_length=96, logging_steps=5, report_to=[])  # fmt: skip
    (args,) = parser.parse_args_and_config(argv)

    torch.set_num_threads(1)  # tiny models generate fastest on one thread
    teacher, tokenizer, _ = toy.load_or_train_teacher()
    student, _, _ = toy.load_or_train_student()
    cut = CutAfterAnswer(tokenizer)
    trainer = OnPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=toy.make_dataset(640, split="train").select_columns(["prompt"]),
        processing_class=tokenizer,
        callbacks=[cut],  # or DropTruncated()
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # `true`: the last whole checkpoint
    print(f"Cut {cut.edited} completions after their answer line.")


if __name__ == "__main__":
    main()
