"""`trl-onpolicy serve-teacher`: a small HTTP server that scores token ids the way vLLM's OpenAI-compatible API does.

    trl-onpolicy serve-teacher MODEL --port 8000 [--host 127.0.0.1] [--dtype auto] [--max-logprobs 20]
                                     [--api-key-env TRL_ONPOLICY_TEACHER_API_KEY] [--trust-remote-code]

It serves the subset of vLLM's API that [`~trl_onpolicy.teachers.server.ServerTeacher`] uses, with the same request
and response shapes, from a local transformers model (FastAPI + uvicorn):

- `GET /health`, `GET /v1/models`;
- `POST /tokenize` (`{"model", "prompt": text, "add_special_tokens"}` -> `{"tokens", "count", "max_model_len"}`) and
  `POST /detokenize` (`{"model", "tokens"}` -> `{"prompt"}`);
- `POST /v1/completions` with `prompt` (token ids, one list or a list of lists) and `prompt_logprobs: k`: for every
  sequence, entry `i` of `prompt_logprobs` holds the top-k tokens at position `i` (ranks 1..k) plus the actual token
  `i` with its true rank when it is outside the top-k; entry 0 is null.

How it departs from vLLM: it is a scoring server, not a generator. Every completion is one greedy token (whatever
`max_tokens` asks); requests are served one at a time (a lock around the model); the request `temperature` is applied
to the log-probs, as vLLM does with `--logprobs-mode processed_logprobs` (`--logprobs-mode raw_logprobs` ignores it,
as vLLM does by default). The scores come from [`~trl_onpolicy.teachers.LocalTeacher`], so a client reading them gets
the numbers a teacher in its own process computes. Log-probs below -9999 are clamped to -9999 (as vLLM does: JSON has
no infinities). With an API key (read from the environment variable `--api-key-env` names, never from a flag),
requests without `Authorization: Bearer <key>` get HTTP 401; the key is never printed.
"""

import argparse
import functools
import hmac
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch, transformers and the teacher are imported when a server starts, not for `--help`
    from ..teachers.local import LocalTeacher

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, local request models included.

MIN_LOGPROB = -9999.0  # vLLM's clamp: JSON cannot carry -inf
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve-teacher` flags."""
    parser.add_argument("model", help="Path (or Hub id, when online) of the teacher model and its tokenizer.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 to accept remote clients).")
    parser.add_argument("--dtype", default="auto", help="Model dtype: auto, float32, bfloat16 or float16.")
    parser.add_argument("--max-logprobs", type=int, default=20, help="Largest `prompt_logprobs` served (as vLLM).")
    parser.add_argument(
        "--logprobs-mode",
        choices=LOGPROBS_MODES,
        default="processed_logprobs",
        help="processed_logprobs: apply the request temperature to the log-probs; raw_logprobs: not.",
    )
    parser.add_argument("--served-model-name", default=None, help="Name in /v1/models (default: MODEL as given).")
    parser.add_argument(
        "--api-key-env",
        default="TRL_ONPOLICY_TEACHER_API_KEY",
        help="Environment variable holding the API key clients must send; unset = no key needed.",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Serve `args.model` until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SystemExit("`serve-teacher` needs FastAPI and uvicorn: pip install 'trl-onpolicy[serve]'") from None
    from ..model_paths import check_model_name

    check_model_name(args.model, "teacher", "MODEL")  # before "Serving ...": a missing model is not a server
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    api_key = os.environ.get(args.api_key_env) or None
    print(
        f"Serving {args.model} at http://{args.host}:{args.port} (API key: "
        f"{'required, from $' + args.api_key_env if api_key else 'none'})",
        flush=True,
    )
    serve(
        args.model,
        args.host,
        args.port,
        api_key=api_key,
        model_name=args.served_model_name,
        max_logprobs=args.max_logprobs,
        logprobs_mode=args.logprobs_mode,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )


def load_model(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """An `AutoModelForCausalLM` and `AutoTokenizer` from `path`, on CUDA when available, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def score_sequences(teacher: "LocalTeacher", sequences: list[list[int]], k: int, temperature: float, decode=str):
    """
    vLLM's `prompt_logprobs` for each sequence, and its greedy next token.

    Each sequence is laid out as a rollout with its first token as the prompt and the rest, plus one throwaway token,
    as the completion, so the teacher's completion positions score tokens `1 ... L - 1` and predict the next one.

    Returns:
        `(prompt_logprobs, next_tokens)`: per sequence, `[None, {str(id): {"logprob", "rank", "decoded_token"}}, ...]`
        (`L` entries) and the argmax after its last token.
    """
    import torch

    from ..rollouts import Rollouts, collate

    device = next(teacher.model.parameters()).device
    rollouts = Rollouts([s[:1] for s in sequences], [s[1:] + [0] for s in sequences], source="dataset")
    batch = collate(rollouts, pad_id=0, device=device)
    targets = batch["completion_ids"]  # (B, C)
    full = teacher.score(batch, temperature=temperature, need="full")  # hidden (B, C, H)
    reduced = full.reduce(targets, top_k=max(k, 1), chunk_size=teacher.chunk_size)
    topk_ids, topk_logps = reduced.topk_ids[..., :k], reduced.topk_logps[..., :k]  # (B, C, k)
    inside = topk_ids == targets[..., None]  # (B, C, k)
    ranks = inside.long().argmax(-1) + 1 if k else torch.zeros_like(targets)  # (B, C) the rank when inside
    outside = ~inside.any(-1) & batch["completion_mask"].bool()  # (B, C)
    if outside.any():  # count the tokens more likely than the actual one, over the full vocabulary
        hidden, token_logps = full.hidden[outside], reduced.token_logps[outside]  # (n, H), (n,)
        counts = []
        for start in range(0, hidden.shape[0], teacher.chunk_size):
            end = start + teacher.chunk_size
            logits = full.head(hidden[start:end]).float()  # (n, V)
            logps = torch.log_softmax(logits / temperature, -1)  # (n, V)
            counts.append((logps > token_logps[start:end, None]).sum(-1))  # (n,)
        ranks[outside] = torch.cat(counts) + 1

    ids, logps, token_logps, ranks = (
        topk_ids.tolist(),
        topk_logps.tolist(),
        reduced.token_logps.tolist(),
        ranks.tolist(),
    )
    next_tokens = reduced.topk_ids[..., 0].tolist()
    answers = []
    for row, sequence in enumerate(sequences):
        entries = [None]
        for pos, token in enumerate(sequence[1:]):
            entry = {
                str(t): {"logprob": max(v, MIN_LOGPROB), "rank": r + 1, "decoded_token": decode(t)}
                for r, (t, v) in enumerate(zip(ids[row][pos], logps[row][pos]))
            }
            if str(token) not in entry:
                value = max(token_logps[row][pos], MIN_LOGPROB)
                entry[str(token)] = {"logprob": value, "rank": ranks[row][pos], "decoded_token": decode(token)}
            entries.append(entry)
        answers.append(entries)
    return answers, [next_tokens[row][len(s) - 1] for row, s in enumerate(sequences)]


def _error(status: int, message: str):
    """An error answer in vLLM's shape."""
    from fastapi.responses import JSONResponse

    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(status, "Error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


@functools.lru_cache(maxsize=1)
def _request_models():
    """The request bodies (pydantic models, built on first use so that importing this module needs no FastAPI)."""
    from pydantic import BaseModel, ConfigDict

    class Body(BaseModel):
        model_config = ConfigDict(extra="allow")  # clients send fields this server does not use
        model: str | None = None

    class Tokenize(Body):
        prompt: str
        add_special_tokens: bool = True

    class Detokenize(Body):
        tokens: list[int]

    class Completion(Body):
        prompt: list[list[int]] | list[int] | str | list[str]
        max_tokens: int | None = 16
        temperature: float | None = 1.0
        prompt_logprobs: int | None = None

    return Tokenize, Detokenize, Completion


def _install_errors_and_auth(app, api_key: str | None) -> None:
    """HTTP 400 (not FastAPI's 422) for bad bodies, vLLM-shaped errors, and the bearer-token check."""
    from fastapi import HTTPException
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, exc):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(400, f"Invalid request body: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def check_key(request, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "Unauthorized: send the API key as `Authorization: Bearer <key>`.")
        return await call_next(request)


def _prompt_ids(prompt, tokenizer) -> list[list[int]]:
    """A completions `prompt` (ids, lists of ids, text or texts) as lists of ids."""
    prompts = prompt if isinstance(prompt, list) and prompt else [prompt]
    if isinstance(prompts[0], list):
        return prompts
    return [prompts] if isinstance(prompts[0], int) else [tokenizer(p)["input_ids"] for p in prompts]


def create_app(
    model_path_or_model,
    tokenizer=None,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_logprobs: int = 20,
    logprobs_mode: str = "processed_logprobs",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """
    The FastAPI app of `serve-teacher`.

    Args:
        model_path_or_model (`str` or [`~transformers.PreTrainedModel`]): A path to load (model and tokenizer), or a
            loaded causal LM (then `tokenizer` is required).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): The model's tokenizer.
        api_key (`str`, *optional*): Bearer token every request but `/health` must carry.
        model_name (`str`, *optional*): The name `/v1/models` lists (default: the path, or the model's config name).
        max_logprobs (`int`, *optional*, defaults to `20`): Largest `prompt_logprobs` served; above it HTTP 400.
        logprobs_mode (`str`, *optional*, defaults to `"processed_logprobs"`): `"raw_logprobs"` ignores the request
            temperature (vLLM's default).
        dtype, trust_remote_code: How a path is loaded (see [`load_model`]).
    """
    from fastapi import FastAPI

    from ..teachers.local import LocalTeacher

    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"`logprobs_mode` must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}.")
    model, tokenizer, model_name = _served_model(model_path_or_model, tokenizer, model_name, dtype, trust_remote_code)
    teacher = LocalTeacher(model)
    max_len = getattr(model.config.get_text_config(), "max_position_embeddings", None) or tokenizer.model_max_length
    check = _request_check(model_name, teacher.vocab_size)
    app = FastAPI(title="trl-onpolicy teacher server")
    _install_errors_and_auth(app, api_key)
    _add_model_routes(app, tokenizer, check, model_name, max_len)
    _add_completions_route(app, teacher, tokenizer, check, model_name, max_logprobs, logprobs_mode)
    return app


def _served_model(model_path_or_model, tokenizer, model_name, dtype, trust_remote_code):
    """The model, its tokenizer and the name `/v1/models` lists (a path is loaded with [`load_model`])."""
    if isinstance(model_path_or_model, str):
        model, tokenizer = load_model(model_path_or_model, dtype, trust_remote_code)
        return model, tokenizer, model_name or model_path_or_model
    if tokenizer is None:
        raise ValueError("`create_app` needs the `tokenizer` of a model passed as an object.")
    return model_path_or_model, tokenizer, model_name or model_path_or_model.config.name_or_path or "teacher"


def _request_check(model_name: str, vocab: int):
    """`check(name, ids)`: HTTP 404 for another model's name, HTTP 400 for a token id outside the vocabulary."""
    from fastapi import HTTPException

    def check(name: str | None, ids: list[int] = ()) -> None:
        if name is not None and name != model_name:
            raise HTTPException(404, f"The model `{name}` does not exist; this server serves `{model_name}`.")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise HTTPException(400, f"Token id {bad[0]} is out of vocabulary (size {vocab}).")

    return check


def _add_model_routes(app, tokenizer, check, model_name: str, max_len: int) -> None:
    """`GET /health`, `GET /v1/models`, `POST /tokenize` and `POST /detokenize`."""
    Tokenize, Detokenize, _ = _request_models()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "trl-onpolicy"}
        return {"object": "list", "data": [{**card, "root": model_name, "max_model_len": max_len}]}

    @app.post("/tokenize")
    def tokenize(request: Tokenize):
        check(request.model)
        tokens = tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_len}

    @app.post("/detokenize")
    def detokenize(request: Detokenize):
        check(request.model, request.tokens)
        return {"prompt": tokenizer.decode(request.tokens)}


def _add_completions_route(app, teacher, tokenizer, check, model_name, max_logprobs, logprobs_mode) -> None:
    """`POST /v1/completions`: the prompts' log-probs from the teacher, one request at a time."""
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse

    Completion = _request_models()[2]
    lock = threading.Lock()
    decode = functools.lru_cache(maxsize=None)(lambda t: tokenizer.decode([t]))

    @app.post("/v1/completions")
    def completions(request: Completion):
        prompts, k = _prompt_ids(request.prompt, tokenizer), request.prompt_logprobs
        check(request.model, [t for p in prompts for t in p])
        if k is not None and not 0 <= k <= max_logprobs:
            raise HTTPException(400, f"Requested prompt logprobs of {k}, which is not in [0, {max_logprobs}] "
                                     f"(this server's --max-logprobs).")  # fmt: skip
        if any(len(p) == 0 for p in prompts):
            raise HTTPException(400, "Every prompt needs at least one token.")
        # temperature 0 means greedy: log-probs at 1; raw_logprobs ignores the temperature, as vLLM's default does
        temperature = (request.temperature or 1.0) if logprobs_mode == "processed_logprobs" else 1.0
        with lock:
            answers, next_tokens = score_sequences(teacher, prompts, k or 0, temperature, decode)
        choices = [
            {"index": i, "text": decode(t), "logprobs": None, "finish_reason": "length", "stop_reason": None,
             "prompt_logprobs": answers[i] if k is not None else None}
            for i, t in enumerate(next_tokens)
        ]  # fmt: skip
        n_prompt = sum(len(p) for p in prompts)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(prompts), "total_tokens": n_prompt + len(prompts)}
        answer = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": model_name, "choices": choices, "usage": usage}  # fmt: skip
        return JSONResponse(answer)  # plain JSON: FastAPI's encoder walks every entry and is slow here


def serve(model, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **app_kwargs) -> None:
    """Build [`create_app`]`(model, **app_kwargs)` and serve it with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, **app_kwargs), host=host, port=port, log_level=log_level)
