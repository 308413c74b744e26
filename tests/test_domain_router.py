"""The router of specialised students (`trl_onpolicy.domain_router`): the classifier's features against their
definition, what it learns, determinism, saving, and the errors that name their fix."""

import zlib

import pytest
import torch

from trl_onpolicy import DomainRouter, PromptClassifier
from trl_onpolicy.domain_router import prompt_text

MATH = ["Mia has 7 pens. She buys 5 more. How many pens?", "Tom has 3 cups and gets 4 more. How many cups now?",
        "Ana sells 2 of her 9 eggs. How many eggs are left?", "Leo has 4 boxes of 6 rocks. How many rocks?"]  # fmt: skip
CODE = ["def add(a, b):\n    return a + b  # fix the bug", "Write a Python function that reverses a list.",
        "for i in range(10): print(i) -- why does this loop?", "import numpy as np; np.zeros((2, 3))"]  # fmt: skip


def naive_features(text: str, low: int, high: int, n_features: int) -> torch.Tensor:
    """Counts of hashed character n-grams of the normalised text, then unit L2 norm: the definition, one loop."""
    text = " ".join(text.lower().split())
    counts = torch.zeros(n_features, dtype=torch.float64)
    for n in range(low, high + 1):
        for start in range(len(text) - n + 1):
            counts[zlib.crc32(text[start : start + n].encode("utf-8")) % n_features] += 1
    return counts / counts.norm()


def test_features_match_the_definition():
    classifier = PromptClassifier(["a", "b"], ngram_range=(2, 3), n_features=64)
    texts = ["Hello   World", "été, naïve!"]
    got = classifier.features(texts)
    for row, text in zip(got, texts):
        torch.testing.assert_close(row.double(), naive_features(text, 2, 3, 64), rtol=0, atol=1e-6)
    assert classifier.features(["x"])[0].abs().sum() == 0  # no bigram in one character: an all-zero row, not NaN


def test_chat_prompts_are_read_as_their_messages():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "add 2"}, {"type": "image"}]}]  # fmt: skip
    assert prompt_text(messages) == "system: Be brief.\nuser: add 2"
    assert prompt_text("plain") == "plain"


def test_classifier_learns_the_domains_and_generalises():
    classifier = PromptClassifier(["math", "code"])
    assert classifier.fit(MATH[:3] + CODE[:3], ["math"] * 3 + ["code"] * 3) == 1.0
    assert classifier.predict([MATH[3], CODE[3]]) == ["math", "code"]  # held out
    chat = [[{"role": "user", "content": MATH[3]}], [{"role": "user", "content": CODE[3]}]]
    assert classifier.predict(chat) == ["math", "code"]


def test_classifier_is_deterministic_and_survives_saving(tmp_path):
    fits = []
    for _ in range(2):
        classifier = PromptClassifier(["math", "code"])
        classifier.fit(MATH + CODE, ["math"] * 4 + ["code"] * 4, seed=3)
        fits.append(classifier)
    torch.testing.assert_close(fits[0].weight, fits[1].weight, rtol=0, atol=0)
    DomainRouter(["math", "code"], column="task", classifier=fits[0]).save(str(tmp_path))
    loaded = DomainRouter.load(str(tmp_path))
    assert loaded.domains == ["math", "code"] and loaded.column == "task"
    torch.testing.assert_close(loaded.classifier.scores(MATH + CODE), fits[0].scores(MATH + CODE), rtol=0, atol=0)


def test_router_uses_the_given_domains_over_the_classifier():
    classifier = PromptClassifier(["math", "code"])
    classifier.fit(MATH + CODE, ["math"] * 4 + ["code"] * 4)
    router = DomainRouter(["math", "code"], classifier=classifier)
    assert router.route([MATH[0], CODE[0]]) == ["math", "code"]
    assert router.route([MATH[0], CODE[0]], domains=["code", "code"]) == ["code", "code"]


def test_router_errors_name_the_fix():
    router = DomainRouter(["math", "code"])
    with pytest.raises(ValueError, match=r"^This router has no classifier: pass each prompt's domain \(`domains=`, the "
                                         r"`domain` column\), or build the students with a classifier router"):
        router.route(["x"])
    with pytest.raises(ValueError, match=r"^Got 2 prompts and 1 domains; give one domain per prompt\.$"):
        router.route(["x", "y"], domains=["math"])
    with pytest.raises(ValueError, match=r"^Unknown domain\(s\) \['poetry'\]: the students are for \['math', 'code'\]\.$"):
        router.route(["x"], domains=["poetry"])
    with pytest.raises(ValueError, match=r"^Labels \['poetry'\] are not among the classifier's domains"):
        PromptClassifier(["math", "code"]).fit(["x"], ["poetry"])
    with pytest.raises(ValueError, match=r"^A classifier needs at least two distinct domains, got \['math'\]\.$"):
        PromptClassifier(["math"])
    with pytest.raises(ValueError, match=r"^The classifier's domains \['code', 'math'\] differ from the router's"):
        DomainRouter(["math", "code"], classifier=PromptClassifier(["code", "math"]))
