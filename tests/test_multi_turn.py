"""Multi-turn rollouts (`multi_turn.py`, `environments.py`, `tool_calls.py`): transcripts, masks, and bad input.

A scripted sampler writes known turns, so the transcript and its mask can be pinned token by token against one
written by hand from the chat template: only the tokens the student drew are in the loss.
"""

import asyncio
import re
import time

import pytest
import torch
from transformers import GenerationConfig

from trl_onpolicy.environments import EnvStep, tool_environment_factory
from trl_onpolicy.multi_turn import MultiTurnRollouts, glue_ids
from trl_onpolicy.rollouts import Rollouts, collate
from trl_onpolicy.samplers import Samples
from trl_onpolicy.toy import char_tokenizer

# "#u:" / "#a:" / "#t:" turns; an assistant turn ends with EOS and lists its calls as "call name k=v ..."
TOOL_TEMPLATE = (
    "{% for m in messages %}{{ '#' + m['role'][0] + ':' + m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}{{ 'call ' + c['function']['name'] }}"
    "{% for k, v in c['function']['arguments'].items() %}{{ ' ' + k + '=' + v|string }}{% endfor %}{% endfor %}"
    "{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '#a:' }}{% endif %}"
)


def parse(text: str) -> dict:
    """The template's format read back: "call add a=2 b=3" -> a tool call; a bad argument raises."""
    if "call " not in text:
        return {"role": "assistant", "content": text}
    content, _, call = text.partition("call ")
    name, *pairs = call.split()
    if any("=" not in p for p in pairs):
        raise ValueError(f"argument without a value in {call!r}")
    arguments = {k: int(v) for k, v in (p.split("=") for p in pairs)}
    return {"role": "assistant", "content": content, "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": arguments}}]}  # fmt: skip


def add(a: int, b: int) -> int:
    """
    Adds two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def boom(a: int) -> int:
    """
    Raises.

    Args:
        a: Anything.
    """
    raise RuntimeError("no such luck")


def hang(a: int) -> int:
    """
    Sleeps past the timeout.

    Args:
        a: Anything.
    """
    time.sleep(3)
    return a


async def slow(a: int) -> int:
    """
    An async tool that sleeps past the timeout.

    Args:
        a: Anything.
    """
    await asyncio.sleep(3)
    return a


async def double(a: int) -> int:
    """
    An async tool.

    Args:
        a: The number.
    """
    return 2 * a


class Scripted:
    """A sampler that writes given texts: `turns[r][k]` is rollout r's k-th turn (EOS appended unless `cut`)."""

    def __init__(self, tok, turns, cut=()):
        self.tok, self.turns, self.cut, self.calls = tok, turns, set(cut), []

    def sample(self, prompt_ids, generation_config, tokenizer=None):
        self.calls.append([list(p) for p in prompt_ids])
        out, truncated = [], []
        for prompt in prompt_ids:
            r = next(i for i, start in enumerate(self.starts) if prompt[: len(start)] == start)
            k = self.k[r]
            self.k[r] += 1
            ids = self.tok(self.turns[r][k], add_special_tokens=False)["input_ids"]
            cut = (r, k) in self.cut
            ids = ids[: generation_config.max_new_tokens] if cut else ids + [self.tok.eos_token_id]
            out.append(ids)
            truncated.append(cut)
        return Samples(out, truncated)

    def start(self, prompts):
        self.starts, self.k = [list(p) for p in prompts], [0] * len(prompts)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def tok():
    return char_tokenizer(chat_template=TOOL_TEMPLATE)


def play(tok, turns, tools=(add,), max_turns=4, budget=200, cut=(), factory=None, prompts=("#u:1+2\n#a:",)):
    sampler = Scripted(tok, turns, cut)
    prompt_ids = [ids(tok, p) for p in prompts]
    sampler.start(prompt_ids)
    factory = factory or tool_environment_factory(list(tools), None, 0.5)
    engine = MultiTurnRollouts(factory, tok, max_turns, budget, parse_response=parse)
    rollouts = engine.rollouts(
        sampler, prompt_ids, [{} for _ in prompts], "student", GenerationConfig(max_new_tokens=50)
    )
    return rollouts, sampler


# ------------------------------------------------------------------------------------------------ the transcript
def test_a_hand_written_transcript_and_its_mask(tok):
    """Turn 1 calls add, the tool answers 3, turn 2 answers: the completion is turn 1, the template's tool turn and
    the next assistant header, then turn 2; the mask is 1 exactly on the two turns (EOS included)."""
    rollouts, sampler = play(tok, [["call add a=1 b=2", "3"]])
    turn1, turn2 = ids(tok, "call add a=1 b=2") + [2], ids(tok, "3") + [2]
    glue = ids(tok, "\n#t:3\n#a:")  # after the assistant's EOS: its newline, the tool turn, the next header
    assert rollouts.completion_ids == [turn1 + glue + turn2]
    assert rollouts.tool_mask == [[1] * len(turn1) + [0] * len(glue) + [1] * len(turn2)]
    assert rollouts.truncated == [False]
    assert rollouts.rows[0]["multi_turn"] == {"turns": 2, "reward": 0.0, "malformed": 0, "tool_calls": 1,
                                              "tool_failures": 0}  # fmt: skip
    # the second turn was asked with the whole transcript so far as its prompt
    assert sampler.calls[1] == [ids(tok, "#u:1+2\n#a:") + turn1 + glue]
    # the transcript is the chat template's rendering of the conversation (prefix-preserving)
    whole = tok.apply_chat_template([{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "name": "add", "content": "3"}, {"role": "assistant", "content": "3"}])  # fmt: skip
    assert whole["input_ids"][: len(rollouts.prompt_ids[0]) + len(rollouts.completion_ids[0])] == (
        rollouts.prompt_ids[0] + rollouts.completion_ids[0]
    )


def test_collate_trains_on_the_drawn_tokens_only(tok):
    rollouts, _ = play(tok, [["call add a=1 b=2", "3"], ["7"]], prompts=("#u:1+2\n#a:", "#u:3+4\n#a:"))
    batch = collate(rollouts, pad_id=0)
    mask = [m + [0] * (batch["completion_mask"].shape[1] - len(m)) for m in rollouts.tool_mask]
    assert batch["completion_mask"].tolist() == mask
    assert batch["completion_mask"].sum().item() == 17 + 2 + 2  # "call add a=1 b=2" + EOS, "3" + EOS, "7" + EOS
    real = batch["attention_mask"][:, -batch["completion_ids"].shape[1] :]  # the teacher sees every real token
    assert real.sum(1).tolist() == [len(c) for c in rollouts.completion_ids]


def test_single_turn_rollouts_are_unchanged_by_the_mask_field(tok):
    plain = Rollouts([[5, 6]], [[7, 8, 2]], "student")
    assert collate(plain, 0)["completion_mask"].tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match=re.escape("`tool_mask` must hold one 0/1 flag per completion token, got "
                                                   "completions [0].")):  # fmt: skip
        Rollouts([[5, 6]], [[7, 8, 2]], "student", tool_mask=[[1, 1]])


def test_turns_are_batched_across_rollouts(tok):
    """Two rollouts, one with a tool call: turn 1 is one sampler call for both, turn 2 one call for the open one."""
    _, sampler = play(tok, [["call add a=1 b=2", "3"], ["7"]], prompts=("#u:1+2\n#a:", "#u:3+4\n#a:"))
    assert [len(c) for c in sampler.calls] == [2, 1]


def test_max_turns_ends_the_conversation_after_the_last_student_turn(tok):
    rollouts, _ = play(tok, [["call add a=1 b=2", "call add a=1 b=2", "9"]], max_turns=2)
    assert rollouts.rows[0]["multi_turn"]["turns"] == 2
    assert rollouts.tool_mask[0][-1] == 1  # no environment message after the last turn


def test_max_tool_calling_iterations_as_in_trl(tok):
    factory = tool_environment_factory([add], 1, 0.5)
    rollouts, _ = play(tok, [["call add a=1 b=2", "call add a=3 b=4"]], factory=factory)
    stats = rollouts.rows[0]["multi_turn"]
    assert (stats["turns"], stats["tool_calls"]) == (2, 1)  # the second round of calls is not run


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "turn, tools, expected",
    [
        ("call add a2", [add], "Error: malformed tool call: ValueError: argument without a value in 'add a2'"),
        ("call sub a=1", [add], "Error: unknown tool 'sub'; the tools are: add."),
        ("call boom a=1", [boom], "Error: tool 'boom' raised RuntimeError: no such luck"),
        ("call hang a=1", [hang], "Error: tool 'hang' timed out after 0.5 s."),
        ("call slow a=1", [slow], "Error: tool 'slow' timed out after 0.5 s."),
        ("call double a=4", [double], "8"),
    ],
)  # fmt: skip
def test_a_failed_call_is_answered_and_the_rollout_goes_on(tok, turn, tools, expected):
    started = time.perf_counter()
    rollouts, _ = play(tok, [[turn, "ok"]], tools=tools)
    assert time.perf_counter() - started < 2.5  # a hung tool does not hold the rollout
    # the tool turn holds the error text (characters the tokenizer cannot spell are <unk> on both sides)
    expected_ids = ids(tok, turn) + [2] + ids(tok, f"\n#t:{expected}\n#a:") + ids(tok, "ok") + [2]
    assert rollouts.completion_ids[0] == expected_ids
    stats = rollouts.rows[0]["multi_turn"]
    assert stats["turns"] == 2 and stats["tool_calls"] == 1
    assert stats["tool_failures"] == (0 if expected == "8" else 1)
    assert stats["malformed"] == (1 if "malformed" in expected else 0)


def test_a_conversation_over_the_budget_is_cut_and_flagged(tok):
    # the budget ends inside the second turn: it is cut there, flagged truncated, and nothing follows it
    rollouts, _ = play(tok, [["call add a=1 b=2", "the answer is 3"]], budget=30)
    assert len(rollouts.completion_ids[0]) == 30 and rollouts.truncated == [True]
    # a tool answer that would not leave room for one more student token ends the conversation, flagged
    rollouts, _ = play(tok, [["call add a=1 b=2", "3"]], budget=22)
    assert rollouts.completion_ids[0] == ids(tok, "call add a=1 b=2") + [2] and rollouts.truncated == [True]


def test_the_glue_is_what_the_template_puts_between_turns(tok):
    assert glue_ids(tok, [{"role": "tool", "name": "add", "content": "3"}], {}) == ids(tok, "\n#t:3\n#a:")
    assert glue_ids(tok, [{"role": "user", "content": "more"}], {}) == ids(tok, "\n#u:more\n#a:")


class Counter:
    """An environment that is not a tool: it asks for a number three times and rewards the right ones."""

    def reset(self, row):
        self.n = 0
        return [{"role": "user", "content": f"count from {row['start']}"}]

    def step(self, message):
        self.n += 1
        right = message["content"].strip() == str(self.start_value + self.n)
        return EnvStep([{"role": "user", "content": "next"}], float(right), self.n == 3)


def test_an_environment_opens_the_conversation_and_rewards_it(tok):
    class Env(Counter):
        def reset(self, row):
            self.start_value = row["start"]
            return super().reset(row)

    sampler = Scripted(tok, [["6", "7", "9"]])
    opening = ids(tok, "#u:count from 5\n#a:")  # the template's rendering, written out
    sampler.start([opening])
    engine = MultiTurnRollouts(Env, tok, 5, 200, parse_response=parse)
    rollouts = engine.rollouts(sampler, [[9, 9]], [{"start": 5}], "student", GenerationConfig(max_new_tokens=9))
    assert rollouts.prompt_ids == [opening]  # the environment's opening replaced the row's prompt
    assert rollouts.rows[0]["multi_turn"]["reward"] == 2.0 and rollouts.rows[0]["multi_turn"]["turns"] == 3
    glue = ids(tok, "\n#u:next\n#a:")
    assert rollouts.completion_ids[0] == [*ids(tok, "6"), 2, *glue, *ids(tok, "7"), 2, *glue, *ids(tok, "9"), 2]
    assert torch.tensor(rollouts.tool_mask[0]).sum().item() == 6


# ------------------------------------------------------------------------------------------------ in the trainer
def test_the_trainer_trains_on_the_students_turns_only(tmp_path, tok):
    import tiny_models as tm

    from trl_onpolicy import DistillCallback

    seen = []

    class Keep(DistillCallback):
        def on_rollouts(self, args, state, control, rollouts, **kwargs):
            seen.append(rollouts)

    trainer = tm.OnPolicyDistillTrainer(
        model=tm.model(tok, seed=0), teacher_model=tm.model(tok, seed=1),
        args=tm.config(tmp_path, max_steps=2, max_completion_length=40), environment_factory=tm.ThreeTurns,
        train_dataset=tm.dataset("conversational_prompt_completion").select_columns(["prompt"]),
        processing_class=tok, callbacks=[Keep()],
    )  # fmt: skip
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logs = tm.step_logs(trainer)
    for rollouts, log in zip(seen, logs, strict=True):
        drawn = [sum(m) for m in rollouts.tool_mask]
        assert log["completion_length"] == pytest.approx(sum(drawn) / len(drawn))  # only drawn tokens are counted
        assert any(0 in m for m in rollouts.tool_mask)  # there was context between the turns
        turns = [row["multi_turn"]["turns"] for row in rollouts.rows]
        assert log["multi_turn/turns"] == pytest.approx(sum(turns) / len(turns))
        for row, cut in zip(rollouts.rows, rollouts.truncated):  # 1 per answered turn (a turn cut short: none)
            assert row["multi_turn"]["turns"] - cut <= row["multi_turn"]["reward"] <= row["multi_turn"]["turns"]
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_tools_need_a_template_that_renders_them(tmp_path):
    import tiny_models as tm

    plain = tm.tokenizer()  # "#u:" / "#a:" lines: no tool calls in its template
    with pytest.raises(ValueError) as info:
        tm.OnPolicyDistillTrainer(model=tm.model(plain), teacher_model=tm.model(plain, seed=1),
                                  args=tm.config(tmp_path), train_dataset=tm.dataset(), processing_class=plain,
                                  tools=[add], parse_response=parse)  # fmt: skip
    assert str(info.value) == (
        "`tools` were given, but the tokenizer's chat template cannot render a tool-calling conversation (user -> "
        "assistant with `tool_calls` -> tool). Use a tokenizer whose chat template supports tools (most "
        "instruction-tuned models' do), or set `tokenizer.chat_template` to one that does."
    )


def test_tools_need_a_parser(tmp_path, tok):
    import tiny_models as tm

    with pytest.raises(ValueError, match=re.escape("or pass `parse_response=` (a function from a turn's text")):
        tm.OnPolicyDistillTrainer(model=tm.model(tok), teacher_model=tm.model(tok, seed=1), args=tm.config(tmp_path),
                                  train_dataset=tm.dataset(), processing_class=tok, tools=[add])  # fmt: skip


def test_tools_and_an_environment_together_are_refused(tmp_path, tok):
    import tiny_models as tm

    with pytest.raises(ValueError, match=re.escape("Pass either `tools` or `environment_factory`, not both")):
        tm.OnPolicyDistillTrainer(model=tm.model(tok), teacher_model=tm.model(tok, seed=1), args=tm.config(tmp_path),
                                  train_dataset=tm.dataset(), processing_class=tok, tools=[add],
                                  environment_factory=tm.ThreeTurns)  # fmt: skip


def test_the_prompts_show_the_tools(tmp_path, tok):
    import tiny_models as tm

    schema_template = TOOL_TEMPLATE.replace(
        "{% for m in messages %}",
        "{% for t in tools or [] %}{{ 'tool ' + t['function']['name'] + '\n' }}{% endfor %}{% for m in messages %}",
        1,
    )
    tok.chat_template = schema_template
    trainer = tm.OnPolicyDistillTrainer(
        model=tm.model(tok), teacher_model=tm.model(tok, seed=1), args=tm.config(tmp_path), processing_class=tok,
        train_dataset=tm.dataset("conversational_prompt_completion"), tools=[add], parse_response=parse)  # fmt: skip
    assert tok.decode(trainer.train_dataset[0]["prompt_ids"]).startswith("tool add\n#u:")


def test_a_teacher_cache_is_refused_with_the_reason(tmp_path, tok):
    import tiny_models as tm

    from trl_onpolicy.teachers.cache import TeacherCache
    from trl_onpolicy.teachers.cache_build import build_teacher_cache

    plain = tm.tokenizer()
    build_teacher_cache(tm.model(plain, seed=1), tm.dataset(), plain, str(tmp_path / "cache"), top_k=5,
                        max_prompt_length=56, max_completion_length=8, batch_size=3)  # fmt: skip
    args = tm.config(tmp_path, lmbda=0.0)
    with pytest.raises(ValueError) as info:
        tm.OnPolicyDistillTrainer(model=tm.model(plain), teacher_model=TeacherCache.from_config(tmp_path / "cache",
                                  args, plain), args=args, train_dataset=tm.dataset(), processing_class=plain,
                                  environment_factory=tm.ThreeTurns)  # fmt: skip
    assert str(info.value) == (
        "A teacher cache holds the scores of the dataset's own completions, but with `tools` or `environment_factory` "
        "every rollout is a transcript written during training (the tools' answers too), which no cache can hold. "
        "Use a local or served teacher."
    )


def test_an_environment_that_never_runs_is_refused(tmp_path, tok):
    import tiny_models as tm

    with pytest.raises(ValueError) as info:
        tm.OnPolicyDistillTrainer(model=tm.model(tok), teacher_model=tm.model(tok, seed=1),
                                  args=tm.config(tmp_path, lmbda=0.0), train_dataset=tm.dataset(),
                                  processing_class=tok, environment_factory=tm.ThreeTurns)  # fmt: skip
    assert str(info.value) == (
        "`tools` or `environment_factory` were given, but every completion comes from the dataset (`lmbda=0.0`, "
        "`seq_kd=False`), so no rollout is ever multi-turn. Set `lmbda` > 0 (the student writes) or `seq_kd=True` "
        "(the teacher writes, calling the tools too)."
    )


def _multi_turn_loss(tmp_path, tok, teacher, seed_teacher=True, **overrides):
    import tiny_models as tm

    args = tm.config(tmp_path, max_completion_length=40, teacher_top_k=5, **overrides)
    trainer = tm.OnPolicyDistillTrainer(model=tm.model(tok, seed=0), teacher_model=teacher, args=args,
                                        train_dataset=tm.dataset(), processing_class=tok,
                                        environment_factory=tm.ThreeTurns)  # fmt: skip
    trainer.train()
    return tm.step_logs(trainer)[0]


def test_an_ensemble_scores_the_transcript_as_its_members_mixed(tmp_path, tok):
    """Two identical members mixed 50/50 score what one of them scores: the same loss on the same transcripts."""
    import tiny_models as tm

    one = _multi_turn_loss(tmp_path / "one", tok, tm.model(tok, seed=1))
    two = _multi_turn_loss(tmp_path / "two", tok, {"a": tm.model(tok, seed=1), "b": tm.model(tok, seed=1)},
                           teacher_mixture="weighted", teacher_weights={"a": 0.5, "b": 0.5})  # fmt: skip
    assert one["multi_turn/turns"] > 1 and one["completion_length"] == two["completion_length"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
