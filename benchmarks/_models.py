"""The benchmarks' tiny models: a Llama of any size whose output layer is `vocab` wide (padded past the tokenizer)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def padded_llama(seed: int, layers: int, hidden: int, vocab: int) -> LlamaForCausalLM:
    """A randomly initialised Llama (untied head, 2 heads) with a `vocab`-row embedding and output matrix."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)
