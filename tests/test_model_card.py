"""The model card (what `push_to_hub` uploads) and the merged save of a LoRA student."""

import pytest
import tiny_models as tm
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from trl_onpolicy import DistillCallback, OnPolicyDistillTrainer


class FakeEvalHook(DistillCallback):
    """Stands in for `LmEvalCallback`: a history of scores per round and the teacher's scores."""

    def __init__(self):
        self.history = [{"round": 0, "step": 0, "kind": "before", "scores": {"toy_gsm8k/exact_match": 0.125}}]
        self.teacher_scores = {"toy_gsm8k/exact_match": 0.875}

    def on_round_end(self, args, state, control, round_index, **kwargs):
        self.history.append(
            {
                "round": round_index,
                "step": state.global_step,
                "kind": "round",
                "scores": {"toy_gsm8k/exact_match": 0.5},
            }
        )


def test_card_records_student_teacher_settings_rounds_compute_and_versions(tmp_path):
    tok = tm.tokenizer()
    student, teacher = tm.model(tok, seed=0), tm.model(tok, seed=1)
    student.config._name_or_path = "org/tiny-student"
    teacher.config._name_or_path = "org/tiny-teacher"
    tr = tm.trainer(tmp_path, student, teacher, tok, callbacks=[FakeEvalHook()], loss_type="reverse_kl",
                    lmbda=0.5, seq_kd=True, num_rounds=2, max_steps=2, teacher_top_k=7)  # fmt: skip
    tr.train()
    tr.create_model_card(model_name="tiny-distilled")
    card = (tmp_path / "README.md").read_text()
    assert "## On-policy distillation" in card
    assert "- student: `org/tiny-student`" in card
    assert "- teacher: `org/tiny-teacher` (in the training process)" in card
    for row in ("| `loss_type` | `'reverse_kl'` |", "| `lmbda` | `0.5` |", "| `teacher_top_k` | `7` |",
                "| `num_rounds` | `2` |"):  # fmt: skip
        assert row in card, row
    assert "- optimizer steps: 2" in card and "- teacher scoring: " in card and "- generation: " in card
    import trl_onpolicy

    assert f"trl-onpolicy {trl_onpolicy.__version__}, TRL " in card
    assert "### Scores per round" in card
    assert "| student, before training | 0 | 0.125 |" in card
    assert "| student, round 2 | 2 | 0.500 |" in card and "| teacher | | 0.875 |" in card
    assert "OnPolicyDistill" in card and "trl-onpolicy" in card  # TRL's card part: trainer name and tags


def test_card_of_a_student_given_as_a_local_path_names_the_path_without_hub_links(tmp_path):
    """TRL's template said "fine-tuned version of [None](https://huggingface.co/None)" and `model="None"` for a student
    loaded from a folder; the card names the folder (no Hub link) and the pipeline loads the output folder."""
    tok = tm.tokenizer()
    tm.model(tok, seed=0).save_pretrained(tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    tr = tm.trainer(tmp_path / "out", student, tm.model(tok, seed=1), tok, max_steps=1)
    tr.train()
    tr.create_model_card(model_name="tiny", dataset_name=str(tmp_path / "data.jsonl"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "None" not in card.split("## On-policy distillation")[0], card
    assert (f"This model is a fine-tuned version of a local model (`{tmp_path / 'student'}`) on a local dataset "
            f"(`{tmp_path / 'data.jsonl'}`).") in card  # fmt: skip
    assert "huggingface.co/" + str(tmp_path) not in card
    assert f'generator = pipeline("text-generation", model="{tmp_path / "out"}", device_map="auto")' in card


def test_card_of_a_hub_student_links_it_and_its_dataset(tmp_path):
    tok = tm.tokenizer()
    student = tm.model(tok, seed=0)
    student.config._name_or_path = "org/tiny-student"
    tr = tm.trainer(tmp_path, student, tm.model(tok, seed=1), tok, max_steps=1, hub_model_id="me/tiny-distilled")
    tr.train()
    tr.create_model_card(model_name="tiny", dataset_name="openai/gsm8k")
    card = (tmp_path / "README.md").read_text()
    assert ("This model is a fine-tuned version of [org/tiny-student](https://huggingface.co/org/tiny-student) on the "
            "[openai/gsm8k](https://huggingface.co/datasets/openai/gsm8k) dataset.") in card  # fmt: skip
    assert 'model="me/tiny-distilled"' in card


def test_card_names_several_teachers_and_how_they_mix(tmp_path):
    tok = tm.tokenizer()
    tr = tm.trainer(tmp_path, teacher={"a": tm.model(tok, seed=1), "b": tm.model(tok, seed=2)}, tok=tok,
                    teacher_mixture="weighted", teacher_weights={"a": 0.25, "b": 0.75})  # fmt: skip
    tr.train()
    tr.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "- teacher: 2 teachers, weighted mixture per token (a: 0.25, b: 0.75): a: " in card
    assert "### Scores per round" not in card  # no eval hook, no table


@pytest.mark.parametrize("merge", [True, False])
def test_merged_lora_student_reloads_with_plain_from_pretrained(tmp_path, merge):
    tok = tm.tokenizer()
    student = tm.model(tok, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tr = tm.trainer(tmp_path, student, tm.model(tok, seed=1), tok, learning_rate=1e-2, max_steps=2,
                    save_merged_model=merge, save_strategy="steps", save_steps=1)  # fmt: skip
    tr = OnPolicyDistillTrainer(model=student, teacher_model=tm.model(tok, seed=1), args=tr.args,
                                train_dataset=tm.dataset(), processing_class=tok, peft_config=lora)  # fmt: skip
    tr.train()
    tr.save_model()
    ids = torch.tensor([tok.encode("what is 1+2? 3")])
    with torch.no_grad():
        expected = tr.model.eval()(ids).logits
    files = {p.name for p in tmp_path.iterdir()}
    assert ("adapter_config.json" in files) != merge
    assert "adapter_config.json" in {p.name for p in (tmp_path / "checkpoint-2").iterdir()}  # checkpoints keep LoRA
    if merge:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert not any("lora" in name for name, _ in reloaded.named_parameters())
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert any(n for n, _ in tr.model.named_parameters() if "lora_A" in n)  # the trained model kept its adapters
