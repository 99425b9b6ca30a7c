"""Cut the part of OpenAI's OpenAPI document that the tests validate against.

The full document (github.com/openai/openai-openapi, MIT license, see LICENSE here) is
3.4 MB; the tests need only the response and stream-event schemas of the endpoints Shimmy
serves, and everything they reference.  This script keeps those schemas (closed over
``$ref``) and writes ``openapi-subset.json`` beside itself:

    python tests/openai_spec/cut_spec.py PATH/TO/openapi.json

Run it again with a newer openapi.json to refresh the subset; ROOTS lists what is kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "openapi-subset.json"
PREFIX = "#/components/schemas/"

# The schemas a test names, for every OpenAI endpoint Shimmy serves or is about to.
ROOTS = [
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionRequest",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "CreateEmbeddingRequest",
    "CreateEmbeddingResponse",
    "CreateResponse",
    "Response",
    "ResponseStreamEvent",
    "ResponseItemList",
    "TokenCountsBody",
    "TokenCountsResource",
]


def refs(node) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(PREFIX):
            found.add(ref[len(PREFIX):])
        for value in node.values():
            found |= refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= refs(value)
    return found


def cut(spec: dict, roots: list[str]) -> dict:
    schemas = spec["components"]["schemas"]
    keep: dict[str, dict] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        if name not in schemas:
            raise SystemExit(f"{name} is not a schema of this document")
        keep[name] = schemas[name]
        todo.extend(refs(schemas[name]) - keep.keys())
    info = spec.get("info", {})
    return {
        "openapi": spec.get("openapi"),
        "info": {"title": info.get("title"), "version": info.get("version"),
                 "x-cut-by": "tests/openai_spec/cut_spec.py", "x-roots": roots},
        "components": {"schemas": dict(sorted(keep.items()))},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    subset = cut(spec, ROOTS)
    OUT.write_text(json.dumps(subset, indent=1, sort_keys=False) + "\n")
    print(f"{len(subset['components']['schemas'])} schemas, {OUT.stat().st_size} bytes -> {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
