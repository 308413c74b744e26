"""Rollout pools, `steps_per_generation` (`rollout_pool.py`): the rollouts of several steps generated at once.

Tiny CPU models (see `tiny_models.py`). Each test counts the sampler calls (which step made them, how many prompts),
compares what each step trained on with the pool's slices and with the rows a run without pools trains on, resumes
inside a pool, or pins an error message. `PerStep` is the reference: the trainer as it was before pools (one step's
batches drawn, its rollouts made from them).
"""

import copy
import itertools
import math
import os
import re

import mp_distill_script as script
import pytest
import tiny_models as tm
import torch
from test_multiprocess import assert_same_training, launch_two_processes

from trl_onpolicy import DistillCallback, OnPolicyDistillConfig
from trl_onpolicy.commands.distill import make_parser
from trl_onpolicy.rollout_pool import pool_file, split_evenly


class Recorder(DistillCallback):
    """Each step's rollouts as `on_rollouts` sees them (before the teacher scores them)."""

    def __init__(self):
        self.rollouts = []

    def on_rollouts(self, args, state, control, rollouts, **kwargs):
        self.rollouts.append(copy.deepcopy(rollouts))


class PerStep:
    """The reference: the trainer's data path before pools, one step's batches and rollouts at a time."""

    made_at = age = 0

    def size(self, step, max_steps, round_ends):
        return 1

    def draw(self, epoch_iterator, num_batches, step, size):
        return list(itertools.islice(epoch_iterator, num_batches))

    def rollouts(self, step, rows, make_rollouts, source_of):
        return make_rollouts(rows, source_of(step))

    def save(self, folder, process_index):
        pass

    def restore(self, folder, accelerator, skip_data=True):
        pass


def count_calls(trainer) -> list[tuple[str, int, int]]:
    """Wrap both samplers: each call as (who, the global step it was made at, its number of prompts)."""
    calls = []
    for who, sampler in (("student", trainer.student_sampler), ("teacher", trainer.teacher_sampler)):

        def counted(prompt_ids, *args, _sample=sampler.sample, _who=who, **kwargs):
            samples = _sample(prompt_ids, *args, **kwargs)
            calls.append((_who, trainer.state.global_step, len(prompt_ids), prompt_ids, samples.completion_ids))
            return samples

        sampler.sample = counted
    return calls


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run(tmp_path, name, reference=False, n=16, **overrides):
    """Train tiny models (student seed 0, teacher seed 1); the calls, the recorded rollouts, step logs, weights."""
    tok, recorder = tm.tokenizer(), Recorder()
    student = tm.model(tok, seed=0)
    values = {"lmbda": 1.0, "learning_rate": 1e-2, "max_steps": 6, **overrides}
    tr = tm.trainer(tmp_path / name, student, tm.model(tok, seed=1), tok, train_dataset=tm.dataset(n=n),
                    callbacks=[recorder], **values)  # fmt: skip
    if reference:
        tr.rollout_pool = PerStep()
    calls = count_calls(tr)
    micro = []
    get_batch_samples = tr.get_batch_samples

    def counted_get_batch_samples(*args, **kwargs):
        batches, num_items = get_batch_samples(*args, **kwargs)
        if batches:
            micro.append(len(batches))
        return batches, num_items

    tr.get_batch_samples = counted_get_batch_samples
    tr.train()
    return {"calls": calls, "rollouts": recorder.rollouts, "logs": tm.step_logs(tr), "weights": params(student),
            "micro": micro, "trainer": tr}  # fmt: skip


def prompts(rollouts) -> list[tuple]:
    return [tuple(ids) for ids in rollouts.prompt_ids]


# ------------------------------------------------------------------------------------------ steps_per_generation=1
@pytest.mark.parametrize(
    "overrides",
    [
        {"lmbda": 0.5, "gradient_accumulation_steps": 2, "num_generations": 2},  # student and dataset steps
        {"lmbda": 0.5, "seq_kd": True},  # student and teacher steps
    ],
)
def test_steps_per_generation_1_trains_as_before_pools(tmp_path, overrides):
    """The default draws one step's batches and makes its rollouts in one sampler call, exactly as the trainer did
    before pools (`PerStep`): the same calls, rollouts, losses and weights, and no pool metric in the log rows."""
    new = run(tmp_path, "pool", max_steps=5, **overrides)
    old = run(tmp_path, "per-step", reference=True, max_steps=5, **overrides)
    assert len({r.source for r in new["rollouts"]}) == 2  # both sources were drawn: the test covers them
    assert [c[:3] for c in new["calls"]] == [c[:3] for c in old["calls"]]
    assert [c[1] for c in new["calls"]] == sorted({c[1] for c in new["calls"]})  # at most one call per step
    for a, b in zip(new["rollouts"], old["rollouts"], strict=True):
        assert (a.source, a.prompt_ids, a.completion_ids) == (b.source, b.prompt_ids, b.completion_ids)
    assert [h["loss"] for h in new["logs"]] == [h["loss"] for h in old["logs"]]
    for name, value in old["weights"].items():
        assert torch.equal(new["weights"][name], value), name
    assert all("rollouts/age" not in h and "rollouts/pooled" not in h for h in new["logs"])
    assert not any((tmp_path / "pool").glob("checkpoint-*/rollout_pool_*.pt"))


# ------------------------------------------------------------------------------------------ one pool, K steps
@pytest.mark.parametrize("generation_batch_size, calls_per_pool", [(None, 3), (6, 1), (4, 2)])
def test_pool_of_3_is_generated_at_steps_0_3_6_and_each_step_trains_on_its_slice(
    tmp_path, generation_batch_size, calls_per_pool
):
    """18 rows, batch 2: 9 steps in one epoch, pools at steps 0, 3 and 6. Every sampler call is made at a pool's first
    step (one per step by default; one for the pool's 6 rows with `generation_batch_size=6`; 3 + 3 rows with 4), and
    each step trains on its own consecutive slice of the pool's completions, on the prompts the data loader gives that
    step without pools."""
    pooled = run(tmp_path, "pooled", n=18, max_steps=9, steps_per_generation=3,
                 generation_batch_size=generation_batch_size)  # fmt: skip
    fresh = run(tmp_path, "fresh", n=18, max_steps=9)
    calls = pooled["calls"]
    assert [c[1] for c in calls] == [s for s in (0, 3, 6) for _ in range(calls_per_pool)]
    assert all(who == "student" for who, *_ in calls)
    for pool in range(3):
        mine = [c for c in calls if c[1] == 3 * pool]
        sampled_prompts = [tuple(p) for c in mine for p in c[3]]
        sampled = [c for call in mine for c in call[4]]
        assert len(sampled) == 6
        for j in range(3):  # step 3 * pool + j: rows 2j, 2j + 1 of the pool, in order
            rollouts = pooled["rollouts"][3 * pool + j]
            assert prompts(rollouts) == sampled_prompts[2 * j : 2 * j + 2]
            assert rollouts.completion_ids == sampled[2 * j : 2 * j + 2]
    assert [prompts(r) for r in pooled["rollouts"]] == [prompts(r) for r in fresh["rollouts"]]
    assert [h["rollouts/age"] for h in pooled["logs"]] == [0, 1, 2] * 3
    assert [h["rollouts/pooled"] for h in pooled["logs"]] == [0, 1, 1] * 3
    seconds = [h["time/generation"] for h in pooled["logs"]]  # the pool's generation is timed at its first step
    assert all(seconds[start] > max(seconds[start + 1 : start + 3]) for start in (0, 3, 6))
    assert all(h["time/teacher"] > 0 for h in pooled["logs"])  # the teacher scores every step at that step


def test_a_pool_of_mixed_sources_makes_one_call_per_source(tmp_path):
    """lmbda 0.5 with `seq_kd`: in each pool, the student's steps are sampled in one call and the teacher's in
    another; each step's rollouts come from its own draw of the source (`_completion_source(step)`)."""
    out = run(tmp_path, "mixed", n=18, max_steps=9, steps_per_generation=3, generation_batch_size=6, lmbda=0.5,
              seq_kd=True)  # fmt: skip
    tr = out["trainer"]
    sources = [tr._completion_source(step) for step in range(9)]
    assert {"student", "teacher"} <= set(sources)
    assert [r.source for r in out["rollouts"]] == sources
    expected = []
    for start in (0, 3, 6):
        pool = sources[start : start + 3]
        expected += [(who, start, 2 * pool.count(who)) for who in dict.fromkeys(pool)]
    assert [c[:3] for c in out["calls"]] == expected


def test_round_pools_are_regenerated_at_each_round_start(tmp_path):
    """7 steps in 3 rounds end at steps 2, 5 and 7: pools of 2, 3 and 2 steps, generated at steps 0, 2 and 5."""
    out = run(tmp_path, "round", max_steps=7, num_rounds=3, steps_per_generation="round", generation_batch_size=64)
    assert out["trainer"].round_ends() == [2, 5, 7]
    assert [c[1:3] for c in out["calls"]] == [(0, 4), (2, 6), (5, 4)]
    assert [h["rollouts/age"] for h in out["logs"]] == [0, 1, 0, 1, 2, 0, 1]
    fresh = run(tmp_path, "fresh", max_steps=7, num_rounds=3)
    assert [prompts(r) for r in out["rollouts"]] == [prompts(r) for r in fresh["rollouts"]]


def test_pool_ends_with_the_epoch(tmp_path):
    """10 rows, batch 2, accumulation 2: 5 batches an epoch, steps of 2, 2 and 1 micro-batches. Pools of 2 steps: at
    step 0 (4 batches), at step 2 (the epoch has 1 batch left: a pool of one step), at 3 and at 5. Each step trains
    on as many micro-batches as without pools, on the same rows."""
    pooled = run(tmp_path, "pooled", n=10, max_steps=6, gradient_accumulation_steps=2, steps_per_generation=2,
                 generation_batch_size=8)  # fmt: skip
    fresh = run(tmp_path, "fresh", n=10, max_steps=6, gradient_accumulation_steps=2)
    assert [c[1:3] for c in pooled["calls"]] == [(0, 8), (2, 2), (3, 8), (5, 2)]
    assert pooled["micro"] == fresh["micro"] == [2, 2, 1, 2, 2, 1]
    assert [prompts(r) for r in pooled["rollouts"]] == [prompts(r) for r in fresh["rollouts"]]
    assert [h["rollouts/age"] for h in pooled["logs"]] == [0, 1, 0, 0, 1, 0]


def test_pool_stops_at_max_steps(tmp_path):
    """A pool never draws past `max_steps`: 5 steps with pools of 3 generate 3 + 2 steps' rows."""
    out = run(tmp_path, "pooled", max_steps=5, steps_per_generation=3, generation_batch_size=64)
    assert [c[1:3] for c in out["calls"]] == [(0, 6), (3, 4)]


def test_split_evenly():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1, 2], 2) == [[1], [2]]


# ------------------------------------------------------------------------------------------ resume
def _resume_run(tmp_path, name, resume=None, **overrides):
    tok, recorder = tm.tokenizer(), Recorder()
    tr = tm.trainer(tmp_path / name, tm.model(tok, seed=0), tm.model(tok, seed=1), tok, callbacks=[recorder],
                    lmbda=1.0, max_steps=6, save_strategy="steps", save_steps=1, learning_rate=1e-2,
                    train_dataset=tm.dataset(n=16), **overrides)  # fmt: skip
    calls = count_calls(tr)
    tr.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in tm.step_logs(tr)}
    return losses, params(tr.accelerator.unwrap_model(tr.model)), [prompts(r) for r in recorder.rollouts], calls


@pytest.mark.parametrize(
    "overrides, starts, inside",
    [
        # pools of 3 at steps 0 and 3, in one epoch of 8 steps
        ({"steps_per_generation": 3, "generation_batch_size": 6}, (0, 3), (1, 2, 4, 5)),
        # rounds end at steps 3 and 6; with accumulation 2 an epoch is 4 steps, so the epoch's end cuts the second
        # round's pool to step 3 alone and step 4 starts another, in the next epoch
        ({"steps_per_generation": "round", "num_rounds": 2, "gradient_accumulation_steps": 2}, (0, 3, 4), (1, 2, 5)),
    ],
)
def test_resume_inside_a_pool_equals_the_straight_run(tmp_path, overrides, starts, inside):
    """A checkpoint inside a pool holds its remaining steps' rollouts; resumed from it, the run trains them without
    sampling, then draws the next pool from the rows the straight run drew (the batches the pool had drawn ahead are
    discarded), with the same RNG: the same losses, rows and final weights."""
    straight, weights, rows, calls = _resume_run(tmp_path, "straight", **overrides)
    assert sorted({c[1] for c in calls}) == list(starts)
    saved = [s for s in range(1, 7) if os.path.isfile(pool_file(str(tmp_path / "straight" / f"checkpoint-{s}"), 0))]
    assert tuple(saved) == inside  # not at a pool's end
    for step in inside:
        resumed, resumed_weights, resumed_rows, calls = _resume_run(
            tmp_path, f"from-{step}", str(tmp_path / "straight" / f"checkpoint-{step}"), **overrides
        )
        assert sorted({c[1] for c in calls}) == [s for s in starts if s > step]  # the restored steps sample nothing
        assert resumed_rows == rows[step:]
        for later in range(step + 1, 7):
            assert resumed[later] == pytest.approx(straight[later], rel=1e-6), (step, later)
        for name, value in weights.items():
            torch.testing.assert_close(resumed_weights[name], value, rtol=1e-6, atol=1e-9)


def test_resume_without_the_pool_would_differ(tmp_path):
    """The control of the test above: without the saved pool the resumed run samples the remaining steps afresh."""
    overrides = {"steps_per_generation": 3, "generation_batch_size": 6}
    straight, weights, rows, _ = _resume_run(tmp_path, "straight", **overrides)
    checkpoint = tmp_path / "straight" / "checkpoint-1"
    os.remove(pool_file(str(checkpoint), 0))
    resumed, resumed_weights, resumed_rows, calls = _resume_run(tmp_path, "resumed", str(checkpoint), **overrides)
    assert resumed_rows == rows[1:]  # nothing was drawn ahead: the data loader gives the same rows
    assert [c[1] for c in calls] == [1, 4]  # pools of 3 from the resumed step on
    assert resumed[2] != pytest.approx(straight[2], rel=1e-6)
    assert any(not torch.allclose(resumed_weights[k], v) for k, v in weights.items())


# ------------------------------------------------------------------------------------------ config
def _config(tmp_path, **values):
    return OnPolicyDistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **values)


BAD_VALUE = (
    "`steps_per_generation` must be an integer >= 1 (1 = fresh rollouts every optimizer step) or 'round' (one pool "
    "per round of `num_rounds`), got {}."
)
BOTH_REUSES = (
    "`steps_per_generation=2` and `num_iterations=2` both reuse rollouts across optimizer steps; choose one: "
    "`steps_per_generation` trains each step on its own prompts from a pool generated ahead, `num_iterations` trains "
    "several steps on one step's batch. Set the other to 1."
)
SAMPLED_REVERSE_KL = (
    "`loss_type='sampled_reverse_kl'` cannot train on pooled rollouts (`steps_per_generation='round'`): its "
    "importance weight needs the log-probs of the student that sampled the tokens, which `generate` does not return, "
    "and a pooled step trains a student that has moved since. Use `num_iterations` instead (it keeps those log-probs "
    "at a batch's first use) or a full-distribution loss (`jsd`, `forward_kl`, `reverse_kl`)."
)
ONE_ROUND = (
    "`steps_per_generation='round'` with `num_rounds=1` would generate one pool for the whole run, trained on by a "
    "student that never samples again. Set `num_rounds` to the number of pools (e.g. `num_rounds=4`), or give "
    "`steps_per_generation` an integer."
)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps_per_generation": 2, "num_iterations": 2}, BOTH_REUSES),
        ({"steps_per_generation": "round", "num_rounds": 2, "loss_type": "sampled_reverse_kl"}, SAMPLED_REVERSE_KL),
        ({"steps_per_generation": "round"}, ONE_ROUND),
        ({"steps_per_generation": "rounds"}, BAD_VALUE.format("'rounds'")),
        ({"steps_per_generation": 0}, BAD_VALUE.format(0)),
        ({"steps_per_generation": None}, BAD_VALUE.format(None)),
        (
            {"generation_batch_size": 0},
            "`generation_batch_size` must be None (one sampler call per step's rows) or >= 1, got 0.",
        ),
    ],
)
def test_bad_pool_settings_are_refused(tmp_path, values, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _config(tmp_path, **values)


def test_sampled_reverse_kl_and_num_iterations_without_pools_are_allowed(tmp_path):
    assert _config(tmp_path, loss_type="sampled_reverse_kl", num_iterations=2).steps_per_generation == 1


def test_command_line_takes_round_and_integers(tmp_path):
    """HfArgumentParser would make `int | str` an int-only flag (`invalid int value: 'round'`); the field is
    `int | str | None`, which it parses as text, and the config turns digits into an int."""
    for flag, value in (("round", "round"), ("4", 4)):
        _, config, _ = make_parser().parse_args_and_config(
            args=["--output_dir", str(tmp_path), "--steps_per_generation", flag, "--num_rounds", "2",
                  "--generation_batch_size", "16", "--use_cpu", "true"]
        )  # fmt: skip
        assert config.steps_per_generation == value and config.generation_batch_size == 16


# ------------------------------------------------------------------------------------------ processes
def test_two_processes_with_pools_match_one_process(tmp_path):
    """2 processes x batch 2 == 1 process x batch 4 with pools of 2 steps (dataset completions, lmbda 0): each process
    draws its share of the pool's batches, and the steps train on the same rows and reach the same weights."""
    two = launch_two_processes(tmp_path, "--per-device-batch-size", "2", "--steps-per-generation", "2")
    one = script.run(str(tmp_path / "one.json"), per_device_batch_size=4, output_dir=str(tmp_path / "one"),
                     steps_per_generation=2)  # fmt: skip
    assert [h["rollouts/age"] for h in one["logs"]] == [h["rollouts/age"] for h in two["logs"]] == [0, 1]
    assert_same_training(one, two)
    assert math.isfinite(two["logs"][1]["loss"])
