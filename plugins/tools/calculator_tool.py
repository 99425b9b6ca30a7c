"""The built-in ``calculator`` tool: arithmetic and math functions through a safe evaluator
(``shimmy_core.tools.calculator``; ``eval`` is never used).  Text protocol: ``<tool>calc:2*(3+4)</tool>``."""

from __future__ import annotations

from shimmy_core.plugin_api import hookimpl


class CalculatorTool:
    name = "calculator"
    description = ("Evaluate an arithmetic expression and return the number. Knows + - * / // % ^ (power), "
                   "parentheses, sqrt, cbrt, exp, log, log10, log2, sin, cos, tan, asin, acos, atan, "
                   "factorial, comb, perm, gcd, abs, round, floor, ceil, min, max, pi, e and tau.")
    parameters = {
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "description": "the arithmetic expression to evaluate",
                "pattern": "^[-+*/%^()., 0-9a-z]+$",
            },
        },
        "required": ["expression"],
        "additionalProperties": False,
    }
    capabilities = frozenset()
    text_prefix = "calc"
    text_argument = "expression"
    timeout = 5.0

    def run(self, arguments: dict) -> str:
        from shimmy_core.plugin_api import evaluate, format_number

        return format_number(evaluate(arguments["expression"]))


@hookimpl
def shimmy_register_tools(register):
    register(CalculatorTool())
