"""Drawing the next token by inverse-CDF sampling, inside `model.generate`.

`generate` draws a sampled token with `torch.multinomial`, whose kernel (on CPU, and on one-sample draws generally)
draws one exponential variate per vocabulary entry and row: at V = 32k that was half the generation time of a
2 x 128 student, and it grows with V (25-39 ms per token for 8 rows at V = 152k on one core). Inverse-CDF sampling draws
one uniform per row instead: with p = softmax(scores) and its running sum F (in float64), the token is the first i with
F_i > u F_V, u ~ U[0, 1). Token i is drawn with probability (F_i - F_{i-1}) / F_V = p_i: the same distribution, read
from the random stream differently (so a seed gives other samples than `multinomial` did), and a token of probability
0 (masked by top-k, top-p, min-p) is never drawn.

It runs in `generate`'s greedy loop: the warpers that sampling would apply (temperature, top-k, top-p, min-p, typical,
epsilon, eta; built by [`sampling_warpers`] in `generate`'s order) and then [`DrawToken`] go in as `logits_processor`;
`DrawToken` returns scores that are 0 at the token it drew and -inf elsewhere, so greedy's argmax takes that token.
Everything else stays `generate`'s own: the KV cache, the processors built from the config (repetition penalty,
bad words, ...) applied before the warpers as in sampling, EOS lists, stop strings, `synced_gpus`, the padding of
finished rows. A config this path does not cover (beams, watermarking, `top_h`) samples with plain `generate`.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ._compat import effective_generation_config


def draw_tokens(scores: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """
    One token per row of `scores` `(B, V)`, drawn with probability `softmax(scores)` by inverse-CDF sampling (one
    uniform from torch's default generator per row).

    The running sum is taken in two levels, so that no `(B, V)` float64 tensor is made (a float64 running sum over all
    V columns cost half of `multinomial` at V = 152k): the probabilities are summed per block of `block` columns, a
    uniform picks the block from the blocks' running sum (float64), and the running sum of that one block (float64)
    picks the token. The probabilities are float32 as `generate`'s are; their block sums add a float32 rounding of the
    same order, and no float32 running sum over V columns (whose rounding would swamp tokens below ~1e-7) is taken.

    Returns:
        `torch.Tensor` `(B,)` of token ids.

    Raises:
        `ValueError`: on CPU, a row has no finite probability mass (NaN scores, or every token masked), where
            `torch.multinomial` raises too.
    """
    vocab = scores.shape[-1]
    wide = torch.float32 if scores.device.type == "mps" else torch.float64  # MPS has no float64
    probs = torch.softmax(scores.float(), dim=-1)  # (B, V); masked (-inf) -> 0
    if vocab <= block:  # one block: its running sum is the CDF
        cdf = probs.cumsum(dim=-1, dtype=wide)  # (B, V)
        u = _uniform_below(cdf[:, -1:])  # (B, 1)
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab - 1)  # (B,)
    block_mass = _block_sums(probs, block).to(wide)  # (B, nb)
    block_cdf = block_mass.cumsum(dim=-1)  # (B, nb)
    u = _uniform_below(block_cdf[:, -1:])  # (B, 1)
    b = torch.searchsorted(block_cdf, u, right=True).clamp_(max=block_mass.shape[1] - 1)  # (B, 1): u's block
    columns = b * block + torch.arange(block, device=scores.device)  # (B, block)
    inside = probs.gather(1, columns.clamp(max=vocab - 1)).masked_fill_(columns >= vocab, 0.0)  # (B, block)
    inner_cdf = inside.cumsum(dim=-1, dtype=wide)  # (B, block)
    # u's place in its block, as a fraction of the block's mass, read on the block's own running sum (whose total can
    # differ from the block's sum by a rounding); kept strictly below that total, so the token drawn has weight > 0
    mass = block_mass.gather(1, b)  # (B, 1)
    fraction = ((u - (block_cdf.gather(1, b) - mass)) / mass).clamp_(0, 1)  # (B, 1)
    top = torch.nextafter(inner_cdf[:, -1:], torch.zeros_like(u))  # (B, 1)
    rest = torch.minimum(fraction * inner_cdf[:, -1:], top)  # (B, 1)
    j = torch.searchsorted(inner_cdf, rest, right=True)  # (B, 1): the first running sum > rest
    return (b * block + j).squeeze(1).clamp_(max=vocab - 1)  # (B,); the clamp only matters for a NaN row


def _uniform_below(total: torch.Tensor) -> torch.Tensor:
    """u ~ U[0, total) per row of `total` `(B, 1)` (one draw from torch's default generator). On CPU it first checks
    that every row has finite, positive mass; on an accelerator that check would wait for the device at every token,
    so a NaN row draws some valid id there and the step's non-finite loss is skipped (see `nonfinite.py`)."""
    if total.device.type == "cpu" and not bool((total > 0).all()):  # False for NaN too
        raise ValueError("Cannot sample the next token: a row's scores are NaN or mask every token (-inf).")
    return torch.rand(total.shape, dtype=total.dtype, device=total.device) * total  # (B, 1)


def _block_sums(probs: torch.Tensor, block: int) -> torch.Tensor:
    """Sums of `probs` `(B, V)` over consecutive blocks of `block` columns (the last one may be shorter):
    `(B, ceil(V / block))`."""
    rows, vocab = probs.shape
    full = vocab - vocab % block
    sums = [probs.as_strided((rows, full // block, block), (probs.stride(0), block, 1)).sum(-1)]
    if full < vocab:
        sums.append(probs[:, full:].sum(-1, keepdim=True))
    return torch.cat(sums, dim=1)  # (B, nb)


class DrawToken(LogitsProcessor):
    """The last logits processor of sampling in `generate`'s greedy loop: draws a token per row ([`draw_tokens`])
    and returns scores that are 0 there and -inf elsewhere, so greedy's argmax picks it."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = draw_tokens(scores)  # (B,)
        picked = torch.full_like(scores, float("-inf"))  # (B, V)
        return picked.scatter_(1, tokens[:, None], 0.0)


def sampling_warpers(config: GenerationConfig, device="cpu") -> list[LogitsProcessor]:
    """The warpers `generate` applies before drawing a sampled token (one beam), from `config` with the model's
    defaults already filled in, in `generate`'s order (transformers 5.x, `_get_logits_processor`); `device` is where
    the scores are (the eta warper keeps a tensor there)."""
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff, device=device))
    return warpers


def inverse_cdf_generation(model, config: GenerationConfig) -> tuple[GenerationConfig, dict]:
    """
    The `generate` arguments that sample as `config` says with [`DrawToken`]: a greedy copy of `config` and the
    `logits_processor` list (the warpers, then the draw). A config this path does not cover comes back unchanged
    with no extra arguments.

    Returns:
        `(generation_config, generate_kwargs)`.
    """
    effective = effective_generation_config(model, config)
    covered = (
        effective.do_sample
        and (effective.num_beams or 1) == 1
        and effective.watermarking_config is None
        and getattr(effective, "top_h", None) is None
    )
    if not covered:
        return config, {}
    greedy = copy.deepcopy(config)
    for name in ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"):
        setattr(greedy, name, None)  # the warpers carry them; None keeps greedy's validation quiet
    greedy.do_sample = False
    warpers = sampling_warpers(effective, next(model.parameters()).device)
    return greedy, {"logits_processor": LogitsProcessorList([*warpers, DrawToken()])}
