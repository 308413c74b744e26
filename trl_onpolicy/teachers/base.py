"""The teacher's one job: log-probs for the completion tokens the student (or anyone) wrote.

Every backend returns a [`TeacherScores`] in one of three forms, so the loss is the same for all of them, and every
form is data (tensors and numbers), which a checkpoint saves and restores without asking the teacher again:

- full distribution: the teacher's final hidden states at the completion positions plus its output head as a
  [`~trl_onpolicy.heads.LinearHead`] (tensors), projected to the vocabulary lazily, chunk by chunk or tile by tile,
  inside the loss (never a `(B, C, V)` tensor); or a mixture of several such scores (`members`, several teachers);
- top-k: the teacher's `k` most likely tokens and their log-probs per position; the rest of the mass is one tail
  bucket (the form a remote server or an offline cache returns);
- sampled token only: the log-prob of each completion token (enough for `sampled_reverse_kl`);
- spans: a teacher of another tokenizer ([`~trl_onpolicy.teachers.CrossTokenizerTeacher`]): at the first student
  token of each aligned span, the top-k of the teacher's span measure (teacher token ids and log-values) and the
  span's length in student tokens; the loss compares the student's span measure with it (ULD, hybrid ULD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from ..heads import LinearHead


@dataclass
class TeacherScores:
    """
    The teacher's view of a batch of completions. Tensors are `(B, C, ...)`, aligned with `completion_ids`, or, after
    [`~TeacherScores.flatten`], `(N, ...)` over the `N` real completion tokens.

    Args:
        temperature (`float`): The loss temperature the scores were computed at (and the head is applied at).
        token_logps (`torch.Tensor`, *optional*): `(B, C)` log-prob of each completion token.
        hidden (`torch.Tensor`, *optional*): `(B, C, H_t)` final hidden states predicting each completion token.
        head ([`~trl_onpolicy.heads.LinearHead`], *optional*): The teacher's output head, `(n, H_t)` -> `(n, V)`
            logits; with `hidden`, the full form. A plain `nn.Linear` is taken as its tensors. (A function is accepted
            for experiments; scores holding one cannot be saved in a checkpoint.)
        topk_ids (`torch.Tensor`, *optional*): `(B, C, K)` the teacher's top-k token ids.
        topk_logps (`torch.Tensor`, *optional*): `(B, C, K)` their log-probs (tail mass is implied).
        vocab_size (`int`, *optional*): Logits beyond this index are padding of the embedding matrix and are dropped.
        teacher_weights (`torch.Tensor`, *optional*): `(B, C, T)` the share of each of `T` teachers in the target of
            each token (one-hot when rows are routed): the mixture weights of `members`, and the per-teacher metrics.
        teacher_names (`list[str]`, *optional*): The `T` teachers' names, for the metrics.
        layer_hidden (`torch.Tensor`, *optional*): `(B, C, L, H_t)` the teacher's hidden states of `L` layers at the
            completion positions, for hidden-state matching (local teachers only).
        members (`list[TeacherScores]`, *optional*): A mixture: the `T` teachers' full-form scores, whose target is
            `p = sum_k w_k p_k` with `w = teacher_weights` (see [`~trl_onpolicy.teachers.EnsembleTeacher`]).
        span_length (`torch.Tensor`, *optional*): `(B, C)` long, the spans form: at the first student token of an
            aligned span, its length in student tokens; 0 elsewhere. `topk_ids` `(B, C, K)` are then the teacher's own
            token ids and `topk_logps` the log-values of its span measure there (see
            [`~trl_onpolicy.cross_tokenizer_divergences`]), and `token_logps` the teacher's log-prob of the span's
            text (NaN off span starts).
    """

    temperature: float = 1.0
    token_logps: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: LinearHead | Callable[[torch.Tensor], torch.Tensor] | None = None
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None
    vocab_size: int | None = None
    teacher_weights: torch.Tensor | None = None
    teacher_names: list[str] | None = None
    layer_hidden: torch.Tensor | None = None
    members: list[TeacherScores] | None = None
    span_length: torch.Tensor | None = None

    _TENSORS = ("token_logps", "hidden", "topk_ids", "topk_logps", "teacher_weights", "layer_hidden", "span_length")

    def __post_init__(self):
        if type(self.head) is torch.nn.Linear:
            self.head = LinearHead(self.head.weight.detach(), None if self.head.bias is None else self.head.bias.detach())

    @property
    def form(self) -> str:
        """`"full"`, `"topk"`, `"token"` or `"spans"`."""
        if self.span_length is not None:
            return "spans"
        if self.hidden is not None or self.members is not None:
            return "full"
        if self.topk_ids is not None:
            return "topk"
        return "token"

    def _map(self, fn) -> TeacherScores:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._TENSORS:
            if values[name] is not None:
                values[name] = fn(values[name])
        if self.members is not None:
            values["members"] = [m._map(fn) for m in self.members]
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
        """Full-form only: `(end - start, V)` float32 logits at temperature 1 of flattened positions `start:end` (of a
        mixture: `T * log p`, so the loss's `log_softmax(. / T)` gives the mixture's log-probs exactly)."""
        if self.members is not None:
            return _mixture_logits(self.members, self.teacher_weights[start:end], self.temperature, start, end)
        with torch.no_grad():
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
        batch_size, n_completion = targets.shape
        flat = self._map(lambda t: t.flatten(0, 1))
        targets = targets.reshape(-1)  # (B*C,)
        token_logps, topk_ids, topk_logps = [], [], []
        for start in range(0, targets.shape[0], chunk_size):
            end = min(start + chunk_size, targets.shape[0])
            logps = torch.log_softmax(flat.logits(start, end) / self.temperature, -1)  # (n, V)
            token_logps.append(logps.gather(-1, targets[start:end, None].to(logps.device)).squeeze(-1))  # (n,)
            if top_k is not None:
                values, ids = logps.topk(min(top_k, logps.shape[-1]), dim=-1)  # (n, K)
                topk_logps.append(values)
                topk_ids.append(ids)
        shape = (batch_size, n_completion)
        reduced = replace(self, hidden=None, head=None, members=None, token_logps=torch.cat(token_logps).view(shape))
        if top_k is not None:
            reduced.topk_ids = torch.cat(topk_ids).view(*shape, -1)  # (B, C, K)
            reduced.topk_logps = torch.cat(topk_logps).view(*shape, -1)  # (B, C, K)
        return reduced

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything but the heads' tensors, which are the teacher's frozen weights: [`from_state_dict`] takes them
        from the teacher again, and checks them against the fingerprints kept here."""
        if self.head is not None and not isinstance(self.head, LinearHead):
            raise TypeError("Teacher scores whose head is a function cannot be saved; return a `LinearHead`.")
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("head", "members")}
        state["head"] = None if self.head is None else self.head.fingerprint()
        state["members"] = None if self.members is None else [m.state_dict() for m in self.members]
        return state

    @classmethod
    def from_state_dict(cls, state: dict, heads: list[LinearHead | None]) -> TeacherScores:
        """The scores [`state_dict`] saved, with the output heads of the teacher (one per ensemble member)."""
        values = {k: v for k, v in state.items() if k not in ("head", "members")}
        if state["members"] is not None:
            members = [cls.from_state_dict(m, [h]) for m, h in zip(state["members"], heads, strict=True)]
            return cls(**values, members=members)
        head = None
        if state["head"] is not None:
            head = heads[0]
            if head is None or not _same(head.fingerprint(), state["head"]):
                raise ValueError(
                    "The rollout buffer of this checkpoint was scored by a teacher whose output head differs from this "
                    "run's teacher. Resume with the same teacher, or delete the checkpoint's `rollout_buffer_*.pt` "
                    "files to sample fresh rollouts."
                )
        return cls(**values, head=head)


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b))


def _mixture_logits(members, weights: torch.Tensor, temperature: float, start: int, end: int) -> torch.Tensor:
    """`(n, V)` `T * log(sum_k w_k p_k)` at positions `start:end`, from the members' full-form scores and `(n, T)`
    weights; each member's head runs only where its weight is non-zero (routed rows cost one head each)."""
    mixed = None
    for k, member in enumerate(members):
        where = weights[:, k] > 0  # (n,)
        if not where.any():
            continue
        part = replace(member, hidden=member.hidden[start:end][where.to(member.hidden.device)])
        logits = part.logits(0, part.hidden.shape[0]).to(weights.device)  # (m, V_k)
        term = torch.log_softmax(logits / temperature, -1) + weights[where, k, None].log()  # (m, V)
        if mixed is None:
            mixed = torch.full((weights.shape[0], term.shape[-1]), -math.inf, device=weights.device)  # (n, V)
        mixed[where] = torch.logaddexp(mixed[where], term)
    return mixed * temperature  # (n, V)


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

    def output_heads(self) -> list[LinearHead | None]:
        """The output heads its full-form scores carry (one per member of an ensemble; None where a backend has none
        here): frozen tensors, which a checkpoint's buffered scores take again on resume instead of saving them."""
        return [None]

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

    def save_state(self, folder: str, process_index: int) -> None:
        """Write what the teacher learns while training (an EMA self-teacher's weights) into checkpoint `folder`;
        nothing for a frozen teacher."""

    def restore_state(self, folder: str | None, process_index: int) -> None:
        """Load what [`save_state`] wrote, resuming from checkpoint `folder`."""
