"""Bad input, fuzzed: every generated dataset either trains one step to a finite loss or raises one of our own errors.

Hypothesis builds small datasets (1-6 rows) in every supported format (prompt-only, prompt-completion, conversational
prompt / prompt-completion, `messages`) and mutates them: empty and whitespace-only strings; unicode (emoji, RTL
marks and scripts, combining marks, NUL, zero-width characters, BOM); characters outside the char tokenizer's
vocabulary and the literal text of its special tokens; prompts far beyond `max_length`; None values in any field;
malformed messages (no role, None content, strings instead of mappings, conversations without a user or an assistant
turn); rows whose prompt and completion are in different formats; a `prompt` and a `messages` column side by side;
missing columns; and extra columns of odd types (bytes, NaN/inf floats, nested lists, structs, all-None, columns named
like the trainer's own `prompt_ids` / `completion_ids`). Each case builds the trainer on tiny models
(`tests/tiny_models.py`) with `max_steps=1` and trains; completions come from the student (`lmbda=1`), the dataset
(`lmbda=0`) or the teacher (`lmbda=0, seq_kd=True`).

The property: training finishes with a finite loss, or a `ValueError` / `TypeError` is raised whose message is one of the
messages the package itself raises. Those are collected from the source of `prompts.py`, `trainer.py`, `config.py`
and `config_checks.py` (every `raise ValueError/TypeError(...)` and every config `check(..., message)`), each turned
into a regex (the formatted parts match anything), so a new documented error needs no edit here, while a bare
`IndexError`, a `torch.cat()` complaint from the loss or a Jinja `UndefinedError` from a chat template fails the test.

Cases tried (derandomized, so CI tries the same ones every run): 60 mutated datasets of the four formats, 25 rows that
mix formats, 15 column sets; 100 in all, about 40 s on a busy 2-core CPU. Set `TRL_ONPOLICY_FUZZ_SCALE=10` to try ten
times as many, and `TRL_ONPOLICY_FUZZ_RANDOM=1` for new random cases on every run.

The fuzzer found, besides the deep crashes fixed in `prompts.py`, one in the trainer: an off-policy step
(`lmbda < 1`, `seq_kd=False`) whose rows had no completion (a `messages` row without a final assistant turn, a None
completion) died in the loss with `torch.cat(): expected a non-empty list of Tensors`. The trainer now refuses such
rows up front (`test_off_policy_step_without_dataset_completions_names_the_fix`).
"""

from __future__ import annotations

import ast
import logging
import math
import os
import re
import string
import tempfile
from pathlib import Path

import pytest
import tiny_models as tm
from datasets import Dataset
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import trl_onpolicy
from trl_onpolicy.toy.tokenizer import CHARS

# ------------------------------------------------------------------------------------------------ the documented errors
PACKAGE = Path(trl_onpolicy.__file__).parent
SOURCES = ("prompts.py", "trainer.py", "trainer_setup.py", "config.py", "config_checks.py")
FIXED_TRAINER_BUG = "torch.cat(): expected a non-empty list of Tensors"  # see the module docstring


def _pattern(node: ast.AST, constants: dict[str, str]) -> str | None:
    """A regex for the message an expression builds: literal text escaped, every formatted part `.*?`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value)
    if isinstance(node, ast.JoinedStr):  # an f-string
        return "".join(_pattern(v, constants) or ".*?" if isinstance(v, ast.Constant) else ".*?" for v in node.values)
    if isinstance(node, ast.Name) and node.id in constants:
        return _pattern(ast.Constant(constants[node.id]), constants)
    is_format = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
    if is_format and isinstance(node.func.value, ast.Name) and node.func.value.id in constants:
        parts = string.Formatter().parse(constants[node.func.value.id])
        return "".join(re.escape(text) + (".*?" if field is not None else "") for text, field, _, _ in parts)
    return None


def documented_errors() -> list[re.Pattern]:
    """The messages of every `ValueError(...)` / `TypeError(...)` built (raised, or returned by a helper that builds
    an error) and every config `check(ok, message)` in `SOURCES`."""
    patterns = []
    for name in SOURCES:
        tree = ast.parse((PACKAGE / name).read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            message = None
            is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            if is_call and node.func.id in ("ValueError", "TypeError") and node.args:
                message = node.args[0]
            elif is_call and node.func.id == "check":
                message = node.args[1] if len(node.args) == 2 else None
            pattern = _pattern(message, constants) if message is not None else None
            if pattern:
                patterns.append(re.compile(pattern, re.DOTALL))
    return patterns


DOCUMENTED = documented_errors()


def is_documented(error: BaseException) -> bool:
    return isinstance(error, (ValueError, TypeError)) and any(p.fullmatch(str(error)) for p in DOCUMENTED)


def test_the_documented_errors_are_collected():
    """The collector finds the dataset, trainer and config errors (and would reject a deep one)."""
    assert len(DOCUMENTED) >= 40, len(DOCUMENTED)
    for message in (
        "The train dataset is empty: pass a dataset with at least one prompt.",
        "A `prompt` must be a string or a list of messages, got NoneType (None). Fill in or filter out such rows first.",
        "`beta` must be in [0.0, 1.0] (0 = forward KL, 1 = reverse KL), got 1.5.",
        (
            "`lmbda=0.0` makes some batches off-policy, which need completions, but the dataset has none (columns: "
            "['prompt']). Set `seq_kd=True` to let the teacher write them, set `lmbda=1.0`, or add a `completion` column."
        ),
    ):
        assert is_documented(ValueError(message)), message
    assert not is_documented(ValueError(FIXED_TRAINER_BUG))
    assert not is_documented(IndexError("list index out of range"))


# ------------------------------------------------------------------------------------------------ strategies
MAX_LENGTH, MAX_COMPLETION = 48, 4
ODD = ["\x00", "😀", "👩‍👩‍👧", "\u202e", "\u200f", "مرحبا", "שלום", "e\u0301", "a\u0308\u0323", "\u200b", "\ufeff",
       "日本語", "Ω", "ß", "\t", "\r\n", "</s>", "<s>", "<pad>", "<unk>", "{{ x }}", "{% if %}", "'\"\\"]  # fmt: skip

in_vocab = st.text(alphabet=CHARS, max_size=12)
odd_text = st.lists(
    st.one_of(
        st.sampled_from(ODD),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=6),  # any unicode but lone surrogates
        in_vocab,
    ),
    max_size=4,
).map("".join)
texts = st.one_of(
    in_vocab,
    in_vocab,  # weighted toward ordinary text, so that many cases train
    st.sampled_from(["", " ", "   ", "\n", " \t\n "]),  # empty or whitespace only
    odd_text,
    st.integers(MAX_LENGTH + 1, 6 * MAX_LENGTH).map(lambda n: ("abc def 123 " * n)[:n]),  # beyond max_length
)


@st.composite
def conversations(draw, final_assistant: bool | None = None) -> list[dict]:
    """A conversation: optional system turn, user/assistant pairs, and (optionally) a final assistant turn."""
    turns = [{"role": "system", "content": draw(texts)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 2))):
        turns += [{"role": "user", "content": draw(texts)}, {"role": "assistant", "content": draw(texts)}]
    if draw(st.booleans()) or not turns:
        turns.append({"role": "user", "content": draw(texts)})
    if final_assistant if final_assistant is not None else draw(st.booleans()):
        turns.append({"role": "assistant", "content": draw(texts)})
    return turns


FORMATS = ("prompt_only", "prompt_completion", "conversational_prompt_only", "conversational_prompt_completion",
           "messages")  # fmt: skip


@st.composite
def rows_of(draw, kind: str) -> list[dict]:
    """1-6 rows of one format."""
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        if kind == "prompt_only":
            rows.append({"prompt": draw(texts)})
        elif kind == "prompt_completion":
            rows.append({"prompt": draw(texts), "completion": draw(texts)})
        elif kind == "conversational_prompt_only":
            rows.append({"prompt": draw(conversations(final_assistant=False))})
        elif kind == "conversational_prompt_completion":
            rows.append({
                "prompt": draw(conversations(final_assistant=False)),
                "completion": [{"role": "assistant", "content": draw(texts)}],
            })  # fmt: skip
        else:
            rows.append({"messages": draw(conversations())})
    return rows


EXTRA_VALUES = {
    "bytes": st.binary(max_size=4),
    "float": st.sampled_from([0.0, -1.5, float("nan"), float("inf"), float("-inf")]),
    "int": st.integers(-(2**62), 2**62),
    "bool": st.booleans(),
    "none": st.none(),
    "nested": st.lists(st.lists(st.integers(0, 9), max_size=3), max_size=3),
    "struct": st.fixed_dictionaries({"a": st.integers(0, 9), "b": st.text(max_size=3)}),
    "text": odd_text,
}
EXTRA_NAMES = ["id", "meta", "score", "raw", "tags", "text", "teacher", "input_ids", "labels", "attention_mask",
               "prompt_ids", "completion_ids", "prompt_truncated", "Prompt", "prompt "]  # fmt: skip


def _none_somewhere(draw, rows: list[dict]) -> None:
    row = draw(st.sampled_from(rows))
    key = draw(st.sampled_from(sorted(row)))
    value = row[key]
    if isinstance(value, list) and value and draw(st.booleans()):  # a message's role or content
        message = draw(st.sampled_from(value))
        message[draw(st.sampled_from(["role", "content"]))] = None
    else:
        row[key] = None


def _malform_messages(draw, rows: list[dict]) -> None:
    row = draw(st.sampled_from(rows))
    key = "messages" if "messages" in row else "prompt"
    if not isinstance(row[key], list):
        return
    choice = draw(st.sampled_from(["empty", "assistant_only", "system_only", "no_user", "empty_role", "upper_role"]))
    if choice == "empty":
        row[key] = []
    elif choice == "assistant_only":
        row[key] = [{"role": "assistant", "content": draw(texts)}]
    elif choice == "system_only":
        row[key] = [{"role": "system", "content": draw(texts)}]
    elif choice == "no_user":
        row[key] = [m for m in row[key] if m["role"] != "user"]
    elif row[key]:
        row[key][0]["role"] = "" if choice == "empty_role" else row[key][0]["role"].upper()


@st.composite
def mutated_datasets(draw) -> tuple[str, list[dict], list[str]]:
    """Rows of one format with a few mutations; returns (format, rows, the mutations applied)."""
    kind = draw(st.sampled_from(FORMATS))
    rows = draw(rows_of(kind))
    applied = []
    for mutation in draw(st.lists(st.sampled_from(["none", "messages", "extra", "drop", "long"]), max_size=2)):
        applied.append(mutation)
        if mutation == "none":
            _none_somewhere(draw, rows)
        elif mutation == "messages":
            _malform_messages(draw, rows)
        elif mutation == "extra":
            name, kind_of_value = draw(st.sampled_from(EXTRA_NAMES)), draw(st.sampled_from(sorted(EXTRA_VALUES)))
            for row in rows:
                row[name] = draw(EXTRA_VALUES[kind_of_value])
        elif mutation == "drop":
            key = draw(st.sampled_from(sorted(rows[0])))
            for row in rows:
                row.pop(key, None)
        else:  # one very long prompt, whatever the format
            row = draw(st.sampled_from(rows))
            long = "word " * draw(st.integers(2 * MAX_LENGTH, 8 * MAX_LENGTH))
            if isinstance(row.get("prompt"), str):
                row["prompt"] = long
            elif isinstance(row.get("prompt"), list) and row["prompt"]:
                row["prompt"][-1]["content"] = long
            elif isinstance(row.get("messages"), list) and row["messages"]:
                row["messages"][0]["content"] = long
    return kind, rows, applied


@st.composite
def mixed_rows(draw) -> tuple[str, list[dict], list[str]]:
    """Rows that mix formats: within a row (prompt and completion of different kinds), or across rows (a `prompt` and
    a `messages` column side by side, each row using one of them)."""
    choice = draw(st.sampled_from(["text_prompt_chat_completion", "chat_prompt_text_completion", "prompt_and_messages",
                                   "prompt_or_messages", "prompt_dict", "messages_as_strings"]))  # fmt: skip
    n = draw(st.integers(1, 6))
    rows = []
    for _ in range(n):
        if choice == "text_prompt_chat_completion":
            rows.append({"prompt": draw(texts), "completion": [{"role": "assistant", "content": draw(texts)}]})
        elif choice == "chat_prompt_text_completion":
            rows.append({"prompt": draw(conversations(final_assistant=False)), "completion": draw(texts)})
        elif choice == "prompt_and_messages":  # both set: the prompt wins
            rows.append({"prompt": draw(texts), "messages": draw(conversations())})
        elif choice == "prompt_or_messages":  # each row one of them, the other None
            use_prompt = draw(st.booleans())
            rows.append({
                "prompt": draw(texts) if use_prompt else None,
                "messages": None if use_prompt else draw(conversations()),
            })  # fmt: skip
        elif choice == "prompt_dict":  # one message instead of a list of them
            rows.append({"prompt": {"role": "user", "content": draw(texts)}})
        else:
            rows.append({"messages": draw(st.lists(texts, min_size=1, max_size=3))})
    return choice, rows, []


@st.composite
def column_sets(draw) -> tuple[str, list[dict], list[str]]:
    """Columns present or missing: any subset of the known names plus odd extras."""
    names = draw(st.lists(st.sampled_from(["prompt", "completion", "messages", "text", "question", "answer", "input"]),
                          unique=True, max_size=3))  # fmt: skip
    n = draw(st.integers(1, 4))
    rows = [{} for _ in range(n)]
    for name in names:
        for row in rows:
            row[name] = draw(conversations()) if name == "messages" else draw(texts)
    if not names:  # no column at all but an odd one
        for row in rows:
            row["x"] = draw(EXTRA_VALUES["int"])
    return "+".join(names) or "none", rows, []


# ------------------------------------------------------------------------------------------------ the property
def _scale() -> int:
    return max(1, int(os.environ.get("TRL_ONPOLICY_FUZZ_SCALE", "1")))


def fuzz_settings(max_examples: int) -> settings:
    """Derandomized by default (CI tries the same cases every run); no example database written into the repo."""
    return settings(
        max_examples=max_examples * _scale(),
        deadline=None,
        derandomize=os.environ.get("TRL_ONPOLICY_FUZZ_RANDOM") != "1",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


SOURCES_OF_COMPLETIONS = st.sampled_from([{"lmbda": 1.0}, {"lmbda": 0.0}, {"lmbda": 0.0, "seq_kd": True}])
OUTCOMES: dict[str, int] = {}


def train_or_documented_error(case: tuple[str, list[dict], list[str]], source: dict) -> None:
    kind, rows, applied = case
    note(f"format={kind} mutations={applied} source={source} rows={rows!r}")
    try:
        dataset = Dataset.from_list(rows)
    except Exception:  # noqa: BLE001 - pyarrow refuses it (mixed types in a column): no trainer ever sees it
        assume(False)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as out:
        try:
            trainer = tm.trainer(
                out, train_dataset=dataset, max_length=MAX_LENGTH, max_completion_length=MAX_COMPLETION,
                save_strategy="no", **source,
            )  # fmt: skip
            trainer.train()
        except Exception as error:  # noqa: BLE001 - the property is about which errors come out
            assert is_documented(error), f"undocumented {type(error).__name__}: {error}"
            OUTCOMES["documented error"] = OUTCOMES.get("documented error", 0) + 1
            return
    loss = tm.step_logs(trainer)[0]["loss"]
    assert math.isfinite(loss), loss
    OUTCOMES["trained"] = OUTCOMES.get("trained", 0) + 1


@pytest.fixture(autouse=True, scope="module")
def _quiet_and_report():
    logging.getLogger("trl_onpolicy").setLevel(logging.ERROR)  # the long-prompt warning, once per case
    yield
    logging.getLogger("trl_onpolicy").setLevel(logging.NOTSET)
    print(f"\nfuzzed input outcomes: {OUTCOMES}")


@fuzz_settings(60)
@given(case=mutated_datasets(), source=SOURCES_OF_COMPLETIONS)
def test_mutated_datasets_train_or_raise_a_documented_error(case, source):
    train_or_documented_error(case, source)


@fuzz_settings(25)
@given(case=mixed_rows(), source=SOURCES_OF_COMPLETIONS)
def test_rows_mixing_formats_train_or_raise_a_documented_error(case, source):
    train_or_documented_error(case, source)


@fuzz_settings(15)
@given(case=column_sets(), source=SOURCES_OF_COMPLETIONS)
def test_missing_and_extra_columns_train_or_raise_a_documented_error(case, source):
    train_or_documented_error(case, source)


# ------------------------------------------------------------------------------------------------ pinned cases
U = [{"role": "user", "content": "say hi"}]
A = [{"role": "assistant", "content": "hi"}]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": None}], "A `prompt` must be a string or a list of messages, got NoneType"),
        ([{"prompt": "say hi", "completion": 3}], "A row mixes formats: its prompt is a string but its completion is"),
        ([{"prompt": U, "completion": "hi"}], "A row mixes formats: its prompt is a list of messages"),
        ([{"prompt": "say hi", "completion": A}], "A row mixes formats: its prompt is a string"),
        ([{"messages": [{"role": "user", "content": None}]}], "its `content` is None, not a string"),
        ([{"messages": [{"content": "hi"}]}], "its `role` is None, not a non-empty string"),
        ([{"messages": ["say hi", "hi"]}], "a str, not a mapping"),
        ([{"messages": A}], "has an empty prompt"),  # only an assistant turn: nothing to complete
        ([{"messages": []}], "has an empty prompt"),
        ([{"prompt": None, "messages": None}], "A row's `messages` is None"),
    ],
    ids=["none-prompt", "int-completion", "chat-prompt-text-completion", "text-prompt-chat-completion",
         "none-content", "no-role", "string-messages", "assistant-only", "empty-conversation", "all-none"],
)  # fmt: skip
def test_malformed_rows_name_the_fix(tmp_path, rows, message):
    """The deep crashes the fuzzer found (TypeError on `+`, Jinja `UndefinedError`, `AttributeError: 'str' object has
    no attribute 'get'`, transformers' "empty conversation"), each now a ValueError that says what to fix."""
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        tm.trainer(tmp_path, train_dataset=Dataset.from_list(rows))
    assert is_documented(info.value)


def test_a_conversational_dataset_needs_a_chat_template(tmp_path):
    with pytest.raises(ValueError, match="the tokenizer has no chat template") as info:
        tm.trainer(tmp_path, tok=tm.tokenizer(chat_template=False), train_dataset=tm.dataset("messages", 2))
    assert is_documented(info.value)


def test_a_failing_chat_template_names_the_row(tmp_path):
    tok = tm.tokenizer()
    tok.chat_template = "{% for m in messages %}{{ raise_exception('roles must alternate') }}{% endfor %}"
    with pytest.raises(ValueError, match=r"chat template failed on a row's `messages` \(TemplateError: roles must"):
        tm.trainer(tmp_path, tok=tok, train_dataset=tm.dataset("messages", 2))


def test_an_empty_completion_is_eos(tmp_path):
    """`completion=""` trains the student to stop at once (EOS), as in SFTTrainer; it used to be dropped, and a step of
    such rows died in the loss."""
    data = Dataset.from_list([{"prompt": "say hi", "completion": ""}, {"prompt": "abc", "completion": ""}])
    trainer = tm.trainer(tmp_path, train_dataset=data, lmbda=0.0)
    assert trainer.train_dataset["completion_ids"] == [[trainer.processing_class.eos_token_id]] * 2
    trainer.train()
    assert math.isfinite(tm.step_logs(trainer)[0]["loss"])


def test_off_policy_step_without_dataset_completions_names_the_fix(tmp_path):
    """A `messages` dataset without final assistant turns is a fine prompt-only dataset on-policy, but with `lmbda=0`
    the dataset must supply the completions: the error should say which rows lack one and how to fix it."""
    data = Dataset.from_list([{"messages": U}, {"messages": [{"role": "system", "content": "be brief"}, *U]}])
    tm.trainer(tmp_path, train_dataset=data, lmbda=1.0).train()  # on-policy: trains
    with pytest.raises(ValueError, match=r"no completion.*(seq_kd=True|lmbda=1\.0)") as info:
        tm.trainer(tmp_path, train_dataset=data, lmbda=0.0).train()
    assert is_documented(info.value)
