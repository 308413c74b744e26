"""Task rewards beside distillation (`reward_funcs`): GRPO's signature and group advantage, the policy-gradient term
against its definition (value and gradient), the trainer's wiring and metrics, reward models, and every refusal."""

import math
import re

import pytest
import tiny_models as tm
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from trl_onpolicy import OnPolicyDistillTrainer
from trl_onpolicy import divergences as D
from trl_onpolicy.loss import distillation_loss
from trl_onpolicy.rewards import Rewards, group_advantages
from trl_onpolicy.rollouts import Rollouts
from trl_onpolicy.teachers import TeacherScores


# ------------------------------------------------------------------------------------------ group advantages
def test_group_advantages_by_the_definition():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 5.0])
    groups = ["a", "a", "b", "b", "b", "c"]
    got = group_advantages(rewards, groups)
    for key in "ab":
        index = [i for i, g in enumerate(groups) if g == key]
        r = [rewards[i].item() for i in index]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))  # unbiased, as GRPO's
        for i in index:
            assert got[i].item() == pytest.approx((rewards[i].item() - mean) / (std + 1e-4), rel=1e-6)
    assert got[5] == 0.0  # a group of one
    assert group_advantages(torch.tensor([2.0, 2.0]), [0, 0]).tolist() == [0.0, 0.0]  # equal rewards: no signal


# ------------------------------------------------------------------------------------------ the reward functions
def rollouts(tok, rows=None):
    prompts = [tok(p)["input_ids"] for p in ("1+2=", "1+2=", "say hi", "say hi")]
    completions = [tok(c)["input_ids"] + [tok.eos_token_id] for c in (" 3", " 4", " hi", " yo")]
    rows = rows or [{"prompt": p, "answer": a} for p, a in zip(["1+2=", "1+2=", "say hi", "say hi"], "33xx")]
    return Rollouts(prompts, completions, "student", rows=rows)


def test_reward_functions_get_grpos_arguments_and_none_is_left_out():
    tok = tm.tokenizer()
    seen = {}

    def exact(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer)
        return [float(c.strip() == a) if a != "x" else None for c, a in zip(completions, answer)]

    def length(completions, **kwargs):
        return [len(c) for c in completions]

    r = rollouts(tok)
    scores = Rewards([exact, length], [2.0, 0.5], 1.0, tok).score(r)
    assert seen["prompts"] == ["1+2=", "1+2=", "say hi", "say hi"] and seen["answer"] == list("33xx")
    assert seen["completions"] == [" 3", " 4", " hi", " yo"] and seen["completion_ids"] == r.completion_ids
    assert scores[:2].tolist() == [[1.0, 2.0], [0.0, 2.0]] and torch.isnan(scores[2:, 0]).all()


def test_conversational_prompts_get_message_completions():
    tok = tm.tokenizer()
    messages = [{"role": "user", "content": "1+2="}]
    got = []
    reward = lambda prompts, completions, **kw: got.append((prompts, completions)) or [0.0] * len(completions)
    Rewards([reward], None, 1.0, tok).score(rollouts(tok, rows=[{"prompt": messages}] * 4))
    assert got[0][0][0] == messages and got[0][1][0] == [{"role": "assistant", "content": " 3"}]


def test_attach_puts_the_weighted_group_advantage_on_every_completion_token_and_logs_the_rewards():
    tok = tm.tokenizer()
    r = rollouts(tok)
    from trl_onpolicy.step_batch import StepBatch

    batch = StepBatch.collate(r, tok.pad_token_id)
    reward = lambda completions, **kw: [float(len(c)) for c in completions]
    exact = lambda completions, answer, **kw: [float(c.strip() == a) for c, a in zip(completions, answer)]
    metrics = {}
    rewards = Rewards([reward, exact], [0.0, 1.0], 0.5, tok)
    accelerator = type("A", (), {"device": "cpu", "reduce": staticmethod(lambda t, reduction: t)})()
    rewards.attach(batch, r, _DefaultDict(metrics), accelerator)
    expected = 0.5 * group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), [0, 0, 1, 1])  # (B,)
    lengths = batch.completion_mask.sum(1)
    for i in range(4):
        assert torch.equal(batch.advantages[i, : lengths[i]], torch.full((int(lengths[i]),), expected[i].item()))
        assert (batch.advantages[i, lengths[i] :] == 0).all()
    assert metrics["rewards/<lambda>/mean"][0] == pytest.approx(2.5) and metrics["reward"] == [pytest.approx(0.25)]
    assert metrics["reward_std"][0] == pytest.approx(0.5)  # unbiased std of 1, 0, 0, 0
    batch.advantages = None
    Rewards([reward], None, 1.0, tok).attach(batch, Rollouts(r.prompt_ids, r.completion_ids, "dataset"), {}, None)
    assert batch.advantages is None  # a policy gradient needs the student's own samples


class _DefaultDict(dict):
    def __init__(self, target):
        self.target = target

    def __getitem__(self, key):
        return self.target.setdefault(key, [])


def test_a_reward_model_scores_prompt_and_completion():
    tok = tm.tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id))  # fmt: skip
    scores = Rewards([model], None, 1.0, tok).score(rollouts(tok))[:, 0]
    for i, text in enumerate(["1+2= 3", "1+2= 4", "say hi hi", "say hi yo"]):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        assert scores[i].item() == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)


@pytest.mark.parametrize(
    ("funcs", "message"),
    [
        ([lambda completions, **kw: [1.0]], "The reward function <lambda> returned 1 values for 4 completions"),
        ([lambda completions, **kw: ["a"] * 4], "The reward function <lambda> returned a value that is not a number"),
        ([lambda completions, **kw: None], "The reward function <lambda> returned None for 4 completions"),
    ],
)
def test_bad_reward_values_are_refused(funcs, message):
    tok = tm.tokenizer()
    with pytest.raises(ValueError, match=re.escape(message)):
        Rewards(funcs, None, 1.0, tok).score(rollouts(tok))


def test_a_reward_function_that_raises_is_named_with_the_completion_it_raised_on():
    tok = tm.tokenizer()

    def picky(completions, **kwargs):
        return [1.0 / (c != " hi") for c in completions]  # ZeroDivisionError on " hi" (completion 2)

    with pytest.raises(ValueError, match=re.escape("The reward function picky raised ZeroDivisionError: float division "
                                                   "by zero on completion 2 (prompt 'say hi')")):  # fmt: skip
        Rewards([picky], None, 1.0, tok).score(rollouts(tok))


def test_nan_rewards_count_as_none_with_a_warning_and_inf_is_refused(caplog):
    tok = tm.tokenizer()
    nan = lambda completions, **kw: [float("nan"), 1.0, 2.0, 3.0]
    with caplog.at_level("WARNING"):
        scores = Rewards([nan], None, 1.0, tok).score(rollouts(tok))
    assert torch.isnan(scores[0, 0]) and scores[1:, 0].tolist() == [1.0, 2.0, 3.0]
    assert "returned NaN for 1 of 4 completions (first: 0); they count as None" in caplog.text
    inf = lambda completions, **kw: [1.0, float("inf"), 2.0, 3.0]
    with pytest.raises(ValueError, match=re.escape("returned an infinite reward for completion 1")):
        Rewards([inf], None, 1.0, tok).score(rollouts(tok))


def test_bad_reward_functions_are_refused():
    tok = tm.tokenizer()
    with pytest.raises(TypeError, match=re.escape("Each of `reward_funcs` must be a callable")):
        Rewards([3], None, 1.0, tok)
    with pytest.raises(TypeError, match=re.escape("must accept `prompts`, `completions` and `**kwargs`")):
        Rewards([lambda completions: [0.0]], None, 1.0, tok)


# ------------------------------------------------------------------------------------------ the loss
def test_policy_gradient_value_and_gradient():
    logits = torch.randn(5, 7, requires_grad=True)
    targets = torch.tensor([0, 3, 6, 2, 2])
    advantages = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    log_q = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    loss = D.policy_gradient(log_q, advantages)
    assert torch.allclose(loss, -advantages)  # the value: -A (ratio 1 on fresh rollouts)
    loss.sum().backward()
    naive = logits.detach().clone().requires_grad_()  # REINFORCE: the gradient of -A log q(y)
    (-(advantages * torch.log_softmax(naive, -1).gather(-1, targets[:, None]).squeeze(-1))).sum().backward()
    torch.testing.assert_close(logits.grad, naive.grad)


@pytest.mark.parametrize("loss_type", ["jsd", "forward_kl", "sampled_reverse_kl"])
def test_distillation_loss_with_advantages_is_divergence_plus_policy_gradient(loss_type):
    torch.manual_seed(0)
    n, h, v = 6, 4, 9
    hidden = torch.randn(n, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    teacher_logits = torch.randn(n, v)
    targets = torch.randint(0, v, (n,))
    advantages = torch.randn(n)
    teacher = TeacherScores(1.0, hidden=teacher_logits, head=torch.nn.Identity().forward)
    kw = {"loss_type": loss_type, "vocab_size": v, "num_items": n, "head_params": list(head.parameters())}
    sums = distillation_loss(hidden, head, teacher, targets, advantages=advantages, **kw)
    sums.loss.backward()
    got_hidden, got_w = hidden.grad.clone(), head.weight.grad.clone()
    # naive reference: per-token divergence from the definition plus -A * log q(y), averaged over the N tokens
    hidden.grad = head.weight.grad = None
    s_logps = torch.log_softmax(head(hidden), -1)
    t_logps = torch.log_softmax(teacher_logits, -1)
    s_tok, t_tok = s_logps.gather(-1, targets[:, None]).squeeze(-1), t_logps.gather(-1, targets[:, None]).squeeze(-1)
    if loss_type == "sampled_reverse_kl":
        divergence = -(t_tok - s_tok.detach()) * torch.exp(s_tok - s_tok.detach())
    elif loss_type == "forward_kl":
        divergence = (t_logps.exp() * (t_logps - s_logps)).sum(-1)
    else:
        mix = torch.logsumexp(torch.stack([s_logps + math.log(0.5), t_logps + math.log(0.5)]), 0)
        divergence = 0.5 * (t_logps.exp() * (t_logps - mix)).sum(-1) + 0.5 * (s_logps.exp() * (s_logps - mix)).sum(-1)
    naive = (divergence - advantages * torch.exp(s_tok - s_tok.detach())).sum() / n
    naive.backward()
    assert sums.loss.item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(got_hidden, hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_w, head.weight.grad, rtol=1e-4, atol=1e-6)
    assert sums.divergence.item() == pytest.approx(divergence.sum().item(), rel=1e-5)  # the metric: no reward term


# ------------------------------------------------------------------------------------------ the trainer
def trainer(output_dir, reward_funcs=None, **overrides):
    tok = tm.tokenizer()
    return OnPolicyDistillTrainer(tm.model(tok, seed=0), teacher_model=tm.model(tok, seed=1),
                                  args=tm.config(output_dir, **overrides), train_dataset=tm.dataset(),
                                  processing_class=tok, reward_funcs=reward_funcs)  # fmt: skip


def test_trainer_logs_rewards_and_a_constant_reward_changes_nothing(tmp_path):
    def train(name, reward_funcs):
        run = trainer(tmp_path / name, reward_funcs, num_generations=2, optim="sgd", learning_rate=0.5)  # no Adam: it
        # would blow float rounding in near-zero gradients up to the learning rate
        run.train()
        return tm.step_logs(run)[0], {n: p.detach().clone() for n, p in run.model.named_parameters()}

    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    def first_char(completions, **kwargs):  # differs within groups (the lengths may not: a random model writes 8)
        return [float(ord(c[0])) if c else 0.0 for c in completions]

    plain, plain_weights = train("plain", None)
    same, same_weights = train("constant", constant)
    assert same["reward"] == 1.0 and same["reward_std"] == 0.0 and same["rewards/constant/mean"] == 1.0
    # equal up to float rounding (with a reward term the loss is projected to the whole vocabulary, not tiled)
    assert same["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for name, w in plain_weights.items():
        torch.testing.assert_close(same_weights[name], w, rtol=0, atol=1e-6)
    moved, moved_weights = train("first_char", [first_char])
    assert moved["reward_std"] > 0 and moved["divergence"] == pytest.approx(plain["divergence"], rel=1e-5)
    assert any(not torch.allclose(moved_weights[n], w) for n, w in plain_weights.items())


@pytest.mark.parametrize(
    ("overrides", "funcs", "message"),
    [
        ({}, [lambda completions, **kw: [0.0] * len(completions)],
         ("`reward_funcs` need a group of completions per prompt to compare (GRPO's group advantage), but "
          "`num_generations=1`.")),
        ({"num_generations": 2, "reward_weights": [1.0, 2.0]}, [lambda completions, **kw: [0.0]],
         "`reward_weights` has 2 weights for 1 reward functions"),
        ({"reward_weights": [1.0]}, None, "`reward_weights` is set but the trainer was given no `reward_funcs`"),
    ],
)  # fmt: skip
def test_bad_reward_settings_are_refused(tmp_path, overrides, funcs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer(tmp_path, funcs, **overrides)


def test_negative_reward_weight_is_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape("`reward_weight` must be >= 0, got -1.0.")):
        tm.config(tmp_path, reward_weight=-1.0)
