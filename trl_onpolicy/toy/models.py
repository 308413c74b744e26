"""Tiny Llama-style models for the toy task: construction, batching, and the two measures the recipe reports.

`build_model` makes a `LlamaForCausalLM` from a `LlamaConfig` sized by two numbers (layers, width): heads of 32
dimensions, an MLP 4x as wide (SwiGLU), tied embeddings. `evaluate_exact_match` is greedy generation with left
padding and the KV cache, scored like lm-eval's GSM8K strict match; `completion_nll` is the mean negative
log-likelihood per completion token, the quantity the teacher recipe minimises; `evaluate_multiple_choice` is
the toy MMLU score (argmax of the log-likelihood of " A" .. " D" after `mc_prompt_text`, as lm-eval's `acc`).
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .task import MC_LETTERS, is_correct, mc_prompt_text, prompt_text, to_multiple_choice, to_prompt_completion


def build_model(num_layers: int, hidden_size: int, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama of `num_layers` x `hidden_size` for `tokenizer` (deterministic in `seed`)."""
    if hidden_size % 16 != 0:
        raise ValueError(f"hidden_size must be a multiple of 16, got {hidden_size}")
    head_dim = 32 if hidden_size >= 64 else 16
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=hidden_size // head_dim,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def num_parameters(model) -> int:
    """Parameters counted once (tied embeddings are one tensor)."""
    return sum(p.numel() for p in model.parameters())


def encode_batch(tokenizer, problems: list[dict]) -> dict[str, torch.Tensor]:
    """Prompt + " " + answer + EOS in GSM8K's format, right-padded, labels on the completion (see `encode_rows`)."""
    return encode_rows(tokenizer, [to_prompt_completion(p) for p in problems])


def _completion_ids(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """The completion's token ids and labels; with `masked_spans` (or one `masked_span`: `[start, end)` characters of
    the completion, e.g. a slip in `slips.slip_row`, the tool's answers in `calculator.tool_row`), the pieces are
    tokenized separately and the masked ones get -100."""
    spans = row.get("masked_spans") or ([row["masked_span"]] if row.get("masked_span") is not None else [])
    text, ids, labels, at = row["completion"], [], [], 0
    pieces = []
    for start, end in spans:
        pieces += [(text[at:start], True), (text[start:end], False)]
        at = end
    pieces.append((text[at:], True))
    for piece, target in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids += piece_ids
        labels += piece_ids if target else [-100] * len(piece_ids)
    return ids, labels


def encode_rows(tokenizer, rows: list[dict], add_eos: bool = True) -> dict[str, torch.Tensor]:
    """Prompt-completion rows (`{"prompt", "completion"}`, any format) as prompt + completion (+ EOS), right-padded;
    prompt and completion are tokenized separately; labels are -100 outside the completion (completion-only NLL)
    and on a row's optional `masked_span` of the completion (context that is not a target)."""
    ids, labels = [], []
    eos = [tokenizer.eos_token_id] if add_eos else []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion, completion_labels = _completion_ids(tokenizer, row)
        ids.append(prompt + completion + eos)
        labels.append([-100] * len(prompt) + completion_labels + eos)
    width = max(len(r) for r in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in ids])  # (B, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])  # (B, T)
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


@torch.no_grad()
def completion_nll(model, tokenizer, problems: list[dict], batch_size: int = 64) -> float:
    """Mean negative log-likelihood (nats) per completion token, EOS included, over `problems`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(problems), batch_size):
        batch = encode_batch(tokenizer, problems[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        targets = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        mask = targets != -100  # (B, T-1)
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        total += -(picked * mask).sum().item()
        count += mask.sum().item()
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], batch_size: int = 64, max_new_tokens: int = 64):
    """Greedy completions of `prompts` (left padding, KV cache), decoded without special tokens."""
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # (B, T_prompt + T_new)
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return outputs


def default_max_new_tokens(tokenizer, problems: list[dict]) -> int:
    """Room for the longest reference answer plus slack (a wrong chain may be a little longer)."""
    longest = max(len(tokenizer(" " + p["answer"], add_special_tokens=False)["input_ids"]) for p in problems)
    return math.ceil(longest * 1.25) + 4


def evaluate_exact_match(model, tokenizer, problems: list[dict], batch_size: int = 64,
                         max_new_tokens: int | None = None) -> float:
    """Fraction of `problems` whose greedy completion ends in the right `#### <int>`."""
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, problems)
    prompts = [prompt_text(p["question"]) for p in problems]
    completions = generate_completions(model, tokenizer, prompts, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens)
    return sum(is_correct(c, p) for c, p in zip(completions, problems)) / len(problems)


@torch.no_grad()
def evaluate_multiple_choice(model, tokenizer, problems: list[dict], seed: int = 0, batch_size: int = 64) -> float:
    """Toy MMLU accuracy: for each problem in MMLU's format (`to_multiple_choice(problem, seed)`), the summed
    log-likelihood of each continuation " A" .. " D" after `mc_prompt_text`; correct when the argmax is the gold
    letter (lm-eval's `acc` on `toy_mmlu`, which renders the eval split with the same seed)."""
    was_training = model.training
    model.eval()
    mcs = [to_multiple_choice(p, seed=seed) for p in problems]
    rows = [{"prompt": mc_prompt_text(mc), "completion": " " + letter} for mc in mcs for letter in MC_LETTERS]
    scores = []
    try:
        for start in range(0, len(rows), batch_size * len(MC_LETTERS)):
            batch = encode_rows(tokenizer, rows[start : start + batch_size * len(MC_LETTERS)], add_eos=False)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            targets = batch["labels"][:, 1:]  # (B, T-1)
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
            picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            scores += (picked * (targets != -100)).sum(-1).tolist()  # (B,) log-likelihood of the continuation
    finally:
        model.train(was_training)
    per_problem = torch.tensor(scores).view(len(mcs), len(MC_LETTERS))  # (N, 4)
    gold = torch.tensor([mc["answer"] for mc in mcs])  # (N,)
    return (per_problem.argmax(-1) == gold).float().mean().item()
