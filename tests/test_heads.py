"""Output heads (`heads.py`): each architecture's logit multiplier, and the linear head the tiled loss walks."""

import pytest
import tiny_models as tm
import torch

from trl_onpolicy.heads import linear_head, output_logits


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
