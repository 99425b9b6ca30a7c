"""Everything a Shimmy plugin may use, in one module.

A plugin, built in (``plugins/``) or installed with pip, imports from here and from nowhere
else in Shimmy: the hook marker, the types the hooks exchange (:mod:`shimmy_core.contract`),
and the shared mechanisms a backend, a discovery source or an API dialect builds on (chat
templates, prompt building, stop strings, file scanning, the tool runtime, the neutral request
and the generation flow of a dialect's routes).  What is not named here is
internal and may change without notice; an import-linter contract in ``pyproject.toml``
keeps the built-in plugins to this module.
"""

from __future__ import annotations

from shimmy_core.admission import await_slot, check_room
from shimmy_core.chat_template import (
    BUILTIN_TEMPLATES,
    CHATML_FALLBACK,
    ChatTemplate,
    TemplateError,
    template_stop_strings,
)
from shimmy_core.choice_text import ChoiceText
from shimmy_core.contract.dialect import Dialect, HTTPRefusal
from shimmy_core.contract.embedding import EmbeddingInput, EmbeddingModel, Embeddings, RerankModel, RerankScores
from shimmy_core.contract.embedding import WrongModelKind
from shimmy_core.contract.generation import (
    Backend,
    BackendError,
    BackendUnavailable,
    ChoicesModel,
    Chunk,
    ContextLengthExceeded,
    Finish,
    GenerationRequest,
    InsufficientMemory,
    InvalidPrompt,
    InvalidRequest,
    LoadedModel,
    ModelLoadError,
    ModelNotFound,
    OutputFormat,
    Overloaded,
    PENALTY_LAST_N,
    PreparedPrompt,
    ReasoningDelta,
    ReasoningOptions,
    ReasoningSyntax,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    UnsupportedOutputSchema,
    ToolExecuted,
    TopLogprob,
    Usage,
)
from shimmy_core.contract.hookspecs import PROJECT, hookimpl
from shimmy_core.contract.memory import DENSE, EXPERT, INPUT, MemoryFacts, OUTPUT, Plan, WeightTensor
from shimmy_core.contract.model_formats import HeaderCache, ModelFacts, ModelFormat, Recognized, Skip
from shimmy_core.contract.model_info import (
    CHAT,
    DEFAULT_PRIORITY,
    EMBEDDING_KIND,
    MODEL_KINDS,
    RERANK,
    DiscoveryResult,
    DiscoverySource,
    ModelInfo,
    SkippedFile,
)
from shimmy_core.contract.settings import Settings
from shimmy_core.embedding_inputs import InputTokens
from shimmy_core.embedding_service import EmbeddingResult, EmbeddingService, RerankResult
from shimmy_core.discovery import (
    ADAPTER,
    CORRUPT,
    DIFFUSION,
    EMBEDDING,
    INCOMPLETE,
    MISSING,
    NOT_A_MODEL,
    PICKLE_REFUSAL,
    PROJECTOR,
    SPEECH,
    UNSUPPORTED,
    VISION,
    Found,
    Scanner,
    add_all,
    add_named,
    missing_skip,
    oserror_skip,
    read_json,
    stat_key,
)
from shimmy_core.formatting import human_size
from shimmy_core.http.dialect_kit import DialectServer, Generation, read_body, send_stream
from shimmy_core.http.errors import neutral_error
from shimmy_core.http.request_checks import check_body, check_strings, check_text, parse_json
from shimmy_core.parsed_request import ParsedRequest
from shimmy_core.prompt_builder import PromptBuilder
from shimmy_core.registered_models import RegistryError, load_entries, registry_path
from shimmy_core.stops import StopScanner
from shimmy_core.streams import with_heartbeat
from shimmy_core.tools.calculator import evaluate, format_number
from shimmy_core.tools.files import FileReader
from shimmy_core.tools.http_client import HttpPolicy, RequestRefused, fetch
from shimmy_core.tools.schemas import errors as schema_errors
from shimmy_core.tools.loop import RequestedTool, ToolRequest
from shimmy_core.tools.schemas import check_schema, json_path, pattern_search, SchemaProblem, validator_for
from shimmy_core.tools.specs import ToolError
from shimmy_core.tools.tool_prompts import template_supports_tools

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
    "neutral_error", "read_body", "send_stream", "with_heartbeat", "parse_json", "check_body", "check_text", "check_strings",
    # prompts
    "BUILTIN_TEMPLATES", "CHATML_FALLBACK", "ChatTemplate", "TemplateError", "template_stop_strings",
    "PromptBuilder", "StopScanner", "ChoiceText", "template_supports_tools", "human_size",
    # tools
    # JSON Schema (what a backend compiling an OutputFormat may need)
    "check_schema", "json_path", "pattern_search", "schema_errors", "SchemaProblem", "validator_for",
    "FileReader", "HttpPolicy", "RequestRefused", "ToolError", "evaluate", "fetch", "format_number",
]
