"""Tiny models for the trainer tests: a character-level tokenizer and LlamaConfig models built from configs.

Nothing is downloaded: the tokenizer is built in memory with the `tokenizers` library and the models are randomly
initialised from a `LlamaConfig` (1-2 layers, hidden size 16-32), so one training step takes milliseconds.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer
from trl_onpolicy.toy import char_tokenizer
from trl_onpolicy.toy.tokenizer import byte_tokenizer  # noqa: F401 (tests take it from here)


# One line per turn, "#u:" / "#a:" / "#s:" + content; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '#' + m['role'][0] + ':' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '#a:' }}{% endif %}"
)


def tokenizer(pad: bool = True, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: 4 special tokens + 47 characters = 51 ids; no BOS/EOS added on encode."""
    return char_tokenizer(pad=pad, chat_template=CHAT_TEMPLATE if chat_template else None)


def model(tok, layers: int = 1, hidden: int = 16, seed: int = 0, vocab_size: int | None = None) -> LlamaForCausalLM:
    """A randomly initialised Llama (`vocab_size` defaults to the tokenizer's; larger = padded embeddings)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


PROMPTS = ["what is 1+2?", "say hi", "count 123", "abc", "spell cat", "2*3=?", "go", "name a color"]
# Varied lengths, so the padding differs between batch layouts
COMPLETIONS = [" 3", " hi there", " 4 5 6", " def", " c a t", " 6", " stop now please", " red"]


def dataset(kind: str = "prompt_completion", n: int = 8) -> Dataset:
    """`n` rows of one SFT format: `"prompt_only"`, `"prompt_completion"`, `"conversational_prompt_completion"` or
    `"messages"`."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    completions = [COMPLETIONS[i % len(COMPLETIONS)] for i in range(n)]
    if kind == "prompt_only":
        return Dataset.from_dict({"prompt": prompts})
    if kind == "prompt_completion":
        return Dataset.from_dict({"prompt": prompts, "completion": completions})
    if kind == "conversational_prompt_completion":
        return Dataset.from_dict({
            "prompt": [[{"role": "user", "content": p}] for p in prompts],
            "completion": [[{"role": "assistant", "content": c.strip()}] for c in completions],
        })  # fmt: skip
    if kind == "messages":
        return Dataset.from_dict({
            "messages": [
                [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                for p, c in zip(prompts, completions)
            ]
        })  # fmt: skip
    raise ValueError(f"unknown dataset kind {kind!r}")


def config(output_dir, **overrides) -> OnPolicyDistillConfig:
    """A config for a one-step CPU run: batch 2, completions of at most 8 tokens, no saving, no reporting."""
    values = {
        "output_dir": str(output_dir),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "max_completion_length": 8,
        "max_length": 64,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    values.update(overrides)
    return OnPolicyDistillConfig(**values)


def trainer(output_dir, student=None, teacher=None, tok=None, train_dataset=None, callbacks=None, **overrides):
    """An `OnPolicyDistillTrainer` on tiny models (a fresh student and a differently seeded teacher by default)."""
    tok = tok or tokenizer()
    student = student if student is not None else model(tok, seed=0)
    teacher = teacher if teacher is not None else model(tok, seed=1)
    return OnPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=config(output_dir, **overrides),
        train_dataset=train_dataset if train_dataset is not None else dataset(),
        processing_class=tok,
        callbacks=callbacks,
    )


class ThreeTurns:
    """A multi-turn environment: every student turn is answered by a user message ("go on", reward 1); the third
    turn ends the conversation."""

    def reset(self, row):
        self.n = 0

    def step(self, message):
        from trl_onpolicy.environments import EnvStep

        self.n += 1
        return EnvStep([{"role": "user", "content": "go on"}], 1.0, self.n == 3)


def step_logs(trainer) -> list[dict]:
    """The per-step log entries of `trainer.state.log_history` (those with a loss)."""
    return [h for h in trainer.state.log_history if "loss" in h]
