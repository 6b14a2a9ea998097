"""GSM8K solutions as chains of calculations: the `<<expression=value>>` steps, their operations, and one number of
the question changed with every later value recomputed (the corrupted side of a patching pair).

Step s (1-based) is the s-th `<<...>>` annotation. Its operation is the expression's outermost operator
(`+ - * /`). Expressions are evaluated with a small arithmetic evaluator (numbers, + - * /, parentheses,
unary minus), never with eval. A literal of an expression is a number written in it (LITERAL: `12`, `1.5`, `.75`).

The gold answer is the number after '####' (codi_attn.answers.parse_gold), not the last step's value: the two
differ in 377 of GSM8K's 7473 train solutions (the last annotation a side calculation, or the answer worked out
in the text). A changed step moves the gold only through the steps whose value is the gold: the gold becomes
their recomputed value (unchanged where none of them depends on the changed step), and cannot be told where no
step has the gold's value or those steps disagree.
"""
from __future__ import annotations

import ast
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

from codi_attn.answers import parse_gold

STEP = re.compile(r"<<([^<>=]*)=([^<>=]+)>>")
NUMBER = re.compile(r"(?<![\w.])-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?![\w.]*\d)")  # 1,200  3.5  $.75
LITERAL = re.compile(r"\d+(?:\.\d+)?|\.\d+")  # a number in an expression whose commas are removed
OPERATIONS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_APPLY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class Step:
    """One calculation of a solution."""

    expression: str  # as written, e.g. "12*4"
    value: float  # the annotated result
    operation: str  # the outermost operator: + - * / (or "" for a bare number)


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression (numbers with optional commas, + - * /, parentheses, unary minus)."""
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _APPLY:
            return _APPLY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        raise ValueError(f"not plain arithmetic: {expression!r}")

    try:
        return walk(ast.parse(expression.replace(",", "").strip(), mode="eval").body)
    except (SyntaxError, ZeroDivisionError) as err:
        raise ValueError(f"cannot evaluate {expression!r}: {err}") from None


def _operation(expression: str) -> str:
    try:
        node = ast.parse(expression.replace(",", "").strip(), mode="eval").body
    except SyntaxError:
        return ""
    return OPERATIONS.get(type(node.op), "") if isinstance(node, ast.BinOp) else ""


def solution_steps(solution: str) -> list[Step]:
    """The `<<expression=value>>` steps of a GSM8K solution, in order (unparsable values skipped)."""
    steps = []
    for expression, value in STEP.findall(solution):
        try:
            steps.append(Step(expression.strip(), float(value.replace(",", "").strip()), _operation(expression)))
        except ValueError:
            continue
    return steps


def numbers_in(text: str) -> list[tuple[int, int, float]]:
    """(start, end, value) of every number written in `text` (commas inside numbers allowed)."""
    return [(m.start(), m.end(), float(m.group().replace(",", ""))) for m in NUMBER.finditer(text)]


def literals(expression: str) -> list[tuple[int, int, float]]:
    """(start, end, value) of every literal of an expression, positions in the expression with commas removed."""
    return [(m.start(), m.end(), float(m.group())) for m in LITERAL.finditer(expression.replace(",", ""))]


def gold_after(steps: Sequence[Step], values: Sequence[float], gold: float | None) -> float | None:
    """The gold answer once the steps' values became `values` [len(steps)] (module docstring): the new value of
    the steps whose value is `gold`; None where no step has it or their new values differ."""
    new = {v for st, v in zip(steps, values) if st.value == gold}
    return new.pop() if len(new) == 1 else None


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def substitute(expression: str, mapping: dict[float, float]) -> tuple[str, bool]:
    """The expression (commas removed) with every literal that is a key of `mapping` written as its value, and
    whether any literal was."""
    expression = expression.replace(",", "")
    pieces, last, used = [], 0, False
    for a, b, literal in literals(expression):
        used |= literal in mapping
        pieces += [expression[last:a], _format(mapping[literal]) if literal in mapping else expression[a:b]]
        last = b
    return "".join(pieces) + expression[last:], used


@dataclass(frozen=True)
class Counterfactual:
    """A question with one number changed and what its solution becomes."""

    question: str
    solution: str  # the recomputed `<<expression=value>>` chain and '#### answer'
    answer: float  # the gold answer recomputed (gold_after)
    changed: tuple[float, float]  # (old, new) number of the question
    steps: tuple[Step, ...]


def change_number(question: str, solution: str, index: int, new: float) -> Counterfactual | None:
    """The question with its index-th number set to `new`, the solution's steps recomputed: every expression
    literal equal to the old number, or to a value an earlier step had, takes the new number or that step's new
    value. None where that is ambiguous (the old number appears twice in the question, or a step's value equals a
    number of the question, so that a literal could be either), where no step uses the changed number, or where
    the new gold answer cannot be told (gold_after) or a recomputed step does not evaluate (a division by zero, or
    an expression that is not plain arithmetic, such as `560//15`)."""
    numbers = numbers_in(question)
    if not 0 <= index < len(numbers):
        return None
    start, end, old = numbers[index]
    others = [v for k, (_, _, v) in enumerate(numbers) if k != index]
    steps = solution_steps(solution)
    if not steps or old in others or old == new or any(st.value in (old, *others) for st in steps):
        return None  # a literal could then be either a question number or an earlier result
    mapping = {old: new}
    used, rewritten = False, []
    for step in steps:
        text, changed = substitute(step.expression, mapping)
        used |= changed
        try:
            value = evaluate(text)
        except ValueError:
            return None
        if step.value in mapping and mapping[step.value] != value:
            return None  # a later literal equal to this value would be read as the old number's substitute
        if step.value != value:
            mapping[step.value] = value
        rewritten.append(Step(text, value, step.operation))
    answer = gold_after(steps, [st.value for st in rewritten], parse_gold(solution))
    if not used or answer is None:
        return None
    new_question = question[:start] + _format(new) + question[end:]
    chain = "\n".join(f"<<{s.expression}={_format(s.value)}>>" for s in rewritten) + f"\n#### {_format(answer)}"
    return Counterfactual(new_question, chain, answer, (old, new), tuple(rewritten))


def answer_if(question: str, solution: str, step: int, value: float) -> float | None:
    """The gold answer if step `step` (1-based) had the result `value`, every later step recomputed with its
    literals equal to an earlier result taking that result's new value, the gold following the steps that have
    its value (gold_after); None where another step had the same result or the question writes that number (a
    literal could then be either), where the chain does not evaluate or the new gold cannot be told."""
    steps = solution_steps(solution)
    if not 1 <= step <= len(steps):
        return None
    results = [st.value for st in steps]
    if results.count(results[step - 1]) > 1 or results[step - 1] in {v for _, _, v in numbers_in(question)}:
        return None
    mapping, values = {results[step - 1]: float(value)}, [*results[: step - 1], float(value)]
    for st in steps[step:]:
        try:
            new = evaluate(substitute(st.expression, mapping)[0])
        except ValueError:
            return None
        values.append(new)
        if st.value != new:
            mapping[st.value] = new
    return gold_after(steps, values, parse_gold(solution))
