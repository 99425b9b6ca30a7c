"""Validate bodies against the official OpenAI OpenAPI schemas with jsonschema.

OpenAPI 3.0's ``nullable: true`` means "null allowed"; JSON Schema ignores it,
so it is rewritten into ``anyOf [..., {"type": "null"}]`` first.
"""

from __future__ import annotations

import copy

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


def _nullable(node):
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


class SchemaChecker:
    def __init__(self, spec: dict):
        doc = _nullable(copy.deepcopy(spec))
        self.registry = Registry().with_resource("urn:openai", Resource(contents=doc, specification=DRAFT202012))
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    def validate(self, body: dict, name: str) -> None:
        validator = self._validators.get(name)
        if validator is None:
            schema = {"$ref": f"urn:openai#/components/schemas/{name}"}
            validator = jsonschema.Draft202012Validator(schema, registry=self.registry)
            self._validators[name] = validator
        validator.validate(body)
