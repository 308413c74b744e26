"""The toy tokenizer: small, deterministic, lossless on task text, and saved/reloaded identically."""

import pytest
from transformers import AutoTokenizer

from trl_onpolicy.toy.task import generate_problems, prompt_text, to_multiple_choice
from trl_onpolicy.toy.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def task_texts():
    texts = []
    for problem in generate_problems(200, "eval", seed=0, min_steps=1, max_steps=8):
        texts.append(prompt_text(problem["question"]) + " " + problem["answer"])
        mc = to_multiple_choice(problem)
        texts.append("\n".join([mc["question"], *(f"{'ABCD'[i]}. {c}" for i, c in enumerate(mc["choices"]))]))
    others = ["#### 1,234", "####0", "0 1 2 3 4 5 6 7 8 9 10 99 100 12345", "  two  spaces\n\n", "héllo ✓ 日本"]
    return texts + others


def test_special_tokens_and_size(tok):
    assert 300 <= len(tok) <= 1000
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok("Question: hi")["input_ids"] == tok("Question: hi", add_special_tokens=False)["input_ids"]


def test_round_trip(tok):
    for text in task_texts():
        assert tok.decode(tok(text)["input_ids"]) == text


def test_task_text_is_short(tok):
    assert len(tok.tokenize(" 3 + 45 = 48.\n#### 48")) == 9  # every number < 100 and "####" are one token
    assert all(len(tok.tokenize(f" {v}")) == 1 for v in range(100))
    problem = generate_problems(1, seed=0, min_steps=2, max_steps=2)[0]
    assert len(tok(prompt_text(problem["question"]) + " " + problem["answer"])["input_ids"]) < 80


def test_same_vocabulary_every_build(tok):
    from trl_onpolicy.toy import tokenizer as module

    module._trained.cache_clear()  # train again, not just re-wrap the cached result
    again = build_tokenizer()
    assert again is not tok and again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert again.chat_template == tok.chat_template
    assert (again.bos_token, again.eos_token, again.pad_token, again.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for text in task_texts()[:50]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_chat_template(tok):
    messages = [{"role": "user", "content": "Question: 2 + 2?"}, {"role": "assistant", "content": "#### 4"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s>user\nQuestion: 2 + 2?</s>\n<s>assistant\n#### 4</s>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user\nQuestion: 2 + 2?</s>\n<s>assistant\n"
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(assistant) == "#### 4</s>"
