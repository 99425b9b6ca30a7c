"""The GGUF backend: models run in-process through llama.cpp (llama-cpp-python).

llama_cpp is imported only when a GGUF model loads.  One loaded model is
shared by every request: its engine (``gguf_engine``) batches their sequences.  Embedding and
rerank models get a pooling context instead (``gguf_embedding``).

The plugin also registers the GGUF format (:mod:`~shimmy_plugins.backends.gguf.gguf_format`),
which discovery asks about ``.gguf`` files: disabling the plugin hides both.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from typing import Callable, Iterator, Sequence

from shimmy_core.plugin_api import (
    CHAT,
    ChoicesModel,
    Chunk,
    GenerationRequest,
    hookimpl,
    InvalidRequest,
    MemoryFacts,
    ModelLoadError,
    OutputFormat,
    Plan,
    PreparedPrompt,
    SamplingParams,
)
from shimmy_plugins.backends.gguf.gbnf import after_reasoning, compile_output
from shimmy_plugins.backends.gguf.gguf_embedding import GGUFEmbeddingModel, load_embedding_model
from shimmy_plugins.backends.gguf.gguf_engine import Engine
from shimmy_plugins.backends.gguf.gguf_format import GGUFFormat
from shimmy_plugins.backends.gguf.gguf_header import GGUFError
from shimmy_plugins.backends.gguf.gguf_placement import check_attention, context_attention, memory_facts, model_params

GRAMMAR_CACHE = 64   # compiled output formats kept per model


def engine_threads(requested: int = 0) -> tuple[int, int]:
    """(decode threads, prompt threads).  By default decode on half the logical cores, as
    llama.cpp does: decode is memory-bound, and the HTTP side and the client need a core
    too (measured on 2 cores: 51 tok/s with 1 decode thread against 35 with 2, see
    docs/performance.md).  Prompt processing is compute-bound and takes every core."""
    cores = os.cpu_count() or 1
    if requested:
        return requested, requested
    return max(1, cores // 2), cores


class GGUFBackend:
    name = "gguf"
    formats = ("gguf",)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("llama_cpp") is None:
            return "GGUF models need llama-cpp-python: pip install llama-cpp-python"
        return None

    def memory_facts(self, model, settings) -> MemoryFacts:
        """What the model needs in memory (the core's planner decides from it)."""
        import llama_cpp

        try:
            return memory_facts(model.path, settings, gpu_capable=bool(llama_cpp.llama_supports_gpu_offload()))
        except (GGUFError, OSError) as exc:
            raise ModelLoadError(f"could not read the GGUF header of {model.id!r}: {exc}") from exc

    def load(self, model, settings, plan: Plan | None = None,
             progress: Callable[[float], None] | None = None) -> "GGUFModel | GGUFEmbeddingModel":
        """Load ``model`` as ``plan`` places it (None: every layer where llama.cpp can, the
        context from the settings alone), telling ``progress`` how far llama.cpp has read it."""
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's load log is noise; errors still reach stderr
        check_attention(settings)
        mparams, keep = model_params(llama_cpp, settings, plan, progress)
        try:
            lmodel = LlamaModel(path_model=model.path, params=mparams, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"could not load GGUF model {model.id!r}: {exc}") from exc
        if model.kind != CHAT:  # an embedding or rerank model: a pooling context, no chat engine
            return load_embedding_model(model, settings, lmodel, engine_threads)
        if plan is not None:
            per_slot, slots = plan.ctx_per_slot, plan.slots
        else:
            per_slot = settings.ctx_size or min(model.context_length or lmodel.n_ctx_train() or 4096, settings.max_ctx)
            slots = max(1, settings.parallel)
        threads, batch_threads = engine_threads(settings.threads)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = per_slot * slots
        cparams.n_batch = cparams.n_ubatch = min(settings.batch_size, per_slot)
        cparams.n_seq_max = slots
        # Each slot gets its own KV stream of per_slot cells: in one unified stream a sequence's
        # cells land between the others', and its greedy text changes with them (bench/kv_layout.py)
        cparams.kv_unified = False
        cparams.n_threads, cparams.n_threads_batch = threads, batch_threads
        cparams.no_perf = True
        context_attention(llama_cpp, cparams, settings, plan)
        try:
            ctx = LlamaContext(model=lmodel, params=cparams, verbose=False)
        except ValueError as exc:
            lmodel.close()
            raise ModelLoadError(f"could not create a context for {model.id!r}: {exc}") from exc
        engine = Engine(lmodel, ctx, n_slots=slots, n_batch=cparams.n_batch, queue_size=settings.queue_size,
                        queue_timeout=settings.queue_timeout, invariant=settings.batch_invariant)
        loaded = GGUFModel(lmodel, ctx, engine, llama_cpp.llama_n_ctx_seq(ctx.ctx), settings.max_tokens_ceiling,
                           hints=model.extra)
        loaded.pinned = keep  # the override array and the split: llama.cpp holds pointers into them
        return loaded


class GGUFModel(ChoicesModel):
    """A loaded llama.cpp model: its chat template, its tokenizer and the engine that runs it."""

    def __init__(self, lmodel, ctx, engine: Engine, context_length: int, max_tokens_ceiling: int,
                 hints: dict | None = None):
        """``hints`` come from discovery (an Ollama manifest): ``template_hint`` names a
        prompt format for files without a template, ``stop`` adds stop strings and
        ``system`` is the default system prompt."""
        # Chat templates (Jinja) are imported with the first model, not when the plugin loads.
        from shimmy_core.plugin_api import BUILTIN_TEMPLATES, CHATML_FALLBACK, ChatTemplate, PromptBuilder
        from shimmy_core.plugin_api import template_stop_strings, TemplateError

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


@hookimpl
def shimmy_register_backends(register):
    register(GGUFBackend())


@hookimpl
def shimmy_register_formats(register):
    register(GGUFFormat())
