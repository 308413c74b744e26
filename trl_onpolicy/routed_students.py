"""Specialised students behind a router, as one object: a mixture of distilled experts (MoDE).

Distilling one small student per domain (each from its own teacher) and routing every prompt to its domain's student
is the other half of several teachers routed by a column: the specialists split the parameters by domain instead of
sharing them. `trl-onpolicy distill --domain_column domain` trains them (`commands/distill_domains.py`); this module
holds the result. The folder it saves is

    output_dir/
        router.json                (the domains, the column, whether a classifier routes)
        router_classifier.pt       (the classifier's weights, when it has one)
        <domain>/                  (one student each: `save_pretrained` of the model and its tokenizer)

and [`RoutedStudents.from_pretrained`] loads it back; [`RoutedStudents.generate`] sends each prompt to its student,
batches the prompts of each student together, and returns the completions in the prompts' order.
"""

from __future__ import annotations

import os

import torch

from .domain_router import DomainRouter


class RoutedStudents:
    """
    Specialised students and the router that picks one per prompt.

    Args:
        students (`dict[str, PreTrainedModel]`): One causal LM per domain.
        tokenizers (`dict[str, PreTrainedTokenizerBase]`): Each student's tokenizer (the same object may serve several).
        router ([`~trl_onpolicy.domain_router.DomainRouter`]): Its domains must be the students' keys.
    """

    def __init__(self, students: dict, tokenizers: dict, router: DomainRouter):
        if set(students) != set(router.domains) or set(tokenizers) != set(router.domains):
            raise ValueError(f"One student and one tokenizer per domain of the router {router.domains}; got students "
                             f"for {sorted(students)} and tokenizers for {sorted(tokenizers)}.")  # fmt: skip
        self.students, self.tokenizers, self.router = dict(students), dict(tokenizers), router

    @property
    def domains(self) -> list[str]:
        return self.router.domains

    def num_parameters(self) -> int:
        """All students' parameters together (each tied tensor once)."""
        return sum(sum(p.numel() for p in model.parameters()) for model in self.students.values())

    def _prompt_string(self, domain: str, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizers[domain].apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list, domains: list[str] | None = None, batch_size: int = 64, **generate_kwargs):
        """
        Completions of `prompts` (strings, or chat messages rendered with the student's chat template), each from the
        student of its domain (`domains`, else the router's classifier), decoded without special tokens.

        `generate_kwargs` go to each student's `generate` (`max_new_tokens`, `do_sample`, ...); prompts of a domain are
        left-padded in batches of `batch_size`. Returns `(completions, domains)`, both in the prompts' order.
        """
        routes = self.router.route(prompts, domains)
        completions: list[str | None] = [None] * len(prompts)
        for domain in self.domains:
            rows = [i for i, d in enumerate(routes) if d == domain]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                texts = [self._prompt_string(domain, prompts[i]) for i in chunk]
                for i, text in zip(chunk, self._generate(domain, texts, generate_kwargs)):
                    completions[i] = text
        return completions, routes

    def _generate(self, domain: str, texts: list[str], generate_kwargs: dict) -> list[str]:
        model, tokenizer = self.students[domain], self.tokenizers[domain]
        was_training, padding_side = model.training, tokenizer.padding_side
        model.eval()
        tokenizer.padding_side = "left"
        try:
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kwargs = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                      **generate_kwargs}  # fmt: skip
            with torch.no_grad():
                out = model.generate(**encoded, **kwargs)  # (B, T_prompt + T_new)
        finally:
            model.train(was_training)
            tokenizer.padding_side = padding_side
        return tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)

    def save_pretrained(self, folder: str) -> None:
        """Each student and its tokenizer under `folder/<domain>`, the router beside them."""
        os.makedirs(folder, exist_ok=True)
        for domain in self.domains:
            self.students[domain].save_pretrained(os.path.join(folder, domain))
            self.tokenizers[domain].save_pretrained(os.path.join(folder, domain))
        self.router.save(folder)

    @classmethod
    def from_pretrained(cls, folder: str, **model_kwargs) -> RoutedStudents:
        """Load what [`save_pretrained`] (or `trl-onpolicy distill --domain_column`) wrote; `model_kwargs` (`dtype`,
        `device_map`, ...) go to every student's `AutoModelForCausalLM.from_pretrained`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        router = DomainRouter.load(folder)
        students, tokenizers = {}, {}
        for domain in router.domains:
            path = os.path.join(folder, domain)
            if not os.path.isdir(path):
                raise ValueError(f"{folder} has no student for the domain {domain!r} (no folder {path}).")
            students[domain] = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
            tokenizers[domain] = AutoTokenizer.from_pretrained(path)
        return cls(students, tokenizers, router)
