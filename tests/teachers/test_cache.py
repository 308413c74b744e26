"""The offline teacher cache: round trip against the live teacher, shards, training from it, and every refusal.

Tiny models from `tiny_models.py`; a cache of 8 rows builds in milliseconds.
"""

import gc
import json
import os
import re
import weakref

import pytest
import tiny_models as tm
import torch

from trl_onpolicy.prompts import prepare_dataset
from trl_onpolicy.rollouts import Rollouts, collate
from trl_onpolicy.teachers import LocalTeacher
from trl_onpolicy.teachers.cache import TeacherCache
from trl_onpolicy.teachers.cache_build import build_teacher_cache
from trl_onpolicy.teachers.cache_format import CacheError, is_teacher_cache, model_fingerprint, tokenizer_fingerprint

K = 5
MAX_LENGTH, MAX_COMPLETION = 64, 8  # tm.config's: the trainer cuts prompts to 56 and completions to 8 tokens


def build(tmp_path, teacher, tok, dataset=None, **kwargs):
    kwargs = {"top_k": K, "max_prompt_length": MAX_LENGTH - MAX_COMPLETION,
              "max_completion_length": MAX_COMPLETION, "batch_size": 3, **kwargs}  # fmt: skip
    return build_teacher_cache(teacher, dataset or tm.dataset(), tok, str(tmp_path / "cache"), **kwargs)


def batch_of(tok, dataset, order):
    """A collated batch of the dataset's own completions, rows in `order` (another layout than at build time)."""
    rows = prepare_dataset(dataset, tok, MAX_LENGTH - MAX_COMPLETION, MAX_COMPLETION)
    rollouts = Rollouts([rows[i]["prompt_ids"] for i in order], [rows[i]["completion_ids"] for i in order], "dataset")
    return collate(rollouts, tok.pad_token_id)


def assert_same_scores(cached, live, mask, atol=0.0):
    """
    Equal on every real completion token: bit for bit in the batch layout the cache was built with; in another layout
    the live teacher's own float32 results move by an ulp (other matmul shapes), hence `atol` there.
    """
    assert cached.form == live.form
    for name in ("token_logps", "topk_ids", "topk_logps"):
        a, b = getattr(cached, name), getattr(live, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=atol if a.is_floating_point() else 0, msg=name)


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("kind", ["prompt_completion", "messages"])
def test_round_trip_equals_live_teacher(tmp_path, kind):
    tok, dataset = tm.tokenizer(), tm.dataset(kind)
    teacher = tm.model(tok, seed=1)
    cache = build(tmp_path, teacher, tok, dataset, teacher_name="tiny-teacher", batch_size=8)  # one batch, in order
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["format"] == "trl-onpolicy-teacher-cache" and manifest["version"] == 1
    assert manifest["teacher"] == {"name": "tiny-teacher", "fingerprint": model_fingerprint(teacher)}
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert (manifest["top_k"], manifest["temperature"], manifest["vocab_size"], manifest["rows"]) == (K, 1.0, 51, 8)
    assert is_teacher_cache(tmp_path / "cache") and len(cache) == 8

    assert manifest["tokens"] == batch_of(tok, dataset, range(8))["completion_mask"].sum()

    live = LocalTeacher(teacher)
    # the build's layout: storing loses nothing; then 4 rows in another order: other padding widths on both sides
    for order, atol in [(range(8), 0.0), ([6, 1, 4, 3], 1e-6)]:
        batch = batch_of(tok, dataset, order)
        mask = batch["completion_mask"].bool()
        assert_same_scores(cache.score(batch, top_k=K), live.score(batch, top_k=K), mask, atol)
        assert_same_scores(cache.score(batch), live.score(batch, top_k=K), mask, atol)  # None: all of the cache's k
        assert_same_scores(cache.score(batch, top_k=2), live.score(batch, top_k=2), mask, atol)  # the first columns
        assert_same_scores(cache.score(batch, need="token"), live.score(batch, need="token"), mask, atol)


def test_several_shards_and_duplicate_rows(tmp_path):
    tok, dataset = tm.tokenizer(), tm.dataset(n=16)  # every row twice: scored and stored once
    teacher = tm.model(tok, seed=1)
    cache = build(tmp_path, teacher, tok, dataset, shard_tokens=10)
    shards = cache.manifest["shards"]
    assert len(shards) >= 3 and sorted(os.listdir(tmp_path / "cache")) == sorted(
        ["manifest.json"] + [s["file"] for s in shards]
    )
    assert sum(s["rows"] for s in shards) == cache.manifest["rows"] == 8
    batch = batch_of(tok, dataset, [15, 0, 9, 4, 11, 2, 13, 6])  # rows from every shard in one batch
    assert_same_scores(
        cache.score(batch), LocalTeacher(teacher).score(batch, top_k=K), batch["completion_mask"].bool(), atol=1e-6
    )


def test_model_fingerprint_identifies_the_weights_not_their_dtype():
    tok = tm.tokenizer()
    teacher = tm.model(tok, seed=1)
    assert model_fingerprint(tm.model(tok, seed=1)) == model_fingerprint(teacher)
    assert model_fingerprint(tm.model(tok, seed=1).to(torch.bfloat16)) == model_fingerprint(teacher)
    assert model_fingerprint(tm.model(tok, seed=2)) != model_fingerprint(teacher)
    assert model_fingerprint(tm.model(tok, seed=1, hidden=32)) != model_fingerprint(teacher)


# ------------------------------------------------------------------------------------------ training from the cache
def _train(tmp_path, teacher_model, tok):
    student = tm.model(tok, seed=0)
    tr = tm.trainer(
        tmp_path, student, teacher_model, tok, lmbda=0.0, teacher_top_k=K, max_steps=3, learning_rate=1e-2,
        loss_type="jsd",
    )  # fmt: skip
    tr.train()
    return tm.step_logs(tr), {name: p.detach().clone() for name, p in student.named_parameters()}


def test_training_from_cache_equals_live_teacher_without_the_teacher_in_memory(tmp_path):
    tok = tm.tokenizer()
    teacher = tm.model(tok, seed=1)
    build(tmp_path, teacher, tok)
    alive = weakref.ref(teacher)
    del teacher
    gc.collect()
    assert alive() is None  # nothing holds the teacher: training below reads the cache only

    logs_cache, params_cache = _train(tmp_path / "from-cache", TeacherCache(tmp_path / "cache", tok), tok)
    teacher = tm.model(tok, seed=1)  # the same weights again, for the live run
    assert model_fingerprint(teacher) == TeacherCache(tmp_path / "cache").manifest["teacher"]["fingerprint"]
    logs_live, params_live = _train(tmp_path / "live", LocalTeacher(teacher), tok)

    assert len(logs_cache) == len(logs_live) == 3
    assert logs_live[0]["divergence"] > 1e-4  # the teacher really differs from the student (top-5 + tail buckets)
    for cached, live in zip(logs_cache, logs_live):
        for key in ("loss", "divergence", "grad_norm", "teacher_entropy", "completion_length"):
            assert cached[key] == pytest.approx(live[key], rel=1e-6, abs=1e-7), key
    assert any(not torch.equal(p, tm.model(tok, seed=0).state_dict()[n]) for n, p in params_cache.items())
    for name, value in params_cache.items():
        torch.testing.assert_close(value, params_live[name], rtol=1e-6, atol=1e-6)


def test_from_config_accepts_an_offline_run(tmp_path):
    tok = tm.tokenizer()
    build(tmp_path, tm.model(tok, seed=1), tok, teacher_name="tiny-teacher")
    args = tm.config(tmp_path, lmbda=0.0, teacher_top_k=3, teacher_model_name_or_path="tiny-teacher")
    assert TeacherCache.from_config(tmp_path / "cache", args, tok).top_k == K


def test_a_cache_folder_in_the_config_trains_and_evaluates(tmp_path):
    """The same script as with a live teacher: the cache folder as `teacher_model_name_or_path`; evaluation scores the
    eval rows' own completions (a cache has no scores for the student's)."""
    from trl_onpolicy import OnPolicyDistillTrainer

    tok = tm.tokenizer()
    build(tmp_path, tm.model(tok, seed=1), tok)
    args = tm.config(tmp_path / "out", teacher_model_name_or_path=str(tmp_path / "cache"), lmbda=0.0, max_steps=2,
                     eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)  # fmt: skip
    tr = OnPolicyDistillTrainer(tm.model(tok), args=args, train_dataset=tm.dataset(), eval_dataset=tm.dataset(),
                                processing_class=tok)  # fmt: skip
    assert isinstance(tr.teacher, TeacherCache)
    tr.train()
    evals = [h["eval_loss"] for h in tr.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and all(v > 0 for v in evals)


def test_a_cache_object_is_checked_against_the_config(tmp_path):
    tok = tm.tokenizer()
    cache = build(tmp_path, tm.model(tok, seed=1), tok)
    with pytest.raises(CacheError, match="lmbda=0.0"):
        tm.trainer(tmp_path / "out", teacher=cache, tok=tok, lmbda=1.0)


def test_rows_cut_otherwise_than_the_cache_are_refused_when_the_trainer_is_built(tmp_path):
    """A cache built with max_completion_length=8 and a run with 4 failed only at the first step; now the trainer's
    construction fails, naming both lengths and both fixes (2 rows, with completions of 4 tokens or fewer, are cut alike
    and found). Rows from another dataset are refused the same way."""
    from trl_onpolicy import OnPolicyDistillTrainer

    tok = tm.tokenizer()
    build(tmp_path, tm.model(tok, seed=1), tok)
    cache = str(tmp_path / "cache")

    def trainer(dataset, **overrides):
        args = tm.config(tmp_path / "out", teacher_model_name_or_path=cache, lmbda=0.0, **overrides)
        return OnPolicyDistillTrainer(tm.model(tok), args=args, train_dataset=dataset, processing_class=tok)

    message = (
        f"6 of 8 training rows (row 1 first) are not in the teacher cache at {cache}: it was built with "
        "max_prompt_length=56 and max_completion_length=8, but this run cuts rows at max_prompt_length=60 "
        "(`max_length - max_completion_length`) and max_completion_length=4. Train with the cache's lengths "
        "(`max_length=64`, `max_completion_length=8`), or rebuild the cache with this run's (`trl-onpolicy "
        "cache-teacher ... --max-length 64 --max-completion-length 4 --overwrite`)."
    )
    with pytest.raises(CacheError, match=f"^{re.escape(message)}$"):
        trainer(tm.dataset(), max_completion_length=4)
    other = tm.dataset().map(lambda row: {"completion": "~" + row["completion"]})
    with pytest.raises(CacheError, match=r"^8 of 8 training rows \(row 0 first\) are not in the teacher cache at .*: "
                                         r"it was built from other rows"):
        trainer(other)
    assert isinstance(trainer(tm.dataset()).teacher, TeacherCache)  # the rows it was built from: accepted


# ------------------------------------------------------------------------------------------ refused
def test_refuses_another_tokenizer(tmp_path):
    tok = tm.tokenizer()
    build(tmp_path, tm.model(tok, seed=1), tok)
    other = tm.tokenizer(chat_template=False)
    with pytest.raises(CacheError, match=r"made with a different tokenizer than the student's: cache [0-9a-f]{16}"):
        TeacherCache(tmp_path / "cache", other)


def test_refuses_another_teacher_naming_both(tmp_path):
    tok = tm.tokenizer()
    teacher, other = tm.model(tok, seed=1), tm.model(tok, seed=2)
    build(tmp_path, teacher, tok, teacher_name="tiny-teacher")
    TeacherCache(tmp_path / "cache", tok, expected_teacher=teacher)  # its own teacher is accepted
    ours, theirs = model_fingerprint(teacher)[:16], model_fingerprint(other)[:16]
    with pytest.raises(
        CacheError, match=rf"made by another teacher: .*'tiny-teacher' \(weights {ours}.*weights {theirs}"
    ):
        TeacherCache(tmp_path / "cache", tok, expected_teacher=other)
    with pytest.raises(CacheError, match=r"holds the scores of 'tiny-teacher'.*, not of 'org/other-teacher'"):
        TeacherCache(tmp_path / "cache", tok, expected_teacher="org/other-teacher")
    args = tm.config(tmp_path, lmbda=0.0, teacher_model_name_or_path="org/other-teacher")
    with pytest.raises(CacheError, match=r"'tiny-teacher'.*not of 'org/other-teacher'"):
        TeacherCache.from_config(tmp_path / "cache", args, tok)


def test_refuses_a_flipped_byte_naming_the_shard(tmp_path):
    tok = tm.tokenizer()
    cache = build(tmp_path, tm.model(tok, seed=1), tok, shard_tokens=10)
    assert len(cache.manifest["shards"]) >= 2
    shard = tmp_path / "cache" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # a data byte (the last tensor's last value), not the header: the file still opens
    shard.write_bytes(bytes(data))
    cache = TeacherCache(tmp_path / "cache", tok)  # only the row keys are read here
    with pytest.raises(CacheError, match=r"shard shard-00000\.safetensors in .* fails its checksum.*Rebuild"):
        cache.score(batch_of(tok, tm.dataset(), list(range(8))))


def test_refuses_a_missing_shard(tmp_path):
    tok = tm.tokenizer()
    build(tmp_path, tm.model(tok, seed=1), tok, shard_tokens=10)
    os.remove(tmp_path / "cache" / "shard-00001.safetensors")
    with pytest.raises(CacheError, match=r"shard shard-00001\.safetensors in .* is missing.*Rebuild"):
        TeacherCache(tmp_path / "cache", tok)


def test_refuses_a_corrupt_or_missing_manifest(tmp_path):
    tok = tm.tokenizer()
    build(tmp_path, tm.model(tok, seed=1), tok)
    manifest = tmp_path / "cache" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CacheError, match=r"manifest .*manifest\.json is not valid JSON .*Rebuild"):
        TeacherCache(tmp_path / "cache", tok)
    assert is_teacher_cache(tmp_path / "cache")  # damaged, still a cache: the trainer routes it here for the message
    manifest.write_text(json.dumps({"format": "something-else", "version": 1}))
    assert not is_teacher_cache(tmp_path / "cache")  # someone else's manifest: not ours, and never overwritten
    with pytest.raises(CacheError, match=r"not a manifest of a 'trl-onpolicy-teacher-cache' version 1"):
        TeacherCache(tmp_path / "cache", tok)
    with pytest.raises(CacheError, match=r"holds a manifest\.json that is not a teacher cache's"):
        build(tmp_path, tm.model(tok, seed=1), tok, overwrite=True)
    manifest.unlink()
    assert is_teacher_cache(tmp_path / "cache")  # the shards remain: an incomplete cache, refused with a reason
    with pytest.raises(CacheError, match=r"is not a complete teacher cache: it has no manifest\.json"):
        TeacherCache(tmp_path / "cache", tok)


def test_refuses_a_prompt_only_dataset_and_an_existing_cache(tmp_path):
    tok = tm.tokenizer()
    teacher = tm.model(tok, seed=1)
    with pytest.raises(ValueError, match=r"has no completions \(columns: \['prompt'\]\)"):
        build(tmp_path, teacher, tok, tm.dataset("prompt_only"))
    assert not is_teacher_cache(tmp_path / "cache")
    build(tmp_path, teacher, tok)
    with pytest.raises(CacheError, match=r"already holds a teacher cache .*Pass `overwrite=True`"):
        build(tmp_path, teacher, tok)
    cache = build(tmp_path, teacher, tok, top_k=3, overwrite=True)
    assert cache.top_k == 3 and len(os.listdir(tmp_path / "cache")) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lmbda": 0.5}, r"`lmbda=0.5` asks for student rollouts\. Set `lmbda=0.0`"),
        (
            {"lmbda": 0.0, "seq_kd": True},
            r"`seq_kd=True` for teacher-written ones\. Set `lmbda=0.0` and `seq_kd=False`",
        ),
        ({"lmbda": 0.0, "temperature_start": 2.0}, r"temperature 1.0, but .*'constant' from 2.0 to 2.0"),
        ({"lmbda": 0.0, "loss_temperature_schedule": "linear", "temperature_end": 0.5}, r"'linear' from 1.0 to 0.5"),
        ({"lmbda": 0.0, "teacher_top_k": 6}, r"`teacher_top_k=6` asks for more than the 5 log-probs"),
        ({"lmbda": 0.0, "hidden_state_weight": 1.0}, r"Hidden-state matching needs the teacher's hidden states"),
    ],
)
def test_from_config_refuses_what_a_cache_cannot_serve(tmp_path, overrides, message):
    tok = tm.tokenizer()
    build(tmp_path, tm.model(tok, seed=1), tok)
    with pytest.raises(CacheError, match=message):
        TeacherCache.from_config(tmp_path / "cache", tm.config(tmp_path, **overrides), tok)


def test_score_refuses_temperature_top_k_hidden_states_and_unknown_rows(tmp_path):
    tok, dataset = tm.tokenizer(), tm.dataset()
    cache = build(tmp_path, tm.model(tok, seed=1), tok)
    batch = batch_of(tok, dataset, [0, 1])
    with pytest.raises(CacheError, match=r"temperature 1.0, but the loss asks for temperature 2.0.*rebuild the cache"):
        cache.score(batch, temperature=2.0)
    with pytest.raises(CacheError, match=r"`teacher_top_k=6` asks for more than the 5 log-probs per token"):
        cache.score(batch, top_k=6)
    with pytest.raises(ValueError, match="a teacher cache does not hold: use a local teacher"):
        cache.score(batch, hidden_layers=[1])
    batch["completion_ids"][1, 0] += 1  # a completion the dataset does not have (as a student rollout would be)
    batch["input_ids"][1, -batch["completion_ids"].shape[1]] += 1
    with pytest.raises(
        CacheError,
        match=r"Row 1 of the batch \(\d+ prompt \+ \d+ completion tokens\) is not in the teacher cache.*`lmbda` > 0.*"
        r"max_prompt_length=56 .*max_completion_length=8",
    ):
        cache.score(batch)


# ------------------------------------------------------------------------------------------ command line
def test_cache_teacher_command_builds_what_the_function_builds(tmp_path, capsys):
    from trl_onpolicy.commands.cli import main

    tok = tm.tokenizer()
    teacher = tm.model(tok, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    tm.dataset().save_to_disk(str(tmp_path / "data"))
    code = main(["cache-teacher", str(tmp_path / "teacher"), str(tmp_path / "data"), str(tmp_path / "cli-cache"),
                 "--top-k", str(K), "--max-length", str(MAX_LENGTH), "--max-completion-length", str(MAX_COMPLETION),
                 "--threads", "1"])  # fmt: skip
    assert code == 0
    assert "Cached 8 rows" in capsys.readouterr().out
    from_cli = TeacherCache(str(tmp_path / "cli-cache"), tok, expected_teacher=teacher)
    batch = batch_of(tok, tm.dataset(), [3, 1, 0, 2])
    assert_same_scores(from_cli.score(batch), LocalTeacher(teacher).score(batch, top_k=K), batch["completion_mask"].bool(),
                       atol=1e-6)  # fmt: skip
