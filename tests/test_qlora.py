"""QLoRA students on CPU (bitsandbytes 4-bit nf4 base + LoRA) and `save_merged_model` into a float model (issue 13).

- a 4-bit student trains end to end, on-policy (rollouts generated in eval mode), with a separate teacher and with
  self-distillation, with and without an lm-eval pass before training: every LoRA weight moves, the 4-bit base and
  the float head do not, the loss is finite. On a CPU with avx512_bf16 this fails without
  `quantized.keep_trainable` (bitsandbytes repacks the weights for a kernel that passes no gradient: pinned below);
- `save_merged_model=True` writes a float model (no `quantization_config`, no 4-bit tensors) that loads without
  bitsandbytes or PEFT and whose logits equal the trained PEFT student's;
- bad input: a 4-bit student without `peft_config`, a student repacked before the trainer got it, `save_merged_model`
  without adapters or with a sharded 4-bit student.

Tiny toy-tokenizer Llamas (2 layers, hidden 64: the smallest shape bitsandbytes' CPU repacking accepts) saved to a
temporary folder and loaded quantized; nothing is downloaded.
"""

import json
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs `bitsandbytes` (pip install 'trl-onpolicy[dev]')")

from bitsandbytes.functional import dequantize_4bit, has_avx512bf16  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer, merge  # noqa: E402
from trl_onpolicy.quantized import keep_trainable  # noqa: E402
from trl_onpolicy.toy.models import build_model  # noqa: E402
from trl_onpolicy.toy.tokenizer import build_tokenizer  # noqa: E402

TRAP = has_avx512bf16()
needs_trap_cpu = pytest.mark.skipif(not TRAP, reason="bitsandbytes repacks 4-bit weights on avx512_bf16 CPUs only")


# ------------------------------------------------------------------------------------------------------ set-up
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok):
    """A 2-layer Llama (hidden 64, tied head) saved as `from_pretrained` reads it."""
    folder = tmp_path_factory.mktemp("base")
    build_model(2, 64, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def load_4bit(folder, compute_dtype=torch.float32):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=compute_dtype)


def lora(**kwargs) -> LoraConfig:
    # q/v only: their gradients reach the loss only through the 4-bit o_proj / MLP layers, as in the trap's report.
    # Random lora_B: the adapted student differs from its base, so self-distillation has a gradient from step 1.
    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **kwargs}
    return LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)


def dataset() -> Dataset:
    prompts = ["Tom has 3 pens.", "Mia has 5 cups.", "How many?", "1 + 2 ="] * 2
    return Dataset.from_dict({"prompt": prompts, "completion": [" 3", " 5 cups", " 4", " 3"] * 2})


def config(tmp_path, **kwargs) -> OnPolicyDistillConfig:
    values = {
        "output_dir": str(tmp_path), "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
        "lmbda": 1.0, "max_completion_length": 6, "logging_steps": 1, "report_to": [], "save_strategy": "no",
        "seed": 0,
    }  # fmt: skip
    values.update(kwargs)
    return OnPolicyDistillConfig(**values)


def four_bit_state(model) -> dict[str, torch.Tensor]:
    """Each 4-bit layer's stored bytes and its dequantised weight."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name + ".bytes"] = module.weight.data.clone()
            state[name + ".weight"] = dequantize_4bit(module.weight.data, module.weight.quant_state).clone()
    return state


def float_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}


def repacked(model) -> int:
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers)


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("eval_before_training", [False, True], ids=["no-eval", "eval-before"])
@pytest.mark.parametrize("teacher", ["separate", "self"])
@pytest.mark.parametrize("lmbda", [1.0, 0.0], ids=["on-policy", "dataset"])
def test_qlora_student_trains(tmp_path, tok, base_dir, lmbda, teacher, eval_before_training):
    """Three eval-mode passes without gradients that each repack the weights when not prevented: the student's
    rollouts (lmbda=1), the self-distillation teacher's scoring (under inference_mode), the lm-eval pass before the
    first step. LoRA must learn with any of them (dataset + separate teacher + no eval is the control: none)."""
    callbacks = []
    if eval_before_training:
        from trl_onpolicy.eval import LmEvalCallback

        callbacks.append(LmEvalCallback(tasks=["toy_gsm8k"], limit=1, toy_eval_size=4, gen_kwargs={"max_gen_toks": 4},
                                        task_dir=str(tmp_path / "tasks"), eval_before_training=True))  # fmt: skip
    trainer = OnPolicyDistillTrainer(
        model=load_4bit(base_dir),
        teacher_model=build_model(2, 64, tok, seed=1) if teacher == "separate" else None,
        args=config(tmp_path, lmbda=lmbda),
        train_dataset=dataset(),
        processing_class=tok,
        peft_config=lora(),
        callbacks=callbacks,
    )
    student = trainer.accelerator.unwrap_model(trainer.model)
    assert (trainer.teacher.model is student) == (teacher == "self")
    quantized_before, float_before = four_bit_state(student), float_params(student)
    assert len(quantized_before) == 2 * 7 * 2  # (bytes, weight) of 2 blocks x 7 linears; the tied head stays float

    trainer.train()

    if eval_before_training:
        history = callbacks[0].history  # before step 1, and at the round end (step 1 of 2: a mid-training eval too)
        assert history[0]["kind"] == "before" and not any("error" in h for h in history)
    float_after = float_params(student)
    lora_names = [n for n in float_before if "lora_" in n]
    assert len(lora_names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    still = [n for n in lora_names if torch.equal(float_before[n], float_after[n])]
    assert not still, f"LoRA weights that did not move: {still}"
    assert repacked(student) == 0, "a 4-bit layer was repacked for bitsandbytes' CPU inference kernel"
    moved = [n for n in float_before if "lora_" not in n and not torch.equal(float_before[n], float_after[n])]
    assert not moved, f"float base weights (embeddings, tied head, norms) that moved: {moved}"
    quantized_after = four_bit_state(student)
    assert all(torch.equal(quantized_before[k], quantized_after[k]) for k in quantized_before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_qlora_through_the_distill_command(tmp_path, tok, base_dir):
    """`--load_in_4bit --use_peft` (trl.ModelConfig) gives a 4-bit student whose adapters learn, on-policy."""
    from trl_onpolicy.commands.distill import main, make_parser

    teacher_dir = tmp_path / "teacher"
    build_model(2, 64, tok, seed=1).save_pretrained(teacher_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in dataset().to_list()))
    flags = [
        "--model_name_or_path", base_dir, "--teacher_model_name_or_path", str(teacher_dir),
        "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--lmbda", "1",
        "--per_device_train_batch_size", "2", "--max_completion_length", "6", "--learning_rate", "1e-2",
        "--report_to", "none", "--save_strategy", "no",
        "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0", "--dtype", "float32",
        "--load_in_4bit", "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
    ]  # fmt: skip
    trainer = main(*make_parser().parse_args_and_config(args=flags))
    student = trainer.accelerator.unwrap_model(trainer.model)
    assert student.get_base_model().is_loaded_in_4bit and repacked(student) == 0
    lora_b = [p for n, p in student.named_parameters() if "lora_B" in n]  # 0 at init (PEFT's default)
    assert len(lora_b) == 4 and all(p.abs().sum() > 0 for p in lora_b), "the adapters did not learn"


@needs_trap_cpu
def test_bitsandbytes_repacking_blocks_gradients():
    """Pins the trap itself (bitsandbytes 0.50 on this CPU): after one eval-mode forward without gradients, a 4-bit
    layer passes no gradient to its input; with `keep_trainable` first, the gradient is the dequantised matmul's."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, requires_grad=True)
    grads = {}
    for fixed in (False, True):
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.load_state_dict(torch.nn.Linear(64, 64, bias=False).state_dict())
        layer = layer.to("cpu")  # quantises
        if fixed:
            keep_trainable(layer)
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(2, 64))
        layer.train()
        x.grad = None
        with pytest.warns(UserWarning, match="autograd kernel was not registered") if not fixed else nullcontext():
            layer(x).pow(2).sum().backward()
        grads[fixed] = x.grad
        if fixed:
            weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in)
            expected = 2 * (x.detach() @ weight.T) @ weight  # d/dx sum((x W^T)^2)
    assert grads[False] is None, "bitsandbytes now passes gradients through repacked weights: the workaround can go"
    torch.testing.assert_close(grads[True], expected, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize(
    "kind, dtype, tolerance",
    # max |logit difference| measured (logits up to ~0.65): QLoRA float32 4.1e-3, because TRL casts a quantized
    # student's adapters to bf16 (sft_trainer.py, "QLoRA ... converted to bf16"), so the student's LoRA branch rounds
    # its activations to bf16 while the merged weights do not (with the adapters cast back to float32 the difference
    # is 3e-7, checked below); QLoRA bf16 (bf16=True) 1.8e-2 (bf16 rounding of the merged W + BA, ~4 ulps at 0.64);
    # LoRA float32 3e-7
    [("4bit", torch.float32, 1e-2), ("4bit", torch.bfloat16, 3e-2), ("lora", torch.float32, 1e-5)],
    ids=["qlora-float32", "qlora-bf16", "lora-float32"],
)
def test_save_merged_model_is_a_float_model(tmp_path, tok, base_dir, monkeypatch, kind, dtype, tolerance):
    """The merged save loads without bitsandbytes or PEFT, holds only float tensors in the compute dtype, and gives
    the trained PEFT student's logits; saving leaves the student in training with its adapters."""
    model = load_4bit(base_dir, dtype) if kind == "4bit" else AutoModelForCausalLM.from_pretrained(base_dir)
    trainer = OnPolicyDistillTrainer(
        model=model, args=config(tmp_path, save_merged_model=True, bf16=dtype == torch.bfloat16, use_cpu=True),
        train_dataset=dataset(), processing_class=tok, peft_config=lora(),
    )  # fmt: skip
    trainer.train()
    student = trainer.accelerator.unwrap_model(trainer.model)
    before = float_params(student)
    trainer.save_model(str(tmp_path / "merged"))
    assert all(torch.equal(before[n], p) for n, p in float_params(student).items())
    assert any("lora_" in n for n in before) and student.training

    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == str(dtype).removeprefix("torch.")
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    plain = build_model(2, 64, tok).state_dict()
    assert set(tensors) == set(plain) - {"lm_head.weight"}  # a tied head is saved once
    assert all(t.dtype == dtype and t.shape == plain[k].shape for k, t in tensors.items())

    for package in ("bitsandbytes", "peft"):  # any import of them would now fail
        monkeypatch.setitem(sys.modules, package, None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    monkeypatch.undo()
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith(("_proj", "lm_head")))
    ids = torch.tensor(tok(["Tom has 3 pens. He buys", "How many cups?"], padding=True)["input_ids"])  # (2, L)
    student.eval()
    with torch.no_grad():
        expected, got = student(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()  # (2, L, V)
    student.train()
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    if dtype == torch.float32:  # the same network in float32 throughout: equal up to float32 round-off
        for name, p in student.named_parameters():
            p.data = p.data.float() if "lora_" in name else p.data
        with torch.no_grad():
            torch.testing.assert_close(got, student.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)
        student.train()
    with torch.no_grad():  # the adapters are in: the merged model is not the base network
        base = student.get_base_model()
        with student.disable_adapter():
            assert (base(input_ids=ids).logits.float() - got).abs().max() > 10 * tolerance


def test_merged_model_of_a_sharded_state_dict(tok, base_dir):
    """`merged_model` takes the state dict gathered from a sharded student (here: the student's own, as a copy on
    another device would arrive) and reads nothing else but config, adapter config and non-persistent buffers."""
    from peft import get_peft_model

    torch.manual_seed(0)
    student = get_peft_model(load_4bit(base_dir), lora())
    state = {k: v.clone() for k, v in student.state_dict().items()}
    assert any(merge.QUANT_STATE in k for k in state)
    for p in student.parameters():  # the module's own tensors are not read
        p.data = torch.zeros_like(p.data)
    merged = merge.merged_model(student, state)
    torch.manual_seed(0)
    reference = merge.merged_model(get_peft_model(load_4bit(base_dir), lora()))  # the same adapters
    for (name, a), (_, b) in zip(merged.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------ bad input
def test_4bit_student_without_peft_config_names_the_fix(tmp_path, tok, base_dir):
    message = r"pass `peft_config=LoraConfig\(...\)` to the trainer"
    with pytest.raises(ValueError, match=message):
        OnPolicyDistillTrainer(model=load_4bit(base_dir), args=config(tmp_path), train_dataset=dataset(),
                               processing_class=tok)  # fmt: skip
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    with pytest.raises(ValueError, match=message):  # refused before anything is loaded
        OnPolicyDistillTrainer(model=base_dir, args=config(tmp_path), train_dataset=dataset(), processing_class=tok,
                               quantization_config=quantization)  # fmt: skip


@needs_trap_cpu
def test_student_repacked_before_the_trainer_is_refused(tmp_path, tok, base_dir):
    model = load_4bit(base_dir)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([tok("Tom has")["input_ids"]]))
    assert repacked(model) == 2 * 7
    with pytest.raises(ValueError, match=r"14 4-bit layers of the student were already repacked .* Load the student"):
        OnPolicyDistillTrainer(model=model, args=config(tmp_path), train_dataset=dataset(), processing_class=tok,
                               peft_config=lora())  # fmt: skip


def test_save_merged_model_without_adapters_is_a_plain_save(tmp_path, tok, base_dir, caplog):
    trainer = OnPolicyDistillTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir), teacher_model=build_model(2, 64, tok, seed=1),
        args=config(tmp_path, save_merged_model=True, max_steps=1), train_dataset=dataset(), processing_class=tok,
    )  # fmt: skip
    assert "`save_merged_model=True` has no effect: the student has no LoRA adapters" in caplog.text
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    own = trainer.model.state_dict()
    assert all(torch.equal(t, own[k]) for k, t in saved.items())


def test_save_merged_model_with_a_sharded_4bit_student_is_refused(tok, base_dir):
    from peft import get_peft_model

    student = get_peft_model(load_4bit(base_dir), lora())
    state = SimpleNamespace(deepspeed_plugin=None)
    trainer = SimpleNamespace(args=SimpleNamespace(save_merged_model=True), is_fsdp_enabled=True,
                              is_deepspeed_enabled=False, accelerator=SimpleNamespace(state=state))  # fmt: skip
    with pytest.raises(ValueError, match="not supported for a quantized \\(QLoRA\\) student under FSDP"):
        merge.check_merge(trainer, student)
    trainer.is_fsdp_enabled = False
    merge.check_merge(trainer, student)  # one process: fine
