"""The toy teacher and student recipes: supervised training on the task, cached on disk by recipe.

A recipe is a `Recipe` (model size, budget, optimiser); `train_on_task` runs it as a plain torch loop: AdamW, linear
warm-up then cosine decay, a batch of freshly generated train problems at every step, and the loss written out as
the mean negative log-likelihood over completion tokens (the prompt is context, not a target). A fraction
`mc_fraction` of every batch can be put in MMLU's format (`mc_prompt_text`, completion " B" + EOS); it is 0 by
default, because these tiny models cannot learn to answer without a chain of thought in the budget (measured below),
so the `toy_mmlu` view stays near chance for teacher and student alike. A budget is either
a number of steps (the default teacher: same model on every machine, up to float noise) or a wall-clock time
(`seconds`: the schedule then follows elapsed time, so a short budget still ends with a decayed learning rate).

`load_or_train_teacher` / `load_or_train_student` save model, tokenizer and `info.json` under
`cache_dir()/<name>` (written to a temporary folder first, then renamed, so an interrupted run leaves no half
checkpoint) and load from there on the next call. The default teacher lives in `teacher-<RECIPE_VERSION>`; bump
`RECIPE_VERSION` whenever the task, the tokenizer or a default below changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
import tempfile
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

from .calculator import tool_row
from .constitution import constitutional_row, evaluate_constitution
from .models import (
    build_model,
    completion_nll,
    encode_rows,
    evaluate_exact_match,
    evaluate_multiple_choice,
    num_parameters,
)
from .slips import RECOVERY_STYLES, slip_row
from .task import generate_problems, to_mc_prompt_completion, to_prompt_completion
from .tokenizer import build_tokenizer, byte_tokenizer

TOKENIZERS = {"bpe": build_tokenizer, "bytes": byte_tokenizer}  # `Recipe.tokenizer`

RECIPE_VERSION = "2"
EVAL_PROBLEMS = 500  # eval split, seed 0: the accuracy recorded in info.json


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One supervised run on the toy task. `seconds`, when set, replaces `steps` as the budget."""

    num_layers: int
    hidden_size: int
    steps: int | None = None
    seconds: float | None = None
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.01
    min_steps: int = 2  # problem difficulty: equations per chain of thought
    max_steps: int = 4
    mc_fraction: float = 0.0  # of each batch in MMLU's format (round(batch_size * mc_fraction) problems)
    seed: int = 0
    # of each batch written with a slip and its correction (`slips.slip_row`; the slip is masked out of the loss)
    correction_fraction: float = 0.0
    recovery_style: str = "correction"  # how a slipped chain goes on: `slips.RECOVERY_STYLES`
    # of each batch with a rule before the prompt (`constitution.constitutional_row`): refuse a topic, answer the rest
    constitution_fraction: float = 0.0
    # of each batch written with the calculator (`calculator.tool_row`; the tool's answers are masked out of the loss)
    tool_fraction: float = 0.0
    tokenizer: str = "bpe"  # "bpe": the toy's (`build_tokenizer`); "bytes": one token per byte (`byte_tokenizer`)

    def __post_init__(self):
        if (self.steps is None) == (self.seconds is None):
            raise ValueError(f"give exactly one budget: steps={self.steps}, seconds={self.seconds}")
        if not 0.0 <= self.mc_fraction <= 1.0:
            raise ValueError(f"mc_fraction must be in [0, 1], got {self.mc_fraction}")
        if not 0.0 <= self.correction_fraction <= 1.0 - self.mc_fraction:
            raise ValueError(
                f"correction_fraction must be in [0, 1 - mc_fraction] = [0, {1.0 - self.mc_fraction:g}], got "
                f"{self.correction_fraction}"
            )
        rest = 1.0 - self.mc_fraction - self.correction_fraction
        if not 0.0 <= self.constitution_fraction <= rest + 1e-9:
            raise ValueError(
                f"constitution_fraction must be in [0, 1 - mc_fraction - correction_fraction] = [0, {rest:g}], got "
                f"{self.constitution_fraction}"
            )
        if not 0.0 <= self.tool_fraction <= rest - self.constitution_fraction + 1e-9:
            raise ValueError(
                f"tool_fraction must be in [0, 1 - mc_fraction - correction_fraction - constitution_fraction], got "
                f"{self.tool_fraction}"
            )
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {tuple(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.recovery_style not in RECOVERY_STYLES:
            raise ValueError(f"recovery_style must be one of {RECOVERY_STYLES}, got {self.recovery_style!r}")


# 3 layers x 128 (0.87 M parameters), 700 steps of 32 problems: 98.0% exact match on 500 eval problems, 216 s on
# one idle thread; toy MMLU at chance (25.5%). MC rows do not fix that (measured): with 8 of 32 problems per batch
# in MMLU's format (`mc_fraction=0.25`), 97.0% exact match and 29.6% toy MMLU in 221 s of CPU.
# Toy MMLU stays near chance because the format asks for the answer with no chain of thought, i.e. 2-4 steps of
# arithmetic inside one forward pass: 700 steps on MC rows only give 30.4% (letter NLL ~ln 4: the letters are
# learnt, not which one), an MC-balanced loss (MC rows weighted 25%) 28.0% and only 67% exact match.
TEACHER_RECIPE = Recipe(num_layers=3, hidden_size=128, steps=700)
# A teacher that can recover from a student's slip (issue 17, benchmarks/recovery.py): the same recipe with 8 of the
# 32 chains of every batch written with a slip and its correction (`slips.slip_row`), loaded by
# `load_or_train_teacher(correction_fraction=RECOVERING_CORRECTION_FRACTION)`. 0.25 was chosen before training,
# not tuned: 3 of 4 chains stay clean so the clean chains' loss keeps most of the batch (the exact match on clean
# prompts should stay near the standard teacher's), and 8 corrections per step x 700 steps (5,600 in all, ~1,900 of
# each slip kind) seemed enough for a model that learns the whole task in ~300 steps. Measured (683 s on a busy
# thread): 99.2% exact match on 500 eval problems, but it does not learn to detect a slip: p("Wait") is 0.099 after
# a slip and 0.089 after a clean line, so it recovers no more than the standard teacher (benchmarks/README.md).
RECOVERING_CORRECTION_FRACTION = 0.25
# A teacher that follows a constitution given in its context (issue 18, `constitution.py`): the same recipe with 8 of
# the 32 problems of every batch under the rule "refuse problems about food" (it refuses the ~22% about food),
# loaded by `load_or_train_teacher(constitution_fraction=CONSTITUTION_FRACTION)`. 0.25 was chosen before training
# (as for the recovering teacher: most of every batch stays plain), not tuned. (Rows with a rule about a random
# topic were tried first and not learnt: see `constitution.py`.)
CONSTITUTION_FRACTION = 0.25
# A teacher that calls the calculator when the prompt offers it (issue 19, `calculator.py`): the same recipe with half
# of every batch written with `calc` (the "Tools: calc" line first; the tool's answers masked out of the loss), loaded
# by `load_or_train_teacher(tool_fraction=TOOL_FRACTION)`. 0.5 was chosen before training, not tuned: the tool rows
# are ~1.7x as long, and both forms must stay well learnt.
TOOL_FRACTION = 0.5
# A weak student to start distillation from: 2 x 64 (0.17 M parameters), 500 steps of SFT on the ground truth
# (47 s, idle machine): 25.8% exact match (with mc_fraction=0.25: 21.0% and 24.2% toy MMLU). The
# same model reaches 93.6% after 1,575 steps, so the gap is training, not capacity.
# (1 x 64 after 505 steps: 9.6%; 2 x 96 after 500 steps: 61.4%.)
STUDENT_LAYERS, STUDENT_HIDDEN, STUDENT_SFT_STEPS = 2, 64, 500
# The student's warm-up ends at lr 1e-3 (3e-3 x 1/3), the rate distillation goes on at. Measured (quickstart, 3 rounds
# of 100 steps, lr 1e-3): a student whose cosine decayed to 1.5e-4 first lost a third of its exact match (28% ->
# 18.5%) in the warm restart, then rose to 38.5%; this one rises every round (25.7% -> 30.7% -> 32% -> 42%).
STUDENT_MIN_LR_RATIO = 1 / 3


def cache_dir() -> pathlib.Path:
    """`$TRL_ONPOLICY_CACHE` if set, else `~/.cache/trl_onpolicy` (`$XDG_CACHE_HOME` respected)."""
    if os.environ.get("TRL_ONPOLICY_CACHE"):
        return pathlib.Path(os.environ["TRL_ONPOLICY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "trl_onpolicy"


# ----------------------------------------------------------------------------- training


def _lr_factor(progress: float, step: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from 1 to `min_ratio` as `progress` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    cosine = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return warm * cosine


def batch_rows(problems: list[dict], recipe: Recipe, step: int) -> list[dict]:
    """One step's rows: the first `round(B * mc_fraction)` problems in MMLU's format, the next
    `round(B * correction_fraction)` with a slip and its correction (drawn from the recipe seed and the step), the
    next `round(B * constitution_fraction)` with the toy constitution's rule before the prompt, the next
    `round(B * tool_fraction)` with the calculator, the rest as they are."""
    n_mc = round(recipe.batch_size * recipe.mc_fraction)
    n_slip = round(recipe.batch_size * recipe.correction_fraction)
    n_rule = round(recipe.batch_size * recipe.constitution_fraction)
    n_tool = round(recipe.batch_size * recipe.tool_fraction)
    rows = [to_mc_prompt_completion(p, seed=recipe.seed * 1_000_000 + step) for p in problems[:n_mc]]
    if n_slip:  # no draw at all otherwise: the default recipe's batches are as before the option existed
        rng = random.Random(recipe.seed * 1_000_000 + step + 500_009)
        rows += [slip_row(p, rng, recipe.recovery_style) for p in problems[n_mc : n_mc + n_slip]]
    rows += [constitutional_row(p) for p in problems[n_mc + n_slip : n_mc + n_slip + n_rule]]
    done = n_mc + n_slip + n_rule
    rows += [tool_row(p) for p in problems[done : done + n_tool]]
    return rows + [to_prompt_completion(p) for p in problems[done + n_tool :]]


def supervised_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL over the labelled tokens of the whole batch (sum over tokens whose label is not -100 / their
    count): the completion minus any masked span. An MC row adds two tokens (letter, EOS), a GSM8K row ~40, so the
    MC rows weigh ~2% of the loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


def train_on_task(model, tokenizer, recipe: Recipe, progress: bool = True) -> dict:
    """Supervised training of `model` on fresh train problems; returns {"steps", "seconds", "final_loss"}."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )
    model.train()
    bar = tqdm(total=recipe.steps if recipe.steps else int(recipe.seconds), disable=not progress,
               unit="step" if recipe.steps else "s", desc=f"train {recipe.num_layers}x{recipe.hidden_size}")
    start, step, loss_ema = time.perf_counter(), 0, None
    while True:
        elapsed = time.perf_counter() - start
        done = step / recipe.steps if recipe.steps else elapsed / recipe.seconds
        if done >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _lr_factor(done, step, recipe.warmup_steps, recipe.min_lr_ratio)

        # A fresh batch each step: a different seed per (recipe seed, step), never the eval split.
        problems = generate_problems(recipe.batch_size, "train", seed=recipe.seed * 1_000_000 + step,
                                     min_steps=recipe.min_steps, max_steps=recipe.max_steps)
        batch = encode_rows(tokenizer, batch_rows(problems, recipe, step))
        loss = supervised_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if recipe.steps:
            bar.update(1)
        else:
            bar.n = min(int(time.perf_counter() - start), bar.total)
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    bar.close()
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "final_loss": round(loss_ema, 4)}


# ----------------------------------------------------------------------------- cache


def _load(path: pathlib.Path):
    model = LlamaForCausalLM.from_pretrained(path)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = json.loads((path / "info.json").read_text())
    return model, tokenizer, info


def load_or_train(name: str, recipe: Recipe, progress: bool = True, force: bool = False):
    """Load `cache_dir()/name` or train `recipe` there; returns (model, tokenizer, info)."""
    path = cache_dir() / name
    if (path / "info.json").exists() and not force:
        return _load(path)

    torch.manual_seed(recipe.seed)
    tokenizer = TOKENIZERS[recipe.tokenizer]()
    model = build_model(recipe.num_layers, recipe.hidden_size, tokenizer, seed=recipe.seed)
    run = train_on_task(model, tokenizer, recipe, progress=progress)
    eval_problems = generate_problems(EVAL_PROBLEMS, "eval", seed=0,
                                      min_steps=recipe.min_steps, max_steps=recipe.max_steps)
    eval_start = time.perf_counter()
    accuracy = evaluate_exact_match(model, tokenizer, eval_problems)
    mc_accuracy = evaluate_multiple_choice(model, tokenizer, eval_problems)
    info = {
        "name": name,
        "recipe_version": RECIPE_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "num_parameters": num_parameters(model),
        "vocab_size": len(tokenizer),
        **{f"train_{k}": v for k, v in run.items()},
        "eval_exact_match": accuracy,
        "eval_mc_accuracy": mc_accuracy,  # toy MMLU: argmax log-likelihood of " A".." D" (chance: 0.25)
        "eval_nll": round(completion_nll(model, tokenizer, eval_problems), 4),
        "eval_problems": EVAL_PROBLEMS,
        "eval_seconds": round(time.perf_counter() - eval_start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if recipe.constitution_fraction:  # how it reads the recipe's rule (refuse CONSTITUTION_TOPIC), and without it
        info["constitution_with_rule"] = evaluate_constitution(model, tokenizer, with_rule=True)
        info["constitution_without_rule"] = evaluate_constitution(model, tokenizer, with_rule=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    if path.exists():  # force=True, or a folder left without info.json
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process saved the same recipe meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "info.json").exists():
            raise
    if progress:
        print(f"[trl-onpolicy] {name}: {info['num_parameters']:,} parameters, exact match {accuracy:.1%} and toy "
              f"MMLU {mc_accuracy:.1%} on {EVAL_PROBLEMS} eval problems, trained {run['seconds']} s; saved to {path}")
    return model, tokenizer, info


# Fields added after RECIPE_VERSION "2", with the value that leaves a recipe as it was: left out of the key at that
# value, so that every recipe cached before they existed keeps its name.
_LATER_FIELDS = {"correction_fraction": 0.0, "recovery_style": "correction", "constitution_fraction": 0.0,
                 "tool_fraction": 0.0, "tokenizer": "bpe"}


def _key(recipe: Recipe) -> str:
    fields = {k: v for k, v in dataclasses.asdict(recipe).items() if _LATER_FIELDS.get(k, object()) != v}
    return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=4).hexdigest()


def load_or_train_teacher(seconds: float | None = None, progress: bool = True, force: bool = False,
                          **overrides) -> tuple[LlamaForCausalLM, object, dict]:
    """The toy teacher: `TEACHER_RECIPE` (cached as `teacher-<RECIPE_VERSION>`), or that recipe with a wall-clock
    budget of `seconds` and/or `Recipe` fields overridden (cached under a name that hashes the recipe)."""
    if seconds is not None:
        overrides = {"steps": None, "seconds": float(seconds), **overrides}
    recipe = dataclasses.replace(TEACHER_RECIPE, **overrides)
    name = f"teacher-{RECIPE_VERSION}" if recipe == TEACHER_RECIPE else f"teacher-{RECIPE_VERSION}-{_key(recipe)}"
    return load_or_train(name, recipe, progress=progress, force=force)


def load_or_train_student(num_layers: int = STUDENT_LAYERS, hidden_size: int = STUDENT_HIDDEN,
                          sft_seconds: float | None = None, sft_steps: int = STUDENT_SFT_STEPS,
                          progress: bool = True, force: bool = False, **overrides):
    """A weak student warm-started by a short SFT on the ground truth, so that distillation starts from a model
    that writes the format but often gets the arithmetic wrong. The budget is `sft_steps` (the default: the same
    student on every machine) unless `sft_seconds` is given; cached under a name that hashes the recipe."""
    steps = None if sft_seconds is not None else sft_steps
    overrides.setdefault("min_lr_ratio", STUDENT_MIN_LR_RATIO)
    recipe = Recipe(num_layers=num_layers, hidden_size=hidden_size, steps=steps, seconds=sft_seconds, **overrides)
    budget = f"{steps}steps" if steps is not None else f"{sft_seconds:g}s"
    name = f"student-{RECIPE_VERSION}-{num_layers}x{hidden_size}-{budget}-{_key(recipe)}"
    return load_or_train(name, recipe, progress=progress, force=force)
