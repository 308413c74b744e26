"""The teacher's one job: log-probs for the completion tokens the student (or anyone) wrote.

Every backend returns a [`TeacherScores`] in one of three forms, so the loss is the same for all of them:

- full distribution: the teacher's final hidden states at the completion positions plus its output head, projected to
  the vocabulary lazily, chunk by chunk, inside the loss (never a `(B, C, V)` tensor);
- top-k: the teacher's `k` most likely tokens and their log-probs per position; the rest of the mass is one tail
  bucket (the form a remote server or an offline cache returns);
- sampled token only: the log-prob of each completion token (enough for `sampled_reverse_kl`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class TeacherScores:
    """
    The teacher's view of a batch of completions. Tensors are `(B, C, ...)`, aligned with `completion_ids`, or, after
    [`~TeacherScores.flatten`], `(N, ...)` over the `N` real completion tokens.

    Args:
        temperature (`float`): The loss temperature the scores were computed at (and the head is applied at).
        token_logps (`torch.Tensor`, *optional*): `(B, C)` log-prob of each completion token.
        hidden (`torch.Tensor`, *optional*): `(B, C, H_t)` final hidden states predicting each completion token.
        head (`Callable`, *optional*): Maps `(n, H_t)` hidden states to `(n, V)` logits.
        topk_ids (`torch.Tensor`, *optional*): `(B, C, K)` the teacher's top-k token ids.
        topk_logps (`torch.Tensor`, *optional*): `(B, C, K)` their log-probs (tail mass is implied).
        vocab_size (`int`, *optional*): Logits beyond this index are padding of the embedding matrix and are dropped.
        teacher_weights (`torch.Tensor`, *optional*): `(B, C, T)` the share of each of `T` teachers in the target of
            each token (one-hot when rows are routed): only for the per-teacher metrics of several teachers.
        teacher_names (`list[str]`, *optional*): The `T` teachers' names, for the metrics.
        layer_hidden (`torch.Tensor`, *optional*): `(B, C, L, H_t)` the teacher's hidden states of `L` layers at the
            completion positions, for hidden-state matching (local teachers only).
    """

    temperature: float = 1.0
    token_logps: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None
    vocab_size: int | None = None
    teacher_weights: torch.Tensor | None = None
    teacher_names: list[str] | None = None
    layer_hidden: torch.Tensor | None = None

    _TENSORS = ("token_logps", "hidden", "topk_ids", "topk_logps", "teacher_weights", "layer_hidden")

    @property
    def form(self) -> str:
        """`"full"`, `"topk"` or `"token"`."""
        if self.hidden is not None:
            return "full"
        if self.topk_ids is not None:
            return "topk"
        return "token"

    def _map(self, fn) -> TeacherScores:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._TENSORS:
            if values[name] is not None:
                values[name] = fn(values[name])
        return TeacherScores(**values)

    def select(self, rows: torch.Tensor | list[int] | slice) -> TeacherScores:
        """Keep the batch rows `rows` (used to split a generation batch into micro-batches); a slice gives views."""
        if isinstance(rows, slice):
            return self._map(lambda t: t[rows])
        index = torch.as_tensor(rows, dtype=torch.long)
        return self._map(lambda t: t[index.to(t.device)])

    def first_columns(self, n_completion: int) -> TeacherScores:
        """Keep the first `n_completion` completion positions: `(B, C, ...)` -> `(B, n_completion, ...)` (views)."""
        return self._map(lambda t: t[:, :n_completion])

    def flatten(self, completion_mask: torch.Tensor) -> TeacherScores:
        """Keep the real completion tokens only: `(B, C, ...)` -> `(N, ...)`."""
        keep = completion_mask.bool()
        return self._map(lambda t: t[keep.to(t.device)])

    def to(self, device) -> TeacherScores:
        return self._map(lambda t: t.to(device))

    def logits(self, start: int, end: int) -> torch.Tensor:
        """Full-form only: `(end - start, V)` float32 logits at temperature 1 of flattened positions `start:end`."""
        logits = self.head(self.hidden[start:end]).float()  # (n, V_t)
        return logits[:, : self.vocab_size] if self.vocab_size is not None else logits

    def reduce(self, targets: torch.Tensor, top_k: int | None = None, chunk_size: int = 1024) -> TeacherScores:
        """
        Full form -> top-k form (with `top_k`) or sampled-token form (without), projecting `chunk_size` positions to
        the vocabulary at a time. Both keep the sampled tokens' log-probs (`token_logps`).

        Args:
            targets: `(B, C)` the completion tokens.
            top_k: Keep this many of the most likely tokens per position.
        """
        if self.form != "full":
            raise ValueError(f"Only full-form scores can be reduced, these are {self.form!r}.")
        batch_size, n_completion = self.hidden.shape[:2]
        flat = TeacherScores(
            self.temperature, hidden=self.hidden.flatten(0, 1), head=self.head, vocab_size=self.vocab_size
        )
        targets = targets.reshape(-1).to(self.hidden.device)  # (B*C,)
        token_logps, topk_ids, topk_logps = [], [], []
        for start in range(0, targets.shape[0], chunk_size):
            end = min(start + chunk_size, targets.shape[0])
            logps = torch.log_softmax(flat.logits(start, end) / self.temperature, -1)  # (n, V)
            token_logps.append(logps.gather(-1, targets[start:end, None]).squeeze(-1))  # (n,)
            if top_k is not None:
                values, ids = logps.topk(min(top_k, logps.shape[-1]), dim=-1)  # (n, K)
                topk_logps.append(values)
                topk_ids.append(ids)
        shape = (batch_size, n_completion)
        reduced = replace(self, hidden=None, head=None, token_logps=torch.cat(token_logps).view(shape))
        if top_k is not None:
            reduced.topk_ids = torch.cat(topk_ids).view(*shape, -1)  # (B, C, K)
            reduced.topk_logps = torch.cat(topk_logps).view(*shape, -1)  # (B, C, K)
        return reduced


class Teacher:
    """
    Interface of a teacher backend. Subclasses implement [`~Teacher.score`]; [`~Teacher.generate`] is needed only for
    `seq_kd=True` (teacher-written completions).
    """

    name: str = "teacher"
    scores_any_completion: bool = True  # False: only completions known in advance (a cache of the dataset's)

    def score(
        self,
        batch: dict[str, torch.Tensor],
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        need: str = "full",
        hidden_layers: list[int] | None = None,
    ) -> TeacherScores:
        """
        Score the completion tokens of `batch` (as built by [`~trl_onpolicy.rollouts.collate`]).

        Args:
            batch (`dict[str, torch.Tensor]`): `input_ids`, `attention_mask` `(B, P + C)`, `completion_ids`,
                `completion_mask` `(B, C)`.
            temperature (`float`): Loss temperature the log-probs are computed at.
            top_k (`int`, *optional*): Return the top-k form with this `k`.
            need (`str`): `"full"` for a distribution (full or top-k), `"token"` when only the sampled tokens'
                log-probs are used.
            hidden_layers (`list[int]`, *optional*): Also return these layers' hidden states (`layer_hidden`), for
                hidden-state matching; only a teacher that runs in this process can.
        """
        raise NotImplementedError

    def generate(self, prompt_ids: list[list[int]], generation_config, tokenizer=None):
        raise NotImplementedError(
            f"The {type(self).__name__} backend cannot write completions, so `seq_kd=True` is not available with it. "
            "Use a local teacher model, or set `seq_kd=False`."
        )

    @property
    def vocab_size(self) -> int | None:
        return None

    @property
    def text_config(self):
        """The text config (`num_hidden_layers`, `hidden_size`) of a teacher model that runs in this process, whose
        hidden states `score(..., hidden_layers=...)` can return (hidden-state matching); None for a backend without
        one here (a server, a cache, an ensemble)."""
        return None

    def to(self, device) -> Teacher:
        """Move what the backend holds in this process to `device` (nothing, for a remote or cached teacher)."""
        return self

    def prepare(self, accelerator) -> Teacher:
        """Place what the backend holds in this process for the launcher of `accelerator` (by default: on its
        device). A local model is sharded where the launcher shards the student (see `trl_onpolicy.frozen_models`)."""
        return self.to(accelerator.device)

    def describe(self) -> str:
        """One line naming the teacher, for the model card (never a secret)."""
        return type(self).__name__
