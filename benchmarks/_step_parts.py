"""The irreducible parts of one on-policy distillation step, each run alone with a plain implementation
(`step_sweep.py`'s (b)): the student's sampling, the teacher's prefill, and the student's update.

On the models, prompts and generation config that `vs_trl.build("ours", ...)` trains with (the same seeds, rows and
`build_generation_config`), each step of `run_parts` times, on the step's batch of `BATCH` prompts:

- `generate`: plain `model.generate` (left padding, KV cache, `do_sample=True`), the "before" sampler (b1');
- `sample`: `trl_onpolicy.rollouts.sample(model, prompt_ids, generation_config)`, our sampler (b1). The two alternate
  which goes first from step to step; the rest of the step trains on `sample`'s completions;
- `teacher`: one no_grad forward of the teacher's backbone over the `(B, P + C)` batch, its final hidden states kept
  at the N positions that predict completion tokens (its head runs inside the loss's tiles, as in our trainer and in
  TRL's; b2);
- `update`: the student's backbone over the batch, the package's own `distillation_loss` (generalized JSD, the
  vocabulary walked in tiles with a closed-form gradient: the fastest implementation we have; a plain full-logits JSD
  took 1.9x our whole update at V = 152k) over the N tokens divided by N, backward, grad-norm clip 1.0,
  `torch.optim.AdamW` (lr and betas of the trainer's `adamw_torch`, no weight decay) step and `zero_grad` (b3).

Collating the completions into the `(B, P + C)` batch (`trl_onpolicy.rollouts.collate`) is not timed.
"""

from __future__ import annotations

import tempfile
import time

import torch
from vs_trl import BATCH, BETA, LR, SEED, common_args, llama, prompts

from trl_onpolicy import OnPolicyDistillConfig, rollouts
from trl_onpolicy.loss import distillation_loss
from trl_onpolicy.prompts import tokenize_row
from trl_onpolicy.teachers import TeacherScores
from trl_onpolicy.toy.tokenizer import char_tokenizer

PARTS = ("generate", "sample", "teacher", "update")


@torch.no_grad()
def plain_generate(model, prompt_ids: list[list[int]], generation_config) -> torch.Tensor:
    """`model.generate` on the left-padded prompts, in eval mode: `(B, P + C')` ids."""
    input_ids, attention_mask = rollouts.pad(prompt_ids, generation_config.pad_token_id, "left")  # (B, P)
    model.eval()
    try:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
    finally:
        model.train()


def completion_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's backbone over the batch, its final hidden states at the positions that predict the completion
    tokens, as our loss takes them: `(N, H)`, in the tokens' order."""
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, P + C)
    hidden = model.model(input_ids=ids, attention_mask=mask, **rollouts.position_kwargs(model, mask)).last_hidden_state
    width = batch["completion_ids"].shape[1]
    return hidden[:, -width - 1 : -1][batch["completion_mask"].bool()]  # (B, C, H) -> (N, H)


@torch.no_grad()
def teacher_prefill(teacher, batch: dict[str, torch.Tensor]) -> TeacherScores:
    """The teacher's scores in full form, `(N, H_t)` hidden states and its head, as a local teacher gives them."""
    return TeacherScores(temperature=1.0, hidden=completion_hidden(teacher, batch), head=teacher.lm_head)


def student_update(student, optimizer, batch, teacher: TeacherScores) -> float:
    """Forward, tiled JSD against the teacher on the N completion tokens (mean over tokens), backward, clip, AdamW."""
    hidden = completion_hidden(student, batch)  # (N, H)
    targets = batch["completion_ids"][batch["completion_mask"].bool()]  # (N,)
    sums = distillation_loss(hidden, student.lm_head, teacher, targets, loss_type="jsd", beta=BETA,
                             vocab_size=student.config.vocab_size, num_items=float(hidden.shape[0]))  # fmt: skip
    sums.loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(sums.loss)


def setup(vocab: int, completion: int, shapes, steps: int):
    """The trainer's models (same seeds), its prompts (same rows, same tokenisation) and its generation config."""
    tok = char_tokenizer()
    student, teacher = llama(0, *shapes[0], vocab), llama(1, *shapes[1], vocab)
    teacher.eval().requires_grad_(False)
    args = OnPolicyDistillConfig(**common_args(tempfile.mkdtemp(prefix="parts-"), steps), lmbda=1.0,
                                 loss_type="jsd", max_completion_length=completion)  # fmt: skip
    config = rollouts.build_generation_config(args, tok, model=student)
    rows = [tokenize_row({"prompt": p}, tok)["prompt_ids"] for p in prompts(BATCH * steps)["prompt"]]
    batches = [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    torch.manual_seed(SEED)  # the sampling's draws, as the trainers seed theirs
    return student, teacher, config, batches, optimizer


def run_parts(vocab: int, completion: int, shapes, warmup: int, timed: int) -> dict:
    """`warmup` + `timed` steps of the parts; per timed step: seconds of each part, completion tokens of `generate`
    and of `sample`, and the loss."""
    student, teacher, config, batches, optimizer = setup(vocab, completion, shapes, warmup + timed)
    out = {**{part: [] for part in PARTS}, "generate_tokens": [], "sample_tokens": [], "losses": []}
    for step, prompt_ids in enumerate(batches):
        seconds, completions = {}, None
        for part in ("generate", "sample") if step % 2 == 0 else ("sample", "generate"):
            t0 = time.perf_counter()
            if part == "generate":
                ids = plain_generate(student, prompt_ids, config)  # (B, P + C')
            else:
                completions, _ = rollouts.sample(student, prompt_ids, config)
            seconds[part] = time.perf_counter() - t0
        batch = rollouts.collate(rollouts.Rollouts(prompt_ids, completions, "student"), config.pad_token_id)
        t0 = time.perf_counter()
        teacher_scores = teacher_prefill(teacher, batch)  # (N, H_t) and the head
        t1 = time.perf_counter()
        loss = student_update(student, optimizer, batch, teacher_scores)
        seconds["update"], seconds["teacher"] = time.perf_counter() - t1, t1 - t0
        if step >= warmup:
            for part in PARTS:
                out[part].append(seconds[part])
            generated = ids[:, max(len(p) for p in prompt_ids) :].tolist()  # (B, C')
            out["generate_tokens"].append(sum(len(rollouts.finish_completion(r, config, None, config.pad_token_id)[0])
                                              for r in generated))  # fmt: skip
            out["sample_tokens"].append(sum(len(c) for c in completions))
            out["losses"].append(loss)
    return out
