"""The toy task with a calculator: the embedded default's tool-use variant (issue 19).

With the tool, every equation of the chain of thought is asked of `calc` instead of computed: the model writes the
left side as a call and ends its turn, the tool's answer closes the equation, and the model goes on:

    Tools: calc
    Question: Mia has 7 pens. She buys 5 more. Then she gives away 3. How many pens does Mia have now?
    Answer: Mia buys 5 more: calc(expression=7 + 5)</s> = 12.
    Mia gives away 3: calc(expression=12 - 3)</s> = 9.
    #### 9</s>

` = 12` and ` = 9` are the tool's turns (context, not targets); `</s>` (EOS) ends each of the model's turns. This is
[`TOOL_CHAT_TEMPLATE`] rendering the conversation (user: the question; assistant: text and a `calc` call; tool: the
value; ...): the same bytes as the plain task with each ` a op b = c` written as a call, so the toy tokenizer needs no
new tokens, and the first line ("Tools: calc", written when the template is given `tools`) tells a model that the
calculator is there (a teacher trained on both forms calls it only then). The model's turns are marked
`{% generation %}`, so TRL's `SFTTrainer(assistant_only_loss=True)` trains on them alone, as the trainer does.
"""

from __future__ import annotations

import re

from .task import _EQUATION, prompt_text, to_prompt_completion

TOOL_NAME = "calc"
TOOL_CHAT_TEMPLATE = (
    "{%- if tools -%}{{ 'Tools: ' + (tools | map(attribute='function.name') | join(', ')) + '\n' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{% generation %}{{ m['content'] }}"
    "{%- for c in m['tool_calls'] or [] -%}{{ c['function']['name'] + '(' }}"
    "{%- for k, v in c['function']['arguments'].items() -%}{{ (', ' if not loop.first else '') + k + '=' + v|string }}"
    "{%- endfor -%}{{ ')' }}{%- endfor -%}{{ '</s>' }}{% endgeneration %}"
    "{%- elif m['role'] == 'tool' -%}{{ ' = ' + m['content'] }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{%- endfor -%}"
)
TOOLS_LINE = f"Tools: {TOOL_NAME}\n"  # what the template writes first when given the calculator
_CALL = re.compile(rf"{TOOL_NAME}\(expression=([^()]*)\)\s*$")
_EXPRESSION = re.compile(r"^\s*(\d+)\s*([+\-x*])\s*(\d+)\s*$")


def calc(expression: str) -> str:
    """
    Evaluates one arithmetic operation on two whole numbers.

    Args:
        expression: Two whole numbers and one of +, -, x (or *), e.g. "7 + 5".
    """
    match = _EXPRESSION.match(expression)
    if match is None:
        raise ValueError(f"not an operation on two whole numbers: {expression!r}")
    a, op, b = int(match[1]), match[2], int(match[3])
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def parse_calc_turn(text: str) -> dict:
    """A turn of the model as an assistant message: a turn that ends with `calc(expression=...)` calls the tool; one
    that mentions `calc(` otherwise is a malformed call (`ValueError`); any other turn is the final answer."""
    match = _CALL.search(text)
    if match is not None:
        call = {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"expression": match[1]}}}
        return {"role": "assistant", "content": text[: match.start()], "tool_calls": [call]}
    if f"{TOOL_NAME}(" in text:
        raise ValueError(f"a call must end the turn as {TOOL_NAME}(expression=a op b), got {text[-60:]!r}")
    return {"role": "assistant", "content": text}


def tool_row(problem: dict) -> dict:
    """
    A problem as the model sees it with the calculator: `prompt` (the tools line and the question), `completion`
    (every equation's value asked of `calc`, each call ending a turn with EOS, then the tool's ` = c`), and
    `masked_spans`: the `[start, end)` characters of the completion written by the tool (context, not targets).
    """
    row = to_prompt_completion(problem)
    text, pieces, spans, at = row["completion"], [], [], 0
    for match in _EQUATION.finditer(text):
        a, op, b, c = match.groups()
        call = f"{TOOL_NAME}(expression={a} {op} {b})</s>"
        pieces.append(text[at : match.start()] + call)
        start = sum(map(len, pieces))
        pieces.append(f" = {c}")
        spans.append([start, start + len(pieces[-1])])
        at = match.end()
    pieces.append(text[at:])
    return {"prompt": TOOLS_LINE + row["prompt"], "completion": "".join(pieces), "masked_spans": spans}


def tool_messages(problem: dict) -> list[dict]:
    """The same transcript as chat messages (what [`TOOL_CHAT_TEMPLATE`] renders into `tool_row`'s text)."""
    row = to_prompt_completion(problem)
    messages, text, at = [{"role": "user", "content": prompt_text(problem["question"])}], row["completion"], 0
    for match in _EQUATION.finditer(text):
        a, op, b, c = match.groups()
        call = {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"expression": f"{a} {op} {b}"}}}
        messages.append({"role": "assistant", "content": text[at : match.start()], "tool_calls": [call]})
        messages.append({"role": "tool", "name": TOOL_NAME, "content": c})
        at = match.end()
    messages.append({"role": "assistant", "content": text[at:]})
    return messages
