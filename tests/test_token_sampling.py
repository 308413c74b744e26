"""Inverse-CDF sampling (`token_sampling.py`): the same distribution as `generate`'s own sampling, token by token
against a reference written from the definition, and end to end in `generate` under a seeded statistical test."""

import pytest
import tiny_models as tm
import torch
from transformers import GenerationConfig, MinPLogitsWarper, TopKLogitsWarper

from trl_onpolicy._compat import effective_generation_config
from trl_onpolicy.rollouts import sample
from trl_onpolicy.token_sampling import DrawToken, draw_tokens, inverse_cdf_generation, sampling_warpers


def reference_draw(scores: torch.Tensor, u: torch.Tensor) -> list[int]:
    """From the definition: the first token whose cumulative probability exceeds u, one row at a time."""
    tokens = []
    for row, ur in zip(torch.softmax(scores.float(), -1).double(), u[:, 0].tolist()):
        total, running = row.sum().item(), 0.0
        for i, p in enumerate(row.tolist()):
            running += p
            if running > ur * total:
                tokens.append(i)
                break
    return tokens


def chi_square_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of the two-sample chi-square test that counts `a` and `b` (equal totals) come from one distribution."""
    seen = (a + b) > 0
    a, b = a[seen].double(), b[seen].double()
    stat = ((a - b) ** 2 / (a + b)).sum()
    return torch.special.gammaincc(torch.tensor((len(a) - 1) / 2, dtype=torch.float64), stat / 2).item()


@pytest.mark.parametrize("vocab, block", [(7, 1024), (1024, 1024), (3000, 1024), (1000, 16), (1000, 333)])
def test_draw_tokens_picks_the_token_the_definition_picks_for_the_same_uniforms(vocab, block):
    """One uniform per row from the default generator, read on the CDF: the same token as the definition, with the
    vocabulary in one block, many blocks, and a short last block."""
    scores = torch.randn(64, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    scores[:, ::5] = float("-inf")  # masked tokens, block starts among them
    for seed in range(3):
        torch.manual_seed(seed)
        u = torch.rand((64, 1), dtype=torch.float64)  # what draw_tokens draws after the same seed
        torch.manual_seed(seed)
        assert draw_tokens(scores, block=block).tolist() == reference_draw(scores, u)


def test_draw_tokens_never_draws_a_masked_token_and_matches_the_probabilities():
    """20,000 draws over 40 ids (blocks of 8) with every 4th id, the first and the last masked: none of them is ever
    drawn, and the counts fit softmax(scores) (a seeded chi-square test, which a wrong temperature fails)."""
    scores = torch.linspace(-2.0, 2.0, 40)
    scores[::4] = float("-inf")
    scores[-1] = float("-inf")
    torch.manual_seed(0)
    drawn = draw_tokens(scores.expand(20_000, 40), block=8)
    counts = torch.bincount(drawn, minlength=40)
    assert counts[torch.isinf(scores)].sum() == 0
    expected = torch.softmax(scores, -1).double() * 20_000
    live = expected > 0
    stat = ((counts[live] - expected[live]) ** 2 / expected[live]).sum()
    df = torch.tensor((live.sum().item() - 1) / 2, dtype=torch.float64)
    assert torch.special.gammaincc(df, stat / 2) > 1e-3
    wrong = torch.softmax(scores / 1.2, -1).double() * 20_000
    stat = ((counts[live] - wrong[live]) ** 2 / wrong[live]).sum()
    assert torch.special.gammaincc(df, stat / 2) < 1e-6


@pytest.mark.parametrize("row", [[float("nan")] * 5, [float("-inf")] * 5])
def test_draw_tokens_refuses_a_row_with_no_probability_mass(row):
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], row])
    with pytest.raises(ValueError, match=r"^Cannot sample the next token: a row's scores are NaN or mask every token"):
        draw_tokens(scores)


def test_draw_token_processor_leaves_only_the_drawn_token_for_argmax():
    scores = torch.randn(6, 50)
    torch.manual_seed(1)
    picked = DrawToken()(torch.zeros(6, 3, dtype=torch.long), scores.clone())
    torch.manual_seed(1)
    tokens = draw_tokens(scores)
    assert picked.argmax(-1).tolist() == tokens.tolist()
    assert (picked == 0).sum().item() == 6 and torch.isinf(picked).sum().item() == 6 * 49


def test_sampling_warpers_are_the_ones_generate_builds_in_its_order():
    """Pins the installed transformers: its own sampling list ends with the same warpers, same settings, same order."""
    tok = tm.tokenizer()
    model = tm.model(tok)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=9, top_p=0.8, min_p=0.05, typical_p=0.9,
                              epsilon_cutoff=1e-4, eta_cutoff=1e-3, repetition_penalty=1.2, max_new_tokens=3)  # fmt: skip
    effective = effective_generation_config(model, config)
    theirs = list(model._get_logits_processor(effective, input_ids_seq_length=2, device="cpu"))
    ours = sampling_warpers(effective)
    assert [type(w) for w in theirs[-len(ours) :]] == [type(w) for w in ours] and len(ours) == 7
    for a, b in zip(theirs[-len(ours) :], ours):
        assert {k: v for k, v in vars(a).items() if not torch.is_tensor(v)} == {
            k: v for k, v in vars(b).items() if not torch.is_tensor(v)
        }


def test_model_defaults_apply_as_generate_applies_them():
    """A field our config leaves unset takes the model's generation default (here min_p), as in `generate`; one it
    sets (top_k=0: no top-k) overrides the model's default of 50."""
    tok = tm.tokenizer()
    model = tm.model(tok)
    model.generation_config.top_k, model.generation_config.min_p = 50, 0.2
    config, kwargs = inverse_cdf_generation(model, GenerationConfig(do_sample=True, top_k=0, max_new_tokens=2))
    kinds = [type(p) for p in kwargs["logits_processor"]]
    assert kinds == [MinPLogitsWarper, DrawToken] and TopKLogitsWarper not in kinds
    assert config.do_sample is False


@pytest.mark.parametrize("fields", [{"do_sample": False}, {"do_sample": True, "num_beams": 2}])
def test_configs_it_does_not_cover_go_to_generate_unchanged(fields):
    tok = tm.tokenizer()
    config = GenerationConfig(max_new_tokens=2, **fields)
    assert inverse_cdf_generation(tm.model(tok), config) == (config, {})


def _spread_model(vocab: int = 51):
    model = tm.model(tm.tokenizer(), hidden=32, vocab_size=vocab).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked but not one-hot next-token distribution
    return model


def _token_counts(out: torch.Tensor, prompt_width: int, vocab: int) -> list[torch.Tensor]:
    return [torch.bincount(out[:, prompt_width + t], minlength=vocab) for t in range(out.shape[1] - prompt_width)]


def test_generate_with_inverse_cdf_sampling_has_generate_s_distribution():
    """4,000 rows, left-padded prompts of two lengths, temperature 0.7, top-k 20, top-p 0.9, min-p 0.02, repetition
    penalty 1.3, three tokens each: every position's token counts pass a two-sample chi-square test against plain
    `generate` (multinomial, p > 1e-3), and fail it against plain `generate` at temperature 1 (p < 1e-4)."""
    model = _spread_model()
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]] * 2000)
    mask = (ids != 0).long()
    settings = {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.02,
                "repetition_penalty": 1.3, "pad_token_id": 0, "eos_token_id": None}  # fmt: skip
    config = GenerationConfig(**settings)
    with torch.no_grad():
        torch.manual_seed(0)
        theirs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        torch.manual_seed(1)
        greedy, kwargs = inverse_cdf_generation(model, config)
        ours = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy, **kwargs)
        torch.manual_seed(2)
        hotter = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
            **{**settings, "temperature": 1.0}))  # fmt: skip
    for a, b, c in zip(*(_token_counts(x, 3, 51) for x in (theirs, ours, hotter))):
        assert chi_square_p(a, b) > 1e-3 and chi_square_p(c, b) < 1e-4  # measured: p 0.41-0.88 and 4e-6 - 9e-30
    assert not torch.equal(theirs, ours)  # another use of the random stream, not a copy of it


def test_sample_is_greedy_when_the_distribution_is_one_hot_and_greedy_decoding_is_untouched():
    """A model with one dominant logit samples what greedy decoding writes, and `do_sample=False` is `generate`'s
    own greedy path token for token."""
    model = _spread_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    prompts = [[5, 6], [7, 8, 9, 10], [11]]
    common = {"max_new_tokens": 6, "pad_token_id": 0, "eos_token_id": None}
    greedy_ids, _ = sample(model, prompts, GenerationConfig(do_sample=False, **common))
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]])
    mask = (ids != 0).long()
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
            do_sample=False, **common))[:, 4:].tolist()  # fmt: skip
    assert greedy_ids == reference
    torch.manual_seed(0)
    sampled_ids, _ = sample(model, prompts, GenerationConfig(do_sample=True, temperature=0.5, top_k=0, **common))
    assert sampled_ids == greedy_ids
