"""LoRA / QLoRA students (issue 2, item 7): `peft_config` exactly as `SFTTrainer` takes it.

- only the adapter weights move; every base weight stays bit-identical;
- with no teacher and a LoRA student the teacher is the same network with its adapters disabled (self-distillation):
  the same model object, no second copy, and its scores are the base network's;
- QLoRA (4-bit base + LoRA) students, on CPU too, are in test_qlora.py.

Tiny models built from configs with a character tokenizer: nothing is downloaded.
"""

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

from trl_onpolicy.toy import char_tokenizer
from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer
from trl_onpolicy.rollouts import Rollouts, collate


# ------------------------------------------------------------------------------------------------- tiny models
def tiny_llama(tok, seed: int = 0, layers: int = 1, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def dataset() -> Dataset:
    prompts = ["what is 1+2?", "say hi", "count 123", "abc"] * 2
    return Dataset.from_dict({"prompt": prompts, "completion": [" 3", " hi", " 4", " d"] * 2})


def lora_config(**kwargs) -> LoraConfig:
    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **kwargs}
    return LoraConfig(task_type="CAUSAL_LM", **kwargs)


def config(tmp_path, **kwargs) -> OnPolicyDistillConfig:
    values = {
        "output_dir": str(tmp_path), "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
        "max_completion_length": 6, "logging_steps": 1, "report_to": [], "save_strategy": "no", "seed": 0,
    }  # fmt: skip
    values.update(kwargs)
    return OnPolicyDistillConfig(**values)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------- tests
def test_lora_changes_adapters_only(tmp_path):
    """Two steps against a different teacher: every LoRA weight moves, every base weight is bit-identical."""
    tok = char_tokenizer()
    trainer = OnPolicyDistillTrainer(
        model=tiny_llama(tok, seed=0),
        teacher_model=tiny_llama(tok, seed=1),
        args=config(tmp_path, lmbda=0.5),
        train_dataset=dataset(),
        processing_class=tok,
        peft_config=lora_config(),
    )
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)

    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    # At init lora_B = 0, so lora_A gets no gradient on step 1; by step 2 both have moved.
    unchanged_lora = [n for n in lora if torch.equal(before[n], after[n])]
    assert not unchanged_lora, f"LoRA weights that did not move: {unchanged_lora}"
    changed_base = [n for n in base if not torch.equal(before[n], after[n])]
    assert not changed_base, f"base weights that moved: {changed_base}"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_lora_without_teacher_is_self_distillation(tmp_path):
    """No teacher: the teacher is the student's own network with adapters off, at init identical (divergence 0)."""
    tok = char_tokenizer()
    trainer = OnPolicyDistillTrainer(
        model=tiny_llama(tok),
        args=config(tmp_path),  # on-policy: the student writes, its base network scores
        train_dataset=dataset(),
        processing_class=tok,
        peft_config=lora_config(),
    )
    student = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.teacher.model is student, "the teacher must be the student's own model object, not a copy"
    assert trainer.teacher.disable_adapters
    # No second copy of the weights: the teacher reads the student's storage.
    student_storage = {p.data_ptr() for p in student.parameters()}
    assert all(p.data_ptr() in student_storage for p in trainer.teacher.model.parameters())

    base = snapshot(student.get_base_model())
    base = {n: t for n, t in base.items() if "lora_" not in n}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "divergence" in h]
    assert len(logs) == 2
    # lora_B = 0 at init: the adapted student *is* its base network, so the divergence is zero up to rounding.
    assert abs(logs[0]["divergence"]) < 1e-6, logs[0]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    after = snapshot(student.get_base_model())
    assert all(torch.equal(base[n], after[n]) for n in base)
    assert student.training, "scoring with the teacher must leave the student in training mode"


def test_self_distillation_teacher_scores_with_adapters_off(tmp_path):
    """With non-zero adapters, the teacher's scores are the base network's and the student is pulled back to it."""
    tok = char_tokenizer()
    plain = tiny_llama(tok)
    reference = tiny_llama(tok)  # the same weights (same seed): what the teacher must reproduce
    trainer = OnPolicyDistillTrainer(
        model=plain,
        args=config(tmp_path, lmbda=0.0, loss_type="forward_kl"),  # dataset completions: a fixed batch
        train_dataset=dataset(),
        processing_class=tok,
        peft_config=lora_config(init_lora_weights=False),  # random lora_B: the adapted student differs from its base
    )
    rows = [trainer.train_dataset[i] for i in range(4)]
    rollouts = Rollouts([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], "dataset")
    batch = collate(rollouts, tok.pad_token_id)
    scores = trainer.teacher.score(batch, need="token")
    with torch.no_grad():
        logps = torch.log_softmax(
            reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1
        )
        n = batch["completion_ids"].shape[1]
        expected = logps[:, -n - 1 : -1].gather(-1, batch["completion_ids"][..., None]).squeeze(-1)  # (B, C)
        adapted = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(scores.token_logps[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        adapted, reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    )

    trainer.train()
    logs = [h for h in trainer.state.log_history if "divergence" in h]
    assert logs[0]["divergence"] > 1e-4, "adapters that change the output must give a non-zero divergence"
    assert logs[1]["divergence"] < logs[0]["divergence"], "the student should move toward its base network"
