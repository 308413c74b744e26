"""How `--help` reads: plain text (no doc markup), one default per flag, one spelling per flag.

Help strings and command descriptions are written once, for the docs and for the terminal. The docs' markup (doc
cross-references ``[`~trl_onpolicy.eval.LmEvalCallback`]``, inline code in backticks, Markdown links) is turned into
plain text here, in [`plain_text`], and [`HelpFormatter`] adds "(default: X)" only where the help does not already say
what the default is and the default says something (not `None`, not `False` for a switch). Stdlib only: `--help` of
the light commands must not load torch or transformers.
"""

from __future__ import annotations

import argparse
import enum
import re

CROSS_REFERENCE = re.compile(r"\[`(~?)([\w.]+)`\]")  # [`~pkg.mod.Name`] -> Name; [`pkg.Name`] -> pkg.Name
LINK = re.compile(r"\[([^\]]+)\]\((https?://[^)]+)\)")  # [text](url) -> text (url)
LONG_CHOICES = 6  # more choices than this are listed in the help, not in the flag's spelling


def plain_text(text: str | None) -> str | None:
    """`text` without doc markup: cross-references become the name, backticks go, links keep their address."""
    if not text:
        return text
    text = CROSS_REFERENCE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = LINK.sub(r"\1 (\2)", text)
    return text.replace("`", "")


def _shown_default(default):
    """The default as a user types it, or None when it is not worth printing (unset, a switch that is off)."""
    if default is None or default is argparse.SUPPRESS or default is False or default == []:
        return None
    return default.value if isinstance(default, enum.Enum) else default


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks (minus doc markup); each flag is spelled once (`--max_steps`, not also
    `--max-steps`) and shows its default once."""

    def _fill_text(self, text, width, indent):
        return super()._fill_text(plain_text(text), width, indent)

    def _format_action_invocation(self, action):
        long_choices = action.choices is not None and len(action.choices) > LONG_CHOICES
        options = action.option_strings
        spelled_once = [s for s in options if s == options[0] or s != options[0].replace("_", "-")]
        if not options or (spelled_once == options and not long_choices):
            return super()._format_action_invocation(action)
        metavar = action.dest.upper() if long_choices and action.metavar is None else action.metavar
        once = argparse.Action(spelled_once, action.dest, nargs=action.nargs, metavar=metavar,
                               choices=None if long_choices else action.choices)  # fmt: skip
        return super()._format_action_invocation(once)

    def _get_help_string(self, action):
        text = plain_text(action.help) or ""
        if action.choices is not None and len(action.choices) > LONG_CHOICES:
            text += " One of: " + ", ".join(str(getattr(c, "value", c)) for c in action.choices) + "."
        default = _shown_default(action.default)
        said = "default" in text.lower() or "%(default)" in text
        if default is not None and not said and (action.option_strings or action.nargs in ("?", "*")):
            text += f" (default: {str(default).replace('%', '%%')})"  # argparse expands %-formats next
        return text
