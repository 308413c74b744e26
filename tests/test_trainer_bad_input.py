"""Bad input to OnPolicyDistillTrainer / OnPolicyDistillConfig: each gets a clear error (or warning) that names the fix."""

import copy
import logging
import math
import re

import pytest
import torch
from datasets import Dataset

import tiny_models as tm
from trl_onpolicy import DistillCallback, LocalTeacher, OnPolicyDistillConfig


def fragment(text: str) -> str:
    return re.escape(text)


# ------------------------------------------------------------------------------------------ datasets
@pytest.mark.parametrize(
    "data, message",
    [
        ({"question": ["a", "b"], "answer": ["c", "d"]}, "needs a `prompt` column (prompt-only or prompt-completion)"),
        ({"prompt": []}, "The train dataset is empty"),
        ({"text": ["hello world", "abc"]}, "has a `text` column but no `prompt` or `messages` column"),
    ],
    ids=["missing-prompt", "empty", "text-only"],
)
def test_bad_dataset(tmp_path, data, message):
    with pytest.raises(ValueError, match=fragment(message)):
        tm.trainer(tmp_path, train_dataset=Dataset.from_dict(data))


def test_off_policy_batches_need_completions(tmp_path):
    prompts = tm.dataset("prompt_only")
    with pytest.raises(
        ValueError, match=fragment("`lmbda=0.5` makes some batches off-policy, which need completions")
    ):
        tm.trainer(tmp_path, train_dataset=prompts, lmbda=0.5)
    tm.trainer(tmp_path, train_dataset=prompts, lmbda=0.5, seq_kd=True)  # the teacher writes them: fine


# ------------------------------------------------------------------------------------------ config ranges
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"beta": 1.5}, "`beta` must be in [0.0, 1.0] (0 = forward KL, 1 = reverse KL), got 1.5"),
        ({"beta": -0.1}, "`beta` must be in [0.0, 1.0]"),
        ({"lmbda": 1.2}, "`lmbda` must be a probability in [0.0, 1.0], got 1.2"),
        ({"lmbda": -0.5}, "`lmbda` must be a probability in [0.0, 1.0], got -0.5"),
        ({"skew_alpha": 1.0}, "`skew_alpha` must be in [0.0, 1.0), got 1.0"),
        ({"temperature": 0.0}, "`temperature` (sampling) must be > 0, got 0.0"),
        ({"top_p": 0.0}, "`top_p` must be in (0.0, 1.0], got 0.0"),
        ({"top_p": 1.5}, "`top_p` must be in (0.0, 1.0], got 1.5"),
        ({"temperature_start": 0.0}, "Loss temperatures must be > 0, got `temperature_start`=0.0"),
        ({"temperature_end": -1.0}, "`temperature_end`=-1.0"),
        ({"max_length": 8, "max_completion_length": 8}, "`max_length` (8) must exceed `max_completion_length` (8)"),
        ({"max_length": 4, "max_completion_length": 8}, "`max_length` (4) must exceed `max_completion_length` (8)"),
    ],
)
def test_config_out_of_range(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=fragment(message)):
        tm.config(tmp_path, **overrides)


def test_teacher_of_wrong_type(tmp_path):
    message = "A teacher must be a model id or path, a server URL, a teacher-cache folder, a `PreTrainedModel`"
    with pytest.raises(TypeError, match=fragment(message)):
        tm.trainer(tmp_path, teacher=123)


def test_teacher_init_kwargs_with_a_loaded_teacher_are_refused(tmp_path):
    """They only apply to a teacher the trainer loads; with a model object they would silently do nothing."""
    message = (
        "teacher_model_init_kwargs={'dtype': 'bfloat16'} is set, but the teacher was passed as an already loaded "
        "model, so they would be ignored. Either load the teacher with them yourself "
        "(`AutoModelForCausalLM.from_pretrained(path, **kwargs)`) and unset `teacher_model_init_kwargs`, or pass the "
        "teacher's id or path (`teacher_model=` or `teacher_model_name_or_path`) so the trainer loads it with them."
    )
    with pytest.raises(ValueError, match=f"^{fragment(message)}$"):
        tm.trainer(tmp_path, teacher_model_init_kwargs={"dtype": "bfloat16"})
    tm.trainer(tmp_path, teacher_model_init_kwargs={})  # empty: nothing ignored, accepted


# ------------------------------------------------------------------------------------------ vocabularies
def test_vocab_mismatch_names_both_sizes(tmp_path):
    tok = tm.tokenizer()
    teacher = tm.model(tok, vocab_size=40)  # smaller than the tokenizer: another model family
    with pytest.raises(ValueError, match=fragment("the student's output layer has 51 tokens and the teacher's 40")):
        tm.trainer(tmp_path, teacher=teacher, tok=tok)


def test_padded_embeddings_over_one_tokenizer_train(tmp_path):
    """Embeddings padded to 64 and 56 rows over a 51-token tokenizer: compared over the 51 real tokens only."""
    tok = tm.tokenizer()
    student = tm.model(tok, vocab_size=64)
    teacher = copy.deepcopy(student)
    teacher.resize_token_embeddings(56)  # same weights on the first 56 rows, so the same model over the tokenizer
    with torch.no_grad():
        student.lm_head.weight[51:] += 5.0  # padding rows that would dominate if they were compared
    tr = tm.trainer(tmp_path, student, teacher, tok, lmbda=0.0)
    tr.train()
    log = tm.step_logs(tr)[0]
    assert abs(log["divergence"]) < 1e-5, log  # identical over the tokenizer's vocabulary
    assert log["completion_length"] > 0


# ------------------------------------------------------------------------------------------ tokenizer and lengths
def test_no_pad_token_uses_eos_with_warning(tmp_path, caplog):
    tok = tm.tokenizer(pad=False)
    assert tok.pad_token is None
    with caplog.at_level(logging.WARNING, logger="trl_onpolicy"):
        tr = tm.trainer(tmp_path, tok=tok, lmbda=1.0)
    assert "The tokenizer has no pad token: using its eos token" in caplog.text
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id
    tr.train()
    assert math.isfinite(tm.step_logs(tr)[0]["loss"])


def test_long_prompts_are_cut_from_the_left(tmp_path, caplog):
    tok = tm.tokenizer()
    data = Dataset.from_dict({"prompt": ["abcdefghijklmnop", "short"], "completion": [" x", " y"]})
    seen = []

    class Keep(DistillCallback):
        def on_rollouts(self, args, state, control, rollouts, **kwargs):
            seen.extend(zip(rollouts.prompt_ids, (row["prompt"] for row in rollouts.rows)))

    with caplog.at_level(logging.WARNING, logger="trl_onpolicy"):
        tr = tm.trainer(
            tmp_path, tok=tok, train_dataset=data, callbacks=[Keep()], lmbda=0.0, max_length=12,
            max_completion_length=4,
        )  # fmt: skip
    assert "1 of 2 prompts in the train dataset are longer than max_length - max_completion_length = 8" in caplog.text
    tr.train()
    kept = {prompt: ids for ids, prompt in seen}
    assert kept["abcdefghijklmnop"] == tok("ijklmnop")["input_ids"]  # the last 8 tokens
    assert kept["short"] == tok("short")["input_ids"]


def test_filter_that_drops_every_rollout(tmp_path):
    class DropAll(DistillCallback):
        def on_rollouts(self, args, state, control, rollouts, **kwargs):
            return rollouts.select([])

    tr = tm.trainer(tmp_path, callbacks=[DropAll()], lmbda=0.0)
    with pytest.raises(ValueError, match=fragment("Step 1: `on_rollouts` returned no rollouts")):
        tr.train()


# ------------------------------------------------------------------------------------------ non-finite losses
class NaNTeacher(LocalTeacher):
    """A teacher whose scores are all NaN."""

    def score(self, batch, **kwargs):
        scores = super().score(batch, **kwargs)
        scores.hidden = torch.full_like(scores.hidden, float("nan"))
        return scores


def test_nonfinite_loss_skips_the_update(tmp_path):
    tok = tm.tokenizer()
    student = tm.model(tok)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    tr = tm.trainer(tmp_path, student, NaNTeacher(tm.model(tok, seed=1)), tok, max_steps=2, learning_rate=1e-2)
    tr.train()
    assert [h["nonfinite_skipped"] for h in tm.step_logs(tr)] == [1.0, 2.0]
    for name, p in student.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_nonfinite_losses_in_a_row_stop_training(tmp_path):
    tok = tm.tokenizer()
    tr = tm.trainer(tmp_path, teacher=NaNTeacher(tm.model(tok, seed=1)), tok=tok, max_steps=5, max_nonfinite_steps=2)
    with pytest.raises(
        FloatingPointError, match=fragment("Training stopped at step 2: 2 updates in a row had a non-finite loss")
    ):
        tr.train()


def test_adaptive_temperature_needs_a_loss_that_measures_teacher_entropy():
    with pytest.raises(ValueError, match=fragment("which `loss_type='sampled_reverse_kl'` never measures")):
        OnPolicyDistillConfig("out", loss_type="sampled_reverse_kl", loss_temperature_schedule="adaptive",
                              target_teacher_entropy=1.0)  # fmt: skip


def test_an_sft_config_is_converted_with_its_tokens_and_settings(tmp_path, caplog):
    """An SFT script passes its `SFTConfig` unchanged: its settings carry over (not `to_dict`'s masked tokens)."""
    from trl import SFTConfig

    tok = tm.tokenizer()
    sft = SFTConfig(str(tmp_path), max_steps=1, report_to="none", use_cpu=True, max_length=512, learning_rate=3e-4,
                    disable_tqdm=True, eos_token=tok.eos_token, dataset_text_field="body")  # fmt: skip
    from trl_onpolicy import OnPolicyDistillTrainer

    tr = OnPolicyDistillTrainer(tm.model(tok), teacher_model=tm.model(tok, seed=1), args=sft,
                                train_dataset=tm.dataset(), processing_class=tok)  # fmt: skip
    assert isinstance(tr.args, OnPolicyDistillConfig)
    assert (tr.args.learning_rate, tr.args.max_length, tr.args.loss_type) == (3e-4, 512, "jsd")
    tr.train()
    assert tr.state.global_step == 1 and math.isfinite(tr.state.log_history[-1]["train_loss"])
