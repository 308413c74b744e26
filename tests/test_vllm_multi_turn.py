"""Multi-turn rollouts sampled by vLLM (`use_vllm=True` with an environment): the same `Sampler` interface as the
transformers path, driven once per turn.

A stand-in engine (`test_vllm_rollouts.FakeVLLMGeneration`) writes a known turn, so the prompts it is sent on every turn
and the transcript it produces can be pinned against the chat template's rendering of the conversation (a template
whose assistant turns end with EOS, as the student's do): one weight sync per
optimizer step however many turns, every open conversation of the step in each call, vLLM's log-probs kept on the
drawn tokens and NaN on the environment's, and the loss over the drawn tokens only.
"""

import math

import tiny_models as tm
import torch
from test_multi_turn import TOOL_TEMPLATE
from test_trainer import Recorder
from test_vllm_rollouts import FakeVLLMGeneration, engine_class  # noqa: F401 (a fixture)

from trl_onpolicy.multi_turn import glue_ids
from trl_onpolicy.prompts import chat_ids
from trl_onpolicy.toy import char_tokenizer


class ShortTurns(FakeVLLMGeneration):
    """Every turn is "ab" and EOS; vLLM's log-prob of each token is -0.5."""

    def completion(self, i, eos, limit):
        return [self.kwargs["processing_class"].convert_tokens_to_ids(c) for c in "ab"] + [eos]

    def logps(self, prompt, completion):
        return [-0.5] * len(completion)


def multi_turn_trainer(tmp_path, tok, data, recorder, **overrides):
    """The trainer on tiny models with vLLM sampling and `tiny_models.ThreeTurns` answering every turn."""
    args = tm.config(tmp_path, use_vllm=True, lmbda=1.0, max_length=128, **overrides)
    return tm.OnPolicyDistillTrainer(model=tm.model(tok, seed=0), teacher_model=tm.model(tok, seed=1), args=args,
                                     train_dataset=data, processing_class=tok, callbacks=[recorder],
                                     environment_factory=tm.ThreeTurns)  # fmt: skip


def test_vllm_writes_every_turn_of_every_conversation_and_the_transcript_is_the_templates(tmp_path, engine_class):  # noqa: F811
    engine_class(ShortTurns)
    recorder, tok = Recorder(), char_tokenizer(chat_template=TOOL_TEMPLATE)
    data = tm.dataset("conversational_prompt_completion", n=4).select_columns(["prompt"])
    trainer = multi_turn_trainer(tmp_path, tok, data, recorder, max_steps=2, gradient_accumulation_steps=2,
                                 max_completion_length=60)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    (engine,) = ShortTurns.instances
    assert engine.syncs == 2  # one per optimizer step, not one per turn
    assert [len(p) for p in engine.prompts] == [4] * 6  # 3 turns a step, each over the step's 4 conversations

    turn = [tok.convert_tokens_to_ids(c) for c in "ab"] + [tok.eos_token_id]
    glue = glue_ids(tok, [{"role": "user", "content": "go on"}], {})
    for step, rollouts in enumerate(recorder.rollouts):
        assert rollouts.completion_ids == [turn + glue + turn + glue + turn] * 4
        assert rollouts.tool_mask == [[1] * 3 + [0] * len(glue) + [1] * 3 + [0] * len(glue) + [1] * 3] * 4
        for logps, mask in zip(rollouts.sampling_logps, rollouts.tool_mask):
            assert [v if m else math.isnan(v) for v, m in zip(logps, mask)] == [-0.5 if m else True for m in mask]
        for k in range(3):  # turn k's prompt is the conversation so far, rendered by the chat template
            conversation = [[*row["prompt"]] for row in rollouts.rows]
            for messages in conversation:
                for _ in range(k):
                    messages += [{"role": "assistant", "content": "ab"}, {"role": "user", "content": "go on"}]
            expected = [chat_ids(tok, m, "test", add_generation_prompt=True) for m in conversation]
            assert engine.prompts[3 * step + k] == expected
        assert [p + c for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)] == [chat_ids(
            tok, m + [{"role": "assistant", "content": "ab"}], "test")[:-1] for m in conversation]  # no final newline
    log = tm.step_logs(trainer)[0]
    assert log["completion_length"] == 9 and log["multi_turn/turns"] == 3  # drawn tokens only
    assert math.isfinite(log["loss"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_turn_longer_than_the_budget_left_is_cut_and_flagged(tmp_path, engine_class):  # noqa: F811
    """vLLM writes up to `max_completion_length` on every turn (its limit is fixed when the engine is built); the turn
    that passes the rollout's remaining budget is cut there, and the rollout flagged truncated."""
    engine_class()  # "ab..." then EOS and junk for even rows; `max_completion_length` tokens of one id for odd rows
    recorder, tok = Recorder(), char_tokenizer(chat_template=TOOL_TEMPLATE)
    data = tm.dataset("conversational_prompt_completion", n=2).select_columns(["prompt"])
    multi_turn_trainer(tmp_path, tok, data, recorder, max_completion_length=60).train()
    (rollouts,) = recorder.rollouts
    assert [len(c) for c in rollouts.completion_ids] == [35, 60] and rollouts.truncated == [False, True]
    assert rollouts.rows[1]["multi_turn"]["turns"] == 1 and rollouts.rows[0]["multi_turn"]["turns"] == 3

