"""Several teachers behind one [`Teacher`]: each row routed to its own teacher, or every token a mixture of all.

- `"route"`: a dataset column names each row's teacher (`{"math": t1, "code": t2}` and a `teacher` column), and each
  teacher scores only its rows. Any backend works (local, server, cache).
- `"weighted"`: every token is scored by every teacher and the target is the mixture `p = sum_k w_k p_k` with fixed
  weights `w_k` (summing to 1).
- `"confidence"`: the same mixture with weights set per token by each teacher's confidence,
  `w_k = softmax_k(-H(p_k))`: a teacher that is sure of the next token (low entropy) counts more there.

Token-level mixing needs each teacher's whole distribution, so it takes teachers that run in this process. The mixture
is again a full-form [`TeacherScores`], and data: the teachers' full-form scores as its `members` and the `(B, C, T)`
mixture weights; its logits are `T * log p` (the loss divides logits by the loss temperature `T`, so it sees `log p`
exactly). Each teacher's head runs only where its weight is non-zero, so routed rows cost one head each.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .base import Teacher, TeacherScores


class EnsembleTeacher(Teacher):
    """
    Several named teachers as one.

    Args:
        teachers (`dict[str, Teacher]`): The teachers by name.
        mixture (`str`, *optional*, defaults to `"route"`): `"route"`, `"weighted"` or `"confidence"` (see above).
        routing_column (`str`, *optional*, defaults to `"teacher"`): The row field naming its teacher (`"route"`).
        weights (`dict[str, float]`, *optional*): Fixed mixture weights (`"weighted"`), summing to 1; equal if unset.
        chunk_size (`int`, *optional*, defaults to `1024`): Positions projected to the vocabulary at once when the
            confidence weights or a top-k form are computed.
    """

    name = "ensemble"

    def __init__(self, teachers: dict, mixture="route", routing_column="teacher", weights=None, chunk_size=1024):
        if not teachers:
            raise ValueError("A dict of teachers must name at least one teacher.")
        self.teachers = dict(teachers)
        self.names = list(self.teachers)
        self.mixture = mixture
        self.routing_column = routing_column
        self.chunk_size = chunk_size
        self.weights = self._check_weights(weights) if mixture == "weighted" else None

    def _check_weights(self, weights) -> list[float]:
        if weights is None:
            return [1.0 / len(self.names)] * len(self.names)
        unknown, missing = set(weights) - set(self.names), set(self.names) - set(weights)
        if unknown or missing:
            raise ValueError(
                f"`teacher_weights` must give one weight per teacher ({', '.join(self.names)}); "
                f"unknown: {sorted(unknown)}, missing: {sorted(missing)}."
            )
        total = sum(weights.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6) or min(weights.values()) < 0:
            raise ValueError(f"`teacher_weights` must be non-negative and sum to 1, got {weights} (sum {total:.6g}).")
        return [float(weights[name]) for name in self.names]

    @property
    def vocab_size(self) -> int | None:
        sizes = {t.vocab_size for t in self.teachers.values()} - {None}
        return min(sizes) if sizes else None

    @property
    def scores_any_completion(self) -> bool:
        return all(t.scores_any_completion for t in self.teachers.values())

    def to(self, device) -> EnsembleTeacher:
        for teacher in self.teachers.values():
            teacher.to(device)
        return self

    def prepare(self, accelerator) -> EnsembleTeacher:
        for teacher in self.teachers.values():
            if isinstance(teacher, Teacher):
                teacher.prepare(accelerator)
            else:  # a bare model given as a member
                teacher.to(accelerator.device)
        return self

    def describe(self) -> str:
        how = {"route": f"each row routed by its `{self.routing_column}` column", "weighted": "weighted mixture per "
               f"token ({', '.join(f'{n}: {w:g}' for n, w in zip(self.names, self.weights or []))})",
               "confidence": "per-token mixture weighted by each teacher's confidence"}[self.mixture]  # fmt: skip
        return f"{len(self.names)} teachers, {how}: " + "; ".join(
            f"{name}: {teacher.describe()}" for name, teacher in self.teachers.items()
        )

    def output_heads(self) -> list:
        return [t.output_heads()[0] if isinstance(t, Teacher) else None for t in self.members]

    @property
    def members(self) -> list[Teacher]:
        return list(self.teachers.values())

    # ----------------------------------------------------------------------------------------------------- routing
    def check_columns(self, columns: list[str]) -> None:
        """Routing needs its column in the dataset."""
        if self.mixture == "route" and self.routing_column not in columns:
            raise ValueError(
                f"Several teachers ({', '.join(self.names)}) are routed by the {self.routing_column!r} column, which "
                f"the dataset lacks (columns: {columns}). Add it, point `teacher_routing_column` at the column naming "
                "each row's teacher, or mix the teachers on every token with `teacher_mixture='weighted'`."
            )

    def route(self, rows: list[dict]) -> list[int]:
        """The index of each row's teacher, from its `routing_column` value."""
        indices = []
        for i, row in enumerate(rows):
            if self.routing_column not in row:
                raise ValueError(
                    f"Row {i} has no {self.routing_column!r} field to route it to a teacher (fields: {sorted(row)}). "
                    f"Add the column to the dataset, set `teacher_routing_column`, or mix the teachers with "
                    "`teacher_mixture='weighted'`."
                )
            value = str(row[self.routing_column])
            if value not in self.teachers:
                raise ValueError(
                    f"{self.routing_column}={value!r} (row {i} of the batch) names no teacher; the teachers are "
                    f"{', '.join(self.names)}. Fix the column or add a teacher of that name."
                )
            indices.append(self.names.index(value))
        return indices

    def score(self, batch, *, temperature=1.0, top_k=None, need="full", hidden_layers=None) -> TeacherScores:
        if hidden_layers is not None:
            raise ValueError("Hidden-state matching takes one local teacher, not a dict of teachers.")
        if self.mixture == "route":
            if "rows" not in batch:
                raise ValueError("Routing needs the batch's dataset rows (`batch['rows']`).")
            return self._routed(batch, self.route(batch["rows"]), temperature, top_k, need)
        parts = [t.score(batch, temperature=temperature, need="full") for t in self.members]
        if any(p.form != "full" for p in parts):
            raise ValueError(
                f"`teacher_mixture={self.mixture!r}` mixes every token's whole distribution, so every teacher must "
                "run in this process (servers and caches return top-k only). Route rows instead "
                "(`teacher_mixture='route'`) or use local teachers."
            )
        b, c = batch["completion_ids"].shape
        if self.mixture == "weighted":
            weights = torch.tensor(self.weights).expand(b, c, -1)  # (B, C, T)
        else:
            weights = self._confidence(parts, b * c).view(b, c, -1)  # (B, C, T)
        return self._finish(_mixture(parts, weights, temperature), batch, top_k, need)

    def _routed(self, batch, owner: list[int], temperature, top_k, need) -> TeacherScores:
        b, c = batch["completion_ids"].shape
        parts, rows_of = [], []
        for k, teacher in enumerate(self.members):
            rows = [i for i, o in enumerate(owner) if o == k]
            rows_of.append(rows)
            if not rows:
                if getattr(teacher, "sharded", False):  # its passes are collectives: join the processes that route rows
                    teacher.score({k: v[:1] for k, v in batch.items() if isinstance(v, torch.Tensor)})
                parts.append(None)
                continue
            index = torch.tensor(rows, device=batch["input_ids"].device)
            sub = {key: v[index] for key, v in batch.items() if isinstance(v, torch.Tensor)}
            sub["rows"] = [batch["rows"][i] for i in rows]
            parts.append(teacher.score(sub, temperature=temperature, top_k=top_k, need=need))
        one_hot = torch.zeros(b, c, len(self.members))  # (B, C, T)
        for k, rows in enumerate(rows_of):
            one_hot[rows, :, k] = 1.0
        scored = [p for p in parts if p is not None]
        if all(p.form == "full" for p in scored):
            return self._finish(_mixture(parts, one_hot, temperature, rows_of), batch, top_k, need)
        merged = _merge_rows(parts, rows_of, batch["completion_ids"], top_k, self.chunk_size)
        merged.teacher_weights, merged.teacher_names = one_hot.to(merged.token_logps.device), self.names
        return merged

    def _confidence(self, parts: list[TeacherScores], n: int) -> torch.Tensor:
        """`(n, T)` per-token weights softmax_k(-H(p_k)) over the teachers."""
        flat = [p._map(lambda t: t.flatten(0, 1)) for p in parts]
        weights = []
        for start in range(0, n, self.chunk_size):
            end = min(start + self.chunk_size, n)
            entropies = []
            for p in flat:
                logps = torch.log_softmax(p.logits(start, end) / p.temperature, -1)  # (n, V)
                entropies.append(-(logps.exp() * logps.nan_to_num(neginf=0.0)).sum(-1))  # (n,)
            weights.append(torch.softmax(-torch.stack(entropies, -1), -1))  # (n, T)
        return torch.cat(weights).cpu()

    def _finish(self, scores: TeacherScores, batch, top_k, need) -> TeacherScores:
        scores.teacher_names = self.names
        if need == "full" and top_k is None:
            return scores
        return scores.reduce(batch["completion_ids"], top_k, self.chunk_size)


def per_teacher_metrics(names: list[str], totals: list[float]) -> dict[str, float]:
    """`teacher/<name>/tokens` and, where it scored any, `teacher/<name>/divergence` (its share-weighted mean), from
    the step's summed divergences then tokens per teacher (`2 T` numbers)."""
    metrics = {}
    for name, divergence, tokens in zip(names, totals[: len(names)], totals[len(names) :]):
        metrics[f"teacher/{name}/tokens"] = tokens
        if tokens > 0:
            metrics[f"teacher/{name}/divergence"] = divergence / tokens
    return metrics


def _mixture(parts, weights: torch.Tensor, temperature: float, rows_of=None) -> TeacherScores:
    """
    One full-form score of the mixture `p = sum_k w_k p_k` of the teachers' full-form scores (its `members`).

    Args:
        parts: Full-form [`TeacherScores`] of the `T` teachers, `(B, C, H_k)` hidden states each (`(B_k, C, H_k)`
            for the rows `rows_of[k]` when rows are routed; None for a teacher routed no rows).
        weights: `(B, C, T)` mixture weights, summing to 1 over the teachers.
        rows_of: The batch rows each teacher scored, when rows are routed.
    """
    device = next(p.hidden.device for p in parts if p is not None)
    b, c = weights.shape[:2]
    members = []
    for k, p in enumerate(parts):
        if p is None:  # no rows: zero-width hidden states, never projected (its weight is 0 everywhere)
            members.append(TeacherScores(temperature, hidden=torch.zeros(b, c, 0, device=device)))
            continue
        if rows_of is not None:  # its rows in batch order, zeros elsewhere
            index = torch.tensor(rows_of[k], dtype=torch.long, device=p.hidden.device)
            p = replace(p, hidden=p.hidden.new_zeros(b, c, p.hidden.shape[-1]).index_copy_(0, index, p.hidden))
        members.append(replace(p, layer_hidden=None))
    return TeacherScores(temperature, teacher_weights=weights.to(device), members=members)


def _merge_rows(parts, rows_of, targets: torch.Tensor, top_k, chunk_size) -> TeacherScores:
    """Top-k or token-form scores of routed rows, put back in batch order (full forms are reduced to match)."""
    forms = {p.form for p in parts if p is not None} - {"full"}
    if len(forms) > 1:
        raise ValueError(f"The routed teachers returned different score forms ({sorted(forms)}); set `teacher_top_k`.")
    k = next((p.topk_ids.shape[-1] for p in parts if p is not None and p.form == "topk"), top_k)
    reduced = []
    for p, rows in zip(parts, rows_of):
        if p is not None and p.form == "full":
            p = p.reduce(targets[rows], k if "topk" in forms else None, chunk_size)
        reduced.append(p)
    first = next(p for p in reduced if p is not None)
    b, c = targets.shape
    out = TeacherScores(first.temperature, token_logps=torch.zeros(b, c, device=first.token_logps.device))
    if first.form == "topk":
        widths = {p.topk_ids.shape[-1] for p in reduced if p is not None}
        if len(widths) > 1:
            raise ValueError(f"The routed teachers returned top-k lists of different sizes {sorted(widths)}.")
        out.topk_ids = torch.zeros(b, c, k, dtype=torch.long, device=out.token_logps.device)  # (B, C, K)
        out.topk_logps = torch.zeros(b, c, k, device=out.token_logps.device)  # (B, C, K)
    for p, rows in zip(reduced, rows_of):
        if p is None:
            continue
        out.token_logps[rows] = p.token_logps.to(out.token_logps)
        if out.topk_ids is not None:
            out.topk_ids[rows] = p.topk_ids.to(out.topk_ids)
            out.topk_logps[rows] = p.topk_logps.to(out.topk_logps)
    return out
