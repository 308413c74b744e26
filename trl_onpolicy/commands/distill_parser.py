"""The parser of `trl-onpolicy distill`: TRL's `TrlParser`, with a `--help` a user can read and typos named.

`TrlParser` makes every field of the three argument groups a flag, in dataclass order: `--help` printed ~1,100 lines
in which the distillation options came after ~600 lines of generic `TrainingArguments`. [`DistillParser`] prints, in
this order, the data, the distillation options (the fields [`OnPolicyDistillConfig`] adds to `SFTConfig`), the
student model's main options and the common training options; `--help-all` adds every other Trainer, SFT and
`ModelConfig` option. Help strings are plain text with one default each ([`~trl_onpolicy.commands.help_format`]).

An unknown field, in the YAML recipe or on the command line, is an error that names the closest known field (`lmdba`:
"did you mean `lmbda`?") instead of TRL's "add them to the dataclass".
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys

from trl import ModelConfig, SFTConfig, TrlParser

from .help_format import HelpFormatter

MODEL_FIELDS = ("model_name_or_path", "model_revision", "dtype", "attn_implementation", "use_peft", "lora_r",
                "lora_alpha", "lora_target_modules", "load_in_4bit")  # fmt: skip
TRAINING_FIELDS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "max_length", "gradient_checkpointing", "bf16",
    "logging_steps", "save_strategy", "save_steps", "save_total_limit", "eval_strategy", "eval_steps", "seed",
    "report_to", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "use_cpu",
)  # fmt: skip
USAGE = "%(prog)s [--config RECIPE.yaml] [--FIELD VALUE ...]"
METAVARS = {"int": "INT", "float": "FLOAT", "string_to_bool": "BOOL", "str": "TEXT"}  # `--max_steps INT`


def _names(dataclass_type, skip=()) -> list[str]:
    return [f.name for f in dataclasses.fields(dataclass_type) if f.name not in skip]


class _HelpAll(argparse.Action):
    """`--help-all`: the help with every option, then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help(show_all=True)
        parser.exit()


class DistillParser(TrlParser):
    """`TrlParser` over (script arguments, [`OnPolicyDistillConfig`], `ModelConfig`) with sectioned help."""

    def __init__(self, script_type, config_type, prog=None, description=None):
        super().__init__((script_type, config_type, ModelConfig), prog=prog, usage=USAGE, description=description,
                         formatter_class=HelpFormatter)  # fmt: skip
        self.add_argument("--help-all", action=_HelpAll, help="Show every option (all Trainer and SFT settings).")
        self.add_argument("--config", metavar="RECIPE.yaml", default=argparse.SUPPRESS,
                          help="YAML file of field: value lines (examples/recipes/); flags given with it win.")  # fmt: skip
        for action in self._actions:
            if action.option_strings and action.metavar is None and action.nargs != 0:
                action.metavar = METAVARS.get(getattr(action.type, "__name__", ""), "VALUE") if action.choices is None else None
        own = _names(config_type, skip=set(_names(SFTConfig)))
        self.sections = [  # (title, fields in the short help, fields only in --help-all)
            ("data", _names(script_type), []),
            (f"distillation ({config_type.__name__})", ["loss_type", *own], []),
            ("student model (trl.ModelConfig)", list(MODEL_FIELDS), _names(ModelConfig, skip=MODEL_FIELDS)),
            ("training", list(TRAINING_FIELDS), _names(SFTConfig, skip={*TRAINING_FIELDS, "loss_type"})),
        ]

    def _actions_of(self, fields: list[str]) -> list[argparse.Action]:
        by_dest = {}
        for action in self._actions:
            if action.option_strings and not action.option_strings[0].startswith("--no_"):
                by_dest.setdefault(action.dest, action)  # `--no_<field>` switches share the field's dest
        return [by_dest[name] for name in fields if name in by_dest]

    def format_help(self, show_all: bool = False) -> str:
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        formatter.start_section("options")
        formatter.add_arguments([a for a in self._actions if a.dest in ("help", "help_all", "config")])
        formatter.end_section()
        hidden = 0
        for title, shown, more in self.sections:
            formatter.start_section(title)
            formatter.add_arguments(self._actions_of(shown + more if show_all else shown))
            formatter.end_section()
            hidden += 0 if show_all else len(self._actions_of(more))
        if hidden:
            formatter.add_text(f"{hidden} more Trainer, SFT and model options: {self.prog} --help-all")
        formatter.add_text(self.epilog)
        return formatter.format_help()

    def print_help(self, file=None, show_all: bool = False):
        self._print_message(self.format_help(show_all=show_all), sys.stdout if file is None else file)

    def parse_args_and_config(self, args=None):
        """TRL's parsing; an unknown field (recipe or flag) raises a `ValueError` naming the closest known field."""
        args = list(sys.argv[1:] if args is None else args)
        args = [part for a in args for part in (a.split("=", 1) if a.startswith("--config=") else [a])]  # TRL: 2 words
        recipe = args[args.index("--config") + 1] if "--config" in args[:-1] else "the --config file"
        *groups, from_config, from_flags = super().parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True
        )
        unknown = [(item[2:], f"in {recipe}") for item in from_config[::2]]
        unknown += [(item[2:], "on the command line") for item in from_flags if item.startswith("--")]
        if unknown or from_flags:
            raise ValueError(self.unknown_fields_message(unknown, from_flags))
        return tuple(groups)

    def unknown_fields_message(self, unknown: list[tuple[str, str]], from_flags: list[str]) -> str:
        known = sorted({a.dest for a in self._actions if a.option_strings and a.dest != argparse.SUPPRESS})
        if not unknown:
            return f"Unexpected values on the command line: {' '.join(from_flags)} (every value follows a --field)."
        parts = []
        for name, where in unknown:
            key = name.split("=", 1)[0].replace("-", "_")
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            parts.append(f"unknown field `{key}` {where}{hint}")
        text = "; ".join(parts)
        return text[0].upper() + text[1:] + f". See `{self.prog} --help-all` for every field."
