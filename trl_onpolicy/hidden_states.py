"""Hidden-state matching: an extra loss term pulling the student's intermediate states toward the teacher's.

    term = hidden_state_weight * sum over completion tokens of mean over layer pairs (i, j) of
           distance(student_hidden[i], proj_ij(teacher_hidden[j]))  /  num_items

Layers are `hidden_states` indices (0 is the embeddings, `L` the last layer). The default map pairs every student layer
`i = 1..L_s` with the evenly spaced teacher layer `j = round(i * L_t / L_s)`, so the last layers meet. Where the widths
differ, `proj_ij` is a learned linear map (no bias) from the teacher's width to the student's, one per pair; where they
are equal it is the identity. The projector trains with the student, is saved beside it as
`hidden_state_projector.safetensors` (the student's own weights stay loadable by `from_pretrained` without it) and is
restored on resume. The distance is the mean squared error over the hidden dimension, or `1 - cosine similarity`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

PROJECTOR_FILE = "hidden_state_projector.safetensors"
PROJECTOR_ATTRIBUTE = "hidden_state_projector"


def layer_map(student_layers: int, teacher_layers: int, spec: list[str] | None = None) -> list[tuple[int, int]]:
    """
    `(student, teacher)` pairs of `hidden_states` indices.

    Args:
        student_layers: Number of transformer layers of the student (`hidden_states` has one more entry).
        teacher_layers: The same for the teacher.
        spec: `"i:j"` strings; `None` gives every student layer and its evenly spaced teacher layer.
    """
    if spec is None:
        return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]
    pairs = []
    for item in spec:
        try:
            i, j = (int(part) for part in str(item).split(":"))
        except ValueError:
            raise ValueError(f"`hidden_state_layers` entries are 'student:teacher' indices like '2:4', got {item!r}.")
        if not (0 <= i <= student_layers and 0 <= j <= teacher_layers):
            raise ValueError(
                f"`hidden_state_layers` pair {item!r} is out of range: the student's hidden states are 0..{student_layers} "
                f"and the teacher's 0..{teacher_layers} (0 is the embeddings)."
            )
        pairs.append((i, j))
    if not pairs:
        raise ValueError(
            "`hidden_state_layers` is empty: give at least one 'student:teacher' pair, or leave it unset."
        )
    return pairs


class HiddenStateProjector(nn.Module):
    """
    Maps the teacher's hidden states of each layer pair to the student's width.

    Args:
        num_pairs (`int`): Number of layer pairs.
        teacher_width (`int`): The teacher's hidden size.
        student_width (`int`): The student's hidden size. When equal to `teacher_width` the map is the identity and
            the module has no parameters.
    """

    def __init__(self, num_pairs: int, teacher_width: int, student_width: int):
        super().__init__()
        self.learned = teacher_width != student_width
        if self.learned:
            self.maps = nn.ModuleList(nn.Linear(teacher_width, student_width, bias=False) for _ in range(num_pairs))
            for layer in self.maps:
                nn.init.orthogonal_(layer.weight)  # keeps the teacher's geometry as far as the widths allow

    def forward(self, teacher_hidden: torch.Tensor) -> torch.Tensor:
        """`(N, L, H_t)` -> `(N, L, H_s)`."""
        if not self.learned:
            return teacher_hidden
        weight = self.maps[0].weight
        x = teacher_hidden.to(weight.dtype)
        return torch.stack([proj(x[:, k]) for k, proj in enumerate(self.maps)], 1)  # (N, L, H_s)


def hidden_state_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """
    Per-token distance averaged over layer pairs.

    Args:
        student: `(N, L, H)` the student's hidden states.
        teacher: `(N, L, H)` the teacher's, already projected (differentiable only through a learned projection).
        kind: `"mse"` (mean over `H` of the squared difference) or `"cosine"` (`1 - cos`).

    Returns:
        `(N,)` float32.
    """
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        per_layer = (student - teacher).pow(2).mean(-1)  # (N, L)
    elif kind == "cosine":
        per_layer = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)  # (N, L)
    else:
        raise ValueError(f"Unknown hidden-state distance {kind!r}: use 'mse' or 'cosine'.")
    return per_layer.mean(-1)  # (N,)


def matching_term(
    student_states, mask, teacher_layers, pairs, model, args, num_items: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The loss term `hidden_state_weight * sum_tokens distance / num_items`, and the plain sum of distances (a detached
    0-dim tensor, for logs).

    Args:
        student_states: The student's `hidden_states` tuple, each `(B, P + C, H_s)`.
        mask: `(B, C)` completion mask.
        teacher_layers: `(N, L, H_t)` the teacher's states of the paired layers at the `N` completion tokens.
        pairs: The `(student, teacher)` layer pairs.
        model: The student (its attached projector, if any, maps the teacher's width to the student's).
    """
    n_completion = mask.shape[1]
    student = torch.stack([student_states[i][:, -n_completion - 1 : -1][mask] for i, _ in pairs], 1)  # (N, L, H_s)
    projector = projector_of(model)
    target = teacher_layers if projector is None else projector(teacher_layers)  # (N, L, H_s)
    per_token = hidden_state_distance(student, target, args.hidden_state_distance)  # (N,)
    term = per_token.sum() * args.hidden_state_weight / max(float(num_items), 1e-8)
    return term, per_token.detach().sum()


def attach_projector(model, student, teacher, args) -> list[tuple[int, int]] | None:
    """
    Set up hidden-state matching for a trainer: the layer pairs, and a learned projector attached to `model` (as
    `model.hidden_state_projector`, so the optimizer, the distributed wrappers and checkpoints all see it) when the
    widths differ. Returns `None` when `args.hidden_state_weight` is 0.

    Args:
        model: The module the trainer optimises (the student, or its PEFT wrapper).
        student: The student's causal LM.
        teacher: The teacher backend; it must run in this process (its `text_config` is not None).
    """
    if args.hidden_state_weight == 0:
        return None
    t_config = teacher.text_config
    if t_config is None:
        raise ValueError(
            f"`hidden_state_weight={args.hidden_state_weight}` matches the teacher's hidden states, which only a teacher "
            f"running in this process has; the {type(teacher).__name__} backend returns log-probs only. Use a local "
            "teacher model or set `hidden_state_weight=0.0`."
        )
    s_config = student.config.get_text_config()
    pairs = layer_map(s_config.num_hidden_layers, t_config.num_hidden_layers, args.hidden_state_layers)
    projector = HiddenStateProjector(len(pairs), t_config.hidden_size, s_config.hidden_size)
    if projector.learned:
        weight = student.get_input_embeddings().weight
        setattr(model, PROJECTOR_ATTRIBUTE, projector.to(device=weight.device, dtype=weight.dtype))
    return pairs


def projector_of(model) -> HiddenStateProjector | None:
    """The learned projector attached to `model`, if any."""
    projector = getattr(model, PROJECTOR_ATTRIBUTE, None)
    return projector if isinstance(projector, HiddenStateProjector) else None


def without_projector(state_dict: dict) -> dict:
    """The student's own weights: a state dict without the projector's entries."""
    return {k: v for k, v in state_dict.items() if f"{PROJECTOR_ATTRIBUTE}." not in k}


def save_projector(model, folder: str) -> None:
    projector = projector_of(model)
    if projector is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
        save_file(state, os.path.join(folder, PROJECTOR_FILE))


def load_projector(model, folder: str) -> None:
    projector = projector_of(model)
    path = os.path.join(folder, PROJECTOR_FILE)
    if projector is not None and os.path.isfile(path):
        projector.load_state_dict(load_file(path, device=str(next(projector.parameters()).device)))
