"""A loaded GGUF chat model: its chat template, its tokenizer, the grammars of its output formats
and the engine that batches its sequences (:mod:`~shimmy_plugins.backends.gguf.gguf_engine`).
Imported when the first GGUF model loads (:meth:`GGUFBackend.load`)."""

from __future__ import annotations

import re
import threading
from typing import Callable, Iterator, Sequence

from shimmy_core.plugin_api import (
    BUILTIN_TEMPLATES,
    CHATML_FALLBACK,
    ChatTemplate,
    ChoicesModel,
    Chunk,
    GenerationRequest,
    InvalidRequest,
    OutputFormat,
    PreparedPrompt,
    PromptBuilder,
    SamplingParams,
    template_stop_strings,
    TemplateError,
)
from shimmy_plugins.backends.gguf.gbnf import after_reasoning, compile_output
from shimmy_plugins.backends.gguf.gguf_engine import Engine

GRAMMAR_CACHE = 64   # compiled output formats kept per model


class GGUFModel(ChoicesModel):
    """A loaded llama.cpp model: its chat template, its tokenizer and the engine that runs it."""

    def __init__(self, lmodel, ctx, engine: Engine, context_length: int, max_tokens_ceiling: int,
                 hints: dict | None = None):
        """``hints`` come from discovery (an Ollama manifest): ``template_hint`` names a
        prompt format for files without a template, ``stop`` adds stop strings and
        ``system`` is the default system prompt."""
        hints = hints or {}
        self._model = lmodel
        self._ctx = ctx
        self.engine = engine
        self.context_length = context_length
        self._grammars: dict[str, str] = {}
        self._grammar_lock = threading.Lock()
        bos, eos = lmodel.token_bos(), lmodel.token_eos()
        bos_text = lmodel.token_get_text(bos) if bos >= 0 else ""
        eos_text = lmodel.token_get_text(eos) if eos >= 0 else ""
        add_bos = bool(lmodel.add_bos_token()) and bos >= 0
        fallback = BUILTIN_TEMPLATES.get(hints.get("template_hint") or "chatml", CHATML_FALLBACK)
        source = lmodel.metadata().get("tokenizer.chat_template") or fallback
        try:
            template = ChatTemplate(source, bos_token=bos_text, eos_token=eos_text)
        except TemplateError:
            template = ChatTemplate(fallback, bos_token=bos_text, eos_token=eos_text)
            source = fallback
        self.prompts = PromptBuilder(
            template=template,
            tokenize=lambda text, add_prefix: lmodel.tokenize(
                text.encode("utf-8"), add_bos=add_bos and add_prefix, special=True),
            context_length=context_length,
            max_tokens_ceiling=max_tokens_ceiling,
            start_token=bos if bos >= 0 else eos,
            bos_text=bos_text,
            turn_stops=tuple(template_stop_strings(source)) + tuple(hints.get("stop", ())),
            default_system=hints.get("system"),
        )

    @property
    def renders_tools(self) -> bool:
        """Tools go through the model's own template when it knows them (Qwen, Llama 3.1...);
        for other templates the core writes them as a generic instruction."""
        from shimmy_core.plugin_api import template_supports_tools

        return template_supports_tools(self.prompts.template)

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        if request.params.output is not None:
            self._grammar(request.params.output)  # a schema it cannot enforce is a 400 now
        return self.prompts.prepare(request)

    def _grammar(self, output: OutputFormat) -> str:
        """The GBNF for an output format, compiled once and checked by llama.cpp's parser."""
        key = output.key()
        with self._grammar_lock:
            grammar = self._grammars.get(key)
        if grammar is None:
            grammar = compile_output(output)
            if not self.engine.check_grammar(grammar):
                raise InvalidRequest("The output grammar could not be parsed by llama.cpp.", code="invalid_grammar")
            with self._grammar_lock:
                self._grammars[key] = grammar
                while len(self._grammars) > GRAMMAR_CACHE:
                    del self._grammars[next(iter(self._grammars))]
        return grammar

    # ------------------------------------------------------------ generation
    def generate_choices(
        self, choices: Sequence[tuple[PreparedPrompt, SamplingParams]], cancelled: Callable[[], bool]
    ) -> Iterator[tuple[int, Chunk]]:
        """All choices run as parallel sequences; raises ``Overloaded`` before any output."""
        return self.engine.submit(choices, cancelled, [self._constraint(p, params) for p, params in choices])

    def _constraint(self, prepared: PreparedPrompt, params: SamplingParams) -> tuple[str, str | None] | None:
        """(GBNF, trigger pattern) for one choice.  A prompt that leaves the model inside its
        reasoning gets the grammar lazily: free until the reasoning ends, constrained after."""
        if params.output is None:
            return None
        grammar = self._grammar(params.output)
        syntax = prepared.reasoning
        if not prepared.thinking or syntax is None:
            return grammar, None
        marker = syntax.answer_start or syntax.close
        return after_reasoning(grammar), r"[\s\S]*?" + re.escape(marker) + r"([\s\S]*)"

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    def close(self) -> None:
        self.engine.close()
        self._ctx.close()
        self._model.close()
