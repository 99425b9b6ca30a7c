"""Run a validated request against a loaded model: resolve, load, prepare every
prompt (so that client mistakes surface before any stream byte), then generate
each choice and yield ``(choice_index, chunk)`` pairs."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from shimmy_core.backend import Chunk, LoadedModel, PreparedPrompt, TextDelta, Usage
from shimmy_core.models import ModelCatalog, ModelInfo, ModelManager
from shimmy_core.openai_api.errors import model_not_found
from shimmy_core.openai_api.requests import ParsedRequest
from shimmy_core.settings import Settings


@dataclass
class Run:
    """A request that passed every check; :meth:`events` generates it."""

    parsed: ParsedRequest
    info: ModelInfo
    model: LoadedModel
    prepared: list[PreparedPrompt]
    deadline: float

    def events(self, disconnected: Callable[[], bool] = lambda: False) -> Iterator[tuple[int, Chunk]]:
        """Generate every choice in turn; stop early when the client goes away."""
        parsed = self.parsed

        def cancelled() -> bool:
            return disconnected() or time.monotonic() > self.deadline

        for p, (request, prepared) in enumerate(zip(parsed.prompts, self.prepared)):
            for c in range(parsed.n):
                index = p * parsed.n + c
                params = request.params
                if params.seed is not None and c:
                    params = dataclasses.replace(params, seed=params.seed + c)
                if parsed.echo:
                    yield index, TextDelta(request.prompt or "")
                for chunk in self.model.generate(prepared, params, cancelled):
                    if c and isinstance(chunk, Usage):  # a prompt is counted once, not once per choice
                        chunk = dataclasses.replace(chunk, prompt_tokens=0, cached_tokens=0)
                    yield index, chunk
                if disconnected():
                    return


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

    def start(self, parsed: ParsedRequest) -> Run:
        info = self.resolve(parsed.model)
        model = self.manager.get(info)
        prepared = [model.prepare(request) for request in parsed.prompts]
        return Run(parsed, info, model, prepared, time.monotonic() + self.settings.request_timeout)
