"""The chunked distillation loss the trainer uses: equal to the one-chunk loss, with memory that grows with the chunk.

Two measurements:
- bytes saved for backward, seen by `torch.autograd.graph.saved_tensors_hooks` (unique storages, inputs excluded):
  what the loss holds between the forward and the backward pass;
- peak bytes of live tensors over forward + backward, tracked with a `TorchDispatchMode`. Chunks run under
  activation checkpointing, whose recomputation in the backward pass is invisible to outer saved-tensor hooks, so
  this is the measurement that shows the chunk size setting the peak.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trl_onpolicy import OnPolicyDistillConfig
from trl_onpolicy.loss import default_vocab_tile, distillation_loss
from trl_onpolicy.teachers.base import TeacherScores


H, V = 16, 512


def problem(n, form="full", seed=0):
    """Student hidden states `(n, H)` + head, and teacher scores in `form` for `n` completion tokens."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    teacher_head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        teacher_head.weight.copy_(torch.randn(V, H, generator=g))
    hidden = torch.randn(n, H, generator=g, requires_grad=True)  # (N, H)
    teacher_hidden = torch.randn(n, H, generator=g)  # (N, H)
    targets = torch.randint(0, V, (n,), generator=g)  # (N,)
    with torch.no_grad():
        teacher_logps = torch.log_softmax(teacher_head(teacher_hidden), -1)  # (N, V)
    if form == "full":
        teacher = TeacherScores(1.0, hidden=teacher_hidden, head=lambda h: teacher_head(h).detach())
    elif form == "topk":
        values, ids = teacher_logps.topk(8, dim=-1)  # (N, 8)
        teacher = TeacherScores(1.0, topk_ids=ids, topk_logps=values)
    else:
        teacher = TeacherScores(1.0, token_logps=teacher_logps.gather(-1, targets[:, None]).squeeze(-1))
    return head, hidden, teacher, targets


def run(n, chunk_size, loss_type="jsd", form="full"):
    head, hidden, teacher, targets = problem(n, form)
    sums = distillation_loss(
        hidden,
        head,
        teacher,
        targets,
        loss_type=loss_type,
        vocab_size=V,
        num_items=n,
        scale=4.0,
        chunk_size=chunk_size,
    )
    sums.loss.backward()
    return sums, hidden.grad, head.weight.grad


@pytest.mark.parametrize(
    "loss_type, form",
    [("jsd", "full"), ("forward_kl", "full"), ("reverse_kl", "topk"), ("skew_reverse_kl", "full"),
     ("sampled_reverse_kl", "token")],
)  # fmt: skip
def test_chunked_equals_one_chunk(loss_type, form):
    chunked, grad_hidden, grad_head = run(50, 3, loss_type, form)
    whole, grad_hidden_ref, grad_head_ref = run(50, 10_000, loss_type, form)
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-6, atol=1e-7)
    assert float(chunked.divergence) == pytest.approx(float(whole.divergence), rel=1e-5)
    assert float(chunked.student_entropy) == pytest.approx(float(whole.student_entropy), rel=1e-5)
    # float32 sums in another order (other chunk and tile sizes): an absolute tolerance of 1e-5 of the largest entry
    # (an element-wise relative one fails on entries that nearly cancel: 2.8e-7 off on a gradient of 0.05 was seen)
    for grad, ref in ((grad_hidden, grad_hidden_ref), (grad_head, grad_head_ref)):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert grad_head.abs().sum() > 0


def saved_bytes(n, chunk_size):
    """Bytes of the unique storages saved for backward and still alive when the forward pass ends (what waits for
    the backward pass), excluding the inputs."""
    head, hidden, teacher, targets = problem(n)
    inputs = {t.untyped_storage().data_ptr() for t in (hidden, targets, teacher.hidden, head.weight)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums = distillation_loss(hidden, head, teacher, targets, loss_type="jsd", vocab_size=V, num_items=n,
                                 chunk_size=chunk_size)  # fmt: skip
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for ref in saved if (t := ref()) is not None}
    sums.loss.backward()
    return sum(alive.values())


class PeakLiveBytes(TorchDispatchMode):
    """Peak total bytes of the storages that the ops run under this mode allocate and that are still alive."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.live:
                storage = t.untyped_storage()
                self.live[id(storage)] = storage.nbytes()
                self.now += storage.nbytes()
                weakref.finalize(storage, self._free, id(storage))
        self.peak = max(self.peak, self.now)
        return out


def peak_bytes(n, chunk_size):
    """Of the whole-vocabulary path (`vocab_tile=0`): the tiled path's default tile narrows as the chunk grows, and its
    peak is tested in `test_fused_divergence.py`."""
    head, hidden, teacher, targets = problem(n)
    with PeakLiveBytes() as tracker:
        sums = distillation_loss(hidden, head, teacher, targets, loss_type="jsd", vocab_size=V, num_items=n,
                                 chunk_size=chunk_size, vocab_tile=0)  # fmt: skip
        sums.loss.backward()
    return tracker.peak


def test_nothing_vocabulary_wide_is_saved_for_backward():
    """Each chunk's gradient is taken in the forward pass: what waits for the backward pass is the `(N, H)` gradient of
    the hidden states and the `(V, H)` gradient of the head, whatever the chunk size; never an `(N, V)` tensor."""
    for n in (256, 2048):
        expected = (n * H + V * H) * 4
        for chunk_size in (64, 4096):  # 4096 >= N: one chunk
            assert saved_bytes(n, chunk_size) == expected, (n, chunk_size)
    assert saved_bytes(2048, 4096) < 2048 * V * 4 / 20


def test_peak_memory_grows_with_chunk_size_not_tokens():
    small, large = peak_bytes(256, 64), peak_bytes(2048, 64)
    # 8x the tokens: only the (N, H) gradient of the hidden states grows, not the (chunk, V) logits
    assert large < 1.5 * small, (small, large)
    assert large - small < 2 * 2048 * H * 4 * 4
    # 4x the chunk: the peak grows about 4x; one chunk of every token: far above both
    chunk_256 = peak_bytes(2048, 256)
    assert chunk_256 > 2.5 * large, (large, chunk_256)
    assert peak_bytes(2048, 4096) > 5 * chunk_256


def test_without_head_parameters_chunks_run_under_checkpointing_with_the_same_result():
    """A head given as a plain function (no parameters known): the checkpointed path, same loss and gradients, and
    statistics counted once although the backward pass recomputes every chunk."""
    head, hidden, teacher, targets = problem(50)
    fused = distillation_loss(hidden, head, teacher, targets, loss_type="jsd", vocab_size=V, num_items=50,
                              chunk_size=7)  # fmt: skip
    fused.loss.backward()
    grad_fused = hidden.grad.clone()
    hidden.grad = None
    plain = distillation_loss(hidden, lambda h: head(h), teacher, targets, loss_type="jsd", vocab_size=V, num_items=50,
                              chunk_size=7)  # fmt: skip
    plain.loss.backward()
    torch.testing.assert_close(plain.loss, fused.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hidden.grad, grad_fused, rtol=1e-5, atol=1e-7)
    assert float(plain.divergence) == pytest.approx(float(fused.divergence), rel=1e-6) and plain.tokens == 50
    assert len(plain.student_token_logps) == 50


def test_default_sizes():
    assert default_vocab_tile(4096, "cpu") == 256
    assert default_vocab_tile(512, "cpu") == 1024
    assert default_vocab_tile(4096, "cuda") == 4096
    assert default_vocab_tile(1, "cpu") == 2**19
    with pytest.raises(ValueError, match="loss_vocab_tile"):
        OnPolicyDistillConfig(output_dir="out", loss_vocab_tile=-1, report_to="none")
    with pytest.raises(ValueError, match="loss_chunk_size"):
        OnPolicyDistillConfig(output_dir="out", loss_chunk_size=0, report_to="none")
