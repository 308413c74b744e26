"""`use_vllm=True`: the wiring to TRL's `VLLMGeneration` (vLLM itself needs CUDA and is not installed in CI).

A stand-in engine with `VLLMGeneration`'s interface records how the trainer drives it: what it is built with (sampling
fields, EOS ids, stop strings, `max_num_seqs`), one weight sync per optimizer step (not per micro-batch), and that its
completions are what the teacher scores. Its `generate` returns log-probs the way the real one does with `logprobs=0`
(`(B, len, 1)` lists of values and of token ids, None where vLLM had NaN), which the truncated importance-sampling
correction uses: pinned here end to end against a reference written by hand from the definition.
"""

import copy
import logging
import math
import os
import re
import types

import pytest
import tiny_models as tm
import torch
from test_trainer import Recorder

from trl_onpolicy import DistillCallback, OnPolicyDistillConfig, vllm_rollouts
from trl_onpolicy.rollouts import build_generation_config, sample


class FakeVLLMGeneration:
    """`VLLMGeneration`'s interface. `completion(i, eos, limit)` writes completion `i` of a call (default: alternately
    one that stops with EOS, followed by junk vLLM would not send, and one that runs to the limit); `logps(prompt,
    completion)` gives vLLM's log-prob of each token (default: -1.0 each)."""

    instances = []
    server_logprobs_mode = "processed_logprobs"

    def __init__(self, **kwargs):
        self.kwargs, self.syncs, self.prompts, self.returned_logps = kwargs, 0, [], []
        self.vllm_client = types.SimpleNamespace(
            get_server_info=lambda: {"model_config": {"logprobs_mode": self.server_logprobs_mode}}
        )
        FakeVLLMGeneration.instances.append(self)

    def completion(self, i, eos, limit):
        return [10, 11, eos, 12] if i % 2 == 0 else [13] * limit

    def logps(self, prompt, completion):
        return [-1.0] * len(completion)

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        self.prompts.append(prompts)
        eos, limit = self.kwargs["processing_class"].eos_token_id, self.kwargs["max_completion_length"]
        completions = [self.completion(i, eos, limit) for i in range(len(prompts))]
        logps = [self.logps(p, c) for p, c in zip(prompts, completions)]
        self.returned_logps.append(logps)
        values = [[[None if math.isnan(v) else v] for v in row] for row in logps]  # (B, len, 1), as extract_logprobs
        ids = [[[t] for t in c] for c in completions]  # (B, len, 1) the sampled token at each position
        return prompts, completions, values, ids


@pytest.fixture
def engine_class(monkeypatch):
    """Install a stand-in engine class (a subclass of `FakeVLLMGeneration` given to the returned function)."""
    FakeVLLMGeneration.instances.clear()

    def install(cls=FakeVLLMGeneration):
        monkeypatch.setattr(vllm_rollouts, "vllm_generation_class", lambda: cls)
        return cls

    install()
    return install


def stub_trainer(tmp_path, **overrides):
    """What `VLLMSampler` reads from a trainer, without building one."""
    tok = tm.tokenizer()
    args = tm.config(tmp_path, use_vllm=True, **overrides)
    student = tm.model(tok)
    return types.SimpleNamespace(
        args=args, model=student, processing_class=tok, state=types.SimpleNamespace(global_step=0),
        accelerator=types.SimpleNamespace(is_main_process=True),
        generation_config=build_generation_config(args, tok, model=student),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ wiring
def test_vllm_engine_is_built_synced_once_per_step_and_its_completions_are_scored(tmp_path, engine_class):
    recorder = Recorder()
    tr = tm.trainer(tmp_path, callbacks=[recorder], use_vllm=True, vllm_mode="server", lmbda=1.0, max_steps=2,
                    per_device_train_batch_size=2, gradient_accumulation_steps=2, stop_strings=["\n"],
                    temperature=0.7, vllm_server_base_url="http://vllm:8000")  # fmt: skip
    (engine,) = FakeVLLMGeneration.instances
    assert engine.kwargs["mode"] == "server" and engine.kwargs["server_base_url"] == "http://vllm:8000"
    assert engine.kwargs["temperature"] == 0.7 and engine.kwargs["max_completion_length"] == 8
    assert engine.kwargs["logprobs"] == 0  # the sampled token's log-prob, as TRL's GRPO asks
    eos = tr.processing_class.eos_token_id
    assert engine.kwargs["generation_kwargs"] == {"stop": ["\n"], "include_stop_str_in_output": True,
                                                  "stop_token_ids": [eos]}  # fmt: skip
    tr.train()
    assert engine.syncs == 2  # one per optimizer step, with 2 micro-batches each
    assert [len(p) for p in engine.prompts] == [4, 4]  # the whole step's prompts in one call
    for rollouts in recorder.rollouts:
        assert rollouts.source == "student"
        assert rollouts.completion_ids == [[10, 11, eos], [13] * 8] * 2
        assert rollouts.truncated == [False, True] * 2
        assert rollouts.sampling_logps == [[-1.0] * 3, [-1.0] * 8] * 2  # cut with the completions
    assert tm.step_logs(tr)[0]["truncated_fraction"] == 0.5


def test_missing_vllm_names_the_extra(tmp_path):
    pytest.importorskip("trl")
    from trl.import_utils import is_vllm_available

    if is_vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match=re.escape("pip install 'trl-onpolicy[vllm]'")):
        tm.trainer(tmp_path, use_vllm=True)


# ------------------------------------------------------------------------------------------ sampling fields
def test_generation_kwargs_never_reach_vllm_and_vllm_generation_kwargs_do(tmp_path, engine_class):
    vllm_kwargs = {"seed": 7, "presence_penalty": 0.5, "include_stop_str_in_output": False}
    tr = tm.trainer(tmp_path, use_vllm=True, generation_kwargs={"no_repeat_ngram_size": 3, "do_sample": True},
                    vllm_generation_kwargs=vllm_kwargs)  # fmt: skip
    (engine,) = FakeVLLMGeneration.instances
    sent = engine.kwargs["generation_kwargs"]  # what VLLMGeneration passes on to SamplingParams
    assert sent == {"seed": 7, "presence_penalty": 0.5, "include_stop_str_in_output": False,
                    "stop_token_ids": [tr.processing_class.eos_token_id]}  # fmt: skip
    assert tr.generation_config.no_repeat_ngram_size == 3  # transformers generation still gets its own


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"do_sample": False}, ("`vllm_generation_kwargs` takes vLLM `SamplingParams` fields, and `do_sample` is a "
         "transformers `GenerationConfig` field (for vLLM: none needed: vLLM always samples, `temperature=0` is "
         "greedy). Put transformers fields in `generation_kwargs`.")),
        ({"seed": 1, "max_new_tokens": 4}, ("`vllm_generation_kwargs` takes vLLM `SamplingParams` fields, and "
         "`max_new_tokens` is a transformers `GenerationConfig` field (for vLLM: `max_completion_length`). Put "
         "transformers fields in `generation_kwargs`.")),
        ({"suppress_tokens": [3]}, ("`vllm_generation_kwargs` takes vLLM `SamplingParams` fields, and "
         "`suppress_tokens` is a transformers `GenerationConfig` field. Put transformers fields in "
         "`generation_kwargs`.")),
        ({"n": 4}, "`vllm_generation_kwargs` cannot set `n`: it comes from `num_generations`."),
        ({"logprobs": 5}, ("`vllm_generation_kwargs` cannot set `logprobs`: it comes from the trainer (the sampled "
         "token's log-prob, for the importance-sampling correction).")),
        (["seed"], "`vllm_generation_kwargs` must be a dict of vLLM `SamplingParams` fields, got list."),
    ],
)  # fmt: skip
def test_vllm_generation_kwargs_refuses_transformers_fields(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OnPolicyDistillConfig(output_dir=str(tmp_path), use_vllm=True, vllm_generation_kwargs=kwargs)


def test_sampling_dicts_parse_from_json_and_generation_kwargs_alone_warn_under_vllm(tmp_path, caplog):
    args = OnPolicyDistillConfig(output_dir=str(tmp_path), generation_kwargs='{"no_repeat_ngram_size": 2}',
                                 vllm_generation_kwargs='{"seed": 3}')  # fmt: skip
    assert args.generation_kwargs == {"no_repeat_ngram_size": 2} and args.vllm_generation_kwargs == {"seed": 3}
    with caplog.at_level(logging.WARNING, logger="trl_onpolicy.config"):
        OnPolicyDistillConfig(output_dir=str(tmp_path), use_vllm=True, generation_kwargs={"seed": 3})
    assert "vLLM's rollouts take `vllm_generation_kwargs`" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_onpolicy.config"):
        OnPolicyDistillConfig(output_dir=str(tmp_path), generation_kwargs={"seed": 3})  # no vLLM: nothing to say
    assert caplog.text == ""


def test_clip_max_below_one_is_refused(tmp_path):
    message = ("`vllm_importance_sampling_clip_max` must be >= 1.0 or None (no cap), got 0.5: a cap below 1 would "
               "down-weight the tokens vLLM and the student agree on.")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        OnPolicyDistillConfig(output_dir=str(tmp_path), vllm_importance_sampling_clip_max=0.5)


def test_max_num_seqs_counts_the_tensor_parallel_group(tmp_path, engine_class):
    from trl_onpolicy.vllm_rollouts import VLLMSampler

    trainer = stub_trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=3, num_generations=2,
                           vllm_tensor_parallel_size=2)  # fmt: skip
    VLLMSampler(trainer)
    # 2 rows x 3 micro-batches x 2 generations on this process, x 2 ranks whose prompts the TP group gathers
    assert FakeVLLMGeneration.instances[-1].kwargs["max_num_seqs"] == 24


# ------------------------------------------------------------------------------------------ EOS ids, stop strings
def test_completions_stop_at_any_of_the_models_eos_ids_on_both_paths(tmp_path, engine_class):
    """Generation config with EOS ids [2, 5] (the tokenizer's is 2): both engines stop at 5 and the cut agrees."""
    from trl_onpolicy.vllm_rollouts import VLLMSampler

    trainer = stub_trainer(tmp_path)
    student, tok = trainer.model, trainer.processing_class
    student.generation_config.eos_token_id = [tok.eos_token_id, 5]
    trainer.generation_config = build_generation_config(trainer.args, tok, model=student)
    assert trainer.generation_config.eos_token_id == [tok.eos_token_id, 5]

    class StopsAtFive(FakeVLLMGeneration):
        def completion(self, i, eos, limit):
            return [10, 5, 11] if i == 0 else [13] * (limit - 1) + [5]  # the last one stops exactly at the limit

    engine_class(StopsAtFive)
    sampler = VLLMSampler(trainer)
    assert sampler.engine.kwargs["generation_kwargs"]["stop_token_ids"] == [tok.eos_token_id, 5]
    completions, truncated, logps = sampler.sample([[20, 21], [22]], trainer.generation_config, tok)
    assert completions == [[10, 5], [13] * 7 + [5]] and truncated == [False, False]
    assert logps == [[-1.0] * 2, [-1.0] * 8]

    # transformers: a student that can only write token 5 stops after it (it ran 8 tokens when only 2 was EOS)
    args = tm.config(tmp_path, generation_kwargs={"suppress_tokens": [t for t in range(len(tok)) if t != 5]})
    config = build_generation_config(args, tok, model=student)
    assert sample(student, [[20, 21]], config, tok) == ([[5]], [False])
    config.eos_token_id = tok.eos_token_id  # what it was before: the tokenizer's alone
    assert sample(student, [[20, 21]], config, tok) == ([[5] * 8], [True])


def test_a_stop_string_ends_a_vllm_completion_as_on_the_transformers_path(tmp_path, engine_class):
    from trl_onpolicy.vllm_rollouts import VLLMSampler

    trainer = stub_trainer(tmp_path, stop_strings=["\n"])
    tok = trainer.processing_class
    newline = tok.convert_tokens_to_ids("\n")

    class StopsAtNewline(FakeVLLMGeneration):
        def completion(self, i, eos, limit):  # vLLM stops after the stop string; exactly at the limit for row 0
            return [13] * (limit - 1) + [newline] if i == 0 else [10, newline] if i == 1 else [13] * limit

    engine_class(StopsAtNewline)
    sampler = VLLMSampler(trainer)
    sent = sampler.engine.kwargs["generation_kwargs"]
    assert sent["stop"] == ["\n"] and sent["include_stop_str_in_output"] is True  # the text keeps it too
    completions, truncated, _ = sampler.sample([[20], [21], [22]], trainer.generation_config, tok)
    assert completions == [[13] * 7 + [newline], [10, newline], [13] * 8]  # the stop string is kept
    assert truncated == [False, False, True]  # stopped at the limit by the stop string: not truncated


# ------------------------------------------------------------------------------------------ importance sampling
OFFSETS = [0.4, -1.6, 0.1, -0.7, 1.2]  # vLLM's log-prob minus the student's, cycled over positions


def student_logps(model, prompt, completion) -> list[float]:
    """The student's log-prob of each completion token, one unpadded sequence, float64."""
    ids = torch.tensor([prompt + completion])
    positions = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, positions].double(), -1)  # (C, V)
    return logps.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


class OffByKnownAmounts(FakeVLLMGeneration):
    """vLLM's log-probs = the student's (at the synced weights) + OFFSETS; NaN (vLLM's None) at position 1 of every
    second completion."""

    def logps(self, prompt, completion):
        own = student_logps(self.kwargs["model"], prompt, completion)
        out = [v + OFFSETS[t % len(OFFSETS)] for t, v in enumerate(own)]
        return [math.nan if (t == 1 and len(completion) > 4) else v for t, v in enumerate(out)]


class ShortThenLong(OffByKnownAmounts):
    """The first two completions of a call stop early, the others run to the limit: with two micro-batches of two,
    the first is trimmed to its own (shorter) length."""

    def completion(self, i, eos, limit):
        return [10, 11, eos, 12] if i < 2 else [13] * limit


class Snapshots(DistillCallback):
    """The student's weights before each step, its gradients right before each optimizer step, and the rollouts."""

    def __init__(self):
        self.weights, self.grads, self.rollouts = [], [], []

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        self.rollouts.append(copy.deepcopy(rollouts))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append({name: value.detach().clone() for name, value in model.state_dict().items()})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})


def naive_token_logps(model, rollouts, grad=True) -> torch.Tensor:
    """`(N,)` log-probs of the completion tokens, one unpadded sequence at a time, float64."""
    out = []
    for prompt, completion in zip(rollouts.prompt_ids, rollouts.completion_ids):
        ids = torch.tensor([prompt + completion])
        positions = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
        with torch.set_grad_enabled(grad):
            logps = torch.log_softmax(model(ids).logits[0, positions].double(), -1)  # (C, V)
        out.append(logps.gather(-1, torch.tensor(completion)[:, None])[:, 0])  # (C,)
    return torch.cat(out)


def vllm_run(tmp_path, callbacks=(), **overrides):
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0), tm.model(tok, seed=1, layers=2, hidden=32)
    with torch.no_grad():  # a peaked teacher: per-token terms of O(1)
        teacher.lm_head.weight.mul_(30.0)
    values = {"use_vllm": True, "lmbda": 1.0, "loss_type": "sampled_reverse_kl", "per_device_train_batch_size": 4,
              "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0}  # fmt: skip
    values.update(overrides)
    return tm.trainer(tmp_path, student, teacher, tok, callbacks=list(callbacks), **values), student, teacher, tok


def test_tis_weight_and_its_composition_with_reuse_equal_the_hand_written_reference(tmp_path, engine_class):
    """Step 1 (fresh): loss = sum_t w_t (log q_t - log p_t) / N, w_t = min(q_t / mu_t, 3); gradient
    sum_t w_t (log q_t - log p_t) grad log q_t / N. Step 2 reuses the batch: w_t = min(q0_t / mu_t, 3) times the ratio
    q_t / q0_t, q0 the student that sampled (vLLM synced from it). mu = q0 * exp(OFFSETS): some clipped, some NaN.
    Two micro-batches, the first trimmed to its shorter completions."""
    engine_class(ShortThenLong)
    snapshots = Snapshots()
    # lr 0.1: the student moves (reuse ratios 0.02 to 21), but not so far that float32 round-off is amplified
    tr, _, teacher, tok = vllm_run(tmp_path, [snapshots], num_iterations=2, max_steps=2, learning_rate=0.1,
                                   per_device_train_batch_size=2, gradient_accumulation_steps=2)  # fmt: skip
    tr.train()
    (engine,) = FakeVLLMGeneration.instances
    assert len(snapshots.rollouts) == 1 and engine.syncs == 1  # step 2 reuses step 1's vLLM rollouts
    rollouts = snapshots.rollouts[0]
    mu = torch.tensor([v for row in rollouts.sampling_logps for v in row], dtype=torch.float64)  # (N,)
    returned = [v for row, c in zip(engine.returned_logps[0], rollouts.completion_ids) for v in row[: len(c)]]
    torch.testing.assert_close(mu, torch.tensor(returned, dtype=torch.float64), equal_nan=True)
    models = [tm.model(tok, seed=0) for _ in snapshots.weights]
    for model, weights in zip(models, snapshots.weights):
        model.load_state_dict(weights)
        model.double()
    log_p = naive_token_logps(teacher.double(), rollouts, grad=False)  # (N,)
    log_q0 = naive_token_logps(models[0], rollouts, grad=False)  # (N,) the student vLLM was synced from
    weight = torch.where(torch.isnan(mu), 1.0, torch.exp(log_q0 - mu)).clamp(max=3.0)  # (N,) TIS, by hand
    assert (weight == 3.0).sum() >= 2 and (weight < 0.99).sum() >= 2 and torch.isnan(mu).sum() == 2
    logs = tm.step_logs(tr)
    for step, model in enumerate(models):
        log_q = naive_token_logps(model, rollouts)  # (N,) with the gradient, at the current student
        ratio = torch.exp(log_q - log_q0)  # (N,) the reuse ratio: 1 at the first use
        loss = (weight * ratio * (log_q.detach() - log_p)).sum() / log_p.numel()
        loss.backward()
        assert logs[step]["loss"] == pytest.approx(loss.item(), rel=1e-4)
        for name, p in model.named_parameters():
            torch.testing.assert_close(snapshots.grads[step][name].double(), p.grad, rtol=1e-4, atol=1e-7)
        unweighted = (ratio.detach() * (log_q.detach() - log_p)).mean().item()
        assert logs[step]["loss"] != pytest.approx(unweighted, rel=1e-3)  # the weight changed the loss
        known = ~torch.isnan(mu)  # TRL's names; the weight is the same at both uses
        expected = {
            "importance_sampling_ratio/mean": weight[known].mean().item(),
            "importance_sampling_ratio/min": weight[known].min().item(),
            "importance_sampling_ratio/max": 3.0,
            "importance_sampling_ratio/clipped_fraction": (torch.exp(log_q0 - mu)[known] > 3.0).double().mean().item(),
            "sampling_logp_difference/mean": (log_q0 - mu)[known].abs().mean().item(),
            "sampling_logp_difference/max": 1.6,  # the largest |offset| at a known position
        }
        for name, value in expected.items():
            assert logs[step][f"sampling/{name}"] == pytest.approx(value, rel=1e-5), name


class FarOff(FakeVLLMGeneration):
    def logps(self, prompt, completion):
        return [-9.0] * len(completion)


@pytest.mark.parametrize("loss_type, correction", [("jsd", True), ("reverse_kl", True), ("sampled_reverse_kl", False)])
def test_vllm_log_probs_change_nothing_where_no_weight_applies(tmp_path, engine_class, loss_type, correction):
    """The full-distribution losses take no weight (they do not depend on the sampled token), nor does anything with
    the correction off: two runs whose vLLM log-probs differ train identically."""
    runs = []
    for name, engine in (("near", OffByKnownAmounts), ("far", FarOff)):
        engine_class(engine)
        snapshots = Snapshots()
        tr, *_ = vllm_run(tmp_path / name, [snapshots], loss_type=loss_type, max_steps=2,
                          vllm_importance_sampling_correction=correction)  # fmt: skip
        tr.train()
        assert snapshots.rollouts[0].sampling_logps is not None  # carried, so a weight could have been applied
        assert not any(key.startswith("sampling/") for log in tm.step_logs(tr) for key in log)
        runs.append(([log["loss"] for log in tm.step_logs(tr)], snapshots.grads))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert loss_a == loss_b
    for step_a, step_b in zip(grads_a, grads_b):
        for name, g in step_a.items():
            assert torch.equal(g, step_b[name]), name


def _resumable_run(output_dir, resume=None):
    tr, student, *_ = vllm_run(output_dir, num_iterations=3, max_steps=6, save_strategy="steps", save_steps=2,
                               learning_rate=1e-2, train_dataset=tm.dataset(n=16))  # fmt: skip
    tr.train(resume_from_checkpoint=resume)
    weights = {name: p.detach().clone() for name, p in student.named_parameters()}
    return {h["step"]: h["loss"] for h in tm.step_logs(tr)}, weights


def test_resume_inside_a_reused_vllm_batch_equals_the_straight_run(tmp_path, engine_class):
    """Checkpoint 2 holds step 1's vLLM batch (with vLLM's log-probs) that step 3 reuses; resuming there is exact."""
    engine_class(OffByKnownAmounts)
    straight, weights = _resumable_run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    saved = torch.load(os.path.join(checkpoint, "rollout_buffer_0.pt"), weights_only=True)
    assert "sampling_logps" in saved["batch"]
    resumed, resumed_weights = _resumable_run(tmp_path / "resumed", str(checkpoint))
    for step in range(3, 7):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
    for name, value in weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ warnings
def test_a_server_without_processed_log_probs_is_named(tmp_path, engine_class, caplog):
    from trl_onpolicy.vllm_rollouts import VLLMSampler

    class RawServer(FakeVLLMGeneration):
        server_logprobs_mode = "raw_logprobs"

    for cls, expected in ((RawServer, True), (FakeVLLMGeneration, False)):
        engine_class(cls)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trl_onpolicy.vllm_rollouts"):
            VLLMSampler(stub_trainer(tmp_path, vllm_mode="server", loss_type="sampled_reverse_kl"))
        assert ("`--logprobs-mode raw_logprobs`" in caplog.text) is expected


def test_sampling_settings_the_weight_also_measures_are_named(tmp_path, engine_class, caplog):
    from trl_onpolicy.vllm_rollouts import VLLMSampler

    with caplog.at_level(logging.WARNING, logger="trl_onpolicy.vllm_rollouts"):
        VLLMSampler(stub_trainer(tmp_path, loss_type="sampled_reverse_kl", temperature=0.7, top_p=0.9))
    assert "processed sampling distribution (temperature, top_p)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_onpolicy.vllm_rollouts"):
        VLLMSampler(stub_trainer(tmp_path, loss_type="jsd", temperature=0.7))  # no weight: nothing to say
    assert caplog.text == ""
