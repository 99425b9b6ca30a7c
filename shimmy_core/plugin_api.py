"""Everything a Shimmy plugin may use, in one module.

A plugin, built in (``plugins/``) or installed with pip, imports from here and from nowhere
else in Shimmy: the hook marker, the types the hooks exchange (:mod:`shimmy_core.contract`),
and the shared mechanisms a backend, a discovery source or an API dialect builds on (chat
templates, prompt building, stop strings, file scanning, the tool runtime, the neutral request
and the generation flow of a dialect's routes).  What is not named here is
internal and may change without notice; an import-linter contract in ``pyproject.toml``
keeps the built-in plugins to this module.

The names are imported when first used (PEP 562), so that loading a plugin costs only what it
uses: a dialect that never renders a chat template does not import Jinja, and ``shimmy serve``
answers sooner (bench/ready_bench.py).
"""

from __future__ import annotations

import importlib
from typing import Any

# Where each public name lives ("public=internal" where the names differ).
_SOURCES = {
    "shimmy_core.admission": "await_slot check_room",
    "shimmy_core.chat_template": "BUILTIN_TEMPLATES CHATML_FALLBACK ChatTemplate TemplateError template_stop_strings",
    "shimmy_core.choice_text": "ChoiceText",
    "shimmy_core.contract.dialect": "Dialect HTTPRefusal",
    "shimmy_core.contract.embedding": "EmbeddingInput EmbeddingModel Embeddings RerankModel RerankScores WrongModelKind",
    "shimmy_core.contract.generation": (
        "Backend BackendError BackendUnavailable ChoicesModel Chunk ContextLengthExceeded Finish "
        "GenerationRequest InsufficientMemory InvalidPrompt InvalidRequest LoadedModel "
        "ModelLoadError ModelNotFound OutputFormat Overloaded PENALTY_LAST_N PreparedPrompt "
        "ReasoningDelta ReasoningOptions ReasoningSyntax SamplingParams TextDelta TokenLogprob "
        "ToolCallDelta UnsupportedOutputSchema ToolExecuted TopLogprob Usage"
    ),
    "shimmy_core.contract.hookspecs": "PROJECT hookimpl",
    "shimmy_core.contract.memory": "DENSE EXPERT INPUT MemoryFacts OUTPUT Plan WeightTensor",
    "shimmy_core.contract.model_formats": "HeaderCache ModelFacts ModelFormat Recognized Skip",
    "shimmy_core.contract.model_info": (
        "CHAT DEFAULT_PRIORITY EMBEDDING_KIND MODEL_KINDS RERANK DiscoveryResult DiscoverySource "
        "ModelInfo SkippedFile"
    ),
    "shimmy_core.contract.settings": "Settings",
    "shimmy_core.embedding_inputs": "InputTokens",
    "shimmy_core.embedding_service": "EmbeddingResult EmbeddingService RerankResult",
    "shimmy_core.discovery": (
        "ADAPTER CORRUPT DIFFUSION EMBEDDING INCOMPLETE MISSING NOT_A_MODEL PICKLE_REFUSAL "
        "PROJECTOR SPEECH UNSUPPORTED VISION Found Scanner add_all add_named missing_skip "
        "oserror_skip read_json stat_key"
    ),
    "shimmy_core.formatting": "human_size",
    "shimmy_core.http.dialect_kit": "DialectServer Generation read_body send_stream",
    "shimmy_core.http.errors": "neutral_error",
    "shimmy_core.http.request_checks": "BodySchema check_body check_strings check_text parse_json",
    "shimmy_core.parsed_request": "ParsedRequest",
    "shimmy_core.tools.requested": "RequestedTool ToolRequest",
    "shimmy_core.prompt_builder": "PromptBuilder",
    "shimmy_core.registered_models": "RegistryError load_entries registry_path",
    "shimmy_core.stops": "StopScanner",
    "shimmy_core.streams": "with_heartbeat",
    "shimmy_core.tools.calculator": "evaluate format_number",
    "shimmy_core.tools.files": "FileReader",
    "shimmy_core.tools.http_client": "HttpPolicy RequestRefused fetch",
    "shimmy_core.tools.schemas": "schema_errors=errors check_schema json_path pattern_search SchemaProblem validator_for",
    "shimmy_core.tools.errors": "ToolError",
    "shimmy_core.tools.tool_prompts": "template_supports_tools",
}
_WHERE: dict[str, tuple[str, str]] = {}
for _module, _names in _SOURCES.items():
    for _name in _names.split():
        _public, _, _internal = _name.partition("=")
        _WHERE[_public] = (_module, _internal or _public)


def __getattr__(name: str) -> Any:
    try:
        module, internal = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), internal)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    # hooks
    "PROJECT", "hookimpl",
    # models and discovery
    "DEFAULT_PRIORITY", "DiscoveryResult", "DiscoverySource", "ModelInfo", "SkippedFile",
    "Found", "ModelFacts", "Scanner", "Skip", "add_all", "add_named", "read_json",
    "RegistryError", "load_entries", "registry_path",
    # model formats (shimmy_register_formats) and the skip categories they answer with
    "HeaderCache", "ModelFormat", "Recognized", "missing_skip", "oserror_skip", "stat_key", "PICKLE_REFUSAL",
    "ADAPTER", "CORRUPT", "DIFFUSION", "EMBEDDING", "INCOMPLETE", "MISSING", "NOT_A_MODEL", "PROJECTOR", "SPEECH",
    "UNSUPPORTED", "VISION",
    # backends: requests, chunks, errors
    "Backend", "LoadedModel", "ChoicesModel", "GenerationRequest", "SamplingParams", "OutputFormat", "PENALTY_LAST_N",
    "PreparedPrompt", "Chunk", "ReasoningDelta", "ReasoningOptions", "ReasoningSyntax",
    "TextDelta", "Finish", "Usage", "TokenLogprob", "TopLogprob", "ToolCallDelta", "ToolExecuted",
    "BackendError", "BackendUnavailable", "ContextLengthExceeded", "InvalidPrompt", "InvalidRequest", "ModelLoadError", "Overloaded",
    "UnsupportedOutputSchema", "InsufficientMemory",
    "ModelNotFound", "Settings", "await_slot", "check_room",
    # embedding and rerank models: what a model is for, what they implement, their results
    "CHAT", "EMBEDDING_KIND", "RERANK", "MODEL_KINDS", "EmbeddingInput", "EmbeddingModel", "Embeddings",
    "RerankModel", "RerankScores", "WrongModelKind", "EmbeddingService", "EmbeddingResult", "RerankResult",
    "InputTokens",
    # memory and placement (a backend's memory_facts, the plan its load receives)
    "MemoryFacts", "WeightTensor", "Plan", "INPUT", "OUTPUT", "DENSE", "EXPERT",
    # API dialects: the neutral request, the generation flow of a route, errors
    "Dialect", "DialectServer", "Generation", "HTTPRefusal", "ParsedRequest", "RequestedTool", "ToolRequest",
    "neutral_error", "read_body", "send_stream", "with_heartbeat", "parse_json", "BodySchema", "check_body", "check_text", "check_strings",
    # prompts
    "BUILTIN_TEMPLATES", "CHATML_FALLBACK", "ChatTemplate", "TemplateError", "template_stop_strings",
    "PromptBuilder", "StopScanner", "ChoiceText", "template_supports_tools", "human_size",
    # tools
    # JSON Schema (what a backend compiling an OutputFormat may need)
    "check_schema", "json_path", "pattern_search", "schema_errors", "SchemaProblem", "validator_for",
    "FileReader", "HttpPolicy", "RequestRefused", "ToolError", "evaluate", "fetch", "format_number",
]
