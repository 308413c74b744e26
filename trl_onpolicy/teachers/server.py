"""A teacher behind an HTTP server: vLLM's OpenAI-compatible completions API, scoring given token ids.

The client sends each prompt + completion as token ids with `max_tokens=1` and `prompt_logprobs=k`; the server answers
per position the top-k tokens with their log-probs (ranks 1..k) plus the actual token when it is outside the top-k.
That is the top-k form of [`TeacherScores`]: the loss treats the rest of the mass as one tail bucket. Any server that
speaks this protocol works: `vllm serve` for real teachers, `trl-onpolicy serve-teacher` for a local model (tests, CPU).

How it departs from TRL's own vLLM client (`VLLMClient.get_sequence_logprobs`): it checks at start that the server's
tokenizer is the student's (a probe text through `/tokenize`, the last vocabulary id through `/detokenize`) and
whether the server applies the request temperature to the log-probs (vLLM only does with
`--logprobs-mode processed_logprobs`), and it retries transient failures (connection errors, timeouts, HTTP 5xx,
408, 429) with exponential backoff before stopping training with an error that says what failed.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

from .base import Teacher, TeacherScores

logger = logging.getLogger(__name__)

# Letters, digits, punctuation, whitespace and non-ASCII: tokenizers that differ anywhere here differ in ids.
PROBE_TEXT = "Hello, World! The 3 quick foxes (42.5%) jump_over: [a+b] = {c}; 'x' \"y\" <z>\n\t  naïve 東京 ÷ 😀"
MAX_BACKOFF = 30.0
START_ADVICE = (
    "Is a server running there? Start one (`vllm serve MODEL --max-logprobs 20 --logprobs-mode processed_logprobs` "
    "or `trl-onpolicy serve-teacher MODEL --port N`) and check the URL (`teacher_model_name_or_path`)."
)
RUN_ADVICE = (
    "Check the server (its log, its memory, whether it still runs), then resume from the last checkpoint: run the "
    "same command again with `--resume_from_checkpoint true` (Python: `trainer.train(resume_from_checkpoint=True)`); "
    "for a slow or busy server raise `teacher_server_timeout` or "
    "`teacher_server_max_retries`, or lower `teacher_server_batch_size`."
)


class TeacherServerError(RuntimeError):
    """A teacher server could not be reached, or kept failing after the retry budget was spent."""


class _Secret(str):
    """A string that never shows itself in a repr (the API key)."""

    def __repr__(self) -> str:
        return "'***'"


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _connection_failure(err: requests.ConnectionError) -> str:
    text = str(err).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "resolve" in text or "nodename" in text:
        return "host not found"
    if "aborted" in text or "reset" in text or "disconnected" in text:
        return "connection lost before the answer came"
    return f"connection error ({type(err).__name__})"


def _server_message(response: requests.Response) -> str:
    """The server's error message (vLLM's `{"error": {"message"}}` or `{"message"}`), else the start of the body."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message") if isinstance(error, dict) else error
        return str(message if message is not None else body)[:200]
    except ValueError:
        return response.text[:200]


class ServerTeacher(Teacher):
    """
    Scores completions on a teacher server that speaks vLLM's OpenAI-compatible API (`vllm serve` or
    `trl-onpolicy serve-teacher`), in the top-k form (or the sampled-token form for `need="token"`).

    At construction it fails fast (one attempt each, naming the URL) when the server is down, picks the model, and
    refuses a server whose tokenizer differs from `tokenizer`.

    Args:
        url (`str`): Base URL of the server, e.g. `"http://localhost:8000"` (a trailing `/v1` is dropped).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The student's tokenizer.
        model (`str`, *optional*): Model name sent to the server; defaults to the first one `/v1/models` lists.
        timeout (`float`, *optional*, defaults to `60.0`): Seconds one request may take before it is retried.
        max_retries (`int`, *optional*, defaults to `5`): Retries of a request after a connection error, a timeout,
            HTTP 5xx, 408 or 429, waiting `backoff * 2**attempt` seconds (jittered, at most 30) in between.
        batch_size (`int`, *optional*, defaults to `8`): Sequences per request.
        concurrency (`int`, *optional*, defaults to `4`): Requests in flight at once.
        api_key_env (`str`, *optional*, defaults to `"TRL_ONPOLICY_TEACHER_API_KEY"`): Environment variable holding
            the API key, sent as `Authorization: Bearer <key>` and nowhere else (never logged).
        default_top_k (`int`, *optional*, defaults to `20`): `k` when the trainer asks for a full distribution
            (`teacher_top_k=None`): vLLM serves at most `--max-logprobs` (20 by default).
        backoff (`float`, *optional*, defaults to `0.5`): First retry delay in seconds.
    """

    name = "server"

    def __init__(
        self,
        url: str,
        tokenizer,
        *,
        model: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        batch_size: int = 8,
        concurrency: int = 4,
        api_key_env: str = "TRL_ONPOLICY_TEACHER_API_KEY",
        default_top_k: int = 20,
        backoff: float = 0.5,
    ):
        url = url.rstrip("/")
        self.url = url.removesuffix("/v1")
        self.tokenizer = tokenizer
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.batch_size, self.concurrency, self.default_top_k = batch_size, concurrency, default_top_k
        self.api_key_env = api_key_env
        self._api_key = _Secret(os.environ.get(api_key_env) or "") if api_key_env else _Secret("")
        self.compare_vocab: int | None = None  # ids at or above it are an error (set by `build_teacher`)
        self._local = threading.local()  # one `requests.Session` per thread
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="teacher-server")
        self._rng = random.Random()  # jitter, without touching the global RNG the trainer seeds
        self._said_top_k = False
        self.model = self._probe_model(model)
        self._probe_tokenizer()
        self.applies_temperature = self._probe_temperature()

    @classmethod
    def from_config(cls, url: str, args, tokenizer) -> ServerTeacher:
        """A client configured by the `teacher_server_*` fields of an [`OnPolicyDistillConfig`]."""
        return cls(
            url,
            tokenizer,
            model=args.teacher_server_model,
            timeout=args.teacher_server_timeout,
            max_retries=args.teacher_server_max_retries,
            batch_size=args.teacher_server_batch_size,
            concurrency=args.teacher_server_concurrency,
            api_key_env=args.teacher_server_api_key_env,
        )

    def __repr__(self) -> str:
        key = f"from ${self.api_key_env}" if self._api_key else "none"
        return f"ServerTeacher(url={self.url!r}, model={self.model!r}, api_key={key})"

    def describe(self) -> str:
        parts = urllib.parse.urlsplit(self.url)  # scheme, host and port only: never credentials in the URL
        host = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return f"`{self.model}` served at {host} (top-k log-probs over HTTP)"

    def close(self) -> None:
        """Stop the request threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------------------ HTTP
    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _request(self, endpoint: str, payload: dict | None = None, *, retries: int | None = None, advice=RUN_ADVICE):
        """GET (no payload) or POST `endpoint`, retrying transient failures; the answer's JSON."""
        retries = self.max_retries if retries is None else retries
        method = "GET" if payload is None else "POST"
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        start = time.monotonic()
        for attempt in range(retries + 1):
            try:
                response = self._session().request(
                    method, self.url + endpoint, json=payload, headers=headers, timeout=self.timeout
                )
            except requests.Timeout:
                failure = f"timed out after {self.timeout:g}s"
            except requests.ConnectionError as err:
                failure = _connection_failure(err)
            else:
                if response.ok:
                    return response.json()
                if not _retryable(response.status_code):
                    raise self._rejected(method, endpoint, response)
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
            if attempt < retries:
                delay = min(self.backoff * 2**attempt, MAX_BACKOFF) * (0.5 + 0.5 * self._rng.random())
                logger.warning(
                    "Teacher server %s: %s %s failed (%s); retry %d of %d in %.2fs.",
                    self.url, method, endpoint, failure, attempt + 1, retries, delay,
                )  # fmt: skip
                time.sleep(delay)
        attempts = f"{retries + 1} attempt{'s' if retries else ''}"
        raise TeacherServerError(
            f"The teacher server at {self.url} failed: {method} {endpoint} did not succeed in {attempts} over "
            f"{time.monotonic() - start:.1f}s. Last failure: {failure}. {advice}"
        )

    def _rejected(self, method: str, endpoint: str, response: requests.Response) -> TeacherServerError:
        """The error for an answer that retrying cannot fix (4xx but 408 and 429)."""
        status, message = response.status_code, _server_message(response)
        what = f"The teacher server at {self.url} rejected {method} {endpoint} with HTTP {status}: {message}."
        if status in (401, 403):
            state = "is not set" if not self._api_key else "holds a key the server does not accept"
            hint = f"The server wants an API key: the environment variable `{self.api_key_env}` {state}."
        elif status == 400 and endpoint == "/v1/completions":
            hint = (
                f"When it is about log-probs: `teacher_top_k` (or {self.default_top_k} when unset) must not exceed the server's "
                "`--max-logprobs` (vLLM's default is 20); when it is about length: the server's `--max-model-len`."
            )
        elif status == 404:
            hint = "Check `teacher_server_model` against the server's /v1/models, and that it speaks vLLM's API."
        else:
            hint = "Check the request settings against the server's log."
        error = TeacherServerError(f"{what} {hint}")
        error.status_code = status
        return error

    # ------------------------------------------------------------------------------------------------------ probes
    def _probe_model(self, model: str | None) -> str:
        """The served model name; one attempt, so a server that is down fails at once with its URL."""
        names = [m.get("id") for m in self._request("/v1/models", retries=0, advice=START_ADVICE).get("data", [])]
        if model is not None and model not in names:
            raise ValueError(
                f"The teacher server at {self.url} serves {names}, not {model!r}: fix `teacher_server_model`."
            )
        if not names:
            raise ValueError(f"The teacher server at {self.url} lists no model under /v1/models.")
        return model or names[0]

    def _probe_tokenizer(self) -> None:
        """Refuse a server whose tokenizer differs from the student's: a probe text and the last vocabulary id."""
        local_ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        payload = {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
        remote_ids = self._request("/tokenize", payload, retries=0, advice=START_ADVICE)["tokens"]
        last = len(self.tokenizer) - 1
        local_text = self.tokenizer.decode([last])
        try:
            payload = {"model": self.model, "tokens": [last]}
            remote_text = self._request("/detokenize", payload, retries=0, advice=START_ADVICE)["prompt"]
        except TeacherServerError as err:
            if getattr(err, "status_code", None) != 400:
                raise
            remote_text = None  # the server's vocabulary ends before the student's
        if remote_ids != local_ids or remote_text != local_text:
            if remote_ids != local_ids:
                pairs = zip(remote_ids, local_ids)
                first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(remote_ids), len(local_ids)))
                found = (
                    f"a probe text tokenizes differently from its token {first} on ({len(remote_ids)} ids there, "
                    f"{len(local_ids)} here)"
                )
            else:
                found = f"token id {last} (the student's last) decodes to {remote_text!r} there, {local_text!r} here"
            raise ValueError(
                f"The teacher server at {self.url} (model {self.model!r}) uses a different tokenizer than the student: "
                f"{found}. Distillation compares the two distributions token by token: serve a teacher from the "
                "student's model family (one that shares its tokenizer), or set `teacher_tokenizer_name_or_path` to "
                "the served model's tokenizer (cross-tokenizer distillation: ULD over aligned spans)."
            )

    def _probe_temperature(self) -> bool:
        """Whether the server applies the request temperature to prompt log-probs (vLLM: processed_logprobs)."""
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:8]
        values = []
        for temperature in (1.0, 2.0):
            entries = self._complete([ids], 0, temperature, retries=0, advice=START_ADVICE)[0]
            values.append([entry[str(t)]["logprob"] for entry, t in zip(entries[1:], ids[1:])])
        return any(abs(a - b) > 1e-6 for a, b in zip(*values))

    # ------------------------------------------------------------------------------------------------------ scoring
    def _complete(self, sequences: list[list[int]], k: int, temperature: float, **request_kwargs) -> list[list]:
        """`prompt_logprobs` of each sequence (one request)."""
        payload = {"model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": temperature}
        payload["prompt_logprobs"] = k
        choices = self._request("/v1/completions", payload, **request_kwargs)["choices"]
        if len(choices) != len(sequences):
            raise TeacherServerError(f"The teacher server at {self.url} answered {len(choices)} of {len(sequences)}.")
        return [c["prompt_logprobs"] for c in sorted(choices, key=lambda c: c["index"])]

    def score(self, batch, *, temperature=1.0, top_k=None, need="full", hidden_layers=None) -> TeacherScores:
        """
        Scores in the top-k form (`topk_ids`, `topk_logps` `(B, C, K)` sorted by rank, `token_logps` `(B, C)`), or the
        sampled-token form for `need="token"`. Positions past a completion's end hold filler (ids `0..K-1`, uniform).
        """
        if hidden_layers is not None:
            raise ValueError(
                "A teacher server returns log-probs only, not hidden states: hidden-state matching needs a local "
                "teacher (a model in this process)."
            )
        if temperature != 1.0 and not self.applies_temperature:
            raise ValueError(
                f"The loss temperature is {temperature:g}, but the teacher server at {self.url} ignores the request "
                "temperature in its log-probs. Restart vLLM with `--logprobs-mode processed_logprobs`, or train at "
                "a loss temperature of 1."
            )
        k = 0 if need == "token" else top_k or self.default_top_k
        if need != "token" and top_k is None and not self._said_top_k:
            logger.info("Teacher server: %d log-probs per position (set `teacher_top_k` to choose).", k)
            self._said_top_k = True
        sequences, starts, rows = self._sequences(batch)
        chunks = [sequences[i : i + self.batch_size] for i in range(0, len(sequences), self.batch_size)]
        futures = [self._executor.submit(self._complete, chunk, k, temperature) for chunk in chunks]
        try:
            answers = [entries for future in futures for entries in future.result()]
        finally:
            for future in futures:
                future.cancel()
        return self._assemble(batch, answers, sequences, starts, rows, k, temperature)

    @staticmethod
    def _sequences(batch) -> tuple[list[list[int]], list[int], list[int]]:
        """Each row's real prompt + completion ids, where its completion starts, and the rows with a completion."""
        input_ids, attention = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()  # (B, P + C)
        n_prompt = input_ids.shape[1] - batch["completion_ids"].shape[1]
        sequences, starts, rows = [], [], []
        for row in range(input_ids.shape[0]):
            n_completion = int(attention[row, n_prompt:].sum())
            if n_completion == 0:
                continue
            ids = input_ids[row][attention[row]].tolist()
            if len(ids) == n_completion:
                raise ValueError(f"Row {row} has no prompt tokens: a server cannot score a sequence's first token.")
            sequences.append(ids)
            starts.append(len(ids) - n_completion)
            rows.append(row)
        return sequences, starts, rows

    def _assemble(self, batch, answers, sequences, starts, rows, k, temperature) -> TeacherScores:
        """Scatter the servers' `prompt_logprobs` into `(B, C, ...)` tensors."""
        batch_size, n_completion = batch["completion_ids"].shape
        device = batch["input_ids"].device
        limit = min(len(self.tokenizer), self.compare_vocab or math.inf)
        where, token_values, top_ids, top_values = [], [], [], []
        for entries, ids, start, row in zip(answers, sequences, starts, rows):
            if entries is None or len(entries) != len(ids):
                raise TeacherServerError(
                    f"The teacher server at {self.url} returned no `prompt_logprobs` for a sequence of {len(ids)} "
                    "tokens (or a wrong number of them): is it a vLLM-compatible server?"
                )
            for pos, (entry, token) in enumerate(zip(entries[start:], ids[start:])):
                # by rank; on a tie (the actual token beside a top-k one of equal log-prob) the likelier first
                candidates = sorted(
                    ((int(t), c["rank"], c["logprob"]) for t, c in entry.items()), key=lambda c: (c[1], -c[2])
                )
                bad = [t for t, _, _ in candidates if t >= limit]
                if bad:
                    raise ValueError(
                        f"The teacher server at {self.url} returned token id {bad[0]}, outside the student's "
                        f"vocabulary of {limit}: its model's vocabulary differs. Serve a teacher that shares the "
                        "student's tokenizer."
                    )
                if str(token) not in entry:
                    raise TeacherServerError(f"The teacher server at {self.url} left out the actual token's log-prob.")
                where.append((row, pos))
                token_values.append(entry[str(token)]["logprob"])
                top = [c for c in candidates if c[1] <= k][:k]
                if len(top) < k:
                    raise ValueError(
                        f"The teacher server at {self.url} returned {len(top)} ranked candidates at a position where "
                        f"{k} were asked: its answer is cut short, or its vocabulary is smaller than `teacher_top_k`."
                    )
                top_ids.append([c[0] for c in top])
                top_values.append([c[2] for c in top])
        index = tuple(torch.tensor(where, dtype=torch.long).reshape(-1, 2).T)  # 2 x (N,) row and position
        token_logps = torch.zeros(batch_size, n_completion)  # (B, C) filler 0
        token_logps[index] = torch.tensor(token_values, dtype=torch.float32)
        scores = TeacherScores(temperature, token_logps=token_logps.to(device))
        if k:
            topk_ids = torch.arange(k).repeat(batch_size, n_completion, 1)  # (B, C, K) filler: ids 0..K-1
            topk_logps = torch.full((batch_size, n_completion, k), -math.log(k))  # (B, C, K) filler: uniform
            topk_ids[index] = torch.tensor(top_ids, dtype=torch.long).reshape(-1, k)
            topk_logps[index] = torch.tensor(top_values, dtype=torch.float32).reshape(-1, k)
            scores.topk_ids, scores.topk_logps = topk_ids.to(device), topk_logps.to(device)
        return scores
