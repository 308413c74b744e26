"""trl-onpolicy: on-policy knowledge distillation for Hugging Face TRL.

`OnPolicyDistillTrainer` subclasses `trl.SFTTrainer` and `OnPolicyDistillConfig` subclasses `trl.SFTConfig`: an SFT
script becomes a distillation script by swapping the two names and passing `teacher_model`.

The names below are imported on first use (PEP 562), so `import trl_onpolicy` and the `trl-onpolicy` command start
without loading transformers, TRL, PEFT or lm-eval until something needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "CompletionsLogger": "callbacks",
    "CrossTokenizerTeacher": "teachers",
    "DistillCallback": "callbacks",
    "DomainRouter": "domain_router",
    "EnsembleTeacher": "teachers",
    "LmEvalCallback": "eval",
    "LocalTeacher": "teachers",
    "LossTemperature": "temperature",
    "OnPolicyDistillConfig": "config",
    "OnPolicyDistillTrainer": "trainer",
    "PromptClassifier": "domain_router",
    "Rollouts": "rollouts",
    "RoutedStudents": "routed_students",
    "ServerTeacher": "teachers",
    "Teacher": "teachers",
    "TeacherCache": "teachers",
    "TeacherScores": "teachers",
    "build_teacher_cache": "teachers",
}

__all__ = sorted(set(_EXPORTS) - {"LmEvalCallback"})


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'trl_onpolicy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
