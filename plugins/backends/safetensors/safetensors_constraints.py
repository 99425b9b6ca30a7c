"""Structured output for the SafeTensors backend: an :class:`~shimmy_core.contract.generation.OutputFormat`
compiled into an llguidance grammar, and a token mask per choice while it samples.

llguidance (https://github.com/guidance-ai/llguidance) is imported only when a model first
enforces a format.  :func:`output_grammar` writes the format as a Lark grammar whose JSON parts
are llguidance's own JSON Schema compiler (``%json {...}``):

- the answer: JSON valid against its schema;
- a call: ``{"name": "<tool>", "arguments": {...}}``, ``name`` first and no other key, the
  arguments valid against the tool's parameters (any object for ``None``); up to ``max_calls``
  calls, one per line; with an answer too, either the calls or the answer.

Each call is a JSON Schema of its own (a ``const`` name and the parameters under
``arguments``, whose local ``$ref`` pointers are moved under ``#/properties/arguments``), so that
llguidance merges the calls and the answer into one JSON lexer and the first ``{`` does not choose
between them.  JSON is written on one line with ``", "`` and ``": "`` between items, as
``json.dumps`` writes it, and no other whitespace: the model cannot pad its output with blank lines
until ``max_tokens``.  Object properties come in the schema's order (llguidance's rule).

:class:`OutputConstraints` (one per loaded model) compiles and checks a format in ``prepare()``,
so a schema llguidance cannot enforce is :class:`UnsupportedOutputSchema` before any output, and
keeps a bounded cache of compiled matchers.  :class:`TokenConstraint` (one per choice) masks the
logits of each step and follows the sampled tokens; the model's end-of-generation ids are allowed
only where the grammar accepts.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterable

import torch

from shimmy_core.plugin_api import BackendError, BackendUnavailable, OutputFormat, UnsupportedOutputSchema

MATCHER_CACHE = 64      # compiled output formats kept per model
# llguidance's JSON options (its "x-guidance" key): json.dumps's separators, no other whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LOCATION = re.compile(r"^at \d+\(\d+\): ")


class ConstraintError(BackendError):
    """The matcher of a choice failed while it generated (the message says how)."""


def output_grammar(output: OutputFormat, after: str | None = None) -> str:
    """The Lark grammar (llguidance's dialect) whose sentences are exactly the outputs ``output``
    allows; with ``after`` (the end of a thinking model's reasoning), any text up to it first."""
    lines = []
    if output.calls:
        names = [f"call_{i}" for i in range(len(output.calls))]
        lines.append("call: " + " | ".join(names))
        lines += [f"{rule}: %json {_json(call_schema(name, params))}" for rule, (name, params) in zip(names, output.calls)]
        more = max(1, output.max_calls) - 1
        lines.insert(0, 'calls: call ("\\n" call){0,%d}' % more if more else "calls: call")
    if output.answer is not None:
        lines.append(f"answer: %json {_json(_schema(output.answer))}")
    start = " | ".join(rule for rule, there in (("calls", output.calls), ("answer", output.answer is not None)) if there)
    if after is not None:  # the reasoning is free: the shortest text that ends with the marker
        lines += [f"output: {start or 'answer'}", f"thought[lazy]: /(.|\\n)*/ {json.dumps(after)}"]
        start = "thought /[ \\t\\n]*/ output"
    return "\n".join([f"start: {start or 'answer'}", *lines]) + "\n"


def call_schema(name: str, parameters: Any) -> dict:
    """The JSON Schema of one call to ``name``: ``{"name": name, "arguments": <parameters>}``."""
    arguments = {"type": "object"} if parameters is None or parameters is True else _schema(parameters, name)
    return {"type": "object",
            "properties": {"name": {"const": name}, "arguments": rebase_refs(arguments, "/properties/arguments")},
            "required": ["name", "arguments"], "additionalProperties": False}


def rebase_refs(schema: Any, prefix: str) -> Any:
    """``schema`` moved to ``#{prefix}`` of another document: its local JSON Pointer ``$ref``s
    (``#``, ``#/...``) point to the same places there.  Property names are never taken for keywords."""
    if isinstance(schema, list):
        return [rebase_refs(item, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = "#" + prefix + value[1:]
        elif key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas") \
                and isinstance(value, dict):
            out[key] = {name: rebase_refs(sub, prefix) for name, sub in value.items()}
        elif key in ("enum", "const", "default", "examples"):
            out[key] = value  # values, not schemas
        else:
            out[key] = rebase_refs(value, prefix)
    return out


def _schema(schema: Any, tool: str | None = None) -> dict:
    if schema is True:
        return {}
    if not isinstance(schema, dict):
        raise UnsupportedOutputSchema("the schema false allows no value", tool=tool)
    return schema


def _json(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _detail(message: str) -> str:
    """llguidance's error message: its first line, without the position in the grammar."""
    lines = (message or "").strip().splitlines() or [""]
    line = _LOCATION.sub("", lines[0].strip()).removeprefix("failed to compile JSON schema: ")
    return line or "llguidance refused the schema"


class OutputConstraints:
    """One model's compiled output formats.  Thread-safe: request threads compile, the engine samples."""

    def __init__(self, tokenizer: Any, eog: Iterable[int], vocab: int):
        self._hf_tokenizer = tokenizer
        self._eog = sorted(eog)
        self.vocab = vocab
        self._tokenizer: Any = None
        self._matchers: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        """llguidance's view of the tokenizer (built once, about a second for a large vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                try:
                    import llguidance.hf
                except ImportError:
                    raise BackendUnavailable("Structured output on SafeTensors models needs llguidance (not "
                                             "installed here): pip install 'shimmy-server[safetensors]'") from None
                size = len(self._hf_tokenizer)
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=max(self.vocab, size), eos_token=self._eog or None)
                except ValueError as exc:  # a slow (Python) tokenizer
                    raise BackendUnavailable(f"this model's tokenizer cannot constrain output: {exc}") from None
            return self._tokenizer

    def check(self, output: OutputFormat, after: str | None = None) -> None:
        """Compile ``output`` (cached); :class:`UnsupportedOutputSchema` names what llguidance refuses.
        ``after``: the output is constrained only after this text (the end of the reasoning)."""
        self._compiled(output, after)

    def constraint(self, output: OutputFormat, after: str | None = None) -> "TokenConstraint":
        """A fresh matcher for one choice."""
        template = self._compiled(output, after)
        with self._lock:
            return TokenConstraint(template.deep_copy())

    def _compiled(self, output: OutputFormat, after: str | None = None):
        key = f"{output.key()}|{after}"
        with self._lock:
            matcher = self._matchers.get(key)
            if matcher is not None:
                self._matchers.move_to_end(key)
                return matcher
        tokenizer = self._llg_tokenizer()
        matcher = _matcher(output, tokenizer, after)
        if matcher.is_error():
            raise self._unsupported(output, tokenizer, matcher.get_error())
        with self._lock:
            self._matchers[key] = matcher
            while len(self._matchers) > MATCHER_CACHE:
                self._matchers.popitem(last=False)
        return matcher

    @staticmethod
    def _unsupported(output: OutputFormat, tokenizer: Any, error: str) -> UnsupportedOutputSchema:
        """The error naming what fails: the answer's schema, or the first tool whose parameters fail alone."""
        if output.answer is not None and output.calls:
            alone = _matcher(OutputFormat(answer=output.answer), tokenizer)
            if alone.is_error():
                return UnsupportedOutputSchema(_detail(alone.get_error()))
        if len(output.calls) > 1 or (output.calls and output.answer is not None):
            for call in output.calls:
                alone = _matcher(OutputFormat(calls=(call,)), tokenizer)
                if alone.is_error():
                    return UnsupportedOutputSchema(_detail(alone.get_error()), tool=call[0])
        tool = output.calls[0][0] if output.calls and output.answer is None else None
        return UnsupportedOutputSchema(_detail(error), tool=tool)


def _matcher(output: OutputFormat, tokenizer: Any, after: str | None = None):
    """llguidance's matcher for ``output``, in its error state (``is_error()``) if the grammar fails."""
    from llguidance import LLMatcher

    return LLMatcher(tokenizer, LLMatcher.grammar_from_lark(output_grammar(output, after)), log_level=0)


class TokenConstraint:
    """One choice's matcher: which tokens may come next, and the tokens that came (engine thread only).
    Whatever goes wrong in it is a :class:`ConstraintError`, which ends this choice's request alone."""

    _SHIFTS = torch.arange(32, dtype=torch.int32)

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (1-D, CPU) with every token the grammar forbids at ``-inf`` (a new tensor)."""
        with _failures():
            words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
            self._check()
            allowed = ((words[:, None] >> self._SHIFTS) & 1).flatten().bool()
            n = logits.numel()
            if allowed.numel() < n:
                allowed = torch.cat([allowed, allowed.new_zeros(n - allowed.numel())])
            allowed = allowed[:n]
            if not bool(allowed.any()):
                raise ConstraintError("the output grammar allows no token of this model here")
            return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        """Follow a sampled token (one that :meth:`mask` allowed)."""
        with _failures():
            self.matcher.consume_token(token)
            self._check()

    @property
    def finished(self) -> bool:
        """The output is complete: the grammar allows nothing but the end."""
        with _failures():
            return bool(self.matcher.is_stopped())

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"the output grammar failed: {_detail(self.matcher.get_error())}")


@contextmanager
def _failures():
    try:
        yield
    except ConstraintError:
        raise
    except Exception as exc:  # llguidance's API errors, torch errors: this choice fails, not the engine
        raise ConstraintError(f"the output grammar failed: {type(exc).__name__}: {exc}") from exc
