"""The examples run as a user runs them: `examples/on_policy_distill.py` (full fine-tuning, LoRA, two processes under
`accelerate launch`) on tiny local models; every recipe and accelerate config parses; the custom teacher backend and the
custom generation callbacks do what their docstrings say."""

import ast
import dataclasses
import importlib.util
import math
import os
import re
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_models
import torch
import yaml
from safetensors.torch import load_file
from tiny_assets import save_tiny_assets, train_flags

from trl_onpolicy import LocalTeacher
from trl_onpolicy.commands.distill import make_parser
from trl_onpolicy.rollouts import Rollouts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPT = EXAMPLES / "on_policy_distill.py"
RECIPES = sorted((EXAMPLES / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((EXAMPLES / "accelerate_configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_assets(tmp_path_factory.mktemp("tiny"))


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(monkeypatch, capsys, flags: list[str]) -> list[dict]:
    """Run the example as `python examples/on_policy_distill.py FLAGS` (in this process); the step logs it printed."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *flags])
    with pytest.raises(SystemExit) as exit_info:  # the script exits with `run()`'s status
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.splitlines()
    steps = [re.match(r"step (\d+)/\d+ \| loss (\S+) \|.* completions (\S+) tokens \|", line) for line in printed]
    return [{"step": int(m[1]), "loss": float(m[2]), "completion_length": float(m[3])} for m in steps if m]


def _changed(before: dict, after: dict) -> list[str]:
    return [name for name, w in after.items() if not torch.equal(w, before[name])]


# --------------------------------------------------------------------------------------------------- the script


def test_script_full_finetuning_two_steps(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    logs = _run_script(monkeypatch, capsys, train_flags(assets, out, dataset="jsonl"))
    assert [h["step"] for h in logs] == [1, 2]
    assert all(float(h["loss"]) >= 0 and float(h["completion_length"]) > 0 for h in logs)
    before = load_file(os.path.join(assets["student"], "model.safetensors"))
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before)
    assert _changed(before, after), "the saved student equals the initial one: no update happened"


def test_script_lora_two_steps(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lora"
    flags = train_flags(assets, out, dataset="jsonl") + [
        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
    ]  # fmt: skip
    logs = _run_script(monkeypatch, capsys, flags)
    assert len(logs) == 2
    assert not (out / "model.safetensors").exists()  # only the adapters are saved
    adapters = load_file(out / "adapter_model.safetensors")
    lora_b = {name: w for name, w in adapters.items() if "lora_B" in name}
    assert lora_b and {name.split(".")[-3] for name in lora_b} == {"q_proj", "v_proj"}
    assert any(w.abs().sum() > 0 for w in lora_b.values()), "lora_B starts at zero and did not move"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_script_under_accelerate_launch_with_two_processes(assets, tmp_path):
    """`accelerate launch` with two CPU processes (gloo); the checkpoint holds one RNG state per process."""
    out = tmp_path / "two"
    env = {
        **os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    flags = train_flags(assets, out, dataset="gsm8k")
    flags[flags.index("--save_strategy") + 1] = "steps"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(SCRIPT), *flags, "--save_steps", "2",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    state = yaml.safe_load((checkpoint / "trainer_state.json").read_text())  # JSON is YAML
    assert state["global_step"] == 2 and len([h for h in state["log_history"] if "loss" in h]) == 2
    assert (out / "model.safetensors").is_file()
    print(f"two processes: {time.perf_counter() - start:.1f} s")


# --------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_parses_into_the_config(recipe):
    """Every key is a field of the script arguments, OnPolicyDistillConfig or ModelConfig (unknown keys raise), and
    the header gives a launch command for this very file."""
    script_args, training_args, model_args = make_parser().parse_args_and_config(["--config", str(recipe)])
    assert model_args.model_name_or_path and training_args.teacher_model_name_or_path and script_args.dataset_name
    header = recipe.read_text().split("\n\n", 1)[0]
    assert f"--config examples/recipes/{recipe.name}" in header
    assert "accelerate launch" in header or "trl-onpolicy distill" in header


def test_recipes_cover_full_lora_and_cpu():
    parsed = {p.name: make_parser().parse_args_and_config(["--config", str(p)]) for p in RECIPES}
    assert {"qwen-gsm8k-jsd.yaml", "qwen-gsm8k-lora.yaml", "toy-cpu.yaml"} <= set(parsed)
    assert not parsed["qwen-gsm8k-jsd.yaml"][2].use_peft and parsed["qwen-gsm8k-lora.yaml"][2].use_peft
    assert parsed["qwen-gsm8k-jsd.yaml"][0].dataset_name == "openai/gsm8k"
    assert parsed["toy-cpu.yaml"][1].use_cpu


def test_recipe_with_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPES[0].read_text() + "\nlearning_rat: 1.0e-5\n")
    with pytest.raises(ValueError, match="learning_rat"):
        make_parser().parse_args_and_config(["--config", str(bad)])


# --------------------------------------------------------------------------------------------------- accelerate


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {s for action in launch_command_parser()._actions for s in action.option_strings}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_config_loads(path):
    """accelerate's own loader (it refuses unknown top-level keys); nested FSDP / DeepSpeed keys are `launch` flags."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    unknown = [key for key in nested if f"--{key}" not in _launch_options()]
    assert not unknown, f"{path.name}: not accelerate launch options: {unknown}"
    assert "accelerate launch --config_file examples/accelerate_configs/" + path.name in path.read_text()


def test_accelerate_configs_cover_the_setups():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.name: load_config_from_file(str(p)) for p in ACCELERATE_CONFIGS}
    kinds = {name: str(c.distributed_type).split(".")[-1] for name, c in configs.items()}
    assert kinds["single_gpu.yaml"] == "NO" and configs["single_gpu.yaml"].num_processes == 1
    assert kinds["multi_gpu.yaml"] == "MULTI_GPU"
    assert kinds["fsdp2.yaml"] == "FSDP" and configs["fsdp2.yaml"].fsdp_config["fsdp_version"] == 2
    assert {configs[f"zero{s}.yaml"].deepspeed_config["zero_stage"] for s in (2, 3)} == {2, 3}


def test_accelerate_config_with_an_unknown_key_is_refused(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "accelerate_configs" / "multi_gpu.yaml").read_text() + "num_proceses: 2\n")
    with pytest.raises(ValueError, match="num_proceses"):
        load_config_from_file(str(bad))


def test_examples_readme_lists_every_example():
    readme = (EXAMPLES / "README.md").read_text()
    for path in [*EXAMPLES.glob("*.py"), *RECIPES, *ACCELERATE_CONFIGS]:
        assert path.name in readme, f"examples/README.md does not mention {path.name}"


# --------------------------------------------------------------------------------------------------- extensions


def test_custom_teacher_logs_every_scoring_call(tmp_path):
    example = _load_example("custom_teacher")
    tok = tiny_models.tokenizer()
    teacher = example.LoggingTeacher(LocalTeacher(tiny_models.model(tok, seed=1)))
    trainer = tiny_models.trainer(tmp_path, teacher=teacher, tok=tok, max_steps=2)
    trainer.train()
    logs = tiny_models.step_logs(trainer)
    assert len(teacher.records) == len(logs) == 2
    for record, log in zip(teacher.records, logs):
        assert record["form"] == "full" and record["tokens"] == round(log["completion_length"] * 2)
        assert record["mean_token_logp"] < 0
    assert teacher.compare_vocab == len(tok)  # the trainer's setting reached the wrapped backend


def test_custom_teacher_keeps_the_score_forms(tmp_path):
    example = _load_example("custom_teacher")
    tok = tiny_models.tokenizer()
    teacher = example.LoggingTeacher(LocalTeacher(tiny_models.model(tok, seed=1)))
    batch = {  # one prompt of 3 tokens and a completion of 2
        "input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "completion_ids": torch.tensor([[8, 9]]), "completion_mask": torch.ones(1, 2, dtype=torch.long),
    }  # fmt: skip
    topk = teacher.score(batch, top_k=3)
    token = teacher.score(batch, need="token")
    assert topk.form == "topk" and topk.topk_logps.shape == (1, 2, 3)
    assert token.form == "token" and token.token_logps.shape == (1, 2)
    assert [r["tokens"] for r in teacher.records] == [2, 2]
    assert teacher.records[0]["mean_token_logp"] == pytest.approx(teacher.records[1]["mean_token_logp"])


def test_drop_truncated_filters_and_never_empties_a_step():
    example = _load_example("custom_callback")
    callback = example.DropTruncated()
    rollouts = Rollouts([[1], [2], [3]], [[4, 2], [5, 5], [6, 2]], "student", truncated=[False, True, False])
    kept = callback.on_rollouts(None, None, None, rollouts)
    assert kept.completion_ids == [[4, 2], [6, 2]] and kept.prompt_ids == [[1], [3]]
    all_cut = Rollouts([[1], [2]], [[4], [5]], "student", truncated=[True, True])
    assert callback.on_rollouts(None, None, None, all_cut) is None
    assert (callback.kept, callback.dropped) == (4, 1)


def test_cut_after_answer_edits_completions():
    example = _load_example("custom_callback")
    tok = tiny_models.tokenizer()
    callback = example.CutAfterAnswer(tok, pattern=r"#a\n")  # the tiny char tokenizer: a short marker
    done = tok.encode("ok #a\nmore text", add_special_tokens=False)
    plain = tok.encode("no marker", add_special_tokens=False)
    rollouts = Rollouts([[1], [1]], [done, plain], "student", truncated=[True, True])
    edited = callback.on_rollouts(None, None, None, rollouts)
    assert edited.completion_ids[0] == tok.encode("ok #a\n", add_special_tokens=False) + [tok.eos_token_id]
    assert edited.completion_ids[1] == plain and edited.truncated == [False, True]
    assert callback.edited == 1 and edited.sampling_logps is None
    # vLLM's log-probs are cut alike; the EOS the callback added was not sampled (NaN)
    vllm = dataclasses.replace(rollouts, sampling_logps=[[-0.5] * len(done), [-0.25] * len(plain)])
    edited = callback.on_rollouts(None, None, None, vllm)
    kept = len(tok.encode("ok #a\n", add_special_tokens=False))
    assert edited.sampling_logps[1] == [-0.25] * len(plain) and edited.sampling_logps[0][:kept] == [-0.5] * kept
    assert len(edited.sampling_logps[0]) == kept + 1 and math.isnan(edited.sampling_logps[0][-1])


def test_filtering_callback_inside_a_training_step(tmp_path):
    """Random tiny students rarely stop within 8 tokens, so `DropTruncated` sees truncated rows; the step trains on
    what it kept."""
    example = _load_example("custom_callback")
    callback = example.DropTruncated()
    trainer = tiny_models.trainer(tmp_path, callbacks=[callback], max_steps=2)
    trainer.train()
    logs = tiny_models.step_logs(trainer)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert callback.kept + callback.dropped == 4  # every sampled completion went through the callback


# --------------------------------------------------------------------------------------------------- resume


def _train_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "train"
    ]


def test_every_training_example_passes_resume_from_checkpoint():
    """Each `trainer.train(...)` in examples/ passes the `--resume_from_checkpoint` flag through (on_policy_distill.py
    runs `trl_onpolicy.commands.distill`, which does; tests/test_cli.py resumes through it)."""
    training = {path.name: _train_calls(path) for path in EXAMPLES.glob("*.py") if _train_calls(path)}
    assert set(training) == {"distill.py", "sft_to_distill.py", "custom_callback.py", "custom_teacher.py"}
    for name, calls in training.items():
        for call in calls:
            passed = {k.arg: ast.unparse(k.value) for k in call.keywords}
            assert passed.get("resume_from_checkpoint") == "args.resume_from_checkpoint", name
    assert "sys.exit(run(" in (EXAMPLES / "on_policy_distill.py").read_text()


def test_distill_example_refuses_a_missing_checkpoint(assets, tmp_path):
    """`python examples/distill.py --resume_from_checkpoint /nonexistent` used to exit 0, trained from scratch."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [
        sys.executable, str(EXAMPLES / "distill.py"), "--student", assets["student"], "--num_rows", "8",
        "--teacher_model_name_or_path", assets["teacher"], "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--max_completion_length", "8", "--max_length", "64",
        "--report_to", "none", "--use_cpu", "true", "--resume_from_checkpoint", "/nonexistent",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    last_line = proc.stderr.rstrip().splitlines()[-1]
    assert last_line.startswith("FileNotFoundError: resume_from_checkpoint '/nonexistent' does not exist; output_dir")
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "model.safetensors").exists()
