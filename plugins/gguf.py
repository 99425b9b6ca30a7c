"""The GGUF backend: models run in-process through llama.cpp (llama-cpp-python).

llama_cpp is imported only when a GGUF model loads.  One loaded model is
shared by every request; requests take turns on it (a per-model queue).
"""

from __future__ import annotations

import codecs
import ctypes
import importlib.util
import math
import os
import secrets
import threading
from typing import Callable, Iterator

from shimmy_core.backend import (
    ContextLengthExceeded,
    Finish,
    GenerationRequest,
    InvalidPrompt,
    ModelLoadError,
    PreparedPrompt,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from shimmy_core.chat_template import CHATML_FALLBACK, ChatTemplate, TemplateError, template_stop_strings
from shimmy_core.hookspecs import hookimpl
from shimmy_core.stops import StopScanner

PENALTY_LAST_N = 256
_QUEUE_POLL_S = 0.05


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

    def load(self, model, settings) -> "GGUFModel":
        import llama_cpp

        gpu_layers = settings.gpu_layers
        if gpu_layers < 0:
            gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        n_ctx = settings.ctx_size or min(model.context_length or 4096, settings.max_ctx)
        threads, batch_threads = engine_threads(settings.threads)
        try:
            llm = llama_cpp.Llama(
                model_path=model.path,
                n_ctx=n_ctx,
                n_batch=min(512, n_ctx),
                n_gpu_layers=gpu_layers,
                n_threads=threads,
                n_threads_batch=batch_threads,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"could not load GGUF model {model.id!r}: {exc}") from exc
        return GGUFModel(llm, settings.max_tokens_ceiling)


class GGUFModel:
    """A loaded llama.cpp model with its chat template and end-of-generation tokens."""

    def __init__(self, llm, max_tokens_ceiling: int):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.llm = llm
        self.context_length = llm.n_ctx()
        self.max_tokens_ceiling = max_tokens_ceiling
        self._lock = threading.Lock()
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._n_vocab = llm.n_vocab()
        self._piece_buf = ctypes.create_string_buffer(256)
        model = llm._model
        bos, eos = model.token_bos(), model.token_eos()
        self.bos_text = model.token_get_text(bos) if bos >= 0 else ""
        eos_text = model.token_get_text(eos) if eos >= 0 else ""
        self.add_bos = bool(model.add_bos_token()) and bos >= 0
        source = llm.metadata.get("tokenizer.chat_template") or CHATML_FALLBACK
        try:
            self.template = ChatTemplate(source, bos_token=self.bos_text, eos_token=eos_text)
        except TemplateError:
            self.template = ChatTemplate(CHATML_FALLBACK, bos_token=self.bos_text, eos_token=eos_text)
            source = CHATML_FALLBACK
        self.turn_stops = tuple(template_stop_strings(source))

    # ------------------------------------------------------------ prompts
    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        if request.messages is not None:
            try:
                text = self.template.render([dict(m) for m in request.messages], add_generation_prompt=True)
            except TemplateError as exc:
                raise InvalidPrompt(f"The model's chat template failed: {exc}", param="messages",
                                    code="template_error") from None
            add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
            stops = request.params.stop + self.turn_stops
            param = "messages"
        else:
            text = request.prompt or ""
            add_bos = self.add_bos
            stops = request.params.stop
            param = "prompt"
        tokens = self.tokenize(text, add_bos)
        if not tokens:  # an empty prompt: start from BOS (or EOS) so there is something to decode
            start = self.llm.token_bos()
            tokens = [start if start >= 0 else self.llm.token_eos()]
        n_ctx, n_prompt = self.context_length, len(tokens)
        requested = request.params.max_tokens
        if n_prompt >= n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, your {param} "
                f"resulted in {n_prompt} tokens. Please reduce the length of the {param}.",
                param=param,
            )
        if requested is not None and n_prompt + requested > n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{n_prompt + requested} tokens ({n_prompt} in the {param}, {requested} in the completion). "
                f"Please reduce the length of the {param} or completion.",
                param="max_tokens",
            )
        limit = min(requested or self.max_tokens_ceiling, self.max_tokens_ceiling, n_ctx - n_prompt)
        return PreparedPrompt(text=text, tokens=tuple(tokens), max_tokens=limit, stop=stops)

    # ------------------------------------------------------------ generation
    def _sampler(self, params: SamplingParams):
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        if params.logit_bias:
            sampler.add_logit_bias(self._n_vocab, dict(params.logit_bias))
        if params.presence_penalty or params.frequency_penalty:
            sampler.add_penalties(self._n_vocab, PENALTY_LAST_N, 1.0,
                                  params.frequency_penalty, params.presence_penalty)
        if params.temperature == 0:
            sampler.add_greedy()
            return sampler
        sampler.add_temp(params.temperature)
        if params.top_p < 1.0:
            sampler.add_top_p(params.top_p, 1)
        seed = secrets.randbits(31) if params.seed is None else params.seed % 0xFFFFFFFF
        sampler.add_dist(seed)
        return sampler

    def _piece(self, token: int) -> bytes:
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, False)
        return self._piece_buf.raw[: max(n, 0)]

    def _logprob(self, token: int, piece: bytes, top_n: int) -> TokenLogprob:
        import numpy as np

        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)
        peak = logits.max()
        lse = peak + math.log(float(np.exp(logits - peak).sum()))
        top: tuple[TopLogprob, ...] = ()
        if top_n:
            best = np.argpartition(-logits, top_n)[:top_n]
            best = best[np.argsort(-logits[best])]
            top = tuple(
                TopLogprob(self._token_text(p := self._piece(int(t))), float(logits[t] - lse), tuple(p))
                for t in best
            )
        return TokenLogprob(self._token_text(piece), float(logits[token] - lse), tuple(piece), top)

    @staticmethod
    def _token_text(piece: bytes) -> str:
        return piece.decode("utf-8", errors="replace")

    def _acquire(self, cancelled: Callable[[], bool]) -> bool:
        while not self._lock.acquire(timeout=_QUEUE_POLL_S):
            if cancelled():
                return False
        return True

    def generate(
        self, prepared: PreparedPrompt, params: SamplingParams, cancelled: Callable[[], bool]
    ) -> Iterator:
        n_prompt = len(prepared.tokens)
        if not self._acquire(cancelled):
            yield Finish("length")
            yield Usage(n_prompt, 0)
            return
        generated = 0
        try:
            llm = self.llm
            llm.reset()
            llm.eval(prepared.tokens)
            sampler = self._sampler(params)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            scanner = StopScanner(prepared.stop)
            pending_lps: list[TokenLogprob] = []
            reason = "length"
            while generated < prepared.max_tokens and not cancelled():
                token = sampler.sample(llm._ctx, -1)
                if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason = "stop"
                    break
                generated += 1
                piece = self._piece(token)
                if params.logprobs:
                    pending_lps.append(self._logprob(token, piece, params.top_logprobs))
                text, stopped = scanner.feed(decoder.decode(piece))
                if text or (pending_lps and not stopped):
                    yield TextDelta(text, tuple(pending_lps))
                    pending_lps = []
                if stopped:
                    reason = "stop"
                    break
                if generated < prepared.max_tokens:
                    llm.eval([token])
            if not scanner.stopped:
                tail, stopped = scanner.feed(decoder.decode(b"", final=True))
                tail += scanner.flush()
                reason = "stop" if stopped else reason
                if tail or pending_lps:
                    yield TextDelta(tail, tuple(pending_lps))
            yield Finish(reason)
            yield Usage(n_prompt, generated)
        finally:
            self._lock.release()

    def close(self) -> None:
        self.llm.close()


@hookimpl
def shimmy_register_backends(register):
    register(GGUFBackend())
