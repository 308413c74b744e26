"""Specialised students behind a router as one object (`trl_onpolicy.routed_students`): each prompt answered by its
domain's student, in the prompts' order; saved and loaded as one folder."""

import pytest
import torch

from tests import tiny_models
from trl_onpolicy import DomainRouter, PromptClassifier, RoutedStudents

PROMPTS = ["add 12", "say hi", "add 3", "name a color", "add 45"]
DOMAINS = ["math", "chat", "math", "chat", "math"]


def pair():
    tok = tiny_models.tokenizer()
    students = {"math": tiny_models.model(tok, seed=3), "chat": tiny_models.model(tok, seed=4)}
    return students, tok


def alone(model, tok, prompt: str) -> str:
    """The greedy completion of one prompt by one model, no padding."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_each_prompt_is_answered_by_its_domains_student_in_order():
    students, tok = pair()
    mixture = RoutedStudents(students, {"math": tok, "chat": tok}, DomainRouter(["math", "chat"]))
    completions, routes = mixture.generate(PROMPTS, domains=DOMAINS, do_sample=False, max_new_tokens=6)
    assert routes == DOMAINS
    assert completions == [alone(students[d], tok, p) for p, d in zip(PROMPTS, DOMAINS)]
    # the two students differ, so the routing is what makes the answers right
    assert [alone(students["chat"], tok, p) for p in PROMPTS] != completions
    assert mixture.num_parameters() == sum(p.numel() for m in students.values() for p in m.parameters())


def test_chat_prompts_use_the_students_template():
    students, tok = pair()
    mixture = RoutedStudents(students, {"math": tok, "chat": tok}, DomainRouter(["math", "chat"]))
    chat = [[{"role": "user", "content": "add 12"}]]
    completions, _ = mixture.generate(chat, domains=["math"], do_sample=False, max_new_tokens=6)
    assert completions == [alone(students["math"], tok, "#u:add 12\n#a:")]


def test_saved_and_loaded_as_one_folder(tmp_path):
    students, tok = pair()
    classifier = PromptClassifier(["math", "chat"])
    classifier.fit(PROMPTS, DOMAINS)
    mixture = RoutedStudents(students, {"math": tok, "chat": tok}, DomainRouter(["math", "chat"], classifier=classifier))
    mixture.save_pretrained(str(tmp_path))
    loaded = RoutedStudents.from_pretrained(str(tmp_path))
    for domain in ("math", "chat"):
        for a, b in zip(students[domain].parameters(), loaded.students[domain].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    before, routes = mixture.generate(PROMPTS, do_sample=False, max_new_tokens=6)
    after, loaded_routes = loaded.generate(PROMPTS, do_sample=False, max_new_tokens=6)
    assert routes == loaded_routes == DOMAINS and before == after


def test_bad_input_names_the_fix(tmp_path):
    students, tok = pair()
    with pytest.raises(ValueError, match=r"^One student and one tokenizer per domain of the router \['math', 'code'\]; "
                                         r"got students for \['chat', 'math'\] and tokenizers for \['chat', 'math'\]\.$"):
        RoutedStudents(students, {"math": tok, "chat": tok}, DomainRouter(["math", "code"]))
    DomainRouter(["math", "code"]).save(str(tmp_path))
    with pytest.raises(ValueError, match=r"has no student for the domain 'math' \(no folder .*math\)\.$"):
        RoutedStudents.from_pretrained(str(tmp_path))
