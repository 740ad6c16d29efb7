"""The ``calculator`` tool: arithmetic a model may not turn into code.

The expression is parsed with ``ast`` and walked by hand; nothing is ever passed
to ``eval``. Allowed: int and float literals, ``+ - * / **``, unary ``+ -`` and
parentheses (also written ``× ÷ −``, and ``^`` for a power). Everything else
(names, calls, attributes, subscripts, strings, comprehensions, lambdas, complex
numbers, comparisons) is refused with a sentence the model can read.

Work is bounded before it is done: the expression's length, its number of
operations, integer sizes (``MAX_INT_BITS``: ``9 ** 9 ** 9`` is refused before
Python would spend minutes on it), and non-finite floats.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 1000
MAX_NODES = 200
MAX_INT_BITS = 4096
"""Largest integer (about 1233 decimal digits) an operand or result may be."""


class CalculatorError(ValueError):
    """The expression is refused or cannot be computed; the message is for the model."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}


def _check_size(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large (not a finite number)")
    return value


def _power(base: int | float, exp: int | float) -> int | float:
    """``base ** exp``, refused before the work when an integer result would be too large
    (its size is at least ``exp * (bits(base) - 1)``)."""
    if isinstance(base, int) and isinstance(exp, int) and exp >= 0:
        if abs(base) > 1 and exp * (abs(base).bit_length() - 1) > MAX_INT_BITS:
            raise CalculatorError(f"the result is too large (more than {MAX_INT_BITS} bits)")
        return base**exp
    # A float result: a float operand or a negative exponent.
    if base < 0 and not float(exp).is_integer():
        raise CalculatorError("a negative number to a fractional power is not a real number")
    try:
        return float(base) ** float(exp)
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    except ZeroDivisionError:
        raise CalculatorError("zero cannot be raised to a negative power") from None


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("the result is too large") from None
    if isinstance(node, ast.BinOp):
        raise CalculatorError(
            f"the operator {type(node.op).__name__} is not allowed; use + - * / ** and parentheses"
        )
    if isinstance(node, ast.Name | ast.Call | ast.Attribute | ast.Subscript):
        raise CalculatorError(
            "names, calls and attributes are not allowed: the calculator takes only numbers, "
            "+ - * / ** and parentheses"
        )
    raise CalculatorError(
        f"{type(node).__name__} is not allowed: the calculator takes only numbers, "
        "+ - * / ** and parentheses"
    )


def _normalise(expression: str) -> str:
    for old, new in (("×", "*"), ("÷", "/"), ("−", "-"), ("^", "**")):
        expression = expression.replace(old, new)
    return expression.strip()


def format_number(value: int | float) -> str:
    """An int exactly; a float to 12 significant digits (integral floats without '.0')."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g")


def evaluate(expression: str) -> int | float:
    """The value of ``expression``; CalculatorError with a sentence when refused."""
    if not isinstance(expression, str):
        raise CalculatorError('"expression" must be a string')
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = _normalise(expression)
    if not text:
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        detail = getattr(exc, "msg", None) or type(exc).__name__
        raise CalculatorError(f"the expression does not parse ({detail})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"the expression has more than {MAX_NODES} parts")
    return _eval(tree)


def calculate(expression: str) -> str:
    """The tool: the formatted value of ``expression``."""
    return format_number(evaluate(expression))
