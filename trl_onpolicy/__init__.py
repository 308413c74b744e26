"""trl-onpolicy: on-policy knowledge distillation for Hugging Face TRL.

`OnPolicyDistillTrainer` subclasses `trl.SFTTrainer` and `OnPolicyDistillConfig` subclasses `trl.SFTConfig`: an SFT
script becomes a distillation script by swapping the two names and passing `teacher_model`.
"""

__version__ = "0.1.0"

from .callbacks import CompletionsLogger, DistillCallback
from .config import OnPolicyDistillConfig
from .rollouts import Rollouts
from .teachers import (
    EnsembleTeacher,
    LocalTeacher,
    ServerTeacher,
    Teacher,
    TeacherCache,
    TeacherScores,
    build_teacher_cache,
)
from .temperature import LossTemperature
from .trainer import OnPolicyDistillTrainer

__all__ = [
    "CompletionsLogger",
    "DistillCallback",
    "EnsembleTeacher",
    "LocalTeacher",
    "LossTemperature",
    "OnPolicyDistillConfig",
    "OnPolicyDistillTrainer",
    "Rollouts",
    "ServerTeacher",
    "Teacher",
    "TeacherCache",
    "TeacherScores",
    "build_teacher_cache",
]


def __getattr__(name):  # the eval hook imports lm-eval, which is slow: load it on first use
    if name == "LmEvalCallback":
        from .eval import LmEvalCallback

        return LmEvalCallback
    raise AttributeError(f"module 'trl_onpolicy' has no attribute {name!r}")
