"""Local code evaluation (`tasks/code_eval.py`): pass@k against its definition; programs run only when opted in."""

import numpy as np
import pytest

from trl_onpolicy.tasks.code_eval import LocalCodeEval, estimate_pass_at_k, run_program


def test_pass_at_k_matches_the_definition():
    from math import comb

    n, c = np.array([10, 10, 5, 3]), np.array([0, 3, 5, 1])
    for k in (1, 2, 3):
        naive = [1 - comb(ni - ci, k) / comb(ni, k) for ni, ci in zip(n, c)]
        np.testing.assert_allclose(estimate_pass_at_k(n, c, k), naive)


def test_local_code_eval(monkeypatch):
    metric = LocalCodeEval(timeout=2.0)
    with pytest.raises(ValueError, match="HF_ALLOW_CODE_EVAL=1"):
        metric.compute(references=["assert f() == 1"], predictions=[["def f(): return 1"]], k=[1])
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    scores, results = metric.compute(references=["assert f() == 1", "assert f() == 1"],
                                     predictions=[["def f(): return 1"], ["def f(): return 2"]], k=[1])
    assert scores == {"pass@1": 0.5}
    assert results[1][0][1] == {"passed": False, "result": "failed"}
    assert run_program("while True: pass", timeout=0.5) == "timed out"
