"""Part `loss` of `gpu_check.py`: forward + backward of the distillation loss alone, ours (`distillation_loss`, tiles
with a closed-form gradient) against TRL's `_chunked_divergence_loss` (its Triton `ChunkedDivergenceFunction`), on the
same hidden states and heads."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from _gpu_training import GiB, free_memory, spread, synchronize

if TYPE_CHECKING:
    from gpu_check import Sizes


# ---------------------------------------------------------------------------------------------- the loss alone
def loss_problem(sizes: Sizes, device: str, dtype, seed: int = 0):
    """Hidden states and heads of the two models' widths: `(N, H)` student (with a gradient), `(N, H_t)` teacher."""
    g = torch.Generator(device).manual_seed(seed)
    n, h, h_t, v = sizes.loss_tokens, sizes.student["hidden_size"], sizes.teacher["hidden_size"], sizes.vocab

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    weight = randn(v, h, scale=h**-0.5).requires_grad_()  # (V, H): logits of unit scale
    teacher_weight = randn(v, h_t, scale=h_t**-0.5)  # (V, H_t)
    hidden = randn(n, h).requires_grad_()  # (N, H)
    teacher_hidden = randn(n, h_t)  # (N, H_t)
    targets = torch.randint(0, v, (n,), generator=g, device=device)  # (N,)
    return hidden, weight, teacher_hidden, teacher_weight, targets


def loss_functions(problem, vocab: int, beta: float = 0.5) -> dict:
    """name -> a function that runs forward + backward of that implementation's loss and returns the loss."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from trl_onpolicy.heads import LinearHead
    from trl_onpolicy.loss import distillation_loss
    from trl_onpolicy.teachers.base import TeacherScores

    hidden, weight, teacher_hidden, teacher_weight, targets = problem
    n = hidden.shape[0]

    def ours():
        teacher = TeacherScores(1.0, hidden=teacher_hidden, head=LinearHead(teacher_weight))
        loss = distillation_loss(hidden, LinearHead(weight), teacher, targets, loss_type="jsd", beta=beta,
                                 vocab_size=vocab, num_items=n).loss  # fmt: skip
        loss.backward()
        return loss.detach()

    def trl():
        mask = torch.ones((1, n), dtype=torch.long, device=hidden.device)  # (1, N)
        loss = _chunked_divergence_loss(hidden[None], teacher_hidden[None], weight, teacher_weight, mask, beta,
                                        num_items_in_batch=n)[0]  # fmt: skip
        loss.backward()
        return loss.detach()

    return {"ours": ours, "trl": trl}


def timed_call(fn, device: str, problem) -> tuple[float, float]:
    """Seconds of one call (CUDA events on a GPU) and the loss it returned; the gradients are cleared first."""
    for t in (problem[0], problem[1]):
        t.grad = None
    if device != "cuda":
        start = time.perf_counter()
        loss = fn()
        return time.perf_counter() - start, loss.item()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, loss.item()


def part_loss(sizes: Sizes, device: str, dtype, deadline: float, workdir: str) -> dict:
    """The loss alone, ours against TRL's kernel: memory, then alternating timed calls, then the two gradients."""
    from trl.kernels.chunked_logprob import _use_triton

    problem = loss_problem(sizes, device, dtype)
    fns = loss_functions(problem, sizes.vocab)
    result = {name: {} for name in fns}
    for name, fn in fns.items():  # twice each: Triton compiles on the first call
        for _ in range(2):
            timed_call(fn, device, problem)
        problem[0].grad = problem[1].grad = None  # the working memory counts the gradients the call makes
        free_memory(device)
        synchronize(device)
        if device == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        result[name]["loss"] = timed_call(fn, device, problem)[1]
        result[name]["grads"] = [problem[0].grad.float(), problem[1].grad.float()]
        if device == "cuda":
            result[name]["working_GiB"] = (torch.cuda.max_memory_allocated() - base) / GiB
    times = {name: [] for name in fns}
    for _ in range(sizes.loss_repeats):
        for name, fn in fns.items():
            times[name].append(timed_call(fn, device, problem)[0])
        if time.perf_counter() > deadline:
            break
    for name in fns:
        result[name]["seconds"], result[name]["all_seconds"] = spread(times[name]), times[name]
    (gh, gw), (th, tw) = result["ours"].pop("grads"), result["trl"].pop("grads")
    result["agreement"] = {
        "loss_relative_difference": abs(result["ours"]["loss"] - result["trl"]["loss"]) / abs(result["trl"]["loss"]),
        "grad_hidden_relative_difference": ((gh - th).norm() / th.norm()).item(),
        "grad_head_relative_difference": ((gw - tw).norm() / tw.norm()).item(),
    }
    triton = _use_triton(torch.device(device))
    result["trl_kernel"] = "triton" if triton else "torch fallback (no Triton on this device)"
    medians = {name: result[name]["seconds"]["median"] for name in fns}
    result["ratios_ours_over_trl"] = {"median_s": medians["ours"] / medians["trl"]}
    if device == "cuda":
        result["ratios_ours_over_trl"]["working_memory"] = result["ours"]["working_GiB"] / result["trl"]["working_GiB"]
    return result
