"""Two tokenizations of the same text, aligned: the student's completion tokens and the teacher's tokens for the text
they decode to (cross-tokenizer distillation, issue 20).

Every token covers a run of the text's characters; where a token ends inside a character (a byte-level tokenizer
splits a multi-byte character over tokens), it has no end of its own and its characters end with a later token.
The two tokenizations cut the text at different places. A *span* is a shortest run of student tokens and a run of
teacher tokens that cover the same characters: spans cut the text exactly at the boundaries that both tokenizations
share, so every token belongs to exactly one span, and the spans of a completion cover it in order. A span of one
student token and one teacher token is *one-to-one* (both tokens are the same string); the alignment rate is the
fraction of student tokens in one-to-one spans.

A token's end is found by decoding it after a few tokens of context (as vLLM's incremental detokenizer does: the
text that `decode(context + token)` adds to `decode(context)`), so that leading-space rules (SentencePiece strips the
first token's space) and partial characters (decoded as U+FFFD) behave as in a decode of the whole sequence. The
special tokens that end a completion (EOS) are not text: [`teacher_completion`] aligns the text before them and pairs
the student's EOS with the teacher's as a span of their own. [`matched_vocabulary`] pairs the tokens of the two
vocabularies that are the same text (the hybrid loss compares them column by column). Student tokens that end a completion inside a character
(a completion cut at `max_completion_length` mid-character) have no teacher tokens: their span is empty on the
teacher's side, and the loss leaves it out.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what a decode writes for bytes that are not yet a whole character


def token_ends(tokenizer, ids: list[int], context: int = 4) -> list[int | None]:
    """
    The character offset in `tokenizer.decode(ids)` at which each token's text ends, or None for a token that ends
    inside a character (its text is complete only with later tokens).

    Args:
        tokenizer: A tokenizer with `decode`.
        ids (`list[int]`): Token ids (special tokens are decoded as their text).
        context (`int`, *optional*, defaults to `4`): Tokens decoded before each one, so that the decode treats it as
            a token in the middle of a sequence.
    """
    ends: list[int | None] = []
    start, position = 0, 0  # the token index after the last whole character, and its character offset
    for i in range(len(ids)):
        lo = max(0, start - context)
        before = tokenizer.decode(ids[lo:start])
        text = tokenizer.decode(ids[lo : i + 1])
        if text.endswith(REPLACEMENT) or not text.startswith(before):
            ends.append(None)
            continue
        position += len(text) - len(before)
        ends.append(position)
        start = i + 1
    return ends


@dataclass(frozen=True)
class Alignment:
    """
    Spans of two tokenizations of one text: `student[k]` and `teacher[k]` are the `[start, end)` token ranges of span
    `k` in each; consecutive spans are adjacent and together cover both sequences.
    """

    student: list[tuple[int, int]]
    teacher: list[tuple[int, int]]

    def scored(self) -> list[bool]:
        """Per span: it has teacher tokens (a completion's trailing partial character has none)."""
        return [t[1] > t[0] for t in self.teacher]

    def one_to_one(self) -> list[bool]:
        """Per span: one student token and one teacher token."""
        return [s[1] - s[0] == 1 and t[1] - t[0] == 1 for s, t in zip(self.student, self.teacher, strict=True)]

    def rate(self) -> float:
        """The fraction of student tokens in one-to-one spans (1.0 for an empty completion)."""
        tokens = sum(s[1] - s[0] for s in self.student)
        return sum(self.one_to_one()) / tokens if tokens else 1.0


def align(student_ends: list[int | None], teacher_ends: list[int | None]) -> Alignment:
    """
    Spans from the token ends ([`token_ends`]) of two tokenizations of the same text: each span closes where a
    student token and a teacher token end at the same character. Raises a `ValueError` when the two do not cover the
    same number of characters (they are not the same text).
    """
    s_total = next((e for e in reversed(student_ends) if e is not None), 0)
    t_total = next((e for e in reversed(teacher_ends) if e is not None), 0)
    whole = (not student_ends or student_ends[-1] is not None) and (not teacher_ends or teacher_ends[-1] is not None)
    if s_total != t_total or not whole:
        raise ValueError(f"The two tokenizations do not cover the same text: the student's ends at character "
                         f"{student_ends[-1] if student_ends else 0}, the teacher's at "
                         f"{teacher_ends[-1] if teacher_ends else 0}.")  # fmt: skip
    student, teacher = [], []
    i = j = s0 = t0 = 0
    while i < len(student_ends) or j < len(teacher_ends):
        i, s_end = _next_end(student_ends, i)
        j, t_end = _next_end(teacher_ends, j)
        while s_end != t_end:  # advance the side that ends first, to its next whole character
            if s_end < t_end:
                i, s_end = _next_end(student_ends, i)
            else:
                j, t_end = _next_end(teacher_ends, j)
        if student and (i == s0 or j == t0):  # tokens of no text at the end: they join the last span
            student[-1], teacher[-1] = (student[-1][0], i), (teacher[-1][0], j)
        else:
            student.append((s0, i))
            teacher.append((t0, j))
        s0, t0 = i, j
    return Alignment(student, teacher)


def _next_end(ends: list[int | None], i: int) -> tuple[int, int]:
    """The index after the next token from `i` that ends a whole character, and that character offset; past the
    last token: the end of the text."""
    while i < len(ends) and ends[i] is None:
        i += 1
    if i == len(ends):
        return i, (ends[-1] if ends else 0)
    return i + 1, ends[i]


def teacher_completion(student_tokenizer, teacher_tokenizer, completion_ids: list[int], student_eos_ids: set[int],
                       teacher_eos_id: int) -> tuple[list[int], Alignment]:  # fmt: skip
    """
    The teacher's tokens for a student completion, and the alignment of the two.

    The completion's text (decoded without its trailing EOS) is encoded by the teacher's tokenizer
    (`add_special_tokens=False`); a trailing student EOS (any of `student_eos_ids`) becomes `teacher_eos_id`, in a
    span of its own. Student tokens that end the text inside a character get an empty teacher span. Raises a
    `ValueError` naming the first character that does not survive the teacher's encode and decode.
    """
    eos = bool(completion_ids) and completion_ids[-1] in student_eos_ids
    body = list(completion_ids[:-1] if eos else completion_ids)
    student_ends = token_ends(student_tokenizer, body)
    whole = len(student_ends)
    while whole and student_ends[whole - 1] is None:  # a trailing partial character
        whole -= 1
    text = student_tokenizer.decode(body[:whole])
    teacher_ids = list(teacher_tokenizer(text, add_special_tokens=False)["input_ids"])
    back = teacher_tokenizer.decode(teacher_ids)
    if back != text:
        at = next((k for k, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
        raise ValueError(
            f"The teacher's tokenizer cannot encode the student's text: character {at} ({text[at:at + 10]!r}) comes back "
            f"as {back[at:at + 10]!r}. Use a teacher whose tokenizer round-trips every character the student writes "
            "(a byte-level tokenizer does), or filter those characters from the prompts."
        )  # fmt: skip
    alignment = align(student_ends[:whole], token_ends(teacher_tokenizer, teacher_ids))
    student, teacher = list(alignment.student), list(alignment.teacher)
    if whole < len(body):  # the partial character: no teacher tokens
        student.append((whole, len(body)))
        teacher.append((len(teacher_ids), len(teacher_ids)))
    if eos:
        student.append((len(body), len(body) + 1))
        teacher.append((len(teacher_ids), len(teacher_ids) + 1))
        teacher_ids.append(teacher_eos_id)
    return teacher_ids, Alignment(student, teacher)


def token_texts(tokenizer) -> list[str | None]:
    """Each id's text as it reads inside a sequence (after "a": SentencePiece's leading space is kept); None for an
    id that is not a whole character (a byte of one) or decodes to nothing."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = tokenizer.decode(anchor)
    texts: list[str | None] = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([*anchor, i])
        piece = text[len(prefix) :] if text.startswith(prefix) else None
        texts.append(piece if piece and REPLACEMENT not in piece else None)
    return texts


def matched_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[list[int], list[int]]:
    """
    The pairs of ids, one per vocabulary, whose texts ([`token_texts`]) are the same and occur once in each
    vocabulary, plus (student EOS, teacher EOS); as `(student_ids, teacher_ids)`, ordered by student id.
    """
    def unique(texts: list[str | None]) -> dict[str, int]:
        seen: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            if text is not None:
                seen.setdefault(text, []).append(i)
        return {text: ids[0] for text, ids in seen.items() if len(ids) == 1}

    student, teacher = unique(token_texts(student_tokenizer)), unique(token_texts(teacher_tokenizer))
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    pairs = {student[t]: teacher[t] for t in student.keys() & teacher.keys() if student[t] != s_eos and teacher[t] != t_eos}
    pairs[s_eos] = t_eos  # the ends of a completion mean the same, whatever their text
    ordered = sorted(pairs.items())
    return [s for s, _ in ordered], [t for _, t in ordered]
