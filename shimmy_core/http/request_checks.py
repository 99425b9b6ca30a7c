"""The checks every dialect makes on a JSON request body, as neutral 400s.

:func:`parse_json` decodes a body (malformed, non-object, NaN or too deeply nested JSON is refused),
:func:`check_body` validates it against a dialect's JSON Schema (a :class:`BodySchema`, compiled
on first use so that loading a dialect does not import jsonschema) and names the offending field,
:func:`check_text` and :func:`check_strings` refuse text a tokenizer cannot take (NUL characters,
lone surrogates).  Each raises :class:`~shimmy_core.contract.generation.InvalidRequest`, which the
dialect owning the path renders in its error envelope.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterator

from shimmy_core.contract.generation import InvalidRequest
from shimmy_core.tools.schemas import json_path

if TYPE_CHECKING:  # pragma: no cover
    import jsonschema

MAX_DEPTH = 64


class BodySchema:
    """A request body's JSON Schema (Draft 2020-12), compiled into a validator on first use."""

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self._validator: Any = None

    def iter_errors(self, body: Any) -> Iterator["jsonschema.ValidationError"]:
        if self._validator is None:
            from jsonschema import Draft202012Validator

            self._validator = Draft202012Validator(self.schema)  # two threads may both build it: harmless
        return self._validator.iter_errors(body)


def _reject_constant(name: str):
    raise InvalidRequest(f"Invalid JSON number {name}: NaN and Infinity are not allowed.", code="invalid_json")


def parse_json(raw: bytes) -> dict:
    """Decode a request body; malformed, non-object or too deeply nested JSON is a 400."""
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant)
    except InvalidRequest:
        raise
    except RecursionError:
        raise InvalidRequest("The JSON body is nested too deeply.", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The JSON body must be an object.", code="invalid_json")
    _check_depth(body)
    return body


def _check_depth(value: object) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"The JSON body is nested deeper than {MAX_DEPTH} levels.", code="invalid_json")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _param_name(error: "jsonschema.ValidationError") -> str | None:
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else None
        path = path + ([missing] if missing else [])
    if error.validator in ("propertyNames", "additionalProperties") and not path:
        return None
    return json_path(path) or None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(error: "jsonschema.ValidationError", param: str | None) -> str:
    where = f"'{param}'" if param else "the request"
    if error.validator == "required":
        return f"Missing required parameter: {where}."
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"Invalid value for {where}: {_short(repr(error.instance))} is out of range."
    if error.validator in ("type", "anyOf", "enum"):
        return f"Invalid type or value for {where}: {_short(error.message)}."
    return f"Invalid value for {where}: {_short(error.message)}."


def check_body(validator: "BodySchema | jsonschema.protocols.Validator", body: dict) -> None:
    """Validate ``body`` with a dialect's schema validator; the best error is a 400 naming the field."""
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(body))
    if error is not None:
        param = _param_name(error)
        raise InvalidRequest(_describe(error, param), param=param, code="invalid_value" if param else None)


def check_text(value: str, param: str) -> str:
    """``value``, refused when it holds a NUL character or a lone surrogate."""
    if "\x00" in value:
        raise InvalidRequest(f"Invalid value for '{param}': text must not contain NUL characters.", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"Invalid value for '{param}': text contains a lone surrogate (invalid Unicode).", param=param
        ) from None
    return value


def check_strings(value: object, param: str) -> None:
    """Check every string inside a JSON value (already depth-limited)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_text(item, param)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
