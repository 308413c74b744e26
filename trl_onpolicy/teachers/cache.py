"""The offline teacher: its top-k log-probs of a dataset's completions, computed once, then read from disk.

[`~trl_onpolicy.teachers.cache_build.build_teacher_cache`] scores the dataset's own completions (tokenised exactly
as the trainer does) and stores, per completion token, the teacher's `k` most likely tokens, their log-probs and the
token's own log-prob in safetensors shards, with a `manifest.json` naming the teacher, the tokenizer, `k` and each
shard's sha256 (the format: [`~trl_onpolicy.teachers.cache_format`]). [`TeacherCache`], here, answers `score` from
the memory-mapped shards, so training runs without the teacher in memory ("offline distillation").

How it departs from a live teacher: only the top-k form exists (the tail mass `1 - sum(top-k)` is implied and
[`~trl_onpolicy.divergences.append_tail`] recovers it), so the loss temperature is fixed at build time (top-k
log-probs cannot be re-tempered exactly), and only the completions that were scored can be looked up: on-policy
rollouts (`lmbda > 0` at any step of its schedule) and `seq_kd` need a live teacher. Every refusal names what
differs and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import numpy as np
import torch
from safetensors import safe_open

from .._compat import is_peft_model
from ..lmbda_schedule import describe, lmbda_range
from .base import Teacher, TeacherScores
from .cache_format import (
    FORMAT,
    MANIFEST,
    VERSION,
    CacheError,
    is_teacher_cache,
    model_fingerprint,
    row_key,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)

_REBUILD = "Rebuild it with `build_teacher_cache(..., overwrite=True)`."
_NO_HIDDEN_STATES = (
    "Hidden-state matching needs the teacher's hidden states, which a teacher cache does not hold: use a local "
    "teacher, or set `hidden_state_weight=0`."
)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Shard:
    """One shard file, opened (memory-mapped) and checked against its sha256 on first use."""

    def __init__(self, folder: str, entry: dict):
        self.folder, self.file, self.entry = folder, entry["file"], entry
        self.path = os.path.join(folder, self.file)
        self._handle = None
        self.offsets: torch.Tensor | None = None

    def _error(self, what: str) -> CacheError:
        return CacheError(f"Teacher cache shard {self.file} in {self.folder} {what}. The cache is damaged: {_REBUILD}")

    def _check_exists(self) -> None:
        if not os.path.isfile(self.path):
            raise self._error("is missing (the manifest lists it)")

    def read_keys(self) -> torch.Tensor:
        """`(R, 16)` row keys, read without the rest of the file."""
        self._check_exists()
        try:
            with safe_open(self.path, framework="pt") as f:
                keys = f.get_tensor("keys")  # (R, 16)
        except Exception as e:  # a damaged header, a missing tensor
            raise self._error(f"cannot be read ({e})") from e
        if tuple(keys.shape) != (self.entry["rows"], 16):
            raise self._error(f"holds {keys.shape[0]} row keys where the manifest records {self.entry['rows']}")
        return keys

    def open(self):
        if self._handle is None:
            self._check_exists()
            digest = _file_sha256(self.path)
            if digest != self.entry["sha256"]:
                raise self._error(
                    f"fails its checksum (sha256 {digest[:16]}..., manifest {self.entry['sha256'][:16]}...)"
                )
            self._handle = safe_open(self.path, framework="pt")
            self.offsets = self._handle.get_tensor("offsets")  # (R + 1,)
        return self._handle

    def read(self, row: int, need_topk: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """`(n, K)` top-k ids and log-probs (None unless `need_topk`) and `(n,)` token log-probs of row `row`."""
        handle = self.open()
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        token_logps = handle.get_slice("token_logps")[start:end]  # (n,)
        if not need_topk:
            return None, None, token_logps
        return handle.get_slice("topk_ids")[start:end], handle.get_slice("topk_logps")[start:end], token_logps

    def read_spans(self, row: int) -> torch.Tensor:
        """`(n,)` span lengths of row `row` (a cache built for a teacher of another tokenizer)."""
        handle = self.open()
        return handle.get_slice("span_length")[int(self.offsets[row]) : int(self.offsets[row + 1])]


def _collated_rows(batch: dict[str, torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's real prompt and completion ids from the [`collate`] layout (prompts left-, completions right-padded)."""
    n_completion = batch["completion_ids"].shape[1]
    n_prompt = batch["input_ids"].shape[1] - n_completion  # P
    prompt_ids = batch["input_ids"][:, :n_prompt].cpu().numpy()  # (B, P)
    prompt_mask = batch["attention_mask"][:, :n_prompt].bool().cpu().numpy()  # (B, P)
    completion_ids = batch["completion_ids"].cpu().numpy()  # (B, C)
    completion_mask = batch["completion_mask"].bool().cpu().numpy()  # (B, C)
    return [(p[pm], c[cm]) for p, pm, c, cm in zip(prompt_ids, prompt_mask, completion_ids, completion_mask)]


class TeacherCache(Teacher):
    """
    A teacher read from a cache made by [`build_teacher_cache`]: the top-k form of the teacher's scores of the
    dataset's own completions, without the teacher in memory. Shards are memory-mapped and checked against their
    sha256 the first time they are read; only the row keys are loaded up front (an index of ~150 bytes per row).
    Use it as `teacher_model` with `lmbda=0.0`, the cache's temperature as a constant loss temperature, and the
    `max_length`/`max_completion_length` it was built with; `teacher_top_k=None` means all of its `k`.

    Args:
        path (`str`): The cache folder.
        tokenizer (*optional*): The student's tokenizer; a cache made with another one is refused.
        expected_teacher (`str` or [`~transformers.PreTrainedModel`], *optional*): Refuse a cache made by another
            teacher: a model is compared by its weights ([`model_fingerprint`]), a string with the stored name.
    """

    name = "cache"
    scores_any_completion = False  # only the dataset's own completions were scored

    def __init__(self, path, tokenizer=None, *, expected_teacher=None):
        self.path = os.fspath(path)
        self.manifest = self._read_manifest()
        self.top_k, self.temperature = self.manifest["top_k"], self.manifest["temperature"]
        self.spans = bool(self.manifest.get("spans"))  # built for a teacher of another tokenizer: the spans form
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        if expected_teacher is not None:
            self._check_teacher(expected_teacher)
        self._shards = [_Shard(self.path, entry) for entry in self.manifest["shards"]]
        self._index: dict[bytes, tuple[int, int]] = {}
        for s, shard in enumerate(self._shards):
            for row, key in enumerate(shard.read_keys().numpy()):
                self._index[key.tobytes()] = (s, row)

    # -------------------------------------------------------------- manifest and identity
    def _read_manifest(self) -> dict:
        file = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(file):
            raise CacheError(
                f"{self.path} is not a complete teacher cache: it has no {MANIFEST} (written last, so building "
                f"stopped early, or this is not a cache folder). {_REBUILD}"
            )
        try:
            with open(file, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheError(f"The teacher cache manifest {file} is not valid JSON ({e}). {_REBUILD}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else manifest
            raise CacheError(
                f"{file} is not a manifest of a {FORMAT!r} version {VERSION} (found {found!r}). {_REBUILD}"
            )
        required = ("teacher", "tokenizer", "top_k", "temperature", "vocab_size", "rows", "tokens", "shards")
        missing = [key for key in required if key not in manifest]
        if missing:
            raise CacheError(f"The teacher cache manifest {file} lacks {missing}. {_REBUILD}")
        for entry in manifest["shards"]:  # plain file names only: a manifest must not point outside its folder
            if not isinstance(entry.get("file"), str) or os.path.basename(entry["file"]) != entry["file"]:
                raise CacheError(f"The teacher cache manifest {file} lists a bad shard {entry!r}. {_REBUILD}")
        return manifest

    def _check_tokenizer(self, tokenizer) -> None:
        stored, given = self.manifest["tokenizer"]["fingerprint"], tokenizer_fingerprint(tokenizer)
        if stored != given:
            raise CacheError(
                f"The teacher cache at {self.path} was made with a different tokenizer than the student's: cache "
                f"{stored[:16]}..., student {given[:16]}... (sha256 of vocabulary, special tokens and chat template). "
                "Its token ids would name other tokens: rebuild the cache with the student's tokenizer."
            )

    def _check_teacher(self, expected) -> None:
        stored = self.manifest["teacher"]
        if isinstance(expected, str):
            if stored["name"] is not None and stored["name"].rstrip("/") == expected.rstrip("/"):
                return
            theirs = f"{expected!r}"
        else:
            name = (expected.get_base_model() if is_peft_model(expected) else expected).config._name_or_path or None
            fingerprint = model_fingerprint(expected)
            if fingerprint == stored["fingerprint"] or (stored["fingerprint"] is None and name == stored["name"]):
                return
            theirs = f"{name!r} (weights {fingerprint[:16]}...)"
        ours = f"{stored['name']!r}" + (f" (weights {stored['fingerprint'][:16]}...)" if stored["fingerprint"] else "")
        raise CacheError(
            f"The teacher cache at {self.path} was made by another teacher: it holds the scores of {ours}, not of "
            f"{theirs}. Build a cache with this teacher, or use the cache of the teacher you meant."
        )

    def describe(self) -> str:
        name = self.manifest["teacher"].get("name") or "an unnamed teacher"
        return (
            f"`{name}` through an offline cache of its top-{self.top_k} log-probs (temperature {self.temperature:g})"
        )

    @property
    def vocab_size(self) -> int | None:
        return self.manifest["vocab_size"]

    def __len__(self) -> int:
        return len(self._index)

    # -------------------------------------------------------------- checks against a run
    def _check_temperature(self, temperature: float) -> None:
        if not math.isclose(temperature, self.temperature, rel_tol=1e-6):
            raise CacheError(
                f"The teacher cache at {self.path} holds log-probs at temperature {self.temperature}, but the loss "
                f"asks for temperature {temperature}. Top-k log-probs cannot be re-tempered exactly (the rest of the "
                f"distribution is gone): rebuild the cache at temperature {temperature}, or set "
                f"`temperature_start={self.temperature}` with a constant `loss_temperature_schedule`."
            )

    def _check_top_k(self, top_k: int | None) -> int:
        if top_k is not None and top_k > self.top_k:
            raise CacheError(
                f"`teacher_top_k={top_k}` asks for more than the {self.top_k} log-probs per token the teacher cache at "
                f"{self.path} holds. Set `teacher_top_k` <= {self.top_k} (None uses all {self.top_k}), or rebuild the "
                f"cache with `top_k={top_k}`."
            )
        return self.top_k if top_k is None else top_k

    def _missing_row(self, i: int, prompt: np.ndarray, completion: np.ndarray) -> CacheError:
        for shard in self._shards:  # damage is the likelier explanation: report it first (reads every shard once)
            shard.open()
        m = self.manifest
        return CacheError(
            f"Row {i} of the batch ({len(prompt)} prompt + {len(completion)} completion tokens) is not in the teacher "
            f"cache at {self.path}. The cache holds the teacher's scores of the dataset's own completions only: "
            "on-policy rollouts (`lmbda` > 0) and `seq_kd=True` need a live teacher. A different `max_length` or "
            "`max_completion_length` than at build time also changes the tokens: the cache was built with "
            f"max_prompt_length={m.get('max_prompt_length')} (the trainer uses `max_length - max_completion_length`) "
            f"and max_completion_length={m.get('max_completion_length')}."
        )

    def check_rows(self, dataset, args) -> None:
        """
        Refuse, when the trainer is built, a training set whose rows (cut as this run cuts them) are not all in the
        cache: each would fail at the first step that draws it. Names the lengths the cache was built with when the
        run's differ (the usual cause), and the two fixes.
        """
        rows = zip(dataset["prompt_ids"], dataset["completion_ids"])
        missing = [i for i, (p, c) in enumerate(rows) if len(c) and row_key(p, c) not in self._index]
        if not missing:
            return
        where = f"{len(missing)} of {len(dataset)} training rows (row {missing[0]} first) are not in the teacher cache "
        built = (self.manifest.get("max_prompt_length"), self.manifest.get("max_completion_length"))
        run = (args.max_prompt_length, args.max_completion_length)
        if built == run:
            raise CacheError(
                f"{where}at {self.path}: it was built from other rows (another dataset or split, or another chat "
                "template). Rebuild it from this training set with `trl-onpolicy cache-teacher` or "
                "`build_teacher_cache(..., overwrite=True)`."
            )
        cache_max_length = None if None in built else built[0] + built[1]
        raise CacheError(
            f"{where}at {self.path}: it was built with max_prompt_length={built[0]} and max_completion_length="
            f"{built[1]}, but this run cuts rows at max_prompt_length={run[0]} (`max_length - max_completion_length`) "
            f"and max_completion_length={run[1]}. Train with the cache's lengths (`max_length={cache_max_length}`, "
            f"`max_completion_length={built[1]}`), or rebuild the cache with this run's (`trl-onpolicy cache-teacher "
            f"... --max-length {args.max_length} --max-completion-length {run[1]} --overwrite`)."
        )

    # -------------------------------------------------------------- scoring
    def score(self, batch, *, temperature=1.0, top_k=None, need="full", hidden_layers=None) -> TeacherScores:
        """Top-k form (`need="full"`) or token form (`need="token"`) of the cached scores of `batch`'s rows."""
        if hidden_layers is not None:
            raise ValueError(_NO_HIDDEN_STATES)
        self._check_temperature(temperature)
        k = self._check_top_k(top_k)
        batch_size, n_completion = batch["completion_ids"].shape
        need_topk = need != "token" or self.spans
        token_logps = torch.full((batch_size, n_completion), float("nan") if self.spans else 0.0)  # (B, C)
        span_length = torch.zeros(batch_size, n_completion, dtype=torch.long) if self.spans else None  # (B, C)
        topk_ids = torch.zeros(batch_size, n_completion, k, dtype=torch.long)  # (B, C, K) filler: token 0 ...
        topk_logps = torch.full((batch_size, n_completion, k), -math.log(k))  # (B, C, K) ... a uniform distribution
        for i, (prompt, completion) in enumerate(_collated_rows(batch)):
            if len(completion) == 0:
                continue
            found = self._index.get(row_key(prompt, completion))
            if found is None:
                raise self._missing_row(i, prompt, completion)
            shard = self._shards[found[0]]
            ids, logps, tokens = shard.read(found[1], need_topk)  # (n, K), (n, K), (n,)
            if tokens.shape[0] != len(completion):
                raise shard._error(f"gives {tokens.shape[0]} tokens for a row of {len(completion)}")
            token_logps[i, : len(completion)] = tokens
            if self.spans:
                span_length[i, : len(completion)] = shard.read_spans(found[1]).long()
            if need_topk:
                topk_ids[i, : len(completion)] = ids[:, :k].long()
                topk_logps[i, : len(completion)] = logps[:, :k]
        device = batch["completion_ids"].device
        scores = TeacherScores(temperature, token_logps=token_logps.to(device), vocab_size=self.vocab_size)
        if self.spans:  # off a span's first token nothing is compared: no top-k mass there, as the live teacher gives
            topk_logps.masked_fill_((span_length == 0)[..., None], float("-inf"))
            scores.span_length = span_length.to(device)
        if need_topk:
            scores.topk_ids, scores.topk_logps = topk_ids.to(device), topk_logps.to(device)
        return scores

    # -------------------------------------------------------------- from a training config
    @classmethod
    def from_config(cls, path, args, tokenizer) -> TeacherCache:
        """Open the cache at `path` with the student's `tokenizer` for a run with config `args` ([`check_config`])."""
        cache = cls(path, tokenizer)
        cache.check_config(args)
        return cache

    def check_config(self, args) -> None:
        """
        Refuse settings of an [`OnPolicyDistillConfig`] the cache cannot serve: student or teacher rollouts, a loss
        temperature other than the cache's, more top-k than it holds, hidden-state matching, or a
        `teacher_model_name_or_path` that names another teacher than the one the cache was made with.
        """
        if lmbda_range(args)[1] > 0 or args.seq_kd:
            raise CacheError(
                f"A teacher cache scores only the dataset's own completions, but {describe(args)} asks for "
                f"student rollouts{' and `seq_kd=True` for teacher-written ones' if args.seq_kd else ''}. Set "
                "`lmbda=0.0` and `seq_kd=False` to train from the cache, or use a live teacher."
            )
        end = args.temperature_end if args.temperature_end is not None else args.temperature_start
        if args.loss_temperature_schedule != "constant" or not math.isclose(args.temperature_start, self.temperature):
            raise CacheError(
                f"The teacher cache at {self.path} holds log-probs at temperature {self.temperature}, but the loss "
                f"temperature schedule is {args.loss_temperature_schedule!r} from {args.temperature_start} to {end}. "
                f"Set `loss_temperature_schedule='constant'` and `temperature_start={self.temperature}`, or rebuild "
                "the cache at the temperature you want."
            )
        self._check_top_k(args.teacher_top_k)
        if getattr(args, "hidden_state_weight", 0):
            raise CacheError(_NO_HIDDEN_STATES)
        named = args.teacher_model_name_or_path
        plain = (
            isinstance(named, str) and not named.startswith(("http://", "https://")) and not is_teacher_cache(named)
        )
        if plain and self.manifest["teacher"]["name"]:  # both are plain names: they must agree
            self._check_teacher(named)
        built = {key: self.manifest.get(key) for key in ("max_prompt_length", "max_completion_length")}
        if built != {key: getattr(args, key) for key in built}:
            logger.warning("The teacher cache was built with %s: rows this run cuts differently are not in it.", built)
