"""Aligning two tokenizations of one text (`token_alignment.py`), on hand-made cases: merges, splits, whitespace,
unicode split over byte tokens, special tokens, a completion that ends mid-character, and text a teacher cannot encode.
Token ends are checked against the definition: the length of the decode of every prefix, where that prefix is whole.
"""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trl_onpolicy.token_alignment import Alignment, align, teacher_completion, token_ends
from trl_onpolicy.toy import build_tokenizer, char_tokenizer

TEXTS = ["Café 中 ok 12+3", "a  b\n\n#### 7", "Question: what is 12 * 3?  Answer: 36 🙂", " leading and trailing  "]


def characters(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `alphabet` (ids 0-3 special, as the toy's), nothing added on encode."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(dict.fromkeys(alphabet))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Words with SentencePiece's "▁" for the space before them; the decode drops the first token's space."""
    words = ["▁hello", "▁world", "hel", "lo", "▁", "wor", "ld"]
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def reference_ends(tokenizer, ids):
    """From the definition: token i ends at len(decode(ids[:i + 1])) when that prefix decodes to a prefix of the whole
    decode (no partial character), else None."""
    whole = tokenizer.decode(ids)
    out = []
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1])
        out.append(len(prefix) if whole.startswith(prefix) and not prefix.endswith("\ufffd") else None)
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_token_ends_are_the_prefix_decodes(text):
    bpe = build_tokenizer()
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    ends = token_ends(bpe, ids)
    assert ends == reference_ends(bpe, ids) and ends[-1] == len(text)
    chars = characters(text)
    assert token_ends(chars, chars(text, add_special_tokens=False)["input_ids"]) == list(range(1, len(text) + 1))


def test_token_ends_follow_sentencepieces_leading_space():
    sp = sentencepiece_like()
    ids = [sp.convert_tokens_to_ids(t) for t in ["▁hello", "▁", "wor", "ld", "▁world"]]
    assert sp.decode(ids) == "hello world world"
    assert token_ends(sp, ids) == reference_ends(sp, ids) == [5, 6, 9, 11, 17]


def test_a_multibyte_character_ends_with_its_last_byte():
    bpe = build_tokenizer()
    ids = bpe("é", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 and token_ends(bpe, ids) == [None, 1]


@pytest.mark.parametrize(
    ("student_ends", "teacher_ends", "student", "teacher", "rate"),
    [
        ([1, 2, 3], [1, 2, 3], [(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)], 1.0),  # the same tokens
        ([3, 5, 11], [1, 5, 9, 11], [(0, 2), (2, 3)], [(0, 2), (2, 4)], 0.0),  # "hel|lo| world" vs "h|ello| wor|ld"
        ([5], [1, 2, 3, 4, 5], [(0, 1)], [(0, 5)], 0.0),  # a merge: one student token, five teacher tokens
        ([2, 4], [1, 3, 4], [(0, 2)], [(0, 3)], 0.0),  # " a| b" vs " |a |b": the spaces cut elsewhere
        ([None, 1, 3], [1, 2, 3], [(0, 2), (2, 3)], [(0, 1), (1, 3)], 0.0),  # "é" in two bytes, then "xy" vs "x|y"
        ([2, 3, 3], [2, 3], [(0, 1), (1, 3)], [(0, 1), (1, 2)], 1 / 3),  # a token of no text joins the last span
        ([], [], [], [], 1.0),
    ],
)  # fmt: skip
def test_spans_close_where_both_tokenizations_end(student_ends, teacher_ends, student, teacher, rate):
    alignment = align(student_ends, teacher_ends)
    assert (alignment.student, alignment.teacher) == (student, teacher)
    assert alignment.rate() == pytest.approx(rate)


def test_two_different_texts_are_refused():
    with pytest.raises(ValueError, match=r"^The two tokenizations do not cover the same text: the student's ends at "
                                         r"character 5, the teacher's at 6\.$"):  # fmt: skip
        align([2, 5], [6])


def test_a_completion_in_another_tokenizer_with_its_eos_and_a_trailing_partial_character():
    bpe, chars = build_tokenizer(), characters("Café 中ok12+3")
    ids = bpe("Café 中 ok", add_special_tokens=False)["input_ids"]
    teacher_ids, alignment = teacher_completion(bpe, chars, [*ids, bpe.eos_token_id], {bpe.eos_token_id}, 2)
    assert chars.decode(teacher_ids[:-1]) == "Café 中 ok" and teacher_ids[-1] == 2
    assert alignment.student[-1] == (len(ids), len(ids) + 1) and alignment.teacher[-1] == (9, 10)  # EOS <-> EOS
    assert all(alignment.scored())
    # C, a, f, the two spaces, EOS; not the bytes of é (2) and 中 (3), nor "ok" (one token) against "o", "k"
    assert alignment.one_to_one() == [True, True, True, False, True, False, True, False, True]

    cut = ids[:-3]  # "Café " and two of the three byte tokens of 中: the completion ends inside a character
    teacher_ids, alignment = teacher_completion(bpe, chars, cut, {bpe.eos_token_id}, 2)
    assert chars.decode(teacher_ids) == "Café "
    assert alignment.student[-1] == (len(cut) - 2, len(cut)) and alignment.teacher[-1] == (5, 5)
    assert alignment.scored()[-1] is False and all(alignment.scored()[:-1])


def test_text_the_teacher_cannot_encode_is_refused_with_the_fix():
    bpe, chars = build_tokenizer(), char_tokenizer()  # the toy's characters: no capitals, no "é"
    ids = bpe("ok Café", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError) as error:
        teacher_completion(bpe, chars, ids, {bpe.eos_token_id}, chars.eos_token_id)
    assert str(error.value) == (
        "The teacher's tokenizer cannot encode the student's text: character 3 ('Café') comes back as '<unk>af<un'. Use "
        "a teacher whose tokenizer round-trips every character the student writes (a byte-level tokenizer does), or "
        "filter those characters from the prompts."
    )


def test_an_alignment_counts_one_to_one_student_tokens():
    alignment = Alignment([(0, 1), (1, 3), (3, 4)], [(0, 1), (1, 2), (2, 2)])
    assert alignment.one_to_one() == [True, False, False] and alignment.scored() == [True, True, False]
    assert alignment.rate() == 0.25
