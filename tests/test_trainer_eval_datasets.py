"""Every eval-dataset form `SFTTrainer` takes evaluates, to the same loss as the same rows in a map-style `Dataset`.

An `IterableDataset`, an `IterableDatasetDict` or a dict of iterable datasets as `eval_dataset` failed in accelerate
("Can only find the batch size of tensors but got <class 'str'>"): accelerate dispatches an iterable dataset's batches
from the main process by default, and this trainer's batches are rows of text until the rollouts are made.
"""

import pytest
import tiny_models as tm
from datasets import DatasetDict, IterableDatasetDict

from trl_onpolicy import OnPolicyDistillTrainer

FORMS = {  # name: (the rows in that form, the same rows map-style; several sets are evaluated one after the other)
    "IterableDataset": (lambda d: d.to_iterable_dataset(), lambda d: d),
    "DatasetDict": (lambda d: DatasetDict({"a": d}), lambda d: {"a": d}),
    "IterableDatasetDict": (lambda d: IterableDatasetDict({"a": d.to_iterable_dataset()}), lambda d: {"a": d}),
    "dict of IterableDataset": (lambda d: {"a": d.to_iterable_dataset()}, lambda d: {"a": d}),
    "dict of Dataset and IterableDataset": (lambda d: {"a": d, "b": d.to_iterable_dataset()},
                                            lambda d: {"a": d, "b": d}),
}


def _eval_losses(tmp_path, eval_dataset, **overrides) -> dict[str, float]:
    tok = tm.tokenizer()
    trainer = OnPolicyDistillTrainer(
        model=tm.model(tok, seed=0), teacher_model=tm.model(tok, seed=1), processing_class=tok,
        args=tm.config(tmp_path, per_device_eval_batch_size=4, **overrides), train_dataset=tm.dataset(),
        eval_dataset=eval_dataset,
    )  # fmt: skip
    metrics = trainer.evaluate()
    return {k: v for k, v in metrics.items() if k.endswith("_loss")}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_eval_dataset_form_evaluates_to_the_map_style_loss(tmp_path, form):
    rows = tm.dataset(n=8)
    make, make_map_style = FORMS[form]
    expected = _eval_losses(tmp_path, make_map_style(rows))
    assert expected and all(loss > 0 for loss in expected.values())
    losses = _eval_losses(tmp_path, make(rows))
    assert sorted(losses) == sorted(expected)
    assert all(losses[k] == pytest.approx(expected[k], rel=1e-6) for k in expected), (losses, expected)


def test_dispatch_batches_is_turned_off_with_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="trl_onpolicy.trainer"):
        loss = _eval_losses(tmp_path, tm.dataset(n=8).to_iterable_dataset(),
                            accelerator_config={"dispatch_batches": True})["eval_loss"]  # fmt: skip
    assert loss > 0
    assert "`dispatch_batches` is set to False: batches are rows of text, which cannot be broadcast." in caplog.text
