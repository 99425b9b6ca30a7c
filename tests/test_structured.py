"""Structured output: JSON Schema to GBNF.

Every grammar is checked three ways: llama.cpp parses it; strings sampled at random from it (by a
small GBNF sampler here) are JSON that validates against the schema; integer ranges match exactly
the integers they should.  Features a grammar cannot enforce raise an error naming them, which a
request gets as a 400.  End to end, SmolLM2 answers ``json_object`` and ``json_schema`` requests
with valid JSON."""

from __future__ import annotations

import json
import random
import re
import zlib

import jsonschema
import openai
import pytest

from shimmy_plugins.backends.gguf.gbnf import (
    GrammarBuilder,
    UnsupportedSchema,
    integer_range,
    json_object_grammar,
    schema_grammar,
)
from tests.conftest import MODEL_ID
from tests.test_function_calling import ASK, grammar_of, make_api  # noqa: F401  (fixture)


# ------------------------------------------------------------------ a GBNF sampler
class TooDeep(Exception):
    pass


_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\[(?:[^\]\\]|\\.)*\])|([a-zA-Z0-9-]+)|(\{\d+(?:,\d*)?\})|(.))')
_POOL = [chr(c) for c in range(0x20, 0x7F)] + ["é", "ü", "中", "😀"]


def _unescape(body: str) -> list[str]:
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]
            if nxt == "x":
                out.append(chr(int(body[i + 2:i + 4], 16)))
                i += 4
                continue
            out.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return out


def _class_chars(body: str) -> list[tuple[str, bool]]:
    """The characters of a class body, each with whether it was escaped."""
    out, i = [], 0
    while i < len(body):
        if body[i] == "\\":
            if body[i + 1] == "x":
                out.append((chr(int(body[i + 2:i + 4], 16)), True))
                i += 4
            else:
                out.append(({"n": "\n", "r": "\r", "t": "\t"}.get(body[i + 1], body[i + 1]), True))
                i += 2
        else:
            out.append((body[i], False))
            i += 1
    return out


class Gbnf:
    """Parses the GBNF this project writes and samples strings from it."""

    def __init__(self, text: str):
        self.rules = {}
        for line in text.strip().splitlines():
            name, body = line.split(" ::= ", 1)
            self.tokens = [t for t in _TOKEN.findall(body)]
            self.pos = 0
            self.rules[name] = self._alt()
            assert self.pos == len(self.tokens), (line, self.tokens[self.pos:])

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _alt(self):
        seqs = [self._seq()]
        while self._peek() and self._peek()[4] == "|":
            self.pos += 1
            seqs.append(self._seq())
        return ("alt", seqs)

    def _seq(self):
        items = []
        while self._peek() and self._peek()[4] not in ("|", ")"):
            items.append(self._postfix(self._atom()))
        return ("seq", items)

    def _atom(self):
        lit, cls, ident, _, other = self._peek()
        self.pos += 1
        if lit:
            return ("lit", "".join(_unescape(lit[1:-1])))
        if cls:
            inner = cls[1:-1]
            negate = inner.startswith("^")
            chars = _class_chars(inner[1:] if negate else inner)
            ranges, i = [], 0
            while i < len(chars):
                if i + 2 < len(chars) and chars[i + 1] == ("-", False):
                    ranges.append((chars[i][0], chars[i + 2][0]))
                    i += 3
                else:
                    ranges.append((chars[i][0], chars[i][0]))
                    i += 1
            return ("cls", negate, ranges)
        if ident:
            return ("ref", ident)
        assert other == "(", other
        node = self._alt()
        assert self._peek()[4] == ")"
        self.pos += 1
        return node

    def _postfix(self, node):
        while self._peek():
            tok = self._peek()
            if tok[4] in ("?", "*", "+"):
                self.pos += 1
                node = ("rep", node, 1 if tok[4] == "+" else 0, 1 if tok[4] == "?" else None)
            elif tok[3]:
                self.pos += 1
                lo, _, hi = tok[3][1:-1].partition(",")
                node = ("rep", node, int(lo), int(lo) if "," not in tok[3] else (int(hi) if hi else None))
            else:
                break
        return node

    def sample(self, rng: random.Random, rule: str = "root") -> str:
        for _ in range(200):
            try:
                return self._gen(("ref", rule), rng, 0)
            except TooDeep:
                continue
        raise AssertionError("could not sample")

    def _gen(self, node, rng, depth) -> str:
        if depth > 80:
            raise TooDeep
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "ref":
            return self._gen(self.rules[node[1]], rng, depth + 1)
        if kind == "seq":
            return "".join(self._gen(item, rng, depth + 1) for item in node[1])
        if kind == "alt":
            return self._gen(rng.choice(node[1]), rng, depth + 1)
        if kind == "rep":
            _, sub, lo, hi = node
            count = lo
            while (hi is None or count < hi) and rng.random() < 0.5:
                count += 1
            return "".join(self._gen(sub, rng, depth + 1) for _ in range(count))
        _, negate, ranges = node
        inside = lambda ch: any(a <= ch <= b for a, b in ranges)  # noqa: E731
        if negate:
            return rng.choice([ch for ch in _POOL if not inside(ch)])
        a, b = rng.choice(ranges)
        return chr(rng.randint(ord(a), ord(b)))

    def regex(self, node) -> str:
        """A Python regex for a rule without references (to check integer ranges exactly)."""
        kind = node[0]
        if kind == "lit":
            return re.escape(node[1])
        if kind == "seq":
            return "".join(self.regex(i) for i in node[1])
        if kind == "alt":
            return "(?:" + "|".join(self.regex(s) for s in node[1]) + ")"
        if kind == "rep":
            _, sub, lo, hi = node
            return f"(?:{self.regex(sub)}){{{lo},{'' if hi is None else hi}}}"
        if kind == "cls":
            _, negate, ranges = node
            return "[" + ("^" if negate else "") + "".join(
                re.escape(a) if a == b else f"{re.escape(a)}-{re.escape(b)}" for a, b in ranges) + "]"
        raise AssertionError(kind)


def check_samples(schema, grammar: str, n: int = 60, seed: int = 0) -> list:
    gbnf = Gbnf(grammar)
    rng = random.Random(seed)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    values = []
    for _ in range(n):
        text = gbnf.sample(rng)
        value = json.loads(text)
        errors = [e.message for e in validator.iter_errors(value) if e.validator != "format" or
                  e.schema.get("format") not in ("date", "date-time")]  # days per month: shape only
        assert not errors, (text, errors)
        values.append(value)
    return values


# ------------------------------------------------------------------ llama.cpp accepts the grammars
@pytest.fixture(scope="module")
def llama_accepts(smollm2_path):
    """``llama_accepts(grammar)``: llama.cpp's own parser (the model's vocabulary only is loaded)."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(smollm2_path), params=params, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(model.model)

    def accepts(grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    yield accepts
    model.close()


SCHEMAS = {
    "object": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "ok": {"type": "boolean"},
        "none": {"type": "null"},
    }, "required": ["name", "age"], "additionalProperties": False},
    "all_optional": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                                      "c": {"const": [1, {"x": None}]}}},
    "recursive": {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["value", "children"]}}, "$ref": "#/$defs/node"},
    "union": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 1000}, {"type": "null"}]},
    "one_of_types": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "number"}}]},
    "type_list": {"type": ["string", "boolean"]},
    "tuple": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
    "min_items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "map": {"type": "object", "additionalProperties": {"type": "integer", "maximum": -5}},
    "any_object": {"type": "object"},
    "any": {},
    "formats": {"type": "object", "properties": {
        "d": {"type": "string", "format": "date"}, "t": {"type": "string", "format": "date-time"},
        "u": {"type": "string", "format": "uuid"}, "ip": {"type": "string", "format": "ipv4"},
        "e": {"type": "string", "format": "email"}}, "required": ["d", "t", "u", "ip", "e"]},
    "pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}(x|yz)?$"},
        "quoted": {"type": "string", "pattern": '^a"b\\\\c\\n[^a-z]+.$'},
        "word": {"type": "string", "pattern": "\\w+\\s\\W"},
        "negated": {"type": "string", "pattern": "^\\D\\S[^\\w\\s][^a-z]$"}},
        "required": ["code", "quoted", "word", "negated"]},
    "strict_openai": {"type": "object", "properties": {
        "steps": {"type": "array", "items": {"type": "object", "properties": {
            "explanation": {"type": "string"}, "output": {"type": "string"}},
            "required": ["explanation", "output"], "additionalProperties": False}},
        "final_answer": {"type": "string"}}, "required": ["steps", "final_answer"], "additionalProperties": False},
    "pydantic_optional": {"properties": {"x": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None,
                                               "title": "X"}}, "title": "Model", "type": "object"},
    "single_all_of": {"allOf": [{"$ref": "#/definitions/p"}], "definitions": {"p": {"type": "string", "enum": ["x"]}}},
    "required_unlisted": {"type": "object", "required": ["free"], "additionalProperties": {"type": "boolean"}},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_grammar_output_validates(name, llama_accepts):
    schema = SCHEMAS[name]
    grammar = schema_grammar(schema)
    assert llama_accepts(grammar), grammar
    check_samples(schema, grammar, n=200, seed=zlib.crc32(name.encode()))


def test_json_object_grammar(llama_accepts):
    grammar = json_object_grammar()
    assert llama_accepts(grammar)
    assert all(isinstance(v, dict) for v in check_samples({"type": "object"}, grammar, n=100))


def test_tool_call_grammar(llama_accepts):
    weather = SCHEMAS["object"]
    builder = GrammarBuilder()
    grammar = builder.build(builder.tool_calls([("get_weather", weather), ("noop", None)], multiple=True))
    assert llama_accepts(grammar)
    gbnf = Gbnf(grammar)
    rng = random.Random(1)
    decoder = json.JSONDecoder()
    for _ in range(40):
        text, calls, at = gbnf.sample(rng), [], 0
        while at < len(text):
            call, at = decoder.raw_decode(text, at)
            calls.append(call)
            assert text[at:at + 1] in ("", "\n")
            at += 1
        assert 1 <= len(calls) <= 4
        for call in calls:
            assert set(call) == {"name", "arguments"} and call["name"] in ("get_weather", "noop")
            if call["name"] == "get_weather":
                jsonschema.validate(call["arguments"], weather)
            else:
                assert isinstance(call["arguments"], dict)


@pytest.mark.parametrize("lo,hi", [(0, 9), (1, 250), (-13, 257), (7, 7), (-500, -120), (None, 42), (-42, None),
                                   (100, None), (None, None), (5, 10**6), (0, 999_999)])
def test_integer_ranges_are_exact(lo, hi):
    gbnf = Gbnf("root ::= " + integer_range(lo, hi))
    pattern = re.compile(gbnf.regex(gbnf.rules["root"]))
    for n in range(-1200, 1300):
        assert bool(pattern.fullmatch(str(n))) == ((lo is None or n >= lo) and (hi is None or n <= hi)), n
    for n in (10**6, 10**6 + 1, 123_456_789, -10**7):
        assert bool(pattern.fullmatch(str(n))) == ((lo is None or n >= lo) and (hi is None or n <= hi)), n
    assert not pattern.fullmatch("007") and not pattern.fullmatch("-0")


UNSUPPORTED = [
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "properties": {"x": {"if": {}, "then": {}}}}, "if"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "string", "format": "uri"}, "format: uri"),
    ({"type": "string", "pattern": "(?=a)b"}, "pattern"),
    ({"type": "string", "pattern": "(a)\\1"}, "pattern"),
    ({"type": "string", "pattern": "(?i)abc"}, "pattern"),
    ({"type": "number", "minimum": 0.5}, "minimum"),
    ({"type": "number", "minimum": -1}, "minimum"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a"], "maxProperties": 0}, "maxProperties"),
    ({"type": "object", "minProperties": 2}, "minProperties"),
    ({"type": "object", "properties": {"b": {}}, "patternProperties": {"^b": {"type": "string"}}}, "patternProperties"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}, "$ref"),
    ({"type": "string", "maxLength": 100000}, "maxLength"),
    (False, "false"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "minimum"),
]


@pytest.mark.parametrize("schema,feature", UNSUPPORTED, ids=[f for _, f in UNSUPPORTED])
def test_unsupported_features_are_named(schema, feature):
    with pytest.raises(UnsupportedSchema) as info:
        schema_grammar(schema)
    assert info.value.feature == feature
    assert f"'{feature}'" in str(info.value)


def test_recursion_and_shared_definitions_make_one_rule_each():
    grammar = schema_grammar(SCHEMAS["recursive"])
    assert grammar.count("ref-node ::=") == 1


# ------------------------------------------------------------------ requests
def test_response_format_reaches_the_model_as_a_grammar(make_api):  # noqa: F811
    api = make_api()
    api.model.outputs = ['{"a": 1}', '{"name": "x", "age": 3}', "plain"]
    body = api.ok(response_format={"type": "json_object"})
    assert body["choices"][0]["message"]["content"] == '{"a": 1}'
    assert grammar_of(api.model.params[-1]) == json_object_grammar()
    api.ok(response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMAS["object"],
                                                                   "strict": True}})
    assert grammar_of(api.model.params[-1]) == schema_grammar(SCHEMAS["object"])
    api.ok(response_format={"type": "text"})
    assert grammar_of(api.model.params[-1]) is None


def test_response_format_with_tools_allows_a_call_or_the_answer(make_api):  # noqa: F811
    from tests.test_function_calling import WEATHER

    api = make_api()
    api.model.outputs = ['{"name": "x", "age": 3}']
    api.ok(tools=[WEATHER], response_format={"type": "json_schema", "json_schema": {
        "name": "cat", "schema": SCHEMAS["object"]}})
    grammar = grammar_of(api.model.params[-1])
    assert grammar.startswith("root ::= call | answer") and "get_weather" in grammar


@pytest.mark.parametrize("schema,feature", [(s, f) for s, f in UNSUPPORTED if isinstance(s, dict) and
                                            not str(s.get("$ref", "")).startswith("http")][:8])
def test_unsupported_response_format_is_400_naming_the_feature(make_api, schema, feature):  # noqa: F811
    api = make_api()
    error = api.error(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert error["param"] == "response_format.json_schema.schema"
    assert error["code"] == "unsupported_schema" and f"'{feature}'" in error["message"]


@pytest.mark.parametrize("response_format,param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://127.0.0.1:9/s"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}, "response_format.json_schema.name"),
])
def test_bad_response_format_is_400(make_api, response_format, param):  # noqa: F811
    error = make_api().error(response_format=response_format)
    assert error["param"] == param, error


# ------------------------------------------------------------------ end to end over SmolLM2
@pytest.fixture(scope="module")
def smol(start_server, smollm2_path):
    srv = start_server(["--model", str(smollm2_path), "--no-demo"])
    return openai.OpenAI(base_url=srv.url, api_key="sk-local", max_retries=0, timeout=300)


def test_e2e_json_object(smol):
    r = smol.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Reply with a JSON object with the name and age of a cat."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=300)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


CAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 30},
                                        "color": {"enum": ["black", "white", "ginger", "grey"]}},
       "required": ["name", "age", "color"], "additionalProperties": False}


def test_e2e_json_schema(smol):
    r = smol.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Describe a cat."}], temperature=0, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), CAT)
    stream = smol.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Describe a cat."}], temperature=0.9, seed=5,
        max_tokens=120, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": True}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), CAT)


def test_e2e_unsupported_schema_is_400(smol):
    with pytest.raises(openai.BadRequestError) as info:
        smol.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}}}})
    assert info.value.body["code"] == "unsupported_schema" and "multipleOf" in info.value.body["message"]
