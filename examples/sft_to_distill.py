"""An SFT script turned into an on-policy distillation script: two names swapped, `teacher_model` added.

    python examples/sft_to_distill.py            # offline: the built-in toy teacher and a weak student, on a CPU
    python examples/sft_to_distill.py --resume_from_checkpoint true    # go on from the last checkpoint

The SFT version of this script would read `SFTConfig(...)` and `SFTTrainer(model=..., ...)`; everything else is the
same. The dataset holds prompts only: the teacher is the only source of knowledge.
"""

import torch
from trl import TrlParser

from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer  # was: from trl import SFTConfig, SFTTrainer
from trl_onpolicy import toy


parser = TrlParser(OnPolicyDistillConfig)  # was: TrlParser(SFTConfig); every field is a flag
parser.set_defaults(
    output_dir="sft-to-distill-out",
    max_steps=20,
    per_device_train_batch_size=32,
    learning_rate=1e-3,
    max_completion_length=96,
    logging_steps=5,
    report_to=[],
)
(args,) = parser.parse_args_and_config()

torch.set_num_threads(1)  # tiny models generate fastest on one thread

teacher, tokenizer, _ = toy.load_or_train_teacher()
student, _, _ = toy.load_or_train_student()
dataset = toy.make_dataset(640, split="train").select_columns(["prompt"])

trainer = OnPolicyDistillTrainer(  # was: SFTTrainer(
    model=student,
    teacher_model=teacher,  # added
    args=args,
    train_dataset=dataset,
    processing_class=tokenizer,
)
trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # `true`: the last whole checkpoint in output_dir
trainer.save_model()
