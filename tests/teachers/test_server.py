"""The teacher server client (`teachers/server.py`) against `trl-onpolicy serve-teacher` on 127.0.0.1.

A real `serve-teacher` process scores a tiny Llama saved to disk; the client's scores must equal a `LocalTeacher`'s.
Faults (503, stalls, 400) come from a test double: the real app wrapped in a scripted ASGI layer, served by uvicorn in a
thread over a real socket.
"""

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import tiny_models as tm
from http_server import thread_server
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from trl_onpolicy import OnPolicyDistillTrainer
from trl_onpolicy.commands.cli import build_parser
from trl_onpolicy.commands.serve_teacher import create_app
from trl_onpolicy.commands.serve_teacher import run as serve_teacher_run
from trl_onpolicy.rollouts import Rollouts, collate
from trl_onpolicy.teachers.local import LocalTeacher
from trl_onpolicy.teachers.server import ServerTeacher, TeacherServerError
from trl_onpolicy.toy.tokenizer import CHARS

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "TRL_ONPOLICY_TEST_TEACHER_KEY"
FAST = {"timeout": 5.0, "max_retries": 3, "backoff": 0.01}  # client settings that keep the fault tests short


# ---------------------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """`python -m trl_onpolicy.commands.cli serve-teacher DIR --port N` offline, on one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop(KEY_ENV, None)
    command = [sys.executable, "-m", "trl_onpolicy.commands.cli", "serve-teacher", str(model_dir), "--port", str(port)]
    with open(log, "w") as out:
        return subprocess.Popen(command + ["--threads", "1"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve-teacher exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{url}/health", timeout=1).ok:
                return
        time.sleep(0.1)
    raise RuntimeError(f"serve-teacher did not answer /health in {limit}s:\n{log.read_text()[-3000:]}")


class Faults:
    """
    The test double: wraps the real app and plays a script on `/v1/completions` requests, one action per request:
    `"503"` (answer 503), `"400"` (answer 400), `"stall"` (sleep `stall` seconds, then answer), `"slow"` (sleep 0.3 s,
    then answer). It records the number of sequences of each completions request and the peak of requests in flight.
    """

    def __init__(self, app, stall: float = 1.5):
        self.app, self.stall = app, stall
        self.reset()

    def reset(self, script=()):
        self.script, self.sizes, self.in_flight, self.peak = list(script), [], 0, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await self.app(scope, receive, send)
        from starlette.responses import PlainTextResponse

        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.sizes.append(len(json.loads(body)["prompt"]))
        action = self.script.pop(0) if self.script else None
        if action in ("503", "400"):
            return await PlainTextResponse(f"scripted {action}", int(action))(scope, receive, send)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep({"stall": self.stall, "slow": 0.3}.get(action, 0))
            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1


def swapped_tokenizer() -> PreTrainedTokenizerFast:
    """The char tokenizer with `a` and `b` trading ids: same size, different ids."""
    chars = "ba" + CHARS[2:]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_batch(tok, n: int = 6) -> dict:
    """Rows with different prompt and completion lengths (left-padded prompts, right-padded completions)."""
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    rollouts = Rollouts([encode(p) for p in tm.PROMPTS[:n]], [encode(c) for c in tm.COMPLETIONS[:n]], "dataset")
    return collate(rollouts, tok.pad_token_id)


def assert_same_scores(got, want, mask, k: int | None):
    """Equal on the real completion tokens: ids exactly, log-probs to 1e-5."""
    mask = mask.bool()
    assert got.form == ("token" if k is None else "topk")
    torch.testing.assert_close(got.token_logps[mask], want.token_logps[mask], atol=1e-5, rtol=0)
    if k is not None:
        assert got.topk_ids.shape == got.topk_logps.shape == (*mask.shape, k)
        assert torch.equal(got.topk_ids[mask], want.topk_ids[mask])
        torch.testing.assert_close(got.topk_logps[mask], want.topk_logps[mask], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    return tm.tokenizer()


@pytest.fixture(scope="module")
def teacher_model(tok):
    return tm.model(tok, layers=2, hidden=32, seed=1).eval()


@pytest.fixture(scope="module")
def processes(tmp_path_factory, tok, teacher_model):
    """Two `serve-teacher` processes of the saved teacher: "main", and "spare" for the test that kills it (started
    now so its start-up overlaps the other tests; only "main" is waited for here)."""
    folder = tmp_path_factory.mktemp("server")
    teacher_model.save_pretrained(folder / "teacher")
    tok.save_pretrained(folder / "teacher")
    started = {}
    try:
        for name in ("main", "spare"):
            port, log = free_port(), folder / f"{name}.log"
            started[name] = (f"http://127.0.0.1:{port}", start_process(folder / "teacher", port, log), log)
        wait_healthy(*started["main"])
        yield started
    finally:
        for _, process, _ in started.values():
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def url(processes):
    return processes["main"][0]


@pytest.fixture(scope="module")
def double(tok, teacher_model):
    """The fault-injecting double around the real app (in a thread): `(url, faults)`."""
    faults = Faults(create_app(teacher_model, tok, model_name="double"))
    with thread_server(faults) as double_url:
        yield double_url, faults


@pytest.fixture
def faults(double):
    double[1].reset()
    return double


# ---------------------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_scores_equal_local_teacher(url, tok, teacher_model, temperature):
    client = ServerTeacher(url, tok, timeout=30)
    assert client.applies_temperature and client.model.endswith("teacher")
    batch, local = make_batch(tok), LocalTeacher(teacher_model)
    assert len(set(batch["completion_mask"].sum(1).tolist())) > 3  # really different lengths
    for k in (5, 1):
        got = client.score(batch, temperature=temperature, top_k=k)
        assert_same_scores(got, local.score(batch, temperature=temperature, top_k=k), batch["completion_mask"], k)
        assert got.temperature == temperature and got.topk_logps.dtype == torch.float32
    got = client.score(batch, temperature=temperature, need="token")
    assert_same_scores(got, local.score(batch, temperature=temperature, need="token"), batch["completion_mask"], None)


def test_default_top_k_and_filler(url, tok, teacher_model, caplog):
    client = ServerTeacher(url, tok, timeout=30, default_top_k=7)
    batch = make_batch(tok)
    with caplog.at_level(logging.INFO, logger="trl_onpolicy.teachers.server"):
        first, second = client.score(batch), client.score(batch)
    assert [r.getMessage() for r in caplog.records].count(
        "Teacher server: 7 log-probs per position (set `teacher_top_k` to choose)."
    ) == 1
    assert_same_scores(first, LocalTeacher(teacher_model).score(batch, top_k=7), batch["completion_mask"], 7)
    assert torch.equal(first.topk_ids, second.topk_ids)
    pad = ~batch["completion_mask"].bool()  # filler: ids 0..K-1 with a uniform distribution
    assert torch.equal(first.topk_ids[pad], torch.arange(7).expand(int(pad.sum()), 7))
    torch.testing.assert_close(first.topk_logps[pad].exp().sum(-1), torch.ones(int(pad.sum())))


def test_batching_and_concurrency_give_same_scores(url, tok):
    batch = make_batch(tok)
    one = ServerTeacher(url, tok, timeout=30, batch_size=8, concurrency=1).score(batch, top_k=5)
    many = ServerTeacher(url, tok, timeout=30, batch_size=2, concurrency=3).score(batch, top_k=5)
    assert_same_scores(many, one, batch["completion_mask"], 5)


def test_requests_are_batched_and_concurrent(faults, tok):
    url, double = faults
    client = ServerTeacher(url, tok, batch_size=2, concurrency=3, **FAST)
    double.reset(["slow"] * 3)
    client.score(make_batch(tok, 6), top_k=3)
    assert double.sizes == [2, 2, 2]
    assert double.peak >= 2  # each request waits 0.3 s: three in flight at once when sent together


def test_server_ranks_the_actual_token_outside_the_top_k(url, tok, teacher_model):
    ids = tok("what is 1+2? 3", add_special_tokens=False)["input_ids"]
    body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 1.0}
    entries = requests.post(f"{url}/v1/completions", json=body, timeout=30).json()["choices"][0]["prompt_logprobs"]
    with torch.no_grad():
        logps = torch.log_softmax(teacher_model(torch.tensor([ids])).logits[0].float(), -1)  # (L, V)
    assert entries[0] is None and len(entries) == len(ids)
    outside = 0
    for pos, entry in enumerate(entries[1:]):
        token, row = ids[pos + 1], logps[pos]
        top = sorted(entry.values(), key=lambda c: c["rank"])[:2]
        assert [c["rank"] for c in top] == [1, 2]
        torch.testing.assert_close(torch.tensor([c["logprob"] for c in top]), row.topk(2).values, atol=1e-5, rtol=0)
        assert entry[str(token)]["rank"] == int((row > row[token]).sum()) + 1
        assert abs(entry[str(token)]["logprob"] - row[token].item()) < 1e-5
        outside += len(entry) == 3
    assert outside > 0  # the random teacher ranks most actual tokens below 2


def test_server_rejects_bad_requests(url):
    too_many = requests.post(f"{url}/v1/completions", json={"prompt": [5, 6], "prompt_logprobs": 21}, timeout=30)
    assert too_many.status_code == 400 and "max-logprobs" in too_many.json()["error"]["message"]
    no_prompt = requests.post(f"{url}/v1/completions", json={"prompt_logprobs": 1}, timeout=30)
    assert no_prompt.status_code == 400 and "prompt" in no_prompt.json()["error"]["message"]
    out_of_vocab = requests.post(f"{url}/v1/completions", json={"prompt": [5, 99], "prompt_logprobs": 1}, timeout=30)
    assert out_of_vocab.status_code == 400 and "99" in out_of_vocab.json()["error"]["message"]


def test_cli_wires_serve_teacher():
    args = build_parser("serve-teacher").parse_args(["serve-teacher", "some/model", "--port", "1234", "--max-logprobs", "5"])
    assert args.func is serve_teacher_run and (args.model, args.port, args.max_logprobs) == ("some/model", 1234, 5)
    assert args.host == "127.0.0.1" and args.api_key_env == "TRL_ONPOLICY_TEACHER_API_KEY"


# ---------------------------------------------------------------------------------------------------------- trainer
def test_trainer_step_with_server_teacher_equals_local(url, tok, teacher_model, tmp_path):
    losses = []
    for teacher in (ServerTeacher(url, tok, timeout=30), teacher_model):
        trainer = tm.trainer(tmp_path / str(len(losses)), teacher=teacher, tok=tok, teacher_top_k=5, lmbda=1.0)
        trainer.train()
        losses.append(tm.step_logs(trainer)[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0] > 0


def test_multi_turn_transcripts_are_scored_as_a_local_teacher_scores_them(url, tok, teacher_model, tmp_path):
    """An environment answers the student's turns: the server scores each whole transcript in one request, the
    environment's messages as context, with the loss a local teacher gives."""
    logs = []
    for teacher in (ServerTeacher(url, tok, timeout=30), teacher_model):
        args = tm.config(tmp_path / str(len(logs)), max_completion_length=40, teacher_top_k=5)
        trainer = OnPolicyDistillTrainer(model=tm.model(tok), teacher_model=teacher, args=args,
                                         train_dataset=tm.dataset(), processing_class=tok,
                                         environment_factory=tm.ThreeTurns)  # fmt: skip
        trainer.train()
        logs.append(tm.step_logs(trainer)[0])
    assert logs[0]["multi_turn/turns"] > 1 and logs[0]["multi_turn/drawn_fraction"] < 1
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], abs=1e-5) and logs[0]["loss"] > 0


def test_server_scores_after_the_teacher_prompt_as_a_local_teacher_does(faults, tok, teacher_model, tmp_path):
    data = tm.dataset().add_column("privileged_context", [f"hint{i}" for i in range(8)])  # privileged context
    losses = []
    for teacher in (ServerTeacher(faults[0], tok, timeout=30), teacher_model, None):
        trainer = tm.trainer(tmp_path / str(len(losses)), teacher=teacher, tok=tok, teacher_top_k=5,
                             train_dataset=data if teacher is not None else tm.dataset())  # fmt: skip
        if teacher is None:
            trainer.teacher = LocalTeacher(teacher_model)  # the same teacher, without the privileged context
        trainer.train()
        losses.append(tm.step_logs(trainer)[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4) and losses[0] != pytest.approx(losses[2], rel=1e-2)


def test_config_url_builds_a_server_teacher(faults, tok, tmp_path):
    url, double = faults
    args = tm.config(tmp_path, teacher_model_name_or_path=url + "/v1", teacher_top_k=3, teacher_server_timeout=7.0,
                     teacher_server_batch_size=1, teacher_server_model="double")  # fmt: skip
    trainer = OnPolicyDistillTrainer(model=tm.model(tok), args=args, train_dataset=tm.dataset(), processing_class=tok)
    assert isinstance(trainer.teacher, ServerTeacher) and trainer.teacher.url == url
    assert (trainer.teacher.timeout, trainer.teacher.batch_size, trainer.teacher.model) == (7.0, 1, "double")
    double.reset()
    trainer.train()
    assert double.sizes == [1, 1]  # the step's two rollouts, one per request


def test_hidden_layers_and_ignored_temperature_are_refused(tok, teacher_model):
    app = create_app(teacher_model, tok, logprobs_mode="raw_logprobs")
    with thread_server(app) as raw_url:
        client = ServerTeacher(raw_url, tok, **FAST)
        batch = make_batch(tok, 2)
        assert not client.applies_temperature
        assert client.score(batch, top_k=2).form == "topk"
        with pytest.raises(ValueError, match="--logprobs-mode processed_logprobs"):
            client.score(batch, temperature=2.0, top_k=2)
        with pytest.raises(ValueError, match="hidden-state matching needs a local teacher"):
            client.score(batch, top_k=2, hidden_layers=[1])


# ---------------------------------------------------------------------------------------------------------- faults
def test_503_twice_then_ok(faults, tok, teacher_model, caplog):
    url, double = faults
    client = ServerTeacher(url, tok, **FAST)
    double.reset(["503", "503"])
    batch = make_batch(tok, 3)
    with caplog.at_level(logging.WARNING, logger="trl_onpolicy.teachers.server"):
        got = client.score(batch, top_k=3)
    assert double.sizes == [3, 3, 3]  # two refused, the third answered
    assert sum("HTTP 503" in r.getMessage() for r in caplog.records) == 2
    assert_same_scores(got, LocalTeacher(teacher_model).score(batch, top_k=3), batch["completion_mask"], 3)


def test_stall_longer_than_timeout_then_ok(faults, tok):
    url, double = faults
    client = ServerTeacher(url, tok, **{**FAST, "timeout": 0.5})
    double.reset(["stall"])
    start = time.monotonic()
    assert client.score(make_batch(tok, 2), top_k=2).form == "topk"
    assert (
        len(double.sizes) == 2 and 0.5 <= time.monotonic() - start < 1.5
    )  # gave up on the stall, did not wait it out


def test_always_503_raises_after_the_budget(faults, tok):
    url, double = faults
    client = ServerTeacher(url, tok, **{**FAST, "max_retries": 2})
    double.reset(["503"] * 10)
    with pytest.raises(TeacherServerError) as info:
        client.score(make_batch(tok, 2), top_k=2)
    message = str(info.value)
    assert url in message and "/v1/completions" in message and "3 attempts" in message
    assert "HTTP 503: scripted 503" in message and len(double.sizes) == 3


def test_400_fails_at_once(faults, tok):
    url, double = faults
    client = ServerTeacher(url, tok, **FAST)
    double.reset()
    with pytest.raises(TeacherServerError, match="HTTP 400") as info:
        client.score(make_batch(tok, 2), top_k=21)  # above the server's --max-logprobs 20: a real 400
    assert "--max-logprobs" in str(info.value) and "`teacher_top_k`" in str(info.value)
    assert len(double.sizes) == 1
    double.reset(["400"])
    with pytest.raises(TeacherServerError, match="scripted 400"):
        client.score(make_batch(tok, 2), top_k=2)
    assert len(double.sizes) == 1


def test_ids_beyond_the_vocabulary_are_refused(faults, tok):
    client = ServerTeacher(faults[0], tok, **FAST)
    client.compare_vocab = 10  # as if the student's vocabulary ended at id 10: the server's answers go beyond
    with pytest.raises(ValueError, match="outside the student's vocabulary of 10"):
        client.score(make_batch(tok, 2), top_k=5)


def test_server_down_at_start_fails_fast(tok):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TeacherServerError, match="connection refused") as info:
        ServerTeacher(url, tok, timeout=60, max_retries=5, backoff=1.0)
    assert url in str(info.value) and "1 attempt " in str(info.value) and time.monotonic() - start < 2.0


def test_different_tokenizer_is_refused(tok, teacher_model):
    server = thread_server(create_app(teacher_model, swapped_tokenizer()))
    with server as other_url, pytest.raises(ValueError, match="different tokenizer.*model family"):
        ServerTeacher(other_url, tok, **FAST)


def test_api_key(tok, teacher_model, monkeypatch, caplog):
    key = "sk-test-5ecret-k3y"
    caplog.set_level(logging.DEBUG)
    with thread_server(Faults(create_app(teacher_model, tok, api_key=key))) as keyed_url:
        assert requests.get(f"{keyed_url}/v1/models", timeout=5).status_code == 401
        assert requests.get(f"{keyed_url}/health", timeout=5).status_code == 200
        monkeypatch.delenv(KEY_ENV, raising=False)
        with pytest.raises(TeacherServerError, match=f"HTTP 401.*`{KEY_ENV}` is not set") as missing:
            ServerTeacher(keyed_url, tok, api_key_env=KEY_ENV, **FAST)
        monkeypatch.setenv(KEY_ENV, "sk-wrong-key")
        with pytest.raises(TeacherServerError, match="does not accept") as wrong:
            ServerTeacher(keyed_url, tok, api_key_env=KEY_ENV, **FAST)
        monkeypatch.setenv(KEY_ENV, key)
        client = ServerTeacher(keyed_url, tok, api_key_env=KEY_ENV, **{**FAST, "max_retries": 1})
        assert client.score(make_batch(tok, 2), top_k=2).form == "topk"
        client.url = client.url.rsplit(":", 1)[0] + f":{free_port()}"  # now the server is gone: retries and an error
        with pytest.raises(TeacherServerError) as gone:
            client.score(make_batch(tok, 2), top_k=2)
    texts = [str(missing.value), str(wrong.value), str(gone.value), repr(client), str(vars(client))]
    texts += [r.getMessage() for r in caplog.records]
    assert caplog.records and all(key not in t and "sk-wrong-key" not in t for t in texts)
    assert f"from ${KEY_ENV}" in repr(client)


def test_server_killed_mid_training_keeps_the_last_checkpoint(processes, tok, tmp_path):
    url, process, log = processes["spare"]
    wait_healthy(url, process, log)

    class KillAfterStep2(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                process.kill()
                process.wait()

    client = ServerTeacher(url, tok, **{**FAST, "max_retries": 2})
    trainer = tm.trainer(
        tmp_path, teacher=client, tok=tok, teacher_top_k=5, max_steps=5, save_strategy="steps", save_steps=1,
        callbacks=[KillAfterStep2()],
    )  # fmt: skip
    with pytest.raises(TeacherServerError, match="3 attempts.*connection refused"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    last = tmp_path / "checkpoint-2"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(last)
    live = trainer.model.state_dict()
    for name, saved in loaded.state_dict().items():
        torch.testing.assert_close(saved, live[name], msg=name)  # step 3 failed before its update


@pytest.mark.slow  # two server start-ups: about a minute
def test_server_restarted_mid_training_is_retried_through_and_no_step_is_half_applied(processes, tok, teacher_model,
                                                                                      tmp_path):  # fmt: skip
    """The server dies after step 1 and a new one comes up on the same port while the client retries: training
    finishes every step, and its losses and weights equal a run with the teacher in process (same top-5 scores)."""
    folder = Path(processes["main"][2]).parent / "teacher"
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "restart.log"
    process = start_process(folder, port, log)
    wait_healthy(url, process, log)
    restarts = []

    class RestartAfterStep1(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                process.kill()
                process.wait()
                restarts.append(start_process(folder, port, tmp_path / "restarted.log"))  # up in a few seconds

    client = ServerTeacher(url, tok, timeout=5.0, max_retries=12, backoff=0.25)
    runs = {}
    try:
        for name, teacher, callbacks in (("server", client, [RestartAfterStep1()]), ("local", teacher_model, [])):
            trainer = tm.trainer(tmp_path / name, tm.model(tok, seed=0), teacher, tok, teacher_top_k=5, lmbda=0.0,
                                 max_steps=3, learning_rate=1e-2, callbacks=callbacks)  # fmt: skip
            trainer.train()
            runs[name] = (tm.step_logs(trainer), {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    finally:
        for p in restarts:
            p.kill()
            p.wait()
    assert len(restarts) == 1
    assert [h["step"] for h in runs["server"][0]] == [1, 2, 3]
    for a, b in zip(runs["server"][0], runs["local"][0]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for name, value in runs["server"][1].items():
        torch.testing.assert_close(value, runs["local"][1][name], rtol=1e-4, atol=1e-5)
