"""The calculator tool the chat model calls as <|python_start|>expr<|python_end|>.

nanochat evaluates the expression with a restricted eval(): arithmetic on numbers, or a string's
.count(...), nothing with names, under a timeout. Here the same language is evaluated without eval
at all: the expression is parsed with `ast` and only the allowed node types are interpreted, so
there is nothing to escape from; the limits below bound the time and the size of the numbers.
"""
from __future__ import annotations

import ast
import operator
import time

# Without ** the largest result of MAX_CHARS characters is a product of ~128-digit numbers: the
# length limit alone bounds every number's size, so no single operation can take long.
MAX_CHARS = 256       # longer expressions are not calculator input
TIMEOUT_S = 0.1       # checked between nodes: a bound on pathological nesting

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    pass


def _eval(node: ast.AST, deadline: float):
    if time.monotonic() > deadline:
        raise _Refused("timeout")
    if isinstance(node, ast.Expression):
        return _eval(node.body, deadline)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _eval(node.operand, deadline)
        if isinstance(value, str):
            raise _Refused("arithmetic on a string")
        return _UNARY[type(node.op)](value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, deadline), _eval(node.right, deadline)
        if isinstance(left, str) or isinstance(right, str):
            raise _Refused("arithmetic on a string")  # no "a" * 10**9
        return _BINOPS[type(node.op)](left, right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and not node.keywords and len(node.args) == 1):
        target, arg = _eval(node.func.value, deadline), _eval(node.args[0], deadline)
        if not isinstance(target, str) or not isinstance(arg, str):
            raise _Refused(".count works on strings")
        return target.count(arg)
    raise _Refused(f"{type(node).__name__} is not allowed")


def calculate(expr: str) -> str | None:
    """Evaluate a calculator expression; its result as text, or None when refused or invalid.

    Allowed: int/float literals, + - * / // % (no **: 9**9**9 would never finish), unary +/-,
    parentheses, thousands separators ("1,234" as in nanochat), and 'string'.count('x').
    Division by zero, names, attribute access other than .count, calls, subscripts: None.
    """
    if not isinstance(expr, str) or len(expr) > MAX_CHARS:
        return None
    text = expr.strip()
    if "'" not in text and '"' not in text:
        text = text.replace(",", "")  # numbers written with separators; strings keep their commas
    try:
        tree = ast.parse(text, mode="eval")
        value = _eval(tree, time.monotonic() + TIMEOUT_S)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, _Refused):
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        value = int(value)  # 12/4 -> "3", as a person would write it
    return str(value)
