"""JSON Schema to GBNF, the grammar format llama.cpp samples under: how the GGUF backend
enforces an :class:`~shimmy_core.contract.generation.OutputFormat` (:func:`compile_output`).

Output generated under one of these grammars is JSON that validates against the schema, for
the subset of JSON Schema supported here.  Every other feature that constrains values (``not``,
``if``/``then``/``else``, ``uniqueItems``, ``multipleOf``, most number bounds, unknown string
formats, ...) raises :class:`UnsupportedSchema`, which names the feature and where it is: a
request asking for it gets a 400, never output that might not validate.

Supported: ``type`` (one or a list), ``enum``, ``const``, ``anyOf``, ``oneOf`` whose branches have
disjoint types, a one-element ``allOf``, local ``$ref`` (``#/$defs/...``, recursion included),
objects (``properties``, ``required``, ``additionalProperties``; properties come in the schema's
order, required ones first), arrays (``items``, ``prefixItems``, ``minItems``, ``maxItems``),
strings (``minLength``, ``maxLength``, ``pattern`` for regular expressions without look-around or
back-references, ``format`` date, time, date-time, uuid, ipv4 and email), integers with any
bounds, numbers with whole non-negative bounds, booleans and null.  Annotations (``title``,
``description``, ``default``, ``examples``...) are ignored.  Objects are generated without
properties the schema does not name, which every schema that allows extra properties accepts.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from shimmy_core.plugin_api import OutputFormat, UnsupportedOutputSchema, pattern_search, schema_errors, validator_for

try:  # Python 3.11+
    from re import _constants as _sre_c  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_REPEAT = 1000        # largest minItems/maxItems/minLength/maxLength/{m,n} a grammar spells out
MAX_OPTIONAL = 256       # most properties of one object
INT_DIGITS = 16          # digits of an unbounded integer part
FRACTION_DIGITS = 16

# Keywords that constrain values and that a grammar here cannot enforce.
_UNSUPPORTED = (
    "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
    "unevaluatedProperties", "unevaluatedItems", "contains", "minContains", "maxContains",
    "$dynamicRef", "$recursiveRef",
)
# Keywords that only describe.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "$id", "$schema", "$anchor",
    "$defs", "definitions", "deprecated", "readOnly", "writeOnly", "contentMediaType",
    "contentEncoding", "contentSchema", "$vocabulary", "strict", "nullable",
})
_OBJECT_KEYS = ("properties", "required", "additionalProperties", "minProperties", "maxProperties",
                "patternProperties", "propertyNames")
_ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "additionalItems")
_STRING_KEYS = ("minLength", "maxLength", "pattern", "format")
_NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")

_PRIMITIVES = {
    "space": '| " " | "\\n" [ \\t]{0,20}',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\""',
    "int-digits": f'"0" | [1-9] [0-9]{{0,{INT_DIGITS - 1}}}',
    "integer": '"-"? int-digits',
    "fraction": f'"." [0-9]{{1,{FRACTION_DIGITS}}}',
    "number": '"-"? int-digits fraction? ([eE] [-+]? [0-9]{1,3})?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space ( string space ":" space value ( space "," space string space ":" space value )* )? space "}"',
    "array": '"[" space ( value ( space "," space value )* )? space "]"',
}
_PRIMITIVE_DEPS = {
    "string": ("char",), "integer": ("int-digits",), "number": ("int-digits", "fraction"),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("space", "string", "value"), "array": ("space", "value"),
}

_FORMATS = {
    "date": '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
    "time": '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? '
            '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
    "uuid": '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}',
    "ipv4": ' ipv4-octet "." ipv4-octet "." ipv4-octet "." ipv4-octet',
    "email": '[a-zA-Z0-9._%+-]{1,64} "@" [a-zA-Z0-9-]{1,63} ( "." [a-zA-Z0-9-]{1,63} ){1,8}',
}
_FORMATS["date-time"] = f"{_FORMATS['date']} [Tt] {_FORMATS['time']}"
_IPV4_OCTET = '"25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9] [0-9] | [0-9]'


class UnsupportedSchema(ValueError):
    """A schema feature the grammar cannot enforce; ``feature`` names it, ``path`` says where."""

    def __init__(self, feature: str, path: str, detail: str = ""):
        self.feature = feature
        self.path = path or "/"
        text = f"the JSON Schema feature '{feature}' at {self.path} cannot be enforced"
        super().__init__(text + (f": {detail}" if detail else ""))


def literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def json_literal(value: Any) -> str:
    return literal(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


def _class_char(ch: str) -> str:
    """One character inside a GBNF character class."""
    if ch == "^":
        return "\\x5E"  # llama.cpp knows no \^
    if ch in "]\\-[":
        return "\\" + ch
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02X}"
    return ch


def _repeat(expr: str, lo: int, hi: int | None, what: str, path: str) -> str:
    if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
        raise UnsupportedSchema(what, path, f"values above {MAX_REPEAT} are not supported")
    if hi is None:
        return f"{expr}{{{lo},}}" if lo else f"{expr}*"
    if lo == hi:
        return f"{expr}{{{lo}}}" if lo != 1 else expr
    return f"{expr}{{{lo},{hi}}}"


# ------------------------------------------------------------------ integer ranges
def _same_length(a: str, b: str) -> list[str]:
    """GBNF sequences matching the decimal numbers from ``a`` to ``b`` (same length, a <= b)."""
    if a == b:
        return [literal(a)]
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if a[0] == b[0]:
        return [f"{literal(a[0])} {rest}" for rest in _same_length(a[1:], b[1:])]
    n = len(a) - 1
    out: list[str] = []
    first, last = int(a[0]), int(b[0])
    if a[1:] != "0" * n:
        out += [f"{literal(a[0])} {rest}" for rest in _same_length(a[1:], "9" * n)]
        first += 1
    upper: list[str] = []
    if b[1:] != "9" * n:
        upper = [f"{literal(b[0])} {rest}" for rest in _same_length("0" * n, b[1:])]
        last -= 1
    if first <= last:
        head = literal(str(first)) if first == last else f"[{first}-{last}]"
        out.append(f"{head} [0-9]{{{n}}}" if n > 1 else f"{head} [0-9]")
    return out + upper


def _natural_range(lo: int, hi: int | None) -> list[str]:
    """Sequences matching the integers lo..hi (0 <= lo, hi None: no upper bound), no leading zeros."""
    alternatives: list[str] = []
    digits = len(str(lo))
    top = hi if hi is not None else 10**INT_DIGITS - 1
    while lo <= top:
        end = min(top, 10**digits - 1)
        alternatives += _same_length(str(lo), str(end))
        lo, digits = end + 1, digits + 1
        if hi is None and digits > 3 and lo == 10 ** (digits - 1):  # every longer number
            alternatives.append(f"[1-9] [0-9]{{{digits - 1},{INT_DIGITS - 1}}}")
            break
    return alternatives


def integer_range(lo: int | None, hi: int | None) -> str:
    """A GBNF expression matching the integers from ``lo`` to ``hi`` (None: unbounded)."""
    alternatives: list[str] = []
    if lo is None or lo < 0:  # the negative part: "-" and the magnitudes
        smallest = 1 if hi is None or hi >= 0 else -hi
        largest = None if lo is None else -lo
        alternatives += [f'"-" ( {" | ".join(_natural_range(smallest, largest))} )']
    if hi is None or hi >= 0:
        alternatives += _natural_range(max(lo or 0, 0), hi)
    return "( " + " | ".join(alternatives) + " )"


# ------------------------------------------------------------------ regular expressions
class _Pattern:
    """A regular expression (Python syntax, the ECMA subset JSON Schema uses) as GBNF over the
    JSON-escaped text of a string."""

    # \d \w \s generate only what both Python's and ECMA-262's classes match (ASCII digits,
    # letters, whitespace); \D \W \S and negated classes holding one generate only ASCII
    # characters that neither matches (é is a word character to Python, \x1c a space).
    _CATEGORIES = {
        "CATEGORY_DIGIT": ("digit", False), "CATEGORY_NOT_DIGIT": ("digit", True),
        "CATEGORY_WORD": ("word", False), "CATEGORY_NOT_WORD": ("word", True),
        "CATEGORY_SPACE": ("space", False), "CATEGORY_NOT_SPACE": ("space", True),
    }
    _GENERATE = {"digit": [("0", "9")], "word": [("a", "z"), ("A", "Z"), ("0", "9"), ("_", "_")],
                 "space": [(" ", " "), ("\t", "\r")]}
    _COVERS = {**_GENERATE, "space": [(" ", " "), ("\t", "\r"), ("\x1c", "\x1f")]}
    _ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}

    def __init__(self, pattern: str, path: str):
        self.path = path
        try:
            self.tree = _sre_parse.parse(pattern)
        except re.error as exc:
            raise UnsupportedSchema("pattern", path, f"invalid regular expression: {exc}") from None
        if self.tree.state.flags & ~_sre_c.SRE_FLAG_UNICODE:
            raise UnsupportedSchema("pattern", path, "inline flags are not supported")

    def _fail(self, what: str) -> UnsupportedSchema:
        return UnsupportedSchema("pattern", self.path, what)

    def _escaped(self, ch: str) -> str:
        """GBNF for one character as it appears inside a JSON string."""
        if ch in self._ESCAPES:
            return literal(self._ESCAPES[ch])
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return literal(f"\\u{ord(ch):04x}")
        return literal(ch)

    def _charset(self, ranges: list[tuple[str, str]], negate: bool) -> str:
        """Characters in (or, negated, outside) ``ranges`` as they appear in a JSON string: the
        characters JSON escapes come as their escapes, the others as a class."""
        specials = [chr(c) for c in range(0x20)] + ['"', "\\", "\x7f"]
        inside = lambda ch: any(lo <= ch <= hi for lo, hi in ranges)  # noqa: E731
        escaped = [self._escaped(ch) for ch in specials if inside(ch) != negate]
        if negate:
            plain = "".join(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"
                            for lo, hi in ranges)
            cls = f'[^{plain}"\\\\\\x7F\\x00-\\x1F]'
        else:
            cls = self._plain_ranges(ranges)
        parts = [p for p in [cls, *escaped] if p]
        if not parts:
            raise self._fail("an empty character class")
        return parts[0] if len(parts) == 1 else "( " + " | ".join(parts) + " )"

    @staticmethod
    def _plain_ranges(ranges: list[tuple[str, str]]) -> str:
        """A class of the ranges with the characters JSON escapes cut out."""
        cut: list[tuple[int, int]] = []
        for lo, hi in ranges:
            start, end = ord(lo), ord(hi)
            pieces = [(start, end)]
            for bad in [*range(0x20), 0x22, 0x5C, 0x7F]:
                pieces = [p for s, e in pieces
                          for p in (((s, bad - 1), (bad + 1, e)) if s <= bad <= e else ((s, e),)) if p[0] <= p[1]]
            cut += pieces
        if not cut:
            return ""
        return "[" + "".join(
            _class_char(chr(s)) if s == e else f"{_class_char(chr(s))}-{_class_char(chr(e))}" for s, e in cut
        ) + "]"

    @staticmethod
    def _ascii_outside(ranges: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The ASCII characters outside ``ranges``, as ranges."""
        out: list[tuple[str, str]] = []
        for c in range(0x80):
            if any(lo <= chr(c) <= hi for lo, hi in ranges):
                continue
            if out and ord(out[-1][1]) == c - 1:
                out[-1] = (out[-1][0], chr(c))
            else:
                out.append((chr(c), chr(c)))
        return out

    def _in(self, items) -> str:
        ranges: list[tuple[str, str]] = []
        covers: list[tuple[str, str]] = []  # what the class escapes inside may match, in either dialect
        negate = False
        for op, av in items:
            name = str(op)
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                ranges.append((chr(av), chr(av)))
            elif name == "RANGE":
                ranges.append((chr(av[0]), chr(av[1])))
            elif name == "CATEGORY":
                kind, cat_negated = self._CATEGORIES.get(str(av), (None, None))
                if kind is None:
                    raise self._fail(f"the class {av}")
                if cat_negated:
                    if len(items) > 1:
                        raise self._fail("a negated class escape inside [...]")
                    return self._charset(self._ascii_outside(self._COVERS[kind]), False)
                ranges += self._GENERATE[kind]
                covers += self._COVERS[kind]
            else:
                raise self._fail(f"{name} inside [...]")
        if negate and covers:
            return self._charset(self._ascii_outside(ranges + covers), False)
        return self._charset(ranges, negate)

    def sequence(self, tree, top: bool = False) -> str:
        items = list(tree)
        if top:
            if items and str(items[0][0]) == "AT" and str(items[0][1]) in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
                items = items[1:]
            if items and str(items[-1][0]) == "AT" and str(items[-1][1]) in ("AT_END", "AT_END_STRING"):
                items = items[:-1]
        parts = [self.item(op, av) for op, av in items]
        return " ".join(parts) if parts else '""'

    def item(self, op, av) -> str:
        name = str(op)
        if name == "LITERAL":
            return self._escaped(chr(av))
        if name == "NOT_LITERAL":
            return self._charset([(chr(av), chr(av))], True)
        if name == "ANY":
            return self._charset([("\n", "\n")], True)
        if name == "IN":
            return self._in(av)
        if name == "BRANCH":
            return "( " + " | ".join(self.sequence(branch) for branch in av[1]) + " )"
        if name == "SUBPATTERN":
            group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise self._fail("inline flags")
            return "( " + self.sequence(sub) + " )"
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = av
            hi = None if hi == _sre_c.MAXREPEAT else hi
            return _repeat("( " + self.sequence(sub) + " )", lo, hi, "pattern", self.path)
        if name == "AT":
            raise self._fail("an anchor (^, $, \\b) inside the expression")
        raise self._fail(f"the construct {name} (look-around, back-references... are not supported)")

    def gbnf(self) -> str:
        return self.sequence(self.tree, top=True)


# ------------------------------------------------------------------ the builder
class GrammarBuilder:
    """Collects the rules of one grammar.  ``schema()`` and ``tool_calls()`` add rules and return
    an expression; ``build(root)`` gives the grammar text with ``root ::= <root>``."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._refs: dict[tuple[int, str], str] = {}

    # ------------------------------------------------------------ rules
    def _name(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-").lower() or "r"
        if base in _PRIMITIVES or base == "root":
            base += "-x"
        name, n = base, 1
        while name in self.rules:
            n += 1
            name = f"{base}-{n}"
        return name

    def rule(self, hint: str, body: str) -> str:
        """A rule with this body (an existing one when the same body was added before)."""
        if body in self._by_body:
            return self._by_body[body]
        name = self._name(hint)
        self.rules[name] = body
        self._by_body[body] = name
        return name

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dep in _PRIMITIVE_DEPS.get(name, ()):
                self.primitive(dep)
        return name

    def build(self, root: str) -> str:
        lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ public entry points
    def schema(self, schema: Any, hint: str = "value") -> str:
        """An expression for JSON values valid against ``schema``."""
        return self._visit(schema, schema, hint, "")

    def json_object(self) -> str:
        return self.primitive("object")

    def tool_calls(self, tools: list[tuple[str, Any]], multiple: bool, max_calls: int = 4) -> str:
        """One call ``{"name": ..., "arguments": {...}}`` (``multiple``: up to ``max_calls``, a line
        each) to one of ``tools``, ``(name, parameters schema)`` pairs."""
        space = self.primitive("space")
        alternatives = []
        for name, parameters in tools:
            args = self._visit(parameters if parameters is not None else {"type": "object"},
                               parameters, f"{name}-arguments", "")
            alternatives.append(f'{literal(json.dumps(name))} {space} "," {space} "\\"arguments\\"" {space} ":" {space} {args}')
        call = self.rule("call", f'"{{" {space} "\\"name\\"" {space} ":" {space} ( {" | ".join(alternatives)} ) {space} "}}"')
        if multiple:
            return f'{call} ( "\\n" {call} ){{0,{max_calls - 1}}}'
        return call

    # ------------------------------------------------------------ schemas
    def _visit(self, schema: Any, root: Any, hint: str, path: str) -> str:
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise UnsupportedSchema("false", path, "no value is valid")
        if not isinstance(schema, dict):
            raise UnsupportedSchema("schema", path, "a schema must be an object or a boolean")
        for key in _UNSUPPORTED:
            if key in schema:
                raise UnsupportedSchema(key, path)
        constraining = {k for k in schema if k not in _ANNOTATIONS}

        if "$ref" in schema:
            if constraining - {"$ref"}:
                raise UnsupportedSchema("$ref", path, "keywords next to $ref are not supported")
            return self._ref(schema["$ref"], root, path)
        if "const" in schema:
            return json_literal(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise UnsupportedSchema("enum", path, "an empty enum")
            return "( " + " | ".join(json_literal(v) for v in values) + " )"
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                if constraining - {key}:
                    raise UnsupportedSchema(key, path, f"keywords next to {key} are not supported")
                branches = schema[key]
                if key == "allOf":
                    if len(branches) != 1:
                        raise UnsupportedSchema("allOf", path, "only a single-schema allOf is supported")
                    return self._visit(branches[0], root, hint, f"{path}/allOf/0")
                if key == "oneOf":
                    self._check_disjoint(branches, root, path)
                return "( " + " | ".join(
                    self._visit(b, root, f"{hint}-{i}", f"{path}/{key}/{i}") for i, b in enumerate(branches)
                ) + " )"

        types = schema.get("type")
        if isinstance(types, list):
            if not types:
                raise UnsupportedSchema("type", path, "an empty type list")
            return "( " + " | ".join(
                self._visit({**schema, "type": t}, root, f"{hint}-{t}", path) for t in types
            ) + " )"
        if types is None:
            types = self._implied_type(schema)
        if types is None:
            return self.primitive("value")
        method = {
            "object": self._object, "array": self._array, "string": self._string,
            "integer": self._integer, "number": self._number,
        }.get(types)
        if method is not None:
            return method(schema, root, hint, path)
        if types in ("boolean", "null"):
            return self.primitive(types)
        raise UnsupportedSchema("type", path, f"unknown type {types!r}")

    @staticmethod
    def _implied_type(schema: dict) -> str | None:
        for keys, kind in ((_OBJECT_KEYS, "object"), (_ARRAY_KEYS, "array"), (_STRING_KEYS, "string"),
                           (_NUMBER_KEYS, "number")):
            if any(k in schema for k in keys):
                return kind
        return None

    def _resolve(self, ref: str, root: Any, path: str) -> Any:
        if not ref.startswith("#"):
            raise UnsupportedSchema("$ref", path, f"{ref!r} is not a local reference")
        node = root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise UnsupportedSchema("$ref", path, f"{ref!r} points nowhere")
        return node

    def _ref(self, ref: str, root: Any, path: str) -> str:
        key = (id(root), ref)
        if key in self._refs:
            return self._refs[key]
        target = self._resolve(ref, root, path)
        name = self._name("ref-" + ref.rsplit("/", 1)[-1])
        self.rules[name] = '""'  # reserved: a recursive reference finds the name
        self._refs[key] = name
        self.rules[name] = self._visit(target, root, name, ref[1:] or "/")
        return name

    def _types_of(self, schema: Any, root: Any, path: str, depth: int = 0) -> set[str]:
        if isinstance(schema, dict) and "$ref" in schema and depth < 16:
            return self._types_of(self._resolve(schema["$ref"], root, path), root, path, depth + 1)
        if not isinstance(schema, dict):
            return {"any"}
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            return {_json_type(v) for v in values}
        t = schema.get("type") or self._implied_type(schema)
        if t is None:
            return {"any"}
        kinds = set(t) if isinstance(t, list) else {t}
        return {"number" if k == "integer" else k for k in kinds}

    def _check_disjoint(self, branches: list, root: Any, path: str) -> None:
        seen: set[str] = set()
        for i, branch in enumerate(branches):
            kinds = self._types_of(branch, root, f"{path}/oneOf/{i}")
            if "any" in kinds or kinds & seen:
                raise UnsupportedSchema("oneOf", path, "branches must have different types")
            seen |= kinds

    # ------------------------------------------------------------ objects
    def _object(self, schema: dict, root: Any, hint: str, path: str) -> str:
        space = self.primitive("space")
        properties = schema.get("properties") or {}
        required = list(dict.fromkeys(schema.get("required") or []))
        additional = schema.get("additionalProperties", True)
        if len(properties) > MAX_OPTIONAL:
            raise UnsupportedSchema("properties", path, f"more than {MAX_OPTIONAL} properties")
        names = list(properties)
        self._check_names(schema, names + [r for r in required if r not in properties], path)
        for name in required:
            if name not in properties and additional is False:
                raise UnsupportedSchema("required", path, f"{name!r} is required but not allowed")
        if not properties and not required and additional not in (True, False, {}):
            # a map: any keys, values of one schema
            value = self._visit(additional, root, f"{hint}-value", f"{path}/additionalProperties")
            return self.rule(hint, f'"{{" {space} ( {self.primitive("string")} {space} ":" {space} {value} '
                                   f'( {space} "," {space} {self.primitive("string")} {space} ":" {space} {value} )* )? {space} "}}"')
        if not properties and not required and additional is not False and "minProperties" not in schema:
            if not any(k in schema for k in ("maxProperties", "propertyNames", "patternProperties")):
                return self.primitive("object")

        def member(name: str) -> str:
            sub = properties.get(name, additional if isinstance(additional, dict) else {})
            value = self._visit(sub, root, f"{hint}-{name}", f"{path}/properties/{name}")
            return f"{literal(json.dumps(name, ensure_ascii=False))} {space} \":\" {space} {value}"

        required_parts = [member(n) for n in required]
        optional = [n for n in names if n not in required]
        n_max = schema.get("maxProperties")
        if n_max is not None and n_max < len(required) + len(optional):
            if n_max < len(required):
                raise UnsupportedSchema("maxProperties", path, "fewer than the required properties")
            optional = []  # generate the required ones only
        n_min = schema.get("minProperties", 0)
        if n_min > len(required):
            raise UnsupportedSchema("minProperties", path, "more than the required properties")
        sep = f'{space} "," {space}'
        body = f" {sep} ".join(required_parts)
        if optional:
            opt_members = [member(n) for n in optional]
            # rest_i: the optional members from i on, each present or not, each after a comma
            rest = '""'
            rests = []
            for m in reversed(opt_members):
                rest = self.rule(f"{hint}-rest", f"( {sep} {m} )? {rest}" if rest != '""' else f"( {sep} {m} )?")
                rests.append(rest)
            rests.reverse()
            if required_parts:
                body = f"{body} {rests[0]}"
            else:
                # the first member present comes without a comma
                first = '""'
                for i in reversed(range(len(opt_members))):
                    after = rests[i + 1] if i + 1 < len(rests) else ""
                    alt = f"{opt_members[i]} {after}".strip()
                    first = self.rule(f"{hint}-first", f"{alt} | {first}" if first != '""' else alt)
                body = f"{first}?"
        return self.rule(hint, f'"{{" {space} {body} {space} "}}"' if body else f'"{{" {space} "}}"')

    def _check_names(self, schema: dict, names: list[str], path: str) -> None:
        """patternProperties and propertyNames constrain the names (and values) we generate."""
        patterns = schema.get("patternProperties") or {}
        for pattern in patterns:
            for name in names:
                try:
                    hit = pattern_search(pattern, name)
                except (TimeoutError, Exception):
                    hit = True
                if hit:
                    raise UnsupportedSchema("patternProperties", path, f"property {name!r} matches {pattern!r}")
        if "propertyNames" in schema:
            validator = validator_for(schema["propertyNames"])
            for name in names:
                if schema_errors(validator, name, limit=1):
                    raise UnsupportedSchema("propertyNames", path, f"property {name!r} is not a valid name")

    # ------------------------------------------------------------ arrays
    def _array(self, schema: dict, root: Any, hint: str, path: str) -> str:
        space = self.primitive("space")
        sep = f'{space} "," {space}'
        lo = schema.get("minItems", 0)
        hi = schema.get("maxItems")
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 7 tuples
            prefix, items = items, schema.get("additionalItems", True)
        if schema.get("uniqueItems") and (hi is None or hi > 1):
            raise UnsupportedSchema("uniqueItems", path)
        if prefix:
            if not (lo <= len(prefix) and (hi is None or hi >= len(prefix))):
                raise UnsupportedSchema("prefixItems", path, "minItems/maxItems other than the prefix length")
            parts = [self._visit(s, root, f"{hint}-{i}", f"{path}/prefixItems/{i}") for i, s in enumerate(prefix)]
            return self.rule(hint, f'"[" {space} {f" {sep} ".join(parts)} {space} "]"')
        if items is False:
            if lo > 0:
                raise UnsupportedSchema("items", path, "items: false with minItems")
            return '"[" ' + space + ' "]"'
        item = self._visit(items, root, f"{hint}-item", f"{path}/items")
        if hi == 0:
            return f'"[" {space} "]"'
        if lo == 0:
            tail = _repeat(f"( {sep} {item} )", 0, None if hi is None else hi - 1, "maxItems", path)
            inner = f"( {item} {tail} )?"
        else:
            tail = _repeat(f"( {sep} {item} )", lo - 1, None if hi is None else hi - 1, "minItems", path)
            inner = f"{item} {tail}"
        return self.rule(hint, f'"[" {space} {inner} {space} "]"')

    # ------------------------------------------------------------ strings
    def _string(self, schema: dict, root: Any, hint: str, path: str) -> str:
        fmt = schema.get("format")
        pattern = schema.get("pattern")
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if fmt is not None:
            if fmt not in _FORMATS:
                raise UnsupportedSchema(f"format: {fmt}", path)
            if pattern is not None or lo or hi is not None:
                raise UnsupportedSchema("format", path, "format together with pattern or lengths")
            if fmt == "ipv4":
                self.rules.setdefault("ipv4-octet", _IPV4_OCTET)
            return self.rule(f"{fmt}-string", f'"\\"" {_FORMATS[fmt]} "\\""')
        if pattern is not None:
            if lo or hi is not None:
                raise UnsupportedSchema("pattern", path, "pattern together with minLength/maxLength")
            return self.rule(f"{hint}-pattern", f'"\\"" {_Pattern(pattern, path).gbnf()} "\\""')
        if not lo and hi is None:
            return self.primitive("string")
        char = self.primitive("char")
        return self.rule(hint, f'"\\"" {_repeat(char, lo, hi, "maxLength" if hi is not None else "minLength", path)} "\\""')

    # ------------------------------------------------------------ numbers
    @staticmethod
    def _bounds(schema: dict, path: str) -> tuple[float | None, bool, float | None, bool]:
        lo, lo_strict, hi, hi_strict = schema.get("minimum"), False, schema.get("maximum"), False
        for key, strict_lo in (("exclusiveMinimum", True), ("exclusiveMaximum", False)):
            value = schema.get(key)
            if isinstance(value, bool):  # draft 4 booleans
                raise UnsupportedSchema(key, path, "boolean exclusive bounds (draft 4) are not supported")
            if value is None:
                continue
            if strict_lo and (lo is None or value >= lo):
                lo, lo_strict = value, True
            elif not strict_lo and (hi is None or value <= hi):
                hi, hi_strict = value, True
        return lo, lo_strict, hi, hi_strict

    def _integer(self, schema: dict, root: Any, hint: str, path: str) -> str:
        multiple = schema.get("multipleOf")
        if multiple is not None and multiple != 1:
            raise UnsupportedSchema("multipleOf", path)
        lo, lo_strict, hi, hi_strict = self._bounds(schema, path)
        if lo is None and hi is None:
            return self.primitive("integer")
        # the smallest and largest integers inside the bounds (2.5 -> 3, exclusive 2 -> 3)
        low = None if lo is None else (math.floor(lo) + 1 if lo_strict or lo != math.floor(lo) else int(lo))
        high = None if hi is None else (math.ceil(hi) - 1 if hi_strict or hi != math.ceil(hi) else int(hi))
        if low is not None and high is not None and low > high:
            raise UnsupportedSchema("minimum", path, "no integer lies between the bounds")
        for bound in (low, high):
            if bound is not None and abs(bound) >= 10 ** (INT_DIGITS - 1):
                raise UnsupportedSchema("minimum" if bound == low else "maximum", path, "bounds this large")
        return self.rule(hint, integer_range(low, high))

    def _number(self, schema: dict, root: Any, hint: str, path: str) -> str:
        if schema.get("multipleOf") is not None:
            if schema["multipleOf"] == 1:
                return self._integer(schema, root, hint, path)
            raise UnsupportedSchema("multipleOf", path)
        lo, lo_strict, hi, hi_strict = self._bounds(schema, path)
        if lo is None and hi is None:
            return self.primitive("number")
        for value, key in ((lo, "minimum"), (hi, "maximum")):
            if value is not None and (value != math.floor(value) or value < 0 or value >= 10 ** (INT_DIGITS - 1)):
                raise UnsupportedSchema(key, path, "number bounds must be whole and not negative")
        if lo is None:
            raise UnsupportedSchema("maximum", path, "a number maximum needs a minimum of 0 or more")
        low, high = int(lo), None if hi is None else int(hi)
        fraction = self.primitive("fraction")
        zeros = f'( "." "0"{{1,{FRACTION_DIGITS}}} )?'
        nonzero_fraction = f'"." [0-9]{{0,{FRACTION_DIGITS - 1}}} [1-9]'
        alternatives = []
        # the whole part strictly between the bounds' whole parts takes any fraction
        first = low + 1 if lo_strict else low
        last = None if high is None else high - 1
        if last is None or first <= last:
            alternatives.append(f"{integer_range(first, last)} {fraction}?")
        if lo_strict and (high is None or low < high):
            alternatives.append(f"{literal(str(low))} {nonzero_fraction}")
        if high is not None and not hi_strict and high >= first:
            alternatives.append(f"{literal(str(high))} {zeros}")
        if not alternatives:
            raise UnsupportedSchema("minimum", path, "no number lies between the bounds")
        return self.rule(hint, "( " + " | ".join(alternatives) + " )")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


# ------------------------------------------------------------------ shortcuts
def schema_grammar(schema: Any) -> str:
    """A grammar whose output is JSON valid against ``schema``."""
    builder = GrammarBuilder()
    return builder.build(builder.schema(schema, "answer"))


def json_object_grammar() -> str:
    """A grammar whose output is one JSON object."""
    builder = GrammarBuilder()
    return builder.build(builder.json_object())


def compile_output(output: OutputFormat) -> str:
    """The grammar for an output format: its answer's schema, a call to one of its tools (up to
    ``max_calls``, a line each), or either.  A schema feature this module cannot enforce raises
    :class:`UnsupportedOutputSchema` naming the tool (each tool's parameters converted alone to
    find it) or the answer."""
    if not output.calls:
        if output.answer == {"type": "object"}:
            return json_object_grammar()
        try:
            return schema_grammar(output.answer)
        except UnsupportedSchema as exc:
            raise UnsupportedOutputSchema(str(exc)) from None
    builder = GrammarBuilder()
    tools = list(output.calls)
    try:
        calls = builder.tool_calls(tools, multiple=output.max_calls > 1, max_calls=output.max_calls)
    except UnsupportedSchema as exc:
        raise UnsupportedOutputSchema(str(exc), tool=_failing_tool(tools)) from None
    if output.answer is None:
        return builder.build(calls)
    try:
        answer = builder.schema(output.answer, "answer")
    except UnsupportedSchema as exc:
        raise UnsupportedOutputSchema(str(exc)) from None
    return builder.build(f"{calls} | {answer}")


def _failing_tool(tools: list[tuple[str, Any]]) -> str:
    """The tool whose parameters the grammar cannot enforce (each converted alone)."""
    for name, parameters in tools:
        try:
            GrammarBuilder().schema(parameters if parameters is not None else {"type": "object"})
        except UnsupportedSchema:
            return name
    return tools[0][0]


def after_reasoning(grammar: str) -> str:
    """The grammar for output that starts after the model's reasoning: whitespace may come first
    (llama.cpp applies it lazily, from the end of the reasoning on)."""
    first, _, rest = grammar.partition("\n")
    assert first.startswith("root ::= ")
    return f"root ::= [ \\t\\n]* ( {first[len('root ::= '):]} )\n{rest}"
