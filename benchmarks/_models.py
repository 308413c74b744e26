"""The benchmarks' models, randomly initialised from configs (nothing is downloaded): a Llama of any size whose output
layer is `vocab` wide (padded past the tokenizer), and Qwen2 models shaped like Qwen2.5-0.5B / 1.5B."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


# The transformer shapes of Qwen2.5-0.5B and Qwen2.5-1.5B (from their config.json files): hidden size, MLP width,
# layers, attention heads, key-value heads. Both tie the output matrix to the embedding; the vocabulary is 151,936.
QWEN25_SHAPES = {
    "0.5B": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2},
    "1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2},
}  # fmt: skip
QWEN25_VOCAB = 151_936


def padded_llama(seed: int, layers: int, hidden: int, vocab: int) -> LlamaForCausalLM:
    """A randomly initialised Llama (untied head, 2 heads) with a `vocab`-row embedding and output matrix."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def qwen2(seed: int, shape: dict, vocab: int, dtype: torch.dtype = torch.float32, device="cpu") -> Qwen2ForCausalLM:
    """
    A randomly initialised Qwen2 with a tied head, built on `device` and cast to `dtype`.

    Args:
        seed: Seed of the initialisation.
        shape: `Qwen2Config` fields of the transformer (one of `QWEN25_SHAPES`, or smaller for tests).
        vocab: Rows of the embedding (and tied output) matrix.
        dtype: The weights' dtype.
        device: Where to build it (a GPU builds a 1.5B model in a second; a CPU takes tens).
    """
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape,
    )  # fmt: skip
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)
