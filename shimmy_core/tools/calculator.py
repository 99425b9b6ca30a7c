"""A safe calculator: the expression is parsed with :mod:`ast` and the tree is evaluated by hand,
node by node, over numbers only (``eval`` is never called).

Bounds, so that no expression can take the server down:

- the expression is at most :data:`MAX_LENGTH` characters and :data:`MAX_DEPTH` levels deep;
- an integer result of ``*``, ``**``, ``<<`` or a function may not exceed :data:`MAX_INT_BITS` bits,
  checked *before* it is computed from the operands' sizes (``9**9**9`` is refused at once);
- ``factorial`` and ``comb``/``perm`` take arguments up to :data:`MAX_FACTORIAL`;
- floats must stay finite;
- evaluation stops after :data:`TIME_LIMIT_S` seconds (checked at every node).

``^`` means power, as on a calculator.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from typing import Any, Callable

MAX_LENGTH = 500
MAX_DEPTH = 40
MAX_INT_BITS = 4096       # about 1,233 decimal digits
MAX_FACTORIAL = 1000
TIME_LIMIT_S = 1.0


class CalculatorError(ValueError):
    """The expression cannot be evaluated; the message says why."""


def _bits(value: Any) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 0


def _check(value: Any) -> Any:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise CalculatorError("the result is too large")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("the result is not a finite number")
        return value
    raise CalculatorError("the result is not a real number")


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if abs(base) > 1 and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
            raise CalculatorError("the result is too large")
    if isinstance(exponent, int) and abs(exponent) > 100_000:
        if not (isinstance(base, (int, float)) and abs(base) in (0, 1)):
            raise CalculatorError("the exponent is too large")
    try:
        result = base ** exponent
    except ZeroDivisionError:
        raise CalculatorError("zero cannot be raised to a negative power") from None
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    if isinstance(result, complex):
        raise CalculatorError("the result is not a real number")
    return result


def _multiply(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and _bits(a) + _bits(b) > MAX_INT_BITS + 1:
        raise CalculatorError("the result is too large")
    if isinstance(a, int) and isinstance(b, float) or isinstance(a, float) and isinstance(b, int):
        big = a if isinstance(a, int) else b
        if _bits(big) > 1024:
            raise CalculatorError("the result is too large")
    return a * b


def _divide(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def divide(a: Any, b: Any) -> Any:
        if b == 0:
            raise CalculatorError("division by zero")
        try:
            return op(a, b)
        except OverflowError:
            raise CalculatorError("the result is too large") from None
    return divide


def _shift(a: Any, b: Any) -> Any:
    if not (isinstance(a, int) and isinstance(b, int)):
        raise CalculatorError("shifts need integers")
    if b < 0:
        raise CalculatorError("negative shift count")
    if _bits(a) + b > MAX_INT_BITS:
        raise CalculatorError("the result is too large")
    return a << b


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _multiply,
    ast.Div: _divide(operator.truediv),
    ast.FloorDiv: _divide(operator.floordiv),
    ast.Mod: _divide(operator.mod),
    ast.Pow: _power,
    ast.LShift: _shift,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _int_arg(value: Any, name: str, limit: int = MAX_FACTORIAL) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise CalculatorError(f"{name} needs a whole number of at least 0")
    if value > limit:
        raise CalculatorError(f"{name} is limited to {limit}")
    return value


def _factorial(n: Any) -> int:
    return math.factorial(_int_arg(n, "factorial"))


def _comb(n: Any, k: Any) -> int:
    return math.comb(_int_arg(n, "comb"), _int_arg(k, "comb"))


def _perm(n: Any, k: Any) -> int:
    return math.perm(_int_arg(n, "perm"), _int_arg(k, "perm"))


def _log(x: Any, base: Any = None) -> float:
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise CalculatorError("log needs a positive number (and a positive base other than 1)")
    return math.log(x) if base is None else math.log(x, base)


def _sqrt(x: Any) -> float:
    if x < 0:
        raise CalculatorError("sqrt of a negative number")
    return math.isqrt(x) if isinstance(x, int) and math.isqrt(x) ** 2 == x else math.sqrt(x)


def _round(x: Any, digits: Any = None) -> Any:
    if digits is None:
        return round(x)
    return round(x, _int_arg(digits, "round", 100))


def _minmax(pick: Callable) -> Callable:
    def choose(*values: Any) -> Any:
        if not values:
            raise CalculatorError(f"{pick.__name__} needs at least one number")
        return pick(values)
    return choose


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": _round, "floor": math.floor, "ceil": math.ceil, "trunc": math.trunc,
    "sqrt": _sqrt, "cbrt": lambda x: math.copysign(abs(x) ** (1 / 3), x), "exp": math.exp,
    "log": _log, "ln": _log, "log10": lambda x: _log(x, 10), "log2": lambda x: _log(x, 2),
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
    "atan": math.atan, "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "degrees": math.degrees, "radians": math.radians, "hypot": math.hypot,
    "factorial": _factorial, "comb": _comb, "perm": _perm,
    "gcd": lambda *a: math.gcd(*(_int_arg(x, "gcd", 2**MAX_INT_BITS) for x in a)),
    "min": _minmax(min), "max": _minmax(max), "pow": _power,
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


class _Evaluator:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def eval(self, node: ast.AST, depth: int = 0) -> Any:
        if time.monotonic() > self.deadline:
            raise CalculatorError("the expression took too long")
        if depth > MAX_DEPTH:
            raise CalculatorError("the expression is nested too deeply")
        if isinstance(node, ast.Expression):
            return self.eval(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise CalculatorError(f"unsupported value {node.value!r}")
            return _check(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left = self.eval(node.left, depth + 1)
            right = self.eval(node.right, depth + 1)
            return _check(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _check(_UNARY[type(node.op)](self.eval(node.operand, depth + 1)))
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise CalculatorError(f"unknown name {node.id!r}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                name = node.func.id if isinstance(node.func, ast.Name) else "this function"
                raise CalculatorError(f"unknown function {name!r}; known: {', '.join(sorted(FUNCTIONS))}")
            if node.keywords:
                raise CalculatorError("functions take positional arguments only")
            if len(node.args) > 16:
                raise CalculatorError("too many arguments")
            args = [self.eval(a, depth + 1) for a in node.args]
            try:
                return _check(FUNCTIONS[node.func.id](*args))
            except CalculatorError:
                raise
            except OverflowError:
                raise CalculatorError("the result is too large") from None
            except (ValueError, TypeError) as exc:
                raise CalculatorError(f"{node.func.id}: {exc}") from None
        raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def evaluate(expression: str) -> int | float:
    """The value of ``expression``; raises :class:`CalculatorError` with a reason."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"the expression is longer than {MAX_LENGTH} characters")
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/").replace("−", "-")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("the expression is not valid arithmetic") from None
    return _Evaluator(time.monotonic() + TIME_LIMIT_S).eval(tree)


def format_number(value: int | float) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return repr(value)
    return str(value)
