"""The environment protocol (`environments.py`): what `reset` and `step` return is checked, naming the method."""

import pytest

from trl_onpolicy.environments import EnvStep, checked_reset, checked_step


class BadEnv:
    def __init__(self, out):
        self.out = out

    def reset(self, row):
        return None

    def step(self, message):
        return self.out


@pytest.mark.parametrize(
    "out, message",
    [
        ("done", "`BadEnv.step` must return an `EnvStep(messages, reward, done)` (or that 3-tuple), got 'done'."),
        (EnvStep("hi", 0.0, False), ("`BadEnv.step`'s `messages` must be a list of messages, each a dict with a "
         "string `role` and `content` (e.g. [{'role': 'user', 'content': '...'}]), got 'hi'.")),
        (EnvStep([], "1", False), "`BadEnv.step`'s `reward` must be a number, got str ('1')."),
        (EnvStep([], 1.0, 0), "`BadEnv.step`'s `done` must be a bool, got int (0)."),
    ],
)  # fmt: skip
def test_an_environment_returning_the_wrong_types_is_named(out, message):
    with pytest.raises(TypeError) as info:
        checked_step(BadEnv(out), {"role": "assistant", "content": ""})
    assert str(info.value) == message


def test_a_wrong_opening_is_named():
    class BadOpening(BadEnv):
        def reset(self, row):
            return {"role": "user", "content": "hi"}

    with pytest.raises(TypeError) as info:
        checked_reset(BadOpening(None), {})
    assert str(info.value).startswith("`BadOpening.reset` must return None or a list of messages, each a dict")
