"""The SafeTensors backend's output-format compiler (safetensors_constraints): the Lark grammar it
writes, and what llguidance then lets SmolLM2's tokenizer write, token by token (no model loaded)."""

from __future__ import annotations

import json

import pytest

from shimmy_core.contract.generation import OutputFormat, UnsupportedOutputSchema
from tests.conftest import safetensors_missing

pytestmark = pytest.mark.skipif(safetensors_missing() is not None, reason=str(safetensors_missing()))

END = 2  # SmolLM2's <|im_end|>
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
           "required": ["city"], "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}}}
CALLS = (("get_weather", WEATHER), ("get_time", None))


@pytest.fixture(scope="module")
def constraints(safetensors_model_path):
    from transformers import AutoTokenizer

    from shimmy_plugins.backends.safetensors.safetensors_constraints import OutputConstraints

    tokenizer = AutoTokenizer.from_pretrained(str(safetensors_model_path))
    return tokenizer, OutputConstraints(tokenizer, {END}, 49152)


def allows(constraints, output: OutputFormat, text: str, after: str | None = None) -> bool:
    """Whether the grammar lets the model write ``text`` (as the tokenizer splits it) and then end."""
    import torch

    tokenizer, compiled = constraints
    matcher = compiled.constraint(output, after)
    for token in tokenizer.encode(text, add_special_tokens=False):
        if matcher.mask(torch.zeros(49152))[token] != 0:
            return False
        matcher.advance(token)
    return bool(matcher.mask(torch.zeros(49152))[END] == 0)


def test_refs_move_with_the_parameters_and_values_stay():
    from shimmy_plugins.backends.safetensors.safetensors_constraints import call_schema

    schema = call_schema("f", {"properties": {"$ref": {"$ref": "#/$defs/a"}, "self": {"$ref": "#"}},
                               "const": {"$ref": "#/kept"}, "items": [{"$ref": "#anchor"}]})
    assert list(schema["properties"]) == ["name", "arguments"] and schema["additionalProperties"] is False
    arguments = schema["properties"]["arguments"]
    assert arguments["properties"]["$ref"] == {"$ref": "#/properties/arguments/$defs/a"}
    assert arguments["properties"]["self"] == {"$ref": "#/properties/arguments"}
    assert arguments["const"] == {"$ref": "#/kept"} and arguments["items"] == [{"$ref": "#anchor"}]


def test_grammar_shapes():
    from shimmy_plugins.backends.safetensors.safetensors_constraints import output_grammar

    assert output_grammar(OutputFormat({"type": "object"})).startswith("start: answer\nanswer: %json {")
    calls = output_grammar(OutputFormat(calls=CALLS, max_calls=4)).splitlines()
    assert calls[:3] == ["start: calls", 'calls: call ("\\n" call){0,3}', "call: call_0 | call_1"]
    assert output_grammar(OutputFormat({"type": "object"}, calls=CALLS)).splitlines()[:2] == \
        ["start: calls | answer", "calls: call"]


def test_calls_name_first_with_valid_arguments(constraints):
    one = OutputFormat(calls=CALLS)
    assert allows(constraints, one, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}')
    assert allows(constraints, one, '{"name": "get_time", "arguments": {"any": [1, {"x": null}]}}')
    assert not allows(constraints, one, '{"arguments": {}, "name": "get_time"}')
    assert not allows(constraints, one, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}')
    assert not allows(constraints, one, '{"name": "other", "arguments": {}}')
    assert not allows(constraints, one, '{"name": "get_time", "arguments": {}, "id": 1}')
    two = '{"name": "get_time", "arguments": {}}\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
    assert not allows(constraints, one, two)
    assert allows(constraints, OutputFormat(calls=CALLS, max_calls=2), two)
    assert not allows(constraints, OutputFormat(calls=CALLS, max_calls=2), two + "\n" + two.split("\n")[0])


def test_answer_or_calls_and_one_line_json(constraints):
    either = OutputFormat({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                          calls=CALLS)
    assert allows(constraints, either, '{"n": 3}')
    assert allows(constraints, either, '{"name": "get_time", "arguments": {}}')
    assert not allows(constraints, either, '{"m": 3}')
    answer = OutputFormat({"type": "object"})
    assert allows(constraints, answer, '{"a": [1, 2], "b": "x"}')
    for loose in ('{"a":1}', '{"a": 1,"b": 2}', '{ "a": 1}', '{"a": 1}\n', '\n{"a": 1}', '{"a": 1} '):
        assert not allows(constraints, answer, loose), loose


def test_refusals_name_the_answer_or_the_tool(constraints):
    _, compiled = constraints
    with pytest.raises(UnsupportedOutputSchema) as info:
        compiled.check(OutputFormat({"type": "string", "format": "uri-reference"}))
    assert info.value.tool is None and info.value.detail == "Unknown format: uri-reference"
    with pytest.raises(UnsupportedOutputSchema) as info:
        compiled.check(OutputFormat(calls=CALLS + (("tags", {"type": "array", "uniqueItems": True}),)))
    assert info.value.tool == "tags" and info.value.detail == 'Unimplemented keys: ["uniqueItems"]'
    with pytest.raises(UnsupportedOutputSchema) as info:
        compiled.check(OutputFormat(calls=(("f", False),)))
    assert info.value.tool == "f"


def test_a_broken_matcher_is_a_constraint_error():
    import torch

    from shimmy_plugins.backends.safetensors.safetensors_constraints import ConstraintError, TokenConstraint

    class Stuck:  # a mask with no token allowed
        def compute_bitmask(self):
            return bytes(8)

        def is_error(self):
            return False

    with pytest.raises(ConstraintError, match="allows no token"):
        TokenConstraint(Stuck()).mask(torch.zeros(64))


def test_without_llguidance_a_format_is_a_clear_503(constraints, monkeypatch):
    from shimmy_core.contract.generation import BackendUnavailable
    from shimmy_plugins.backends.safetensors.safetensors_constraints import OutputConstraints

    monkeypatch.setitem(__import__("sys").modules, "llguidance.hf", None)
    with pytest.raises(BackendUnavailable, match=r"needs llguidance .*pip install 'shimmy-server\[safetensors\]'"):
        OutputConstraints(constraints[0], {END}, 49152).check(OutputFormat({"type": "object"}))


def test_after_a_thought_only_the_answer_is_constrained(constraints):
    answer = OutputFormat({"type": "object"})
    assert allows(constraints, answer, 'I think <b> and {not json.\n</think>\n\n{"a": 1}', after="</think>")
    assert allows(constraints, answer, '</think>{"a": 1}', after="</think>")
    assert not allows(constraints, answer, 'thinking </think> not json', after="</think>")
    assert not allows(constraints, answer, 'never closed', after="</think>")
    assert not allows(constraints, answer, 'I think.</think>{"a": 1}')  # without after: JSON from the start
