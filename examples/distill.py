"""One distillation script for every kind of teacher: the backend follows from `--teacher_model_name_or_path`.

    python examples/distill.py                                              # the built-in toy teacher, in process
    python examples/distill.py --teacher_model_name_or_path path/to/model   # any local or Hub model
    python examples/distill.py --teacher_model_name_or_path http://127.0.0.1:8000 --teacher_top_k 20   # a server
    python examples/distill.py --teacher_model_name_or_path path/to/cache --lmbda 0.0                 # a cache
    python examples/distill.py --teacher_model_name_or_path '{"a": "path/a", "b": "path/b"}' --teacher_mixture weighted

Every `OnPolicyDistillConfig` field is a flag (`--max_steps`, `--loss_type`, `--hidden_state_weight`, ...), and
`--config recipe.yaml` reads them from a file. `--resume_from_checkpoint true` resumes from the last whole checkpoint in
`--output_dir` (a `checkpoint-N` folder or a run folder works too). The student defaults to the toy student and the
dataset to the toy GSM8K-format task, so the script runs offline on a CPU; `--student` and `--dataset_name` point it
at real ones.
"""

import sys
from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer, checkpoints, toy


@dataclass
class ScriptArguments:
    student: str = field(default="toy", metadata={"help": "'toy' (the built-in weak student) or a model id or path."})
    dataset_name: str = field(default="toy", metadata={"help": "'toy' (the built-in task) or a dataset id or path."})
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset_name`."})
    num_rows: int = field(default=640, metadata={"help": "Rows of the toy dataset."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (tiny models are fastest on one)."})


def main(script: ScriptArguments, args: OnPolicyDistillConfig):
    torch.set_num_threads(script.threads)
    if script.student == "toy":
        student, tokenizer, _ = toy.load_or_train_student()
    else:
        student = AutoModelForCausalLM.from_pretrained(script.student, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(script.student, trust_remote_code=args.trust_remote_code)
    teacher = None  # the config's `teacher_model_name_or_path` picks the backend
    if args.teacher_model_name_or_path is None:
        teacher, _, _ = toy.load_or_train_teacher()
    if script.dataset_name == "toy":
        dataset = toy.make_dataset(script.num_rows, split="train").select_columns(["prompt", "completion"])
    else:
        dataset = load_dataset(script.dataset_name, split=script.dataset_split)
    trainer = OnPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # `true`: the last whole checkpoint
    if checkpoints.sigterm_stop(trainer):  # preempted: the checkpoint is what to resume from, not a final model
        sys.exit(checkpoints.SIGTERM_EXIT_STATUS)
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, OnPolicyDistillConfig))
    main(*parser.parse_args_and_config())
