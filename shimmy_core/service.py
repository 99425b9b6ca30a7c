"""Run a validated request against a loaded model: resolve, load, prepare every
prompt and hand every choice to the model (so that client mistakes and a full
queue surface before any stream byte), then yield ``(choice_index, chunk)``."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from shimmy_core.backend import Chunk, Finish, LoadedModel, PreparedPrompt, SamplingParams, TextDelta, Usage
from shimmy_core.models import ModelCatalog, ModelInfo, ModelManager
from shimmy_core.openai_api.errors import model_not_found
from shimmy_core.openai_api.requests import ParsedRequest
from shimmy_core.settings import Settings


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
            close = getattr(self.chunks, "close", None)
            if close is not None:
                close()


class CompletionService:
    def __init__(self, catalog: ModelCatalog, manager: ModelManager, settings: Settings):
        self.catalog = catalog
        self.manager = manager
        self.settings = settings

    def resolve(self, model_id: str) -> ModelInfo:
        info = self.catalog.get(model_id)
        if info is None:
            raise model_not_found(model_id)
        return info

    def start(self, parsed: ParsedRequest, disconnected: Callable[[], bool] = lambda: False) -> Run:
        info = self.resolve(parsed.model)
        model = self.manager.get(info)
        prepared = [model.prepare(request) for request in parsed.prompts]
        deadline = time.monotonic() + self.settings.request_timeout

        def cancelled() -> bool:
            return disconnected() or time.monotonic() > deadline

        choices: list[tuple[PreparedPrompt, SamplingParams]] = []
        for request, prompt in zip(parsed.prompts, prepared):
            for c in range(parsed.n):
                params = request.params
                if params.seed is not None and c:
                    params = dataclasses.replace(params, seed=params.seed + c)
                choices.append((prompt, params))
        generate = getattr(model, "generate_choices", None)
        chunks = generate(choices, cancelled) if generate else sequential_choices(model, choices, cancelled)
        return Run(parsed, info, model, prepared, chunks)
