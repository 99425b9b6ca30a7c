"""Safe rendering of Hugging Face style chat templates.

A chat template ships inside the model (GGUF metadata ``tokenizer.chat_template`` or
``tokenizer_config.json``), so it is untrusted input: CVE-2024-34359 was remote code execution
through a GGUF template rendered with a plain Jinja environment. Here a template is compiled once
in an :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` set up like the one in Hugging Face
transformers, and every render runs under two budgets:

* Size. Operations that can build large values (``*``, ``**``, ``+``, ``%``, ``~``, list, tuple and
  dict literals, function and method calls, filters, captured blocks) are estimated before they
  run and refused when the result would exceed ``max_output_chars``; the rendered stream is cut
  off at the same bound. Everything a render builds also counts against an allowance of
  ``_ALLOCATION_FACTOR * max_output_chars``, so values kept alive (in namespaces, generators,
  ...) cannot pile up past it.
* Time. For the duration of a render, a trace function on the rendering thread checks a deadline
  on the lines of the compiled template and aborts the render in place, so nothing keeps running
  once :meth:`ChatTemplate.render` has raised.

Every failure surfaces as :class:`TemplateError`.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import string
import sys
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from contextvars import ContextVar
from datetime import datetime
from types import BuiltinMethodType, FrameType
from typing import Any, NoReturn, cast

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

__all__ = ["CHATML_FALLBACK", "ChatTemplate", "TemplateError", "template_stop_strings"]

# The file name that Environment.from_string compiles templates under; the deadline tracer
# watches only frames of this code.
_TEMPLATE_FILENAME = "<template>"
# A render may create values of this many times max_output_chars in all (characters of strings
# plus slots of containers), garbage included. Everyday templates use less than ten.
_ALLOCATION_FACTOR = 32
# Size, in bits, of the largest integers that ``*`` and ``**`` may produce (roughly; 4096 bits
# are about 1,233 decimal digits).
_MAX_INT_BITS = 4096
# Largest ``indent`` (spaces, or characters of an indent string) that ``tojson`` accepts.
_MAX_JSON_INDENT = 16
# Longest format string that ``strftime_now`` accepts.
_MAX_STRFTIME_FORMAT = 256
# Messages of TemplateError are cut to this many characters.
_MAX_MESSAGE_CHARS = 500
# Filters whose output can be much larger than their input; their arguments are estimated first.
_ESTIMATED_FILTERS = frozenset({"format", "indent", "join", "replace", "wordwrap"})
# Keyword arguments that generated code adds to calls, for jinja2.runtime.Context.call.
_CONTEXT_CALL_KWARGS = frozenset({"_loop_vars", "_block_vars"})
# Values whose _shallow_size is their len().
_SIZED = (str, bytes, list, tuple, dict)
# Conversion specifiers of printf-style formatting: optional mapping key, flags, width, precision.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\d*|\*)(?:\.(\d*|\*))?")

# ChatML, for models that ship no template. A None content renders as empty, a list content as
# its text parts.
CHATML_FALLBACK = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


_TEXT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
)

# Prompt formats for models whose file carries no template but whose family is known
# (Ollama's template layer names it: see plugins/sources/ollama.py).
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML_FALLBACK,
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n" + _TEXT + "<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}"
        "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n" + _TEXT +
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}<|{{ message['role'] }}|>\n" + _TEXT + "<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}" + _TEXT + "{{ eos_token }}"
        "{% else %}[INST] " + _TEXT + " [/INST]{% endif %}{% endfor %}"
    ),
}

# End-of-turn markers of common chat formats, most specific first.
_STOP_MARKERS = (
    "<|im_end|>",  # ChatML (Qwen, SmolLM, ...)
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3 tool calls
    "<|eot|>",  # Llama 4
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
    "<|END_OF_TURN_TOKEN|>",  # Command R
    "<｜end▁of▁sentence｜>",  # DeepSeek (full-width bars)  # noqa: RUF001
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",  # Llama 2, Mistral
)


class TemplateError(Exception):
    """A template that cannot be compiled or rendered within budget.

    str(e) is a user-facing message.
    """


class _RenderTimeout(BaseException):
    """Raised by the deadline tracer inside template code.

    A BaseException so that nothing between the template and :meth:`ChatTemplate.render` treats it
    as an ordinary error (Jinja's ``generate`` would run its traceback rewriting, itself template
    code, on an Exception).
    """


class _NotRendering(Exception):
    """Raised by filters called outside a render, which happens when Jinja folds a filter with
    constant arguments while compiling. Jinja then leaves the filter to render time, where its
    result counts against the budgets."""


class _Allowance:
    """What the running render may still allocate, in characters (see _ALLOCATION_FACTOR)."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


# The allowance of the render running in this thread; None outside renders (when Jinja folds
# constants at compile time).
_ALLOWANCE: ContextVar[_Allowance | None] = ContextVar(
    "shimmy_chat_template_allowance", default=None
)


def template_stop_strings(source: str) -> list[str]:
    """Best-effort end-of-turn markers mentioned by a template.

    E.g. '<|im_end|>', '<|eot_id|>', '<end_of_turn>', '</s>', '<|end|>'; only those literally
    present in ``source``, most specific first.
    """
    return [marker for marker in _STOP_MARKERS if marker in source]


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def _describe(exc: BaseException) -> str:
    """A short user-facing message for an error raised while compiling or rendering a template."""
    if isinstance(exc, RecursionError):
        return "chat template recursed too deeply"
    if isinstance(exc, MemoryError):
        return "chat template ran out of memory"
    if isinstance(exc, TemplateSyntaxError):
        return _shorten(f"chat template syntax error at line {exc.lineno}: {exc.message}")
    if isinstance(exc, SecurityError):
        return _shorten(f"chat template attempted an unsafe operation: {exc}")
    return _shorten(f"chat template failed: {type(exc).__name__}: {exc}")


def _deep_size(value: object, cap: int) -> int:
    """Roughly how many characters ``value`` takes once printed.

    Counts the characters of strings and one per container element, following shared objects
    once per reference (as printing does). Stops as soon as the total exceeds ``cap`` and returns
    that partial total, so the cost is O(cap) at most.
    """
    total = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, (list, tuple)):
            total += len(item)
            if total <= cap:
                pending.extend(item)
        elif isinstance(item, dict):
            total += len(item)
            if total <= cap:
                pending.extend(item.keys())
                pending.extend(item.values())
        else:
            total += 1
        if total > cap:
            break
    return total


def _shallow_size(value: object) -> int:
    """Characters of a string, or slots of a container, that building ``value`` allocated."""
    return len(value) if isinstance(value, _SIZED) else 1


def _replaced_size(text: str | bytes, old: Any, new: Any, count: int | None = -1) -> int:
    """Length of ``text.replace(old, new, count)``, without building it."""
    hits = text.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _joined_size(separator: str | bytes, items: Sequence[Any]) -> int:
    """Length of ``separator.join(items)`` (non-string items make ``join`` fail anyway)."""
    texts = sum(len(item) for item in items if isinstance(item, (str, bytes)))
    return texts + len(separator) * max(len(items) - 1, 0)


def _expanded_size(text: str | bytes, tabsize: int = 8) -> int:
    """Upper bound on the length of ``text.expandtabs(tabsize)``."""
    tab = "\t" if isinstance(text, str) else b"\t"
    return len(text) + text.count(tab) * max(tabsize, 0)  # type: ignore[arg-type]


def _translated_size(text: str, table: Any) -> int:
    """Upper bound on the length of ``text.translate(table)``."""
    if not isinstance(table, dict):
        return len(text)
    longest = max((len(value) for value in table.values() if isinstance(value, str)), default=1)
    return len(text) * max(longest, 1)


def _raise_exception(message: object) -> NoReturn:
    """The ``raise_exception`` global of Hugging Face templates."""
    raise TemplateError(_shorten(str(message)))


def _strftime_now(format: str) -> str:
    """The ``strftime_now`` global of Hugging Face templates: the local time, formatted."""
    if len(format) > _MAX_STRFTIME_FORMAT:
        raise TemplateError(f"strftime_now format longer than {_MAX_STRFTIME_FORMAT} characters")
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """The ``tojson`` filter of Hugging Face templates: :func:`json.dumps`, no HTML escaping."""
    width = len(indent) if isinstance(indent, str) else indent
    if width is not None and width > _MAX_JSON_INDENT:
        raise TemplateError(f"tojson indent larger than {_MAX_JSON_INDENT}")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _OpaqueNamespace(Namespace):
    """``namespace()`` whose repr leaves out its attributes.

    Namespaces can reference one another any number of times; with the default repr, printing a
    few nested ones would take exponential time and memory.
    """

    def __repr__(self) -> str:
        return "<Namespace>"


class _GenerationTag(Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (Hugging Face's marker for assistant
    tokens, used to build training masks) and renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _GuardedCodeGenerator(CodeGenerator):
    """Jinja's code generator, plus the size checks the sandbox has no hook for.

    The operands of ``~`` and every list, tuple and dict built by a literal pass through
    :class:`_GuardedEnvironment` before use.
    """

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # Chooses the join function the way CodeGenerator.visit_Concat does.
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"{join}(environment.checked_concat((")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write(")))")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.checked_literal(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.checked_literal(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # an assignment target such as `for a, b in ...`
            super().visit_Tuple(node, frame)
            return
        self.write("environment.checked_literal(")
        super().visit_Tuple(node, frame)
        self.write(")")


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox of Hugging Face transformers, with a size budget on everything that can grow."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limit: int) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            extensions=["jinja2.ext.loopcontrols", _GenerationTag],
        )
        self.limit = limit
        # Generated code joins captured output (macros, `{% set %}` and `{% filter %}` blocks,
        # `caller()`) with environment.concat.
        self.concat = self._checked_join  # type: ignore[method-assign]
        del self.globals["lipsum"]  # lipsum(n) builds n paragraphs; no chat template needs it
        self.globals.update(
            raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_OpaqueNamespace
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}

    # -- checks -----------------------------------------------------------------------------

    def _refuse(self, what: str) -> NoReturn:
        raise TemplateError(
            f"chat template exceeds its size budget of {self.limit} characters ({what})"
        )

    def _spend(self, size: int) -> None:
        """Charges ``size`` characters just allocated to the allowance of the running render."""
        allowance = _ALLOWANCE.get()
        if allowance is None:
            return
        allowance.left -= size
        if allowance.left < 0:
            total = _ALLOCATION_FACTOR * self.limit
            raise TemplateError(
                f"chat template exceeds its allocation budget of {total} characters"
            )

    def _admit(self, value: object, what: str) -> None:
        """Refuses a value that template code built if it prints larger than the budget, else
        charges it to the allowance."""
        if _deep_size(value, self.limit) > self.limit:
            self._refuse(what)
        self._spend(_shallow_size(value))

    def _check_ints(self, values: Iterable[Any], what: str) -> None:
        if any(isinstance(value, int) and value > self.limit for value in values):
            self._refuse(f"integer argument of {what}")

    def _check_width(self, width: str | None) -> None:
        if not width or width == "*":
            return
        if len(width) > len(str(self.limit)) or int(width) > self.limit:
            self._refuse("format width")

    def _check_format(
        self, template: str | bytes, values: Sequence[Any], *, braces: bool, reusable: bool
    ) -> None:
        """Refuses a ``%`` or ``str.format`` formatting whose result could exceed the budget.

        ``reusable`` says whether one value may fill several fields (a mapping for ``%``, always
        for ``str.format``), in which case every field is assumed to take the largest value.
        """
        text = template.decode("latin-1") if isinstance(template, bytes) else str(template)
        if braces:
            fields = 0
            for _, name, spec, _ in string.Formatter().parse(text):
                if name is None:
                    continue
                fields += 1
                if "{" in (spec or ""):  # a width taken from an argument
                    self._refuse("nested format field")
                for width in re.findall(r"\d+", spec or ""):
                    self._check_width(width)
        else:
            matches = list(_PERCENT_SPEC.finditer(text))
            fields = len(matches)
            for match in matches:
                self._check_width(match.group(1))
                self._check_width(match.group(2))
            if any("*" in match.group(0) for match in matches):  # widths taken from the values
                self._check_ints(values, "formatting")
        sizes = [_deep_size(value, self.limit) for value in values]
        filled = fields * max(sizes, default=0) if reusable else sum(sizes)
        if len(text) + filled > self.limit:
            self._refuse("formatting")

    def _check_string_method(
        self, text: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...]:
        """Refuses a call of a ``str``/``bytes`` method whose result could exceed the budget.

        Returns the positional arguments to call it with (an iterable given to ``join`` is turned
        into a list, so that it can be measured first).
        """
        if name == "join" and args:
            items = list(args[0])
            args = (items, *args[1:])
            estimate = _joined_size(text, items)
        elif name == "replace":
            estimate = _replaced_size(text, *args, **kwargs)
        elif name == "expandtabs":
            estimate = _expanded_size(text, *args, **kwargs)
        elif name == "translate" and isinstance(text, str) and args:
            estimate = _translated_size(text, args[0])
        else:
            return args
        if estimate > self.limit:
            self._refuse(f"str.{name}")
        return args

    def _check_filter(self, name: str, arguments: dict[str, Any]) -> None:
        """Refuses a call of a filter in _ESTIMATED_FILTERS whose result could exceed the budget.

        ``arguments`` are the filter's bound arguments; an iterable given to ``join`` is replaced
        by a list, so that it can be measured first.
        """
        if name == "format":
            kwargs = arguments["kwargs"]
            values = list(kwargs.values()) if kwargs else list(arguments["args"])
            self._check_format(str(arguments["value"]), values, braces=False, reusable=bool(kwargs))
            return
        if name == "join":
            items = arguments["value"] = list(arguments["value"])
            separators = len(str(arguments["d"])) * max(len(items) - 1, 0)
            estimate = _deep_size(items, self.limit) + separators
        elif name == "replace":
            old, new = str(arguments["old"]), str(arguments["new"])
            estimate = _replaced_size(str(arguments["s"]), old, new, arguments["count"])
        elif name == "indent":
            text, width = str(arguments["s"]), arguments["width"]
            pad = width if isinstance(width, int) else len(str(width))
            estimate = len(text) + (text.count("\n") + 1) * pad
        else:  # wordwrap: at most one wrap string per character
            text, wrap = str(arguments["s"]), arguments["wrapstring"]
            if wrap is None:
                wrap = arguments["environment"].newline_sequence
            estimate = len(text) + (len(text) + 1) * len(str(wrap))
        if estimate > self.limit:
            self._refuse(f"filter {name}")

    # -- hooks of the sandbox and of the generated code -------------------------------------

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Performs ``*``, ``**``, ``+`` and ``%`` after estimating the size of their result."""
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if not isinstance(sequence, (str, bytes, list, tuple)):
                    continue
                if isinstance(times, int) and times > 0:
                    share = self.limit // times  # of the budget, for each repetition
                    if times > self.limit or _deep_size(sequence, share) > share:
                        self._refuse("repetition")
            if isinstance(left, int) and isinstance(right, int):
                bits = left.bit_length() + right.bit_length()
                if bits > _MAX_INT_BITS:
                    self._refuse("integer product")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                bits = (left.bit_length() - 1) * right  # bases 0, 1 and -1 never grow
                if bits > _MAX_INT_BITS:
                    self._refuse("integer power")
        elif operator == "+":
            if isinstance(left, str) and isinstance(right, str):  # the common case, kept cheap
                size = len(left) + len(right)
            elif isinstance(left, (bytes, list, tuple)) and isinstance(right, (bytes, list, tuple)):
                size = _deep_size(left, self.limit) + _deep_size(right, self.limit)
            else:
                size = 0
            if size > self.limit:
                self._refuse("concatenation")
        elif operator == "%" and isinstance(left, (str, bytes)):
            # As in Python: a tuple holds the values, a dict the named ones, anything else is one.
            if isinstance(right, tuple):
                self._check_format(left, right, braces=False, reusable=False)
            elif isinstance(right, dict):
                self._check_format(left, list(right.values()), braces=False, reusable=True)
            else:
                self._check_format(left, (right,), braces=False, reusable=False)
        # What super().call_binop does; inlined, like the size below, because `+` is frequent.
        result = self.binop_table[operator](left, right)
        self._spend(len(result) if isinstance(result, _SIZED) else 1)
        return result

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Calls ``obj`` from template code, refusing integer arguments above the budget,
        estimating string methods that multiply their input, and checking the result."""
        self._check_ints((*args, *kwargs.values()), "a call")
        owner = getattr(obj, "__self__", None)
        if isinstance(obj, BuiltinMethodType) and isinstance(owner, (str, bytes)):
            # Generated code passes the loop's variables along; Context.call consumes them.
            own_kwargs = {k: v for k, v in kwargs.items() if k not in _CONTEXT_CALL_KWARGS}
            args = self._check_string_method(owner, obj.__name__, args, own_kwargs)
        result = super().call(context, obj, *args, **kwargs)
        self._admit(result, "call result")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """The sandbox's ``str.format``/``str.format_map``, with the result estimated first."""
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        template: str = value.__self__
        is_format_map = value.__name__ == "format_map"

        @functools.wraps(formatter)
        def checked(*args: Any, **kwargs: Any) -> str:
            if is_format_map and args and isinstance(args[0], dict):
                values = list(args[0].values())
            else:
                values = [*args, *kwargs.values()]
            self._check_format(template, values, braces=True, reusable=True)
            return formatter(*args, **kwargs)

        return checked

    def checked_concat(self, operands: tuple[Any, ...]) -> tuple[Any, ...]:
        """The operands of ``~``, once their joined size is known to fit."""
        size = sum(_deep_size(operand, self.limit) for operand in operands)
        if size > self.limit:
            self._refuse("~ concatenation")
        self._spend(size)
        return operands

    def checked_literal(self, value: Any) -> Any:
        """A list, tuple or dict built by a literal, once its size is known to fit."""
        self._admit(value, "literal")
        return value

    def _checked_join(self, pieces: Iterable[str]) -> str:
        parts = list(pieces)
        size = sum(map(len, parts))
        if size > self.limit:
            self._refuse("captured block")
        self._spend(size)
        return "".join(parts)

    def _guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        """Wraps a filter (filters are not called through :meth:`call`) with the size checks."""
        # Arguments before the filter's own ones: the value, after the context Jinja passes to
        # pass_context/pass_eval_context/pass_environment filters.
        skip = 2 if hasattr(func, "jinja_pass_arg") else 1
        signature = inspect.signature(func) if name in _ESTIMATED_FILTERS else None

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if _ALLOWANCE.get() is None:
                raise _NotRendering
            self._check_ints((*args[skip:], *kwargs.values()), f"filter {name}")
            if signature is not None:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                self._check_filter(name, bound.arguments)
                args, kwargs = bound.args, bound.kwargs
            result = func(*args, **kwargs)
            self._admit(result, f"filter {name}")
            return result

        return guarded


_TraceFunction = Callable[[FrameType, str, Any], Any]


def _deadline_tracer(deadline: float) -> _TraceFunction:
    """A :func:`sys.settrace` function raising _RenderTimeout in template code after ``deadline``.

    Frames of other code get no local tracer, so they only pay for one call per frame.
    """
    monotonic = time.monotonic

    def trace_template_lines(frame: FrameType, event: str, arg: Any) -> _TraceFunction:
        if monotonic() > deadline:
            raise _RenderTimeout
        return trace_template_lines

    def trace_calls(frame: FrameType, event: str, arg: Any) -> _TraceFunction | None:
        return trace_template_lines if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    return trace_calls


class ChatTemplate:
    """A chat template compiled once in the sandbox, rendered per request.

    Instances are immutable and may be shared between threads.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        max_output_chars: int = 1_000_000,
        time_budget_s: float = 2.0,
    ) -> None:
        if max_output_chars < 1:
            raise ValueError("max_output_chars must be positive")
        if time_budget_s <= 0:
            raise ValueError("time_budget_s must be positive")
        self.source = source
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._max_output_chars = max_output_chars
        self._time_budget_s = time_budget_s
        try:
            self._template = _GuardedEnvironment(max_output_chars).from_string(source)
        except Exception as exc:  # syntax errors, and Python's own limits on the generated code
            raise TemplateError(_describe(exc)) from exc

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Renders the conversation to a prompt.

        ``extra`` become template variables too (e.g. ``date_string``, or ``bos_token`` to
        override the constructor's). Raises TemplateError if the template fails, calls
        ``raise_exception``, or exceeds the size or time budget.
        """
        variables: dict[str, Any] = {
            "bos_token": self._bos_token,
            "eos_token": self._eos_token,
            **extra,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        if tools is not None:
            variables["tools"] = tools
        stream = cast(Generator[str, None, None], self._template.generate(variables))
        try:
            return self._drain(stream)
        except TemplateError:
            raise
        except _RenderTimeout:
            raise TemplateError(
                f"chat template took longer than {self._time_budget_s:g} s to render"
            ) from None
        except Exception as exc:  # RecursionError and MemoryError included
            raise TemplateError(_describe(exc)) from exc
        finally:
            stream.close()

    def _drain(self, stream: Iterable[str]) -> str:
        """Collects the rendered pieces under the deadline tracer and the output budget."""
        pieces: list[str] = []
        size = 0
        allowance = _ALLOWANCE.set(_Allowance(_ALLOCATION_FACTOR * self._max_output_chars))
        previous = sys.gettrace()
        sys.settrace(_deadline_tracer(time.monotonic() + self._time_budget_s))
        try:
            for piece in stream:
                size += len(piece)
                if size > self._max_output_chars:
                    raise TemplateError(
                        f"chat template output exceeds {self._max_output_chars} characters"
                    )
                pieces.append(piece)
        finally:
            sys.settrace(previous)
            _ALLOWANCE.reset(allowance)
        return "".join(pieces)
