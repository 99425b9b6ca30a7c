"""Run a validated request against a loaded model: resolve, load, prepare every
prompt and hand every choice to the model (so that client mistakes and a full
queue surface before any stream byte), then yield ``(choice_index, chunk)``.

A chat request with tools goes through a :class:`~shimmy_core.tools.loop.ToolPlan`: the tools
reach the prompt, tool calls in the output become tool-call chunks, and when the server runs some
of the tools itself the plan's loop takes the conversation on (model, calls, results, model...)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from shimmy_core.contract.generation import (
    Chunk,
    Finish,
    GenerationRequest,
    InvalidRequest,
    LoadedModel,
    PreparedPrompt,
    SamplingParams,
    TextDelta,
    Usage,
)
from shimmy_core.catalog import ModelCatalog, ModelManager
from shimmy_core.contract.model_info import CHAT, ModelInfo
from shimmy_core.parsed_request import ParsedRequest
from shimmy_core.contract.settings import Settings
from shimmy_core.reasoning import ReasoningParser, forced_close, split_reasoning
from shimmy_core.tools import tool_prompts
from shimmy_core.tools.toolbox import ToolBox

if TYPE_CHECKING:  # pragma: no cover
    from shimmy_core.tools.loop import ToolPlan
from shimmy_core import streams


def sequential_choices(model: LoadedModel, choices, cancelled) -> Iterator[tuple[int, Chunk]]:
    """For backends without ``generate_choices``: run the choices one after another.

    Once the request is cancelled (client gone, deadline passed) the remaining choices
    are not started: they end at once with ``length``."""
    for index, (prepared, params) in enumerate(choices):
        if cancelled():
            yield index, Finish("length")
            yield index, Usage(len(prepared.tokens), 0)
            continue
        for chunk in model.generate(prepared, params, cancelled):
            yield index, chunk


@dataclass
class Run:
    """A request that passed every check and whose choices the model has accepted."""

    parsed: ParsedRequest
    info: ModelInfo
    model: LoadedModel
    prepared: list[PreparedPrompt]
    chunks: Iterator[tuple[int, Chunk]]
    # True when the run may execute server-side tools (the request named an enabled one), or
    # did (a text-protocol tool ran): its response depends on more than the prompt.
    uses_server_tools: bool = False

    def events(self) -> Iterator[tuple[int, Chunk]]:
        """The model's chunks, with echoed prompts and each prompt's tokens counted once."""
        n, echo = self.parsed.n, self.parsed.echo
        started: set[int] = set()
        try:
            for index, chunk in self.chunks:
                if echo and index not in started:
                    started.add(index)
                    yield index, TextDelta(self.parsed.prompts[index // n].prompt or "")
                if isinstance(chunk, Usage) and index % n:
                    chunk = dataclasses.replace(chunk, prompt_tokens=0, cached_tokens=0)
                yield index, chunk
        finally:
            streams.close(self.chunks)


def _submit(model: LoadedModel, choices, cancelled) -> Iterator[tuple[int, Chunk]]:
    generate = getattr(model, "generate_choices", None)
    return generate(choices, cancelled) if generate else sequential_choices(model, choices, cancelled)


def _with_prompt_usage(chunks: Iterator[tuple[int, Chunk]], prompt_tokens: int) -> Iterator[tuple[int, Chunk]]:
    """A continuation's chunks, its usage counting the original prompt (its own prompt is that
    prompt plus what was generated before, which was counted as completion)."""
    try:
        for index, chunk in chunks:
            if isinstance(chunk, Usage):
                chunk = dataclasses.replace(chunk, prompt_tokens=prompt_tokens,
                                            cached_tokens=min(chunk.cached_tokens, prompt_tokens))
            yield index, chunk
    finally:
        streams.close(chunks)


def generate(model: LoadedModel, request: GenerationRequest, choices: list[tuple[PreparedPrompt, SamplingParams]],
             cancelled: Callable[[], bool], default_budget: int = -1) -> Iterator[tuple[int, Chunk]]:
    """Submit the choices; a thinking model's reasoning comes apart from its answer
    (:mod:`shimmy_core.reasoning`).  With one choice, its reasoning budget (the request's, else
    ``default_budget``; -1: none) is enforced: past it, the generation continues from the
    reasoning closed (the prefix cache makes that cheap)."""
    parsers = {i: ReasoningParser(p.reasoning, p.thinking) for i, (p, _) in enumerate(choices) if p.reasoning}
    if not parsers:
        return _submit(model, choices, cancelled)
    options = request.reasoning
    budget = options.budget_tokens if options is not None and options.budget_tokens is not None else default_budget
    if len(choices) != 1 or budget < 0:
        return split_reasoning(_submit(model, choices, cancelled), parsers)
    prepared, params = choices[0]

    def force(raw: str) -> Iterator[tuple[int, Chunk]]:
        left = prepared.max_tokens - parsers[0].tokens
        if left <= 0:
            return iter([(0, Finish("length")), (0, Usage(len(prepared.tokens), 0))])
        text = prepared.text + raw + forced_close(prepared.reasoning)
        following = GenerationRequest(prompt=text, params=dataclasses.replace(params, max_tokens=left), continues=True)
        again = model.prepare(following)
        return _with_prompt_usage(_submit(model, [(again, following.params)], cancelled), len(prepared.tokens))

    if budget == 0 and prepared.thinking:  # no reasoning at all: the answer is forced at once
        parsers[0].end_thinking()
        return split_reasoning(force(""), parsers)
    return split_reasoning(_submit(model, choices, cancelled), parsers, budget, force)


class CompletionService:
    def __init__(self, catalog: ModelCatalog, manager: ModelManager, settings: Settings,
                 tools: ToolBox | None = None):
        self.catalog = catalog
        self.manager = manager
        self.settings = settings
        self.tools = tools if tools is not None else ToolBox()

    def resolve(self, model_id: str) -> ModelInfo:
        """The chat model a request naming ``model_id`` gets (aliases applied; an embedding or
        rerank model is a 400)."""
        return self.catalog.resolve(model_id, CHAT)

    def _plan(self, parsed: ParsedRequest) -> ToolPlan | None:
        if parsed.tools is None:
            return None
        from shimmy_core.tools.loop import ToolPlan, ToolRequestError  # the first request with tools

        try:
            plan = ToolPlan(parsed.tools, self.tools, parsed.n)
        except ToolRequestError as exc:
            raise InvalidRequest(str(exc), param=exc.param, code=exc.code) from None
        return plan if plan.active else None

    @staticmethod
    def _requests(parsed: ParsedRequest, plan: ToolPlan | None, native: bool) -> list[GenerationRequest]:
        """The first step's request of each prompt: the tools (and earlier calls) in it, as the
        model takes them."""
        requests: list[GenerationRequest] = list(parsed.prompts)
        if plan is not None:
            return [plan.step_request(r, list(r.messages or ()), plan.first_choice, native, text_tools=True)
                    for r in requests]
        if not native:  # earlier calls and results, written as text for a template without tools
            return [dataclasses.replace(r, messages=tuple(tool_prompts.generic_messages(r.messages, None)))
                    if r.messages and tool_prompts.needs_rewrite(r.messages) else r for r in requests]
        return requests

    def count_tokens(self, parsed: ParsedRequest) -> int:
        """The tokens the prompts of ``parsed`` take, tools included, exactly as :meth:`start` would
        send them; nothing is generated (the model is loaded to tokenize)."""
        model = self.manager.get(self.resolve(parsed.model))
        requests = self._requests(parsed, self._plan(parsed), bool(getattr(model, "renders_tools", False)))
        return sum(len(model.prepare(request).tokens) for request in requests)

    def start(self, parsed: ParsedRequest, disconnected: Callable[[], bool] = lambda: False,
              info: ModelInfo | None = None) -> Run:
        """Start a run; ``info`` is the model when the caller has resolved it already."""
        info = info or self.resolve(parsed.model)
        model = self.manager.get(info)
        plan = self._plan(parsed)
        native = bool(getattr(model, "renders_tools", False))
        requests = self._requests(parsed, plan, native)
        prepared = [model.prepare(request) for request in requests]
        deadline = time.monotonic() + self.settings.request_timeout

        def cancelled() -> bool:
            return disconnected() or time.monotonic() > deadline

        choices: list[tuple[PreparedPrompt, SamplingParams]] = []
        for request, prompt in zip(requests, prepared):
            for c in range(parsed.n):
                params = request.params
                if params.seed is not None and c:
                    params = dataclasses.replace(params, seed=params.seed + c)
                choices.append((prompt, params))
        budget = self.settings.reasoning_budget
        chunks = generate(model, requests[0], choices, cancelled, budget)
        run = Run(parsed, info, model, prepared, chunks, uses_server_tools=bool(plan and plan.server))
        if plan is not None and plan.loops:
            def step(request: GenerationRequest) -> Iterator[tuple[int, Chunk]]:
                return generate(model, request, [(model.prepare(request), request.params)], cancelled, budget)

            def executed() -> None:
                run.uses_server_tools = True

            run.chunks = plan.loop(chunks, parsed.prompts[0], step, native, deadline, executed)
        elif plan is not None:
            from shimmy_core.tools.loop import with_tool_calls

            run.chunks = with_tool_calls(chunks, lambda: plan.parser(plan.first_choice))
        return run
