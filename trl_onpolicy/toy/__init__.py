"""The embedded default: a synthetic GSM8K-format task, a local tokenizer, and a tiny teacher recipe.

Everything here runs offline on a CPU in minutes, so that the whole method can be seen working before it is
pointed at real models. See `task.py` (problems and scoring), `tokenizer.py`, `models.py`, `recipe.py`, and
`constitution.py` (a rule for constitutional distillation).
"""

from .constitution import (
    CONSTITUTION_TEMPLATE,
    CONSTITUTION_TOPIC,
    REFUSAL,
    constitution_text,
    constitution_scores,
    evaluate_constitution,
    is_refusal,
    topic_of,
)
from .models import (
    build_model,
    completion_nll,
    evaluate_exact_match,
    evaluate_multiple_choice,
    generate_completions,
    num_parameters,
)
from .recipe import (
    CONSTITUTION_FRACTION,
    RECIPE_VERSION,
    RECOVERING_CORRECTION_FRACTION,
    STUDENT_HIDDEN,
    STUDENT_LAYERS,
    STUDENT_SFT_STEPS,
    TEACHER_RECIPE,
    TOOL_FRACTION,
    Recipe,
    cache_dir,
    load_or_train_student,
    load_or_train_teacher,
    train_on_task,
)
from .slips import first_wrong_line, slip_row, wrong_lines
from .task import (
    equations,
    final_answer,
    generate_problems,
    is_correct,
    make_dataset,
    mc_prompt_text,
    prompt_text,
    to_mc_prompt_completion,
    to_multiple_choice,
    to_prompt_completion,
)
from .tokenizer import build_tokenizer, char_tokenizer

__all__ = [
    "CONSTITUTION_FRACTION",
    "CONSTITUTION_TEMPLATE",
    "CONSTITUTION_TOPIC",
    "RECIPE_VERSION",
    "RECOVERING_CORRECTION_FRACTION",
    "REFUSAL",
    "STUDENT_HIDDEN",
    "STUDENT_LAYERS",
    "STUDENT_SFT_STEPS",
    "TEACHER_RECIPE",
    "TOOL_FRACTION",
    "Recipe",
    "build_model",
    "build_tokenizer",
    "cache_dir",
    "char_tokenizer",
    "completion_nll",
    "constitution_scores",
    "constitution_text",
    "equations",
    "evaluate_constitution",
    "evaluate_exact_match",
    "evaluate_multiple_choice",
    "final_answer",
    "first_wrong_line",
    "generate_completions",
    "generate_problems",
    "is_correct",
    "is_refusal",
    "load_or_train_student",
    "load_or_train_teacher",
    "make_dataset",
    "mc_prompt_text",
    "num_parameters",
    "prompt_text",
    "slip_row",
    "to_mc_prompt_completion",
    "to_multiple_choice",
    "to_prompt_completion",
    "topic_of",
    "train_on_task",
    "wrong_lines",
]
