# /// script
# dependencies = ["trl-onpolicy", "trl", "peft"]
# ///
"""
On-policy distillation in TRL's script style: `TrlParser` over the script arguments, `OnPolicyDistillConfig` and
`ModelConfig`, so every field is a flag and `--config recipe.yaml` sets them from a file (flags after it win).
`trl-onpolicy distill` runs this same code (`trl_onpolicy/commands/distill.py`).

Qwen2.5-1.5B-Instruct teaches Qwen2.5-0.5B-Instruct on GSM8K: `openai/gsm8k`'s `question`/`answer` rows become
conversational prompts (and completions, used only when `--lmbda` < 1); the student writes its own answers and the
teacher scores every token of them. Needs the Hub, and a GPU for the sizes below.

# Full fine-tuning, one GPU
```bash
accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/on_policy_distill.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --dataset_name openai/gsm8k --dataset_config main \
    --system_prompt "Solve the problem step by step. End with the final answer on its own line as '#### <number>'." \
    --dtype bfloat16 \
    --loss_type jsd --beta 0.5 --lmbda 1.0 \
    --max_completion_length 256 --max_length 512 \
    --learning_rate 1e-5 --lr_scheduler_type cosine --warmup_steps 10 \
    --per_device_train_batch_size 8 --gradient_accumulation_steps 4 \
    --max_steps 400 --num_rounds 4 --eval_tasks gsm8k --eval_limit 250 \
    --logging_steps 5 --report_to none \
    --output_dir Qwen2.5-0.5B-GSM8K-OnPolicyDistill
```

# LoRA (add `--load_in_4bit` for QLoRA: a 4-bit student with LoRA adapters; the teacher stays unquantized)
```bash
accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/on_policy_distill.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --dataset_name openai/gsm8k --dataset_config main \
    --system_prompt "Solve the problem step by step. End with the final answer on its own line as '#### <number>'." \
    --dtype bfloat16 \
    --use_peft --lora_r 32 --lora_alpha 64 --lora_target_modules all-linear \
    --max_completion_length 256 --max_length 512 \
    --learning_rate 1e-4 --per_device_train_batch_size 8 --gradient_accumulation_steps 4 \
    --max_steps 400 --logging_steps 5 --report_to none \
    --output_dir Qwen2.5-0.5B-GSM8K-OnPolicyDistill-LoRA
```

# Several GPUs (DDP, FSDP2, DeepSpeed ZeRO-2/3): the same flags, another accelerate config, or a recipe
```bash
accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 4 \
    examples/on_policy_distill.py --config examples/recipes/qwen-gsm8k-jsd.yaml
accelerate launch --config_file examples/accelerate_configs/zero3.yaml --num_processes 4 \
    examples/on_policy_distill.py --config examples/recipes/qwen-gsm8k-jsd.yaml
```

# Offline on a CPU: the embedded toy teacher, student and task (trained once and cached, about 10 minutes)
```bash
python examples/on_policy_distill.py --config examples/recipes/toy-cpu.yaml
```

Any local model folder or dataset works the same way: `--model_name_or_path path/to/student`,
`--dataset_name path/to/data.jsonl` (or a `save_to_disk` folder). On CPU-only machines, several processes need
`CUDA_VISIBLE_DEVICES= ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...` (in accelerate 1.15
`--cpu --num_processes 2` starts one process).
"""

import shlex
import sys

from trl_onpolicy.commands.distill import run

if __name__ == "__main__":  # exit status 143 when SIGTERM stopped training (it prints the command that resumes)
    sys.exit(run(prog=shlex.join(["python", sys.argv[0]])))
