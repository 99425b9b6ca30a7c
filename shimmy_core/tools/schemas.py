"""JSON Schema validators that are safe to build over schemas Shimmy did not write.

Two things jsonschema does by default are wrong here:

- A ``$ref`` to a URL is fetched over the network.  Every validator here is built with an empty
  :class:`referencing.Registry` (no retrieval), and :func:`check_schema` refuses any ``$ref`` that
  is not local (``#...``) up front.
- ``pattern``, ``patternProperties`` and ``additionalProperties`` (which consults the patterns)
  run Python's ``re``, which backtracks without limit: ``^(a|aa)+$`` against forty ``a`` and a
  ``!`` never returns.  Here they run on the ``regex`` module with a timeout, under one time
  budget per validation; a pattern that runs out of time is a validation error.

jsonschema and regex are imported on first use: a server whose requests never meet a schema
does not pay for them at start.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from jsonschema import Draft202012Validator, ValidationError

PATTERN_TIMEOUT_S = 0.1         # one regex search
VALIDATION_BUDGET_S = 1.0       # all the regex searches of one validation
MAX_ERRORS = 5

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("shimmy_schema_deadline", default=None)


class SchemaProblem(ValueError):
    """A user's schema that cannot be used; the message says why."""


def pattern_search(pattern: str, text: str) -> bool:
    """Whether the regular expression ``pattern`` (JSON Schema dialect, with a time limit) matches
    somewhere in ``text``."""
    deadline = _deadline.get()
    timeout = PATTERN_TIMEOUT_S
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise TimeoutError
    import regex
    from jsonschema import ValidationError

    try:
        return regex.search(pattern, text, timeout=timeout) is not None
    except regex.error as exc:
        raise ValidationError(f"invalid pattern {pattern!r}: {exc}") from None


def _timed_out(pattern: str) -> ValidationError:
    from jsonschema import ValidationError

    return ValidationError(f"the pattern {pattern!r} took too long to check (catastrophic backtracking?)")


def _pattern(validator, pattern, instance, schema) -> Iterator[ValidationError]:
    from jsonschema import ValidationError

    if not validator.is_type(instance, "string"):
        return
    try:
        if not pattern_search(pattern, instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r}")
    except TimeoutError:
        yield _timed_out(pattern)


def _matching_patterns(schema: dict, key: str) -> list[str]:
    return [p for p in schema.get("patternProperties", {}) if pattern_search(p, key)]


def _pattern_properties(validator, patterns, instance, schema) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            try:
                hit = pattern_search(pattern, key)
            except TimeoutError:
                yield _timed_out(pattern)
                return
            if hit:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator, additional, instance, schema) -> Iterator[ValidationError]:
    from jsonschema import ValidationError

    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    extras = []
    for key in instance:
        if key in properties:
            continue
        try:
            if _matching_patterns(schema, key):
                continue
        except TimeoutError:
            yield ValidationError("a patternProperties pattern took too long to check")
            return
        extras.append(key)
    if validator.is_type(additional, "object"):
        for key in extras:
            yield from validator.descend(instance[key], additional, path=key)
    elif not additional and extras:
        yield ValidationError(f"Additional properties are not allowed ({', '.join(map(repr, sorted(extras)))} unexpected)")


@functools.cache
def _safe_validator() -> tuple[type, Any]:
    """Draft 2020-12 with the timed pattern keywords, and the empty registry (nothing fetched)."""
    from jsonschema import Draft202012Validator, validators
    from referencing import Registry

    extended = validators.extend(
        Draft202012Validator,
        {"pattern": _pattern, "patternProperties": _pattern_properties, "additionalProperties": _additional_properties},
    )
    return extended, Registry()


def _walk(schema: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every subschema-like dict with its JSON-pointer-ish path."""
    stack = [(schema, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            yield where, node
            stack.extend((v, f"{where}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(node))


def check_schema(schema: Any) -> None:
    """Raise :class:`SchemaProblem` unless ``schema`` is a usable JSON Schema (2020-12) whose
    references are all local."""
    check_references(schema)
    import jsonschema

    try:
        _safe_validator()[0].check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise SchemaProblem(f"invalid JSON Schema at /{path}: {exc.message}") from None


def check_references(schema: Any) -> None:
    """The part of :func:`check_schema` that needs no jsonschema: an object (or boolean) whose
    references are all local, and no keyword this server cannot apply safely."""
    if not isinstance(schema, (dict, bool)):
        raise SchemaProblem("a JSON Schema must be an object")
    nodes = list(_walk(schema))
    keys = {k for _, node in nodes for k in node}
    if "unevaluatedProperties" in keys and "patternProperties" in keys:
        raise SchemaProblem("unevaluatedProperties together with patternProperties is not supported")
    for where, node in nodes:
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise SchemaProblem(f"$ref {ref!r} at {where or '/'} is not local: remote schemas are never fetched")
        for key in ("$dynamicRef", "$recursiveRef"):
            if key in node:
                raise SchemaProblem(f"{key} at {where or '/'} is not supported")


def validator_for(schema: Any) -> Draft202012Validator:
    """A validator over ``schema`` (call :func:`check_schema` first) that fetches nothing."""
    validator, registry = _safe_validator()
    return validator(schema, registry=registry)


@contextlib.contextmanager
def _budget(seconds: float):
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def errors(validator: Draft202012Validator, instance: Any, limit: int = MAX_ERRORS) -> list[str]:
    """Up to ``limit`` messages, each naming where in ``instance`` it failed; ``[]`` when valid."""
    found: list[str] = []
    with _budget(VALIDATION_BUDGET_S):
        try:
            for error in validator.iter_errors(instance):
                where = "/".join(str(p) for p in error.absolute_path)
                found.append(f"{'/' + where if where else 'arguments'}: {error.message}")
                if len(found) >= limit:
                    break
        except TimeoutError:
            found.append("validation ran out of time (a pattern backtracks too much)")
        except Exception as exc:  # referencing.exceptions.Unresolvable and friends
            found.append(f"the schema could not be applied: {type(exc).__name__}: {exc}")
    return found


def json_path(parts: Iterable[str | int]) -> str:
    """Where a validation error is, as a request field or file field reads: ``tools[1].function.name``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
