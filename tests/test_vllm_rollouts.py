"""`use_vllm=True`: the wiring to TRL's `VLLMGeneration` (vLLM itself needs CUDA and is not installed in CI).

A stand-in engine with `VLLMGeneration`'s interface records how the trainer drives it: what it is built with, one
weight sync per optimizer step (not per micro-batch), and that its completions are what the teacher scores.
"""

import re

import pytest

import tiny_models as tm
from test_trainer import Recorder
from trl_onpolicy import vllm_rollouts


class FakeVLLMGeneration:
    instances = []

    def __init__(self, **kwargs):
        self.kwargs, self.syncs, self.prompts = kwargs, 0, []
        FakeVLLMGeneration.instances.append(self)

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        self.prompts.append(prompts)
        eos = self.kwargs["processing_class"].eos_token_id
        # alternately: a completion that stops with EOS (then junk vLLM would not send, cut anyway) and one that runs out
        completions = [[10, 11, eos, 12] if i % 2 == 0 else [13] * self.kwargs["max_completion_length"]
                       for i in range(len(prompts))]  # fmt: skip
        return prompts, completions, None, None


def test_vllm_engine_is_built_synced_once_per_step_and_its_completions_are_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_rollouts, "vllm_generation_class", lambda: FakeVLLMGeneration)
    FakeVLLMGeneration.instances.clear()
    recorder = Recorder()
    tr = tm.trainer(tmp_path, callbacks=[recorder], use_vllm=True, vllm_mode="server", lmbda=1.0, max_steps=2,
                    per_device_train_batch_size=2, gradient_accumulation_steps=2, stop_strings=["\n"],
                    temperature=0.7, vllm_server_base_url="http://vllm:8000")  # fmt: skip
    (engine,) = FakeVLLMGeneration.instances
    assert engine.kwargs["mode"] == "server" and engine.kwargs["server_base_url"] == "http://vllm:8000"
    assert engine.kwargs["temperature"] == 0.7 and engine.kwargs["max_completion_length"] == 8
    assert engine.kwargs["generation_kwargs"]["stop"] == ["\n"] and engine.kwargs["logprobs"] is None
    tr.train()
    assert engine.syncs == 2  # one per optimizer step, with 2 micro-batches each
    assert [len(p) for p in engine.prompts] == [4, 4]  # the whole step's prompts in one call
    eos = tr.processing_class.eos_token_id
    for rollouts in recorder.rollouts:
        assert rollouts.source == "student"
        assert rollouts.completion_ids == [[10, 11, eos], [13] * 8] * 2
        assert rollouts.truncated == [False, True] * 2
    assert tm.step_logs(tr)[0]["truncated_fraction"] == 0.5


def test_missing_vllm_names_the_extra(tmp_path):
    pytest.importorskip("trl")
    from trl.import_utils import is_vllm_available

    if is_vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match=re.escape("pip install 'trl-onpolicy[vllm]'")):
        tm.trainer(tmp_path, use_vllm=True)
