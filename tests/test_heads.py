"""Output heads (`heads.py`): each architecture's logit multiplier, the linear head the tiled loss walks, and a frozen
model's head as tensors (`frozen_head`): the same logits as the model's own head, for a plain linear head, a
soft-capped one, and head modules that are not a plain `nn.Linear` (read out through the identity)."""

import pytest
import tiny_models as tm
import torch

from trl_onpolicy.heads import LinearHead, dense_weights, frozen_head, linear_head, output_logits


def test_linear_head_is_the_models_head():
    tok = tm.tokenizer()
    model = tm.model(tok)
    model.config.logit_scale = 0.25  # a logit multiplier (Cohere's name)
    hidden = torch.randn(5, 16)
    torch.testing.assert_close(linear_head(model)(hidden), output_logits(model, hidden))
    assert linear_head(model).multiplier == 0.25 and linear_head(model).weight is model.lm_head.weight
    assert not linear_head(model, detach=True).weight.requires_grad
    model.config.final_logit_softcapping = 30.0  # not a linear map: the whole-vocabulary path
    assert linear_head(model) is None


@pytest.mark.parametrize(
    "attributes, factor",
    [({}, 1.0), ({"logit_scale": 0.5}, 0.5), ({"output_multiplier": 2.0}, 2.0), ({"lm_head_multiplier": 3.0}, 3.0),
     ({"logits_scaling": 4.0}, 0.25), ({"logits_scaling": 4.0, "model_type": "hyperclovax"}, 4.0)],
)  # fmt: skip
def test_output_logits_apply_each_architectures_multiplier(attributes, factor):
    from trl_onpolicy.heads import output_logits

    tok = tm.tokenizer()
    model = tm.model(tok)
    hidden = torch.randn(3, 16)
    plain = model.lm_head(hidden)
    for name, value in attributes.items():
        setattr(model.config, name, value)
    torch.testing.assert_close(output_logits(model, hidden), plain * factor)


class Wrapped(torch.nn.Module):
    """A head behind a wrapper (as PEFT's `ModulesToSaveWrapper` or a quantised layer would be): not an `nn.Linear`."""

    def __init__(self, linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("case", ["plain", "softcap", "multiplier", "wrapped", "wrapped_bias", "float64"])
def test_frozen_head_gives_the_models_logits(case):
    tok = tm.tokenizer()
    model = tm.model(tok, hidden=16, seed=1)
    config = model.config
    if case == "softcap":
        config.final_logit_softcapping = 2.0
    if case == "multiplier":
        config.logit_scale = 0.25
    if case.startswith("wrapped"):
        linear = torch.nn.Linear(16, len(tok), bias=case == "wrapped_bias")
        torch.nn.init.normal_(linear.weight)
        if linear.bias is not None:
            torch.nn.init.normal_(linear.bias)
        model.lm_head = Wrapped(linear)
    if case == "float64":
        model.double()
    hidden = torch.randn(7, 16, dtype=model.dtype, generator=torch.Generator().manual_seed(0))  # (n, H)
    head = frozen_head(model)
    assert isinstance(head, LinearHead) and not head.weight.requires_grad
    with torch.no_grad():
        expected = output_logits(model, hidden).to(head(hidden).dtype)  # (n, V): float32, float64 stays
    torch.testing.assert_close(head(hidden), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.tile(hidden, 3, 11, 0.5), expected[:, 3:11] * 0.5, rtol=1e-6, atol=1e-6)


def test_dense_weights_reads_an_affine_module_exactly():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(300, 40)  # more hidden units than one block of the identity
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 300, generator=g))
        linear.bias.copy_(torch.randn(40, generator=g))
    weight, bias = dense_weights(Wrapped(linear), 300, block=128)
    torch.testing.assert_close(weight, linear.weight.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(bias, linear.bias.detach(), rtol=0, atol=0)
    assert dense_weights(Wrapped(torch.nn.Linear(8, 5, bias=False)), 8)[1] is None


def test_the_fingerprint_tells_heads_apart():
    weight = torch.randn(5, 4)
    assert LinearHead(weight).fingerprint() == LinearHead(weight.clone()).fingerprint()
    assert LinearHead(weight).fingerprint() != LinearHead(weight * 1.001).fingerprint()
    assert LinearHead(weight).fingerprint() != LinearHead(weight, softcap=30.0).fingerprint()
