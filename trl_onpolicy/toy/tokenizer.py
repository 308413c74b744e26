"""A small byte-level BPE tokenizer for the toy task, trained locally with the `tokenizers` library.

Sequence length drives the cost of generation on a CPU, so the tokenizer is trained on the task's own text: every
word, every number in [0, 99] and the `####` marker become single tokens (627 tokens in all; problems of 2-4 steps
average 39 prompt and 39 completion tokens, ~12 tokens per chain-of-thought line). It is byte-level (GPT-2's
pre-tokenizer and an alphabet of all 256 bytes), so any text round-trips, task text or not.

The build is deterministic: the training corpus is generated from a fixed seed, and the corpus is fed in one fixed
order. No BOS token is added automatically (as for GPT-2 or Qwen): prompts are tokenized exactly as written, which
is what TRL and lm-eval expect from `add_special_tokens=False` and from chat templates that write their own markers.

The chat template is ChatML-like, with `<s>`/`</s>` in the roles of `<|im_start|>`/`<|im_end|>`, so that the end
of an assistant turn is the EOS token and generation stops there; the assistant content is wrapped in
`{% generation %}` so that TRL's `assistant_only_loss` works.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .task import generate_problems, prompt_text, to_multiple_choice

VOCAB_SIZE = 768  # a cap: training stops at 627 tokens, when no pair occurs twice more
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<s>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + '</s>' }}"
    "{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<s>assistant\n' }}{%- endif -%}"
)


def _corpus() -> list[str]:
    """Task text in a fixed order: problems of every length, multiple-choice renderings, and every number."""
    lines = []
    for i, problem in enumerate(generate_problems(3000, split="train", seed=12345, min_steps=1, max_steps=8)):
        lines.append(prompt_text(problem["question"]) + " " + problem["answer"])
        if i % 10 == 0:  # MMLU's rendering: "A. 12" lines and "Answer: B"
            mc = to_multiple_choice(problem)
            letters = "\n".join(f"{'ABCD'[j]}. {c}" for j, c in enumerate(mc["choices"]))
            lines.append(f"{mc['question']}\n{letters}\nAnswer: {'ABCD'[mc['answer']]}")
    # Make sure every number below 100 (task values, distractors) is frequent after a space.
    lines += [" ".join(str(v) for v in range(100))] * 50
    return lines


@functools.lru_cache(maxsize=1)
def _trained() -> str:
    """The trained `tokenizers` model as JSON, trained once per process (a second or two)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer wrapped for transformers: a new object on every call, the same vocabulary every time."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """
    A byte-level tokenizer with no merges: the toy's four special tokens (same ids), then the 256 bytes (260 ids).
    Every text round-trips, and it cuts text unlike the toy's BPE (one token per byte, against a token per word or
    number): the tokenizer of a teacher of another family (issue 20). With the toy's chat template.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, clean_up_tokenization_spaces=False, model_max_length=4096)  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?:+-*=#\n"


def char_tokenizer(pad: bool = True, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """
    A character-level tokenizer for tests and benchmarks: `<pad>`, `<s>`, `</s>`, `<unk>` then one id per character of
    `CHARS` (51 ids); nothing is added on encode. Built in memory, instantly, with no training.

    Args:
        pad (`bool`, *optional*, defaults to `True`): Whether to set `<pad>` as the pad token.
        chat_template (`str`, *optional*): A Jinja chat template to attach.
    """
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>" if pad else None, unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
