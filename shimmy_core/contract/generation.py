"""The neutral contract between the core and inference backends.

A backend loads a model into a :class:`LoadedModel`.  The core hands it a
:class:`GenerationRequest` (no HTTP, no OpenAI JSON) and receives neutral
chunks: :class:`TextDelta`, :class:`Finish` and :class:`Usage`.  The core's
tool layer (``shimmy_core.tools``) turns text that is a tool call into
:class:`ToolCallDelta` chunks and reports the tools it ran itself as
:class:`ToolExecuted`; each API dialect (``shimmy_register_dialects``) turns all of them
into its wire format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, Union, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - typing only
    from shimmy_core.contract.model_info import ModelInfo
    from shimmy_core.contract.settings import Settings


# ---------------------------------------------------------------- errors
class BackendError(Exception):
    """Base class of the errors a backend reports; the core maps them to HTTP."""


class InvalidRequest(BackendError):
    """A client mistake the request can fix (400 in every dialect); ``param`` names the field,
    ``code`` is a short machine-readable reason.  Raised by the core and by backends; each API
    dialect maps it onto its own error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidPrompt(InvalidRequest):
    """The request cannot be turned into a prompt (a client mistake, 400)."""


class UnsupportedOutputSchema(InvalidRequest):
    """A backend cannot enforce a JSON Schema of an :class:`OutputFormat`: ``tool`` names the
    function whose parameters it is (``None``: the answer's schema), ``detail`` says which
    feature and where.  Each dialect words it for its own fields."""

    def __init__(self, detail: str, tool: str | None = None):
        what = f"the parameters of function {tool!r}" if tool is not None else "the answer's schema"
        super().__init__(f"A JSON Schema feature of {what} cannot be enforced: {detail}.",
                         param=None, code="unsupported_schema")
        self.detail = detail
        self.tool = tool


class ModelNotFound(BackendError):
    """No model by that name is served here (404 in every dialect)."""

    def __init__(self, model: str):
        super().__init__(f"The model {model!r} does not exist.")
        self.model = model


class ContextLengthExceeded(InvalidPrompt):
    """The prompt (plus the requested completion) does not fit the context window.  The figures,
    where known, let a dialect word it its own way: the prompt's tokens, the completion tokens
    requested (None: the prompt alone is too long) and the context length."""

    def __init__(self, message: str, param: str | None = "messages", *, prompt_tokens: int | None = None,
                 requested: int | None = None, context_length: int | None = None):
        super().__init__(message, param=param, code="context_length_exceeded")
        self.prompt_tokens = prompt_tokens
        self.requested = requested
        self.context_length = context_length


class BackendUnavailable(BackendError):
    """The backend cannot run here (missing extra, no GPU...); the message says how to fix it."""


class ModelLoadError(BackendError):
    """The model file could not be loaded."""


class InsufficientMemory(ModelLoadError):
    """A model does not fit the memory that is free, even with the idle models unloaded; it was
    refused before anything was allocated.  The message has the numbers.  Dialects answer 507
    (Insufficient Storage); one that does not know this error answers it as a ModelLoadError."""

    def __init__(self, message: str, plan: object = None):
        super().__init__(message)
        self.plan = plan


class Overloaded(BackendError):
    """Every slot is busy and the queue is full (503 with ``Retry-After``), or a request
    waited in the queue past its deadline (``timed_out``)."""

    def __init__(self, message: str, retry_after: float = 1.0, timed_out: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.timed_out = timed_out


# ---------------------------------------------------------------- requests
PENALTY_LAST_N = 256  # generated tokens that presence and frequency penalties look back on, in every backend


@dataclass(frozen=True)
class OutputFormat:
    """What the output must be, as JSON Schema; each backend compiles it into what it samples
    under (GBNF for llama.cpp, a token mask for transformers) and raises
    :class:`UnsupportedOutputSchema` for a schema it cannot enforce, at ``prepare`` time.

    - ``answer``: the JSON Schema of the answer (``{"type": "object"}`` for any JSON object);
      ``None`` with no ``calls``: free text.
    - ``calls``: ``(name, parameters schema or None)`` pairs: the output is a tool call
      ``{"name": NAME, "arguments": {...}}`` (``name`` first) to one of them, or, when ``answer``
      is given too, either such a call or the answer.
    - ``max_calls``: up to this many calls, one per line (1: exactly one call).
    """

    answer: Any = field(default=None, hash=False)
    calls: tuple[tuple[str, Any], ...] = field(default=(), hash=False)
    max_calls: int = 1

    def key(self) -> str:
        """A text that two equal formats share (to cache what a backend compiled)."""
        return json.dumps([self.answer, [list(c) for c in self.calls], self.max_calls])


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one choice.  Defaults are OpenAI's, not llama.cpp's."""

    max_tokens: int | None = None          # None: up to the server ceiling / context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                          # llama.cpp extension; 0: off
    min_p: float = 0.0                      # llama.cpp extension; 0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    output: OutputFormat | None = None      # structured output (JSON Schema); None: free text


@dataclass(frozen=True)
class ReasoningOptions:
    """How much a thinking model thinks.  ``effort``: ``"none"`` turns thinking off through the
    template's own switch; ``"minimal"``, ``"low"``, ``"medium"``, ``"high"`` turn it on (and reach
    templates that take an effort); ``None``: the model's default.  ``budget_tokens``: most
    reasoning tokens before the answer is forced (``None``: the server's default, 0: no limit)."""

    effort: str | None = None
    budget_tokens: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt: either chat ``messages`` or a raw ``prompt``."""

    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # OpenAI function tools ({"type": "function", "function": {...}}) for the chat template's
    # ``tools`` variable.  Only set for models whose ``renders_tools`` is true (see LoadedModel);
    # for the others the core writes the tools into the messages itself.
    tools: tuple[dict, ...] | None = None
    reasoning: ReasoningOptions | None = None
    # ``prompt`` is a chat prompt rendered earlier plus what the model wrote since (the answer
    # forced after a reasoning budget): tokenized as that chat prompt was, with its stops.
    continues: bool = False


@dataclass(frozen=True)
class ReasoningSyntax:
    """How a model's template marks its reasoning: between ``open`` and ``close``; for
    templates with channels (gpt-oss) the answer starts after ``answer_start``, and what comes
    between ``close`` and it is neither reasoning nor answer."""

    open: str
    close: str
    answer_start: str = ""


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt rendered and tokenized by a loaded model, ready to generate from."""

    text: str
    tokens: tuple[int, ...]
    max_tokens: int                     # tokens this prompt may still generate
    stop: tuple[str, ...] = ()          # request stop strings plus the model's end-of-turn strings
    reasoning: ReasoningSyntax | None = None  # the model's reasoning markers (None: it does not think)
    thinking: bool = False              # the prompt ends inside the reasoning (the template opened it)


# ---------------------------------------------------------------- chunks
@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of a thinking model's reasoning, kept apart from the answer's text (the core's
    reasoning parser makes these from the model's own markers; backends emit only text)."""

    text: str


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" | "length" | "tool_calls"
    # The stop string that ended the choice (one of the prepared prompt's ``stop``: the request's
    # or the model's end-of-turn strings); None when it ended otherwise (end of generation token,
    # token limit...).  A dialect that names the stop sequence hit (Anthropic's) reads it.
    stop: str | None = None


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call of one choice, in OpenAI's streaming shape: the first delta of a
    call has its ``id`` and ``name`` (and usually empty ``arguments``), the next ones carry
    pieces of the arguments' JSON text.  ``call_index`` numbers the calls of the choice."""

    call_index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ToolExecuted:
    """A tool call the server ran itself (server-side tools), with what it returned."""

    id: str
    name: str
    arguments: str          # the JSON text the model wrote
    output: str             # what went back to the model
    is_error: bool = False  # invalid arguments, a refused or failed run


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int            # reasoning tokens included, as OpenAI counts them
    cached_tokens: int = 0
    reasoning_tokens: int = 0


Chunk = Union[TextDelta, ReasoningDelta, ToolCallDelta, ToolExecuted, Finish, Usage]


# ---------------------------------------------------------------- protocols
@runtime_checkable
class LoadedModel(Protocol):
    """A model in memory, shared by all requests for it."""

    context_length: int

    # A model whose prepare() passes ``request.tools`` to its chat template and renders
    # assistant ``tool_calls`` and ``tool`` messages itself (shimmy_core.tools.tool_prompts.render_chat
    # does both) sets ``renders_tools = True``.  Without it the core writes the tools, the calls
    # and their results into the messages as text, and leaves ``request.tools`` empty.
    #
    # ``params.output`` (an OutputFormat) must be enforced while sampling; a backend that cannot
    # enforce it refuses the request (UnsupportedOutputSchema, or InvalidPrompt) in prepare()
    # rather than ignore it.

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """Render and tokenize; raise :class:`InvalidPrompt` for client mistakes."""

    def generate(
        self, prepared: PreparedPrompt, params: SamplingParams, cancelled: Callable[[], bool]
    ) -> Iterator[Chunk]:
        """Yield :class:`TextDelta` chunks, then exactly one :class:`Finish`, then one :class:`Usage`.

        Stop strings are never part of the text.  ``cancelled()`` turning true
        (client gone, deadline passed) ends generation at the next token.
        """

    # A backend that runs several sequences at once also implements
    #   generate_choices(choices: Sequence[tuple[PreparedPrompt, SamplingParams]], cancelled)
    #       -> Iterator[tuple[int, Chunk]]
    # which accepts (or refuses with Overloaded) every choice of a request before it
    # returns, and yields (choice index, chunk) pairs as the choices progress.
    # Without it the core runs the choices one after another through generate().

    def close(self) -> None:
        """Free the model's memory."""


@runtime_checkable
class Backend(Protocol):
    name: str
    formats: Sequence[str]

    def unavailable_reason(self) -> str | None:
        """``None`` when usable here, else a message naming the fix (e.g. the pip command)."""

    def load(self, model: "ModelInfo", settings: "Settings") -> LoadedModel:
        """Load ``model``; raise :class:`ModelLoadError` or :class:`BackendUnavailable`.

        A backend may also take ``plan`` (where the memory planner put the model, when the
        backend has ``memory_facts``) and ``progress``: a callable the core passes only to a
        ``load`` that names it, to be called with the fraction loaded so far (0.0 to 1.0) as
        the load goes, from any thread.  It returns nothing, raises nothing and knows nothing of
        terminals: the core decides what to show (a bar on stderr for loads over a second)."""


class ChoicesModel:
    """Base for loaded models that implement ``generate_choices``: ``generate`` is one choice of it."""

    def generate(
        self, prepared: PreparedPrompt, params: SamplingParams, cancelled: Callable[[], bool]
    ) -> Iterator[Chunk]:
        return (chunk for _, chunk in self.generate_choices([(prepared, params)], cancelled))
