"""Does the teacher recover from the student's mistakes? Issue 17's measurement, for the standard toy teacher and for
the recovering one (`toy.RECOVERING_CORRECTION_FRACTION` of its training chains hold a slip and its correction).

    OMP_NUM_THREADS=1 python benchmarks/recovery.py                       # both teachers (~1 min with both cached)
    OMP_NUM_THREADS=1 python benchmarks/recovery.py --teachers standard   # one of them

On-policy distillation asks the teacher about prefixes the student wrote, mistakes included. This script measures
what the teacher does after the student's first wrong line. Settings, fixed before the first run:

- problems: the 200 held-out problems of `quality.py` (standard task: 2-4 equations, eval split, seed 0);
- student: `quality.py`'s 2 x 128 after 300 SFT steps; one completion per problem, sampled at temperature 1 with
  no top-k/top-p (torch seed 0, batches of 64, left padding), at most `quality.completion_length` new tokens,
  cut at its first EOS; the completions are token ids, and every cut below is a cut of these ids (the teacher sees
  exactly the tokens the student wrote, as in on-policy distillation);
- lines: the completion's ids split at the newline token (the toy tokenizer's only token that holds a newline);
  a line is judged wrong by `toy.slips.wrong_lines` (its equation's result is not `a op b`, or its left operand is
  not the chain's own previous result; for the first equation, not the question's first integer; `b` and the
  `####` line are not judged);
- for each completion with a wrong line, three greedy continuations by the teacher, at most
  `completion_length` new tokens each, scored by `toy.is_correct` on the student's prefix + the continuation:
  (a) **after**: cut right after the first wrong line's newline token (when the line is the completion's last and
  has none, a newline token is appended: the student's next token would have been one) -> the recovery rate;
  (b) **before**: cut right before the first wrong line (after the previous line's newline; the bare prompt when
  the first line is wrong); (c) **bare prompt**, on these completions' problems and on all 200;
- copy: in continuation (a), the first equation's left operand (the token that holds it); the teacher's
  probability there of the wrong line's result (the value the student's chain carries on: its token " <c>"), and
  the entropy (nats) of the teacher's distribution at that token, both averaged over the completions whose
  continuation (a) has an equation; plus the share whose greedy left operand is that value. For a teacher that
  writes a correction line first ("Wait, a op b = c."), that first equation is the correction;
- the teacher's log-prob of the student's own tokens (teacher forcing on prompt + completion): the mean over all
  tokens of the first wrong lines (the tokens cut (a) adds to cut (b), the student's newline included), pooled
  over completions, against the mean over all the completion tokens before them (cut (b)), pooled likewise;
- for the recovering teacher's format: the share of continuations (a) that start with "Wait," (a correction), and
  the share of bare-prompt completions (all 200) that contain "Wait," (a correction where there was no slip);
- added after the first look (the 3 x 128 recovering teacher did not correct): the same problems with a slip of
  the training kind (`synthetic_slips`), to tell "cannot detect slips at all" from "cannot detect the student's";
  and a second judge, "reference" (the first equation that is not the reference chain's, `toy.slips.first_departure`),
  which is the one that reproduces the issue's numbers (see benchmarks/README.md).

Writes `results/recovery.json` (one entry per teacher; a run updates only the teachers it measured) and prints a
table. Both teachers are loaded from the cache (trained there on the first call: ~4-9 min each on one thread).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))
import quality  # (the benchmark's task, problems, student and completion length)

from trl_onpolicy.toy import RECOVERING_CORRECTION_FRACTION

RESULTS = Path(__file__).parent / "results" / "recovery.json"
TASK, N_PROBLEMS, SEED, BATCH = "standard", 200, 0, 64
# name -> `toy.load_or_train_teacher` overrides. Two follow-ups chosen after the first look (the 3 x 128 recovering
# teacher did not learn to detect slips): the same data with twice the depth ("recovering_6x128"), and the same
# model with 3 of 4 chains slipped ("recovering_075": 3x the detection examples). A third, chosen after all three
# failed to detect slips, asks for no detection at all: "recovering_silent" is the first recovering recipe with the
# correction line left out (`recovery_style="silent"`), so every chain that slipped goes straight on from the right
# value. Fixed before training it (2026-12-03): the same 3 x 128, 700 steps, 8 of 32 chains slipped; it counts as
# a teacher that recovers when its recovery rate after the student's first wrong line (arithmetic judge) is at
# least 3x the standard teacher's (>= 24%) with bare-prompt exact match >= 95%.
TEACHERS = {
    "standard": {},
    "recovering": {"correction_fraction": RECOVERING_CORRECTION_FRACTION},
    "recovering_6x128": {"correction_fraction": RECOVERING_CORRECTION_FRACTION, "num_layers": 6},
    "recovering_075": {"correction_fraction": 0.75},
    "recovering_silent": {"correction_fraction": RECOVERING_CORRECTION_FRACTION, "recovery_style": "silent"},
}
DEFAULT_TEACHERS = ["standard", "recovering"]
JUDGES = ("arithmetic", "reference")


def load_teacher(name: str):
    from trl_onpolicy import toy

    return toy.load_or_train_teacher(progress=True, **TEACHERS[name])


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    return ids, mask


@torch.no_grad()
def continue_ids(model, tokenizer, prefixes: list[list[int]], max_new_tokens: int, sample: bool = False):
    """Greedy (or temperature-1 sampled) continuations of token-id prefixes: a list of (ids cut at the first EOS,
    the logits (L, V) of the steps that produced them)."""
    out = []
    for start in range(0, len(prefixes), BATCH):
        ids, mask = _left_padded(prefixes[start : start + BATCH], tokenizer.pad_token_id)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=sample, temperature=1.0 if sample else None,
            top_k=0 if sample else None, top_p=1.0 if sample else None, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
        new = gen.sequences[:, ids.shape[1] :]  # (B, L)
        logits = torch.stack(gen.logits, dim=1)  # (B, L, V)
        for row, row_logits in zip(new.tolist(), logits):
            n = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            out.append((row[:n], row_logits[:n]))
    return out


@torch.no_grad()
def token_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion[k] | prompt + completion[:k]) under `model`, for every k."""
    ids = torch.tensor([prompt + completion])  # (1, T)
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    picked = logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1)  # (T-1,)
    return picked[len(prompt) - 1 :].tolist()


def first_error(judge: str, problem: dict, text: str) -> int | None:
    """The first wrong line's index by `judge`: "arithmetic" (the issue's definition, `toy.slips.first_wrong_line`)
    or "reference" (the first departure from the reference chain, `toy.slips.first_departure`)."""
    from trl_onpolicy.toy.slips import first_departure, first_wrong_line

    if judge == "arithmetic":
        return first_wrong_line(problem["question"], text)
    return first_departure(problem["answer"], text)


def line_cuts(tokenizer, judge: str, problem: dict, completion: list[int]) -> dict | None:
    """Where the first wrong line of a completion (token ids) starts and ends, or None when no line is wrong."""
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    ends = [k + 1 for k, t in enumerate(completion) if t == newline]  # cut positions after each newline
    bounds = [0] + ends + ([len(completion)] if not ends or ends[-1] != len(completion) else [])
    lines = [tokenizer.decode(completion[s:e]).rstrip("\n") for s, e in itertools.pairwise(bounds)]
    i = first_error(judge, problem, "\n".join(lines))
    if i is None:
        return None
    from trl_onpolicy.toy.task import _EQUATION

    match = _EQUATION.search(lines[i])
    return {"line": i, "before": bounds[i], "after": bounds[i + 1], "text": lines[i], "wrong_value": int(match[4]),
            "newline_added": completion[bounds[i + 1] - 1] != newline}  # fmt: skip


def first_operand(tokenizer, continuation: list[int], logits: torch.Tensor, value: int) -> dict | None:
    """At the first equation's left operand in a continuation: p(value), the entropy, and the greedy operand."""
    from trl_onpolicy.toy.task import _EQUATION

    text = tokenizer.decode(continuation)
    match = _EQUATION.search(text)
    if match is None:
        return None
    k = next((k for k in range(len(continuation)) if len(tokenizer.decode(continuation[: k + 1])) >= match.end(1)),
             None)  # fmt: skip
    value_ids = tokenizer(f" {value}", add_special_tokens=False)["input_ids"]
    if len(value_ids) != 1:  # a student's value above 99: several tokens, left out (counted in the JSON)
        return {"multi_token": True}
    logprobs = torch.log_softmax(logits[k].float(), dim=-1)  # (V,)
    return {"p_copy": logprobs[value_ids[0]].exp().item(), "entropy": -(logprobs.exp() * logprobs).sum().item(),
            "greedy_copy": int(match[1]) == value}  # fmt: skip


def student_completions(student, tokenizer) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """The problems, their prompts' ids and one sampled completion (ids) per problem: the same for every teacher."""
    from trl_onpolicy import toy

    problems = quality.eval_problems(TASK, N_PROBLEMS)
    prompts = [tokenizer(toy.prompt_text(p["question"]), add_special_tokens=False)["input_ids"] for p in problems]
    torch.manual_seed(SEED)
    length = quality.completion_length(tokenizer, TASK)
    sampled = [ids for ids, _ in continue_ids(student, tokenizer, prompts, length, sample=True)]
    return problems, prompts, sampled


def measure(teacher, tokenizer, problems: list[dict], prompts: list[list[int]], sampled: list[list[int]],
            judge: str = "arithmetic") -> dict:
    """Issue 17's measurement of one teacher on the student's completions (see the module docstring)."""
    from trl_onpolicy import toy

    length = quality.completion_length(tokenizer, TASK)
    bare = [ids for ids, _ in continue_ids(teacher, tokenizer, prompts, length)]
    bare_correct = [toy.is_correct(tokenizer.decode(ids), p) for ids, p in zip(bare, problems)]

    cases = [(j, c) for j, c in ((j, line_cuts(tokenizer, judge, p, sampled[j])) for j, p in enumerate(problems))
             if c is not None]  # fmt: skip
    newline = tokenizer.convert_tokens_to_ids("Ċ")

    def prefix(j, cut, add_newline=False):
        return sampled[j][:cut] + ([newline] if add_newline else [])

    after = [prefix(j, c["after"], c["newline_added"]) for j, c in cases]
    before = [prefix(j, c["before"]) for j, c in cases]
    runs = {
        "after": continue_ids(teacher, tokenizer, [prompts[j] + a for (j, _), a in zip(cases, after)], length),
        "before": continue_ids(teacher, tokenizer, [prompts[j] + b for (j, _), b in zip(cases, before)], length),
    }
    scored = {
        name: [toy.is_correct(tokenizer.decode(pre + ids), problems[j]) for (j, _), pre, (ids, _) in
               zip(cases, after if name == "after" else before, runs[name])]
        for name in runs
    }  # fmt: skip
    copies = [first_operand(tokenizer, ids, logits, c["wrong_value"]) for (_, c), (ids, logits) in
              zip(cases, runs["after"])]  # fmt: skip
    multi_token = sum(c is not None and "multi_token" in c for c in copies)
    copies = [c for c in copies if c is not None and "multi_token" not in c]
    wrong_lp, before_lp = [], []
    for j, c in cases:
        lp = token_logprobs(teacher, prompts[j], sampled[j])
        before_lp += lp[: c["before"]]
        wrong_lp += lp[c["before"] : c["after"]]
    n = len(cases)
    return {
        "problems": N_PROBLEMS,
        "student_correct": sum(toy.is_correct(tokenizer.decode(s), p) for s, p in zip(sampled, problems)),
        "completions_with_error": n,
        "first_wrong_line_is_first_line": sum(c["line"] == 0 for _, c in cases),
        "newline_added": sum(c["newline_added"] for _, c in cases),
        "recovery_after_error": sum(scored["after"]) / n,
        "correct_before_error": sum(scored["before"]) / n,
        "bare_prompt_on_error_problems": sum(bare_correct[j] for j, _ in cases) / n,
        "bare_prompt_all": sum(bare_correct) / N_PROBLEMS,
        "copy_probability": sum(c["p_copy"] for c in copies) / len(copies),
        "copy_entropy_nats": sum(c["entropy"] for c in copies) / len(copies),
        "copy_greedy_share": sum(c["greedy_copy"] for c in copies) / len(copies),
        "copy_measured_on": len(copies),
        "copy_left_out_value_above_99": multi_token,
        "logprob_wrong_line": sum(wrong_lp) / len(wrong_lp),
        "logprob_before": sum(before_lp) / len(before_lp),
        "tokens_wrong_line": len(wrong_lp),
        "tokens_before": len(before_lp),
        "correction_after_error": sum(tokenizer.decode(ids).startswith("Wait,") for ids, _ in runs["after"]) / n,
        "correction_in_bare_prompt": sum("Wait," in tokenizer.decode(ids) for ids in bare) / N_PROBLEMS,
        "examples": [
            {"problem": j, "wrong_line": c["text"], "teacher_after": tokenizer.decode(ids).split("\n")[:3]}
            for (j, c), (ids, _) in list(zip(cases, runs["after"]))[:5]
        ],
    }


@torch.no_grad()
def synthetic_slips(teacher, tokenizer, problems: list[dict]) -> dict:
    """The teacher on slips of its own training kind (`toy.slip_row`, rng seed 1) in the same problems, cut after the
    slip's newline: p("W", the first token of "Wait,") there vs after every line of the clean reference chains, and
    the share of greedy continuations that start with "Wait," and end right, per slip kind."""
    import random

    from trl_onpolicy import toy

    wait = tokenizer("Wait", add_special_tokens=False)["input_ids"][0]
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    rng = random.Random(1)
    rows = [toy.slip_row(p, rng) for p in problems]
    cut = [r["prompt"] + r["completion"][: r["masked_span"][1]] for r in rows]
    after_slip, after_clean = [], []
    for row, text, problem in zip(rows, cut, problems):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        after_slip.append(torch.softmax(teacher(input_ids=torch.tensor([ids])).logits[0, -1], -1)[wait].item())
        ids = tokenizer(toy.prompt_text(problem["question"]) + " " + problem["answer"],
                        add_special_tokens=False)["input_ids"]  # fmt: skip
        probs = torch.softmax(teacher(input_ids=torch.tensor([ids])).logits[0], -1)[:, wait]  # (T,)
        after_clean += [probs[k].item() for k, t in enumerate(ids) if t == newline][1:]  # after each answer line
    outs = toy.generate_completions(teacher, tokenizer, cut, max_new_tokens=quality.completion_length(tokenizer, TASK))
    by_kind = {}
    for row, out, problem in zip(rows, outs, problems):
        kind = by_kind.setdefault(row["slip"]["kind"], {"n": 0, "corrected": 0, "correct": 0})
        kind["n"] += 1
        kind["corrected"] += out.startswith("Wait,")
        kind["correct"] += toy.is_correct(row["completion"][: row["masked_span"][1]] + out, problem)
    return {"p_wait_after_slip": sum(after_slip) / len(after_slip),
            "p_wait_after_clean_line": sum(after_clean) / len(after_clean),
            "corrected": sum(k["corrected"] for k in by_kind.values()) / len(rows),
            "correct": sum(k["correct"] for k in by_kind.values()) / len(rows), "by_kind": by_kind}  # fmt: skip


ROWS = [  # (label, key, format)
    ("student completions with an error (of 200)", "completions_with_error", "{}"),
    ("  of which the first line is the wrong one", "first_wrong_line_is_first_line", "{}"),
    ("teacher correct, cut after the first wrong line", "recovery_after_error", "{:.1%}"),
    ("teacher correct, cut before it", "correct_before_error", "{:.1%}"),
    ("teacher correct, bare prompt (these problems)", "bare_prompt_on_error_problems", "{:.1%}"),
    ("teacher correct, bare prompt (all 200)", "bare_prompt_all", "{:.1%}"),
    ("p(copy the wrong value into the next equation)", "copy_probability", "{:.3f}"),
    ("entropy at that token (nats)", "copy_entropy_nats", "{:.3f}"),
    ("log-prob of the student's tokens, wrong line", "logprob_wrong_line", "{:.2f}"),
    ("log-prob of the student's tokens, before it", "logprob_before", "{:.2f}"),
    ("continuation after the error starts 'Wait,'", "correction_after_error", "{:.1%}"),
    ("bare-prompt completions with 'Wait,'", "correction_in_bare_prompt", "{:.1%}"),
]


SYNTHETIC_ROWS = [
    ("training-kind slips: p('Wait') after the slip", "p_wait_after_slip", "{:.3f}"),
    ("  p('Wait') after a clean line", "p_wait_after_clean_line", "{:.3f}"),
    ("  continuation starts 'Wait,'", "corrected", "{:.1%}"),
    ("  teacher correct after the slip", "correct", "{:.1%}"),
]


def table(results: dict) -> str:
    """One column per (teacher, judge); the teacher's exact match on 500 problems in the header."""
    cols = [(t, j) for t in TEACHERS if t in results for j in JUDGES]
    lines = [f"{'':50s}" + "".join(f"{t.replace('recovering', 'recov'):>13s}" for t, _ in cols),
             f"{'(exact match on 500 eval problems)':50s}" + "".join(
                 f"{results[t]['teacher_exact_match_500']:>13.1%}" for t, _ in cols),
             f"{'judge of the first wrong line':50s}" + "".join(f"{j:>13s}" for _, j in cols)]  # fmt: skip
    for label, key, fmt in ROWS:
        lines.append(f"{label:50s}" + "".join(f"{fmt.format(results[t][j][key]):>13s}" for t, j in cols))
    for label, key, fmt in SYNTHETIC_ROWS:
        lines.append(f"{label:50s}" + "".join(f"{fmt.format(results[t]['synthetic_slips'][key]):>13s}"
                                              for t, _ in cols))  # fmt: skip
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teachers", nargs="+", choices=TEACHERS, default=DEFAULT_TEACHERS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from trl_onpolicy import toy

    student, tokenizer, _ = toy.load_or_train_student(*quality.STUDENT, sft_steps=300, progress=True)
    problems, prompts, sampled = student_completions(student, tokenizer)
    results = json.loads(RESULTS.read_text()).get("teachers", {}) if RESULTS.exists() else {}
    for name in args.teachers:
        teacher, _, info = load_teacher(name)
        results[name] = {"teacher": info["name"], "teacher_exact_match_500": info["eval_exact_match"]}
        for judge in JUDGES:
            results[name][judge] = measure(teacher, tokenizer, problems, prompts, sampled, judge)
            assert math.isfinite(results[name][judge]["copy_probability"])
        results[name]["synthetic_slips"] = synthetic_slips(teacher, tokenizer, problems)
    RESULTS.parent.mkdir(exist_ok=True)
    settings = {"task": TASK, "problems": N_PROBLEMS, "seed": SEED, "student": "2x128 sft_steps=300",
                "torch": torch.__version__}  # fmt: skip
    RESULTS.write_text(json.dumps({"settings": settings, "teachers": results}, indent=2) + "\n")
    print(table(results))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
