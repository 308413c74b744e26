"""`config_sft.py`: SFT sees its own `loss_type` while its code reads it, ours is back afterwards (also after an error),
and `OnPolicyDistillConfig.from_args` turns an SFT script's args into our config."""

import ast
import dataclasses
import inspect
import logging
import textwrap

import pytest
import tiny_models as tm
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer


# ------------------------------------------------------------------------------------------ SFT's own loss_type
def test_sft_config_post_init_sees_nll_and_ours_is_kept(tmp_path, monkeypatch):
    seen = []
    real = SFTConfig.__post_init__

    def spy(self):
        seen.append(self.loss_type)
        real(self)

    monkeypatch.setattr(SFTConfig, "__post_init__", spy)
    config = OnPolicyDistillConfig(str(tmp_path), loss_type="skew_reverse_kl")
    assert seen == ["nll"] and config.loss_type == "skew_reverse_kl"


def test_sft_loss_type_restores_ours_after_an_error(tmp_path):
    config = OnPolicyDistillConfig(str(tmp_path), loss_type="reverse_kl")
    with pytest.raises(KeyError, match="inside"), config.sft_loss_type():
        assert config.loss_type == "nll"
        raise KeyError("inside")
    assert config.loss_type == "reverse_kl"


def test_sft_trainer_refuses_our_loss_type_without_the_swap(tmp_path):
    """Why the swap exists: `SFTTrainer.__init__` itself refuses any `loss_type` but "nll" and "dft"."""
    tok = tm.tokenizer()
    with pytest.raises(ValueError, match="Invalid `loss_type` jsd passed. Supported values are 'nll' and 'dft'."):
        SFTTrainer(tm.model(tok), args=tm.config(tmp_path), train_dataset=tm.dataset(), processing_class=tok)


def test_sft_trainer_init_sees_nll_and_ours_is_restored(tmp_path, monkeypatch):
    seen = []
    real = SFTTrainer.__init__

    def spy(self, model, args=None, **kwargs):
        seen.append(args.loss_type)
        real(self, model, args=args, **kwargs)
        seen.append(args.loss_type)  # still SFT's at the end of its __init__ (its last read is there)

    monkeypatch.setattr(SFTTrainer, "__init__", spy)
    trainer = tm.trainer(tmp_path, loss_type="reverse_kl")
    assert seen == ["nll", "nll"] and trainer.args.loss_type == "reverse_kl"


def test_ours_is_restored_when_sft_trainer_init_raises(tmp_path, monkeypatch):
    def failing(self, model, args=None, **kwargs):
        raise RuntimeError(f"SFTTrainer saw {args.loss_type!r}")

    monkeypatch.setattr(SFTTrainer, "__init__", failing)
    tok = tm.tokenizer()
    args = tm.config(tmp_path, loss_type="forward_kl")
    with pytest.raises(RuntimeError, match="SFTTrainer saw 'nll'"):
        OnPolicyDistillTrainer(tm.model(tok), teacher_model=tm.model(tok, seed=1), args=args,
                               train_dataset=tm.dataset(), processing_class=tok)  # fmt: skip
    assert args.loss_type == "forward_kl"


def _methods_reading_args_loss_type(cls) -> set[str]:
    """Methods of `cls` whose source reads `args.loss_type` or `self.args.loss_type`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    found = set()
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute) and node.attr == "loss_type":
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id == "args") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "args"
                ):
                    found.add(function.name)
    return found


def test_sft_reads_its_loss_type_only_where_the_swap_covers_it():
    """Every class of `SFTTrainer`'s MRO (TRL's and transformers') reads `args.loss_type` only in `SFTTrainer.__init__`
    (inside the swap) and `SFTTrainer.compute_loss` (which ours overrides without calling it). A TRL release that reads
    it elsewhere fails here."""
    readers = {
        (cls.__name__, method)
        for cls in SFTTrainer.__mro__
        if cls.__module__.startswith(("trl.", "transformers."))
        for method in _methods_reading_args_loss_type(cls)
    }
    assert readers == {("SFTTrainer", "__init__"), ("SFTTrainer", "compute_loss")}
    assert OnPolicyDistillTrainer.compute_loss is not SFTTrainer.compute_loss
    assert "super().compute_loss" not in inspect.getsource(OnPolicyDistillTrainer.compute_loss)


# ------------------------------------------------------------------------------------------ from_args
def test_from_args_converts_an_sft_config_with_dft_without_warning(tmp_path, caplog):
    sft = SFTConfig(str(tmp_path), loss_type="dft", learning_rate=3e-4, max_length=300, seed=7, use_cpu=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config = OnPolicyDistillConfig.from_args(sft, "org/student")
    assert type(config) is OnPolicyDistillConfig
    assert (config.loss_type, config.learning_rate, config.max_length, config.seed) == ("jsd", 3e-4, 300, 7)
    assert config.output_dir == str(tmp_path)
    assert caplog.records == []


@dataclasses.dataclass
class OtherArgs(TrainingArguments):
    other_knob: int = 1


def test_from_args_warns_about_changed_settings_it_drops(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_onpolicy.config"):
        config = OnPolicyDistillConfig.from_args(OtherArgs(str(tmp_path), other_knob=1, learning_rate=2e-4), "m")
    assert config.learning_rate == 2e-4 and caplog.records == []  # at its default: nothing lost
    with caplog.at_level(logging.WARNING, logger="trl_onpolicy.config"):
        OnPolicyDistillConfig.from_args(OtherArgs(str(tmp_path), other_knob=2), "m")
    assert [r.getMessage() for r in caplog.records] == [
        "OtherArgs settings with no counterpart here are ignored: ['other_knob']."
    ]


def test_from_args_without_args_names_the_output_after_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert OnPolicyDistillConfig.from_args(None, "org/tiny-llama").output_dir == "tiny-llama-OnPolicyDistill"
    model = tm.model(tm.tokenizer())
    model.config._name_or_path = ""
    assert OnPolicyDistillConfig.from_args(None, model).output_dir == "model-OnPolicyDistill"
    ours = tm.config(tmp_path)
    assert OnPolicyDistillConfig.from_args(ours, model) is ours
