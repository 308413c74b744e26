"""Which specialised student answers a prompt: the router of a mixture of distilled experts (see `routed_students.py`).

A [`DomainRouter`] knows the domains and how to pick one for a prompt:

- by a column: the caller passes each prompt's domain (the dataset's `domain` column at inference, as in training);
- by a classifier trained on the training prompts: [`PromptClassifier`], a multinomial logistic regression on hashed
  character n-grams of the prompt's text. It is small (`n_features x domains` weights), trains in seconds on a CPU,
  needs no tokenizer or model, and is deterministic in its seed. Prompts of different domains usually differ in their
  words and format (a code request, a word problem, a multiple-choice block), which n-grams see.

A chat prompt (a list of messages) is classified by its messages' contents joined in order (`prompt_text`).
"""

from __future__ import annotations

import json
import os
import zlib

import torch

ROUTER_FILE, CLASSIFIER_FILE = "router.json", "router_classifier.pt"


def prompt_text(prompt) -> str:
    """The text a router reads of a prompt: a string as it is, a list of chat messages as their contents, one per line
    (a message whose content is a list of parts keeps its text parts)."""
    if isinstance(prompt, str):
        return prompt
    lines = []
    for message in prompt:
        content = message.get("content") or ""
        if not isinstance(content, str):
            content = " ".join(part["text"] for part in content if isinstance(part, dict) and "text" in part)
        lines.append(f"{message.get('role', '')}: {content}")
    return "\n".join(lines)


class PromptClassifier:
    """
    A multinomial logistic regression on hashed character n-grams of a prompt's text.

    Args:
        domains (`list[str]`): The classes, in order.
        ngram_range (`tuple[int, int]`, *optional*, defaults to `(1, 4)`): Lengths of the character n-grams counted.
        n_features (`int`, *optional*, defaults to `4096`): Hash buckets (CRC-32 of the n-gram, so stable across
            processes and machines, unlike Python's salted `hash`).
        l2 (`float`, *optional*, defaults to `1e-4`): Weight decay of the regression.
    """

    def __init__(self, domains: list[str], ngram_range: tuple[int, int] = (1, 4), n_features: int = 4096,
                 l2: float = 1e-4):  # fmt: skip
        if len(set(domains)) != len(domains) or len(domains) < 2:
            raise ValueError(f"A classifier needs at least two distinct domains, got {list(domains)}.")
        self.domains, self.ngram_range, self.n_features, self.l2 = list(domains), tuple(ngram_range), n_features, l2
        self.weight = torch.zeros(len(domains), n_features)  # (D, F)
        self.bias = torch.zeros(len(domains))  # (D,)

    def features(self, texts: list[str]) -> torch.Tensor:
        """(N, F) n-gram counts per text (lower-cased, runs of whitespace as one space), each row scaled to unit L2 norm
        (long and short prompts weigh alike)."""
        low, high = self.ngram_range
        flat: list[int] = []
        for i, text in enumerate(texts):
            text, row = " ".join(text.lower().split()), i * self.n_features
            flat += [row + zlib.crc32(text[j : j + n].encode("utf-8")) % self.n_features
                     for n in range(low, high + 1) for j in range(len(text) - n + 1)]  # fmt: skip
        counts = torch.bincount(torch.tensor(flat, dtype=torch.long), minlength=len(texts) * self.n_features)
        out = counts.view(len(texts), self.n_features).float()
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def fit(self, prompts: list, labels: list[str], steps: int = 200, seed: int = 0) -> float:
        """Train on `prompts` (strings or chat messages) with their domains; returns the accuracy on them."""
        unknown = sorted(set(labels) - set(self.domains))
        if unknown:
            raise ValueError(f"Labels {unknown} are not among the classifier's domains {self.domains}.")
        x = self.features([prompt_text(p) for p in prompts])  # (N, F)
        y = torch.tensor([self.domains.index(label) for label in labels])  # (N,)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            weight = (0.01 * torch.randn(len(self.domains), self.n_features)).requires_grad_()
        bias = torch.zeros(len(self.domains), requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + self.l2 * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return ((x @ self.weight.T + self.bias).argmax(-1) == y).float().mean().item()

    def scores(self, prompts: list) -> torch.Tensor:
        """(N, D) logits of each domain."""
        return self.features([prompt_text(p) for p in prompts]) @ self.weight.T + self.bias

    def predict(self, prompts: list) -> list[str]:
        return [self.domains[i] for i in self.scores(prompts).argmax(-1).tolist()]

    def state(self) -> dict:
        return {"domains": self.domains, "ngram_range": list(self.ngram_range), "n_features": self.n_features,
                "l2": self.l2, "weight": self.weight, "bias": self.bias}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> PromptClassifier:
        classifier = cls(state["domains"], tuple(state["ngram_range"]), state["n_features"], state["l2"])
        classifier.weight, classifier.bias = state["weight"], state["bias"]
        return classifier


class DomainRouter:
    """
    The domain of each prompt: given by the caller (a column), or predicted by a [`PromptClassifier`].

    Args:
        domains (`list[str]`): The domains, one specialised student each.
        column (`str`, *optional*, defaults to `"domain"`): The dataset column that names a row's domain.
        classifier ([`PromptClassifier`], *optional*): Predicts the domain of a prompt given without one.
    """

    def __init__(self, domains: list[str], column: str = "domain", classifier: PromptClassifier | None = None):
        if classifier is not None and classifier.domains != list(domains):
            raise ValueError(
                f"The classifier's domains {classifier.domains} differ from the router's {list(domains)}."
            )
        self.domains, self.column, self.classifier = list(domains), column, classifier

    def route(self, prompts: list, domains: list[str] | None = None) -> list[str]:
        """Each prompt's domain: `domains` as given (checked), else the classifier's prediction."""
        if domains is not None:
            if len(domains) != len(prompts):
                raise ValueError(f"Got {len(prompts)} prompts and {len(domains)} domains; give one domain per prompt.")
            unknown = sorted(set(domains) - set(self.domains))
            if unknown:
                raise ValueError(f"Unknown domain(s) {unknown}: the students are for {self.domains}.")
            return list(domains)
        if self.classifier is None:
            raise ValueError(
                f"This router has no classifier: pass each prompt's domain (`domains=`, the `{self.column}` column), "
                "or build the students with a classifier router (`--router classifier`)."
            )
        return self.classifier.predict(prompts)

    def save(self, folder: str) -> None:
        info = {"domains": self.domains, "column": self.column, "classifier": self.classifier is not None}
        with open(os.path.join(folder, ROUTER_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if self.classifier is not None:
            torch.save(self.classifier.state(), os.path.join(folder, CLASSIFIER_FILE))

    @classmethod
    def load(cls, folder: str) -> DomainRouter:
        with open(os.path.join(folder, ROUTER_FILE), encoding="utf-8") as f:
            info = json.load(f)
        classifier = None
        if info["classifier"]:
            state = torch.load(os.path.join(folder, CLASSIFIER_FILE), weights_only=True)
            classifier = PromptClassifier.from_state(state)
        return cls(info["domains"], info["column"], classifier)
