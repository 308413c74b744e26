"""Rollouts (`rollouts.py`): the student samples from its whole distribution, and a `Rollouts` checks its log-probs."""

import re

import pytest
import tiny_models as tm
import torch


@pytest.mark.parametrize("top_k, most", [(0, None), (5, 5)])
def test_rollouts_sample_from_the_whole_distribution_unless_top_k_is_set(tmp_path, top_k, most):
    """`top_k=0` means no top-k: the model's own generation default (transformers: 50) must not apply."""
    from trl_onpolicy.rollouts import build_generation_config, sample

    tok = tm.tokenizer()
    model = tm.model(tok, vocab_size=128)
    model.generation_config.top_k = 50  # what `from_pretrained` gives most checkpoints
    with torch.no_grad():
        model.lm_head.weight.mul_(1e-3)  # a nearly uniform next-token distribution over 128 ids, without ties
    config = build_generation_config(tm.config(tmp_path, top_k=top_k), tok, max_new_tokens=1)
    config.eos_token_id = None  # keep every sampled id
    torch.manual_seed(0)
    completions, _ = sample(model, [[5, 6]] * 600, config)
    distinct = len({c[0] for c in completions if c})  # (a sampled pad id is trimmed as padding)
    if most is None:
        assert distinct > 100  # ~128 expected; 50 at most if a hidden top-k applied
    else:
        assert distinct <= most


def test_sampling_logps_must_match_the_completions(tmp_path):
    from trl_onpolicy import Rollouts

    rollouts = Rollouts([[1], [2]], [[3, 4], [5]], "student", sampling_logps=[[-1.0, -2.0], [-3.0]])
    assert rollouts.select([1]).sampling_logps == [[-3.0]]
    tail = ("A callback that edits completions must edit `sampling_logps` alike (NaN for a token the sampler did not "
            "draw) or set them to `None` (no importance-sampling correction).")  # fmt: skip
    for logps, where in (([[-1.0], [-3.0]], "completions [0]"), ([[-1.0, -2.0]], "1 rows for 2 completions")):
        message = f"`sampling_logps` must hold one log-prob per completion token, got {where}. {tail}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            Rollouts([[1], [2]], [[3, 4], [5]], "student", sampling_logps=logps)
