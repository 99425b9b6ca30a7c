"""A SafeTensors model folder loaded with transformers and torch.

Imported only when such a model loads.  :func:`load` picks the device and
dtype, reports the load's progress and loads the tokenizer and the weights
(SafeTensors only, no custom code, no network).  :class:`SafeTensorsModel`
behaves exactly as the GGUF backend's model: the tokenizer's chat template
rendered in Shimmy's sandbox, the same context-length checks and limits, the
same end-of-turn stops, stop strings held back by
:class:`~shimmy_core.stops.StopScanner`, the same sampling (see
:mod:`shimmy_plugins.backends.safetensors.safetensors_engine`), the same structured output
(an output format compiled by llguidance in ``prepare()``, see
:mod:`shimmy_plugins.backends.safetensors.safetensors_constraints`), and ``cancelled()`` checked for
every token.
"""

from __future__ import annotations

import gc
import importlib.util
import queue
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from shimmy_core.plugin_api import (
    await_slot,
    ChoiceText,
    BackendUnavailable,
    CHATML_FALLBACK,
    ChatTemplate,
    ChoicesModel,
    Chunk,
    GenerationRequest,
    ModelLoadError,
    PreparedPrompt,
    PromptBuilder,
    SamplingParams,
    template_stop_strings,
    TemplateError,
    TokenLogprob,
    TopLogprob,
)
from shimmy_plugins.backends.safetensors.safetensors_constraints import OutputConstraints
from shimmy_plugins.backends.safetensors.safetensors_format import config_context_length
from shimmy_plugins.backends.safetensors.safetensors_placement import device_map, max_memory
from shimmy_plugins.backends.safetensors.safetensors_engine import BatchEngine, EngineError, Job, Ticket
from shimmy_plugins.backends.safetensors.safetensors_text import IncrementalDecoder, TokenPieces

_POLL_S = 0.05
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _thought_end(prepared: PreparedPrompt) -> str | None:
    """Where the output format starts for a prompt that leaves the model thinking: after the
    reasoning's end (structured output constrains the answer, not the thought)."""
    syntax = prepared.reasoning
    if not prepared.thinking or syntax is None:
        return None
    return syntax.answer_start or syntax.close


# ------------------------------------------------------------------ device and dtype
def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, then Apple MPS, else the CPU; or the device named."""
    wanted = (requested or "auto").strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if wanted == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    try:
        device = torch.device(wanted)
    except (RuntimeError, ValueError):
        raise BackendUnavailable(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {requested!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
                                     "(a CPU-only build of torch?); use --device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"device {requested!r} asked for, but only {torch.cuda.device_count()} "
                                     "CUDA device(s) are visible")
    elif device.type == "mps" and not has_mps:
        raise BackendUnavailable(f"device {requested!r} asked for, but Apple MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BackendUnavailable(f"unsupported device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(requested: str, device: torch.device, config: dict) -> torch.dtype:
    """``auto``: float32 on the CPU; on a GPU the config's half type (bf16 or fp16), bf16 where the
    card supports it and the config names none, else fp16."""
    wanted = (requested or "auto").strip().lower()
    if wanted != "auto":
        if wanted not in DTYPES:
            raise BackendUnavailable(f"unknown dtype {requested!r}: use auto, float32, float16 or bfloat16")
        return DTYPES[wanted]
    if device.type == "cpu":
        return torch.float32
    named = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "").lower())
    if device.type == "mps":
        return torch.float16
    bf16 = torch.cuda.is_bf16_supported()
    if named == torch.float16 or not bf16:
        return torch.float16
    return torch.bfloat16


# ------------------------------------------------------------------ loading
class _ReportedBar:
    """A progress bar of transformers, replaced while a model loads: the same iteration, its
    progress reported instead of drawn (the core draws one bar for every backend)."""

    def __init__(self, iterable, total, report: Callable[[float], None]):
        self.iterable = iterable
        if total is None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total, self.n, self._report = total, 0, report

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total:
            self._report(min(1.0, self.n / self.total))

    def __enter__(self) -> "_ReportedBar":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        return None

    def __getattr__(self, name: str):  # set_description, close, refresh...: nothing to draw
        return lambda *args, **kwargs: None


@contextmanager
def _reported_bars(progress: Callable[[float], None] | None, low: float, high: float):
    """While it lasts, transformers' progress bars (its weights, one per tensor) report to ``progress``,
    mapped onto ``low``..``high``; they draw nothing.  Needs transformers' ``set_tqdm_hook`` (5.0+);
    older versions draw their own bar and the load reports its steps only."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if progress is None or set_hook is None:
        yield
        return

    def report(fraction: float) -> None:
        progress(low + (high - low) * fraction)

    previous = set_hook(lambda factory, args, kwargs: _ReportedBar(args[0] if args else kwargs.get("iterable"),
                                                                   kwargs.get("total"), report))
    try:
        yield
    finally:
        set_hook(previous)


def _read_json(path: Path) -> dict:
    from shimmy_core.plugin_api import read_json

    if not path.is_file():
        return {}
    try:
        doc = read_json(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable {path.name} in {path.parent}: {exc}") from None
    return doc if isinstance(doc, dict) else {}


def memory_facts(info, settings):
    from shimmy_plugins.backends.safetensors.safetensors_placement import memory_facts as facts

    folder = Path(info.path)
    config = _read_json(folder / "config.json")
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device, config)
    return facts(info.path, config, torch.empty((), dtype=dtype).element_size(),
                 info.context_length or config_context_length(config), settings, gpu_capable=device.type == "cuda")


def load(info, settings, plan=None, progress: Callable[[float], None] | None = None) -> "SafeTensorsModel":
    folder = Path(info.path)
    generation = _read_json(folder / "generation_config.json")
    tokenizer, model, device, config = load_pretrained(info, settings, "AutoModelForCausalLM", plan, progress)
    loaded = SafeTensorsModel(info, model, tokenizer, device, settings, config=config, generation=generation)
    if progress is not None:
        progress(1.0)
    return loaded


def load_pretrained(info, settings, auto_class: str, plan=None, progress: Callable[[float], None] | None = None
                    ) -> tuple[Any, Any, torch.device, dict]:
    """``(tokenizer, model, device, config)`` of a model folder, the model loaded with the
    transformers class ``auto_class`` (``AutoModelForCausalLM``, ``AutoModel``...) on the device
    and dtype the settings pick, placed as ``plan`` says (the memory planner's; None: all on the
    device), SafeTensors weights only, no custom code, no network.  ``progress`` (the core's) hears
    of the tokenizer, then of every tensor (transformers 5), then of the model on its device."""
    import transformers
    from transformers import AutoTokenizer

    folder = Path(info.path)
    config = _read_json(folder / "config.json")
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device, config)
    shards = info.extra.get("shards") if isinstance(info.extra, dict) else None
    parts = f"{shards} shards in " if isinstance(shards, int) and shards > 1 else ""
    print(f"shimmy: {info.id} goes on {device} as {str(dtype).removeprefix('torch.')} ({parts}{info.path})",
          file=sys.stderr, flush=True)
    report = progress or (lambda fraction: None)
    common: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
    try:
        report(0.0)
        with _reported_bars(progress, 0.05, 0.9):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **common)
            report(0.05)
            kwargs: dict[str, Any] = {**common, "use_safetensors": True}
            dtype_arg = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
            kwargs[dtype_arg] = dtype
            placed = device.type != "cpu" and importlib.util.find_spec("accelerate") is not None
            mapping = device_map(plan, str(device)) if placed and plan is not None else None
            if mapping is not None:  # the plan splits the model: layers and experts partly in CPU memory
                kwargs["device_map"], kwargs["max_memory"] = mapping, max_memory(plan)
                device = torch.device(mapping["model.embed_tokens"])  # where the input ids go
            elif placed:
                kwargs["device_map"] = {"": str(device)}
            model = getattr(transformers, auto_class).from_pretrained(str(folder), **kwargs)
        report(0.9)
        if not placed:
            model = model.to(device)
        model.eval()
        report(0.95)
        return tokenizer, model, device, config
    except (BackendUnavailable, ModelLoadError):
        raise
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, ImportError...)
        raise ModelLoadError(f"could not load SafeTensors model {info.id!r}: {type(exc).__name__}: {exc}") from exc


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _ids(value: Any) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value} if value >= 0 else set()
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    return set()


# ------------------------------------------------------------------ the loaded model
class SafeTensorsModel(ChoicesModel):
    """A loaded transformers model with its tokenizer, chat template, stops and batching engine."""

    def __init__(self, info, model, tokenizer, device: torch.device, settings, *, config: dict, generation: dict):
        self.info = info
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.queue_timeout = settings.queue_timeout
        trained = info.context_length or config_context_length(config)
        self.context_length = settings.ctx_size or min(trained or 4096, settings.max_ctx)
        self._encode_lock = threading.Lock()
        self.pieces = TokenPieces(tokenizer)

        self.bos_text = tokenizer.bos_token or ""
        eos_text = tokenizer.eos_token or ""
        self.prefix_ids = self._special_prefix()
        self.start_id = next((i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None), 0)
        source = tokenizer.chat_template
        if isinstance(source, dict):  # several named templates: the default one
            source = source.get("default") or next(iter(source.values()), None)
        if not isinstance(source, str) or not source:
            source = CHATML_FALLBACK
        try:
            self.template = ChatTemplate(source, bos_token=self.bos_text, eos_token=eos_text)
        except TemplateError:
            source = CHATML_FALLBACK
            self.template = ChatTemplate(source, bos_token=self.bos_text, eos_token=eos_text)
        self.turn_stops = tuple(template_stop_strings(source))
        self.prompts = PromptBuilder(
            template=self.template,
            tokenize=self.tokenize,
            context_length=self.context_length,
            max_tokens_ceiling=settings.max_tokens_ceiling,
            start_token=self.start_id,
            bos_text=self.bos_text,
            turn_stops=self.turn_stops,
        )

        # End of generation: generation_config.json's EOS ids (config.json's without it), the tokenizer's
        # EOS, and special tokens that are end-of-turn markers (llama.cpp's end-of-generation set).
        eog = _ids(generation.get("eos_token_id")) if "eos_token_id" in generation else _ids(config.get("eos_token_id"))
        eog |= _ids(tokenizer.eos_token_id)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        for token_id, token in added.items():
            content = getattr(token, "content", "")
            if getattr(token, "special", False) and content and template_stop_strings(content) == [content]:
                eog.add(int(token_id))
        self.eog = frozenset(eog)

        self.engine = BatchEngine(model, device, parallel=settings.parallel, queue_size=settings.queue_size,
                                  chunk=settings.batch_size, threads=settings.threads, name=info.id)
        self.constraints = OutputConstraints(tokenizer, self.eog, self.engine.vocab)

    def _special_prefix(self) -> list[int]:
        """The special ids the tokenizer puts before a text (BOS for Llama-style tokenizers, often none)."""
        tok = self.tokenizer
        try:
            plain = tok.encode("a", add_special_tokens=False)
            marked = tok.encode("a", add_special_tokens=True)
        except Exception:
            return []
        for start in range(len(marked) - len(plain) + 1):
            if marked[start:start + len(plain)] == plain:
                return list(marked[:start])
        return []

    # ------------------------------------------------------------ prompts
    def tokenize(self, text: str, add_prefix: bool) -> list[int]:
        with self._encode_lock:  # a fast tokenizer must not be used by two threads at once
            ids = list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []
        return (list(self.prefix_ids) if add_prefix else []) + ids

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        prepared = self.prompts.prepare(request)
        if request.params.output is not None:  # a schema llguidance cannot enforce is a 400 now
            self.constraints.check(request.params.output, _thought_end(prepared))
        return prepared

    # ------------------------------------------------------------ generation
    def _logprob(self, token: int, logprob: float, top: tuple) -> TokenLogprob:
        text, raw = self.pieces.text(token)
        tops = tuple(TopLogprob(t, lp, tuple(b)) for t, b, lp in
                     ((*self.pieces.text(i), lp) for i, lp in top))
        return TokenLogprob(text, logprob, tuple(raw), tops)

    def generate_choices(
        self, choices: Sequence[tuple[PreparedPrompt, SamplingParams]], cancelled: Callable[[], bool]
    ) -> Iterator[tuple[int, Chunk]]:
        """Run every choice as a row of the batch; raises :class:`Overloaded` before any output when
        the queue cannot take them or the wait for a slot passes the queue timeout."""
        ticket = Ticket(sum(p.max_tokens + 4 for p, _ in choices) + 4)
        jobs = [Job(i, list(prepared.tokens), params, prepared.max_tokens, self.eog, ticket,
                    constraint=(self.constraints.constraint(params.output, _thought_end(prepared))
                                if params.output is not None else None))
                for i, (prepared, params) in enumerate(choices)]
        self.engine.submit(jobs)
        await_slot(ticket.admitted, cancelled, ticket.cancel, self.queue_timeout, _POLL_S)
        return self._read(choices, jobs, ticket, cancelled)

    def _read(self, choices, jobs: list[Job], ticket: Ticket, cancelled: Callable[[], bool]):
        """The chunks of every choice as the engine produces their tokens (request thread)."""
        states = [self._choice_text(prepared) for prepared, _ in choices]
        try:
            while not all(s.done for s in states):
                if cancelled():
                    ticket.cancel()
                    for index, state in enumerate(states):
                        if not state.done:
                            yield from ((index, c) for c in state.finish("length"))
                    return
                try:
                    index, item = ticket.out.get(timeout=_POLL_S)
                except queue.Empty:
                    if not self.engine.alive():
                        raise EngineError(f"the engine of model {self.info.id!r} stopped") from None
                    continue
                if item[0] == "error":
                    raise item[1]
                state = states[index]
                if state.done:
                    continue  # tokens the engine made before it saw a stop string
                if item[0] == "end":
                    yield from ((index, c) for c in state.finish(item[1]))
                    continue
                _, token, logprob, top = item
                lp = self._logprob(token, logprob, top) if choices[index][1].logprobs else None
                for chunk in state.add(token, lp):
                    yield index, chunk
                if state.done:
                    jobs[index].stopped.set()
        finally:
            ticket.cancel()

    def _choice_text(self, prepared: PreparedPrompt) -> ChoiceText:
        """One choice's text: token ids to text (``IncrementalDecoder``), the shared steps after."""
        decoder = IncrementalDecoder(self.tokenizer)
        return ChoiceText(prepared.stop, len(prepared.tokens), decoder.add, decoder.flush)

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    def close(self) -> None:
        self.engine.close()
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

