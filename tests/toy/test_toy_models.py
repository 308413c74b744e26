"""The toy models and recipes: construction, evaluation, and the cached teacher/student recipes on tiny budgets."""

import json
import time

import pytest
import torch

from trl_onpolicy.toy import recipe as recipe_module
from trl_onpolicy.toy.models import (
    build_model,
    completion_nll,
    evaluate_exact_match,
    evaluate_multiple_choice,
    num_parameters,
)
from trl_onpolicy.toy.recipe import Recipe, cache_dir, load_or_train_student, load_or_train_teacher
from trl_onpolicy.toy.task import generate_problems, mc_prompt_text, to_multiple_choice
from trl_onpolicy.toy.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_ONPOLICY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(recipe_module, "EVAL_PROBLEMS", 16)  # keep the recorded accuracy cheap in tests
    return tmp_path / "cache"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_ONPOLICY_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TRL_ONPOLICY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "trl_onpolicy"


def test_build_model(tok):
    model = build_model(2, 64, tok, seed=1)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert num_parameters(model) < 250_000
    same = build_model(2, 64, tok, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    other = build_model(2, 64, tok, seed=2)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    ids = tok(["Question: hi"], return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_recipe_needs_exactly_one_budget():
    with pytest.raises(ValueError, match="steps=None, seconds=None"):
        Recipe(num_layers=1, hidden_size=32)
    with pytest.raises(ValueError, match="steps=5, seconds=1"):
        Recipe(num_layers=1, hidden_size=32, steps=5, seconds=1)


def test_evaluate_exact_match_runs_greedy_generation(tok):
    model = build_model(1, 32, tok)
    model.train()
    problems = generate_problems(10, "eval", seed=0)
    accuracy = evaluate_exact_match(model, tok, problems, batch_size=4, max_new_tokens=5)
    assert accuracy == 0.0  # five tokens cannot reach "#### <n>" after a chain of thought
    assert tok.padding_side == "right" and model.training  # both restored


def letter_probabilities(model, tok, problems, seed=0):
    """Naive reference: one prompt at a time, p(" A") .. p(" D") at the last prompt position, shape (N, 4)."""
    letters = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in "ABCD"]
    assert all(len(ids) == 1 for ids in letters)  # each continuation is one token of the toy tokenizer
    rows = []
    with torch.no_grad():
        for problem in problems:
            prompt = mc_prompt_text(to_multiple_choice(problem, seed))
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)
            probs = torch.softmax(model(ids).logits[0, -1].float(), dim=-1)  # (V,)
            rows.append(probs[[t[0] for t in letters]])
    return torch.stack(rows)  # (N, 4)


def test_evaluate_multiple_choice_matches_the_definition(tok):
    model = build_model(1, 32, tok, seed=3)
    problems = generate_problems(24, "eval", seed=1)
    gold = torch.tensor([to_multiple_choice(p, seed=2)["answer"] for p in problems])
    expected = (letter_probabilities(model, tok, problems, seed=2).argmax(-1) == gold).float().mean().item()
    model.train()
    assert evaluate_multiple_choice(model, tok, problems, seed=2, batch_size=5) == pytest.approx(expected)
    assert model.training  # restored


def test_recipe_rejects_a_bad_mc_fraction():
    with pytest.raises(ValueError, match="mc_fraction must be in \\[0, 1\\], got -0.1"):
        Recipe(num_layers=1, hidden_size=32, steps=1, mc_fraction=-0.1)


def test_teacher_recipe_learns_and_is_cached(private_cache, tok):
    tiny = {"num_layers": 1, "hidden_size": 32, "steps": 80, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5,
            "mc_fraction": 0.25}  # fmt: skip
    tiny["progress"] = False
    model, tokenizer, info = load_or_train_teacher(**tiny)
    problems = generate_problems(64, "eval", seed=0)
    trained = completion_nll(model, tokenizer, problems)
    untrained = completion_nll(build_model(1, 32, tok, seed=0), tok, problems)
    assert untrained > 5.0  # about log(vocab size)
    print(f"completion NLL: {untrained:.3f} untrained, {trained:.3f} after 80 steps")
    assert trained < 0.5 * untrained, (trained, untrained)
    # With a quarter of every batch in MMLU's format, mass moves to the four letters after an MC prompt's "Answer:".
    trained_mass = letter_probabilities(model, tokenizer, problems[:16]).sum(-1)  # (16,)
    untrained_mass = letter_probabilities(build_model(1, 32, tok, seed=0), tok, problems[:16]).sum(-1)  # (16,)
    assert trained_mass.min() > 5 * untrained_mass.max(), (trained_mass, untrained_mass)
    assert info["train_steps"] == 80 and 0.0 <= info["eval_exact_match"] <= 1.0
    assert 0.0 <= info["eval_mc_accuracy"] <= 1.0 and info["recipe"]["mc_fraction"] == 0.25
    assert info["recipe"]["hidden_size"] == 32 and info["recipe"]["seconds"] is None

    folder = private_cache / info["name"]
    assert json.loads((folder / "info.json").read_text()) == info
    assert tokenizer.get_vocab() == tok.get_vocab()

    start = time.perf_counter()
    again, tokenizer_again, info_again = load_or_train_teacher(**tiny)
    assert time.perf_counter() - start < 5.0  # loaded, not trained
    assert info_again == info
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert tokenizer_again.get_vocab() == tokenizer.get_vocab()


def test_student_is_cached_by_its_settings(private_cache):
    _, _, info = load_or_train_student(num_layers=1, hidden_size=32, sft_steps=3, progress=False)
    assert info["recipe"]["seconds"] is None
    assert info["train_steps"] == 3 and info["name"].startswith("student-")
    _, _, timed = load_or_train_student(num_layers=1, hidden_size=32, sft_seconds=1.0, progress=False)
    assert timed["train_seconds"] >= 1.0 and timed["recipe"]["seconds"] == 1.0
    assert sorted(p.name for p in private_cache.iterdir()) == sorted([info["name"], timed["name"]])
