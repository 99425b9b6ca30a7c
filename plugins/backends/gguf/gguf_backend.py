"""The GGUF backend: models run in-process through llama.cpp (llama-cpp-python).

llama_cpp is imported only when a GGUF model loads.  One loaded model is
shared by every request: its engine (``gguf_engine``) batches their sequences.  Embedding and
rerank models get a pooling context instead (``gguf_embedding``).

The model itself (:mod:`~shimmy_plugins.backends.gguf.gguf_model`), its engine, grammars and
placement are imported when a model loads, not when the plugin does.

The plugin also registers the GGUF format (:mod:`~shimmy_plugins.backends.gguf.gguf_format`),
which discovery asks about ``.gguf`` files: disabling the plugin hides both.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Callable

from shimmy_core.plugin_api import CHAT, hookimpl, MemoryFacts, ModelLoadError, Plan
from shimmy_plugins.backends.gguf.gguf_format import GGUFFormat
from shimmy_plugins.backends.gguf.gguf_header import GGUFError

if TYPE_CHECKING:  # pragma: no cover
    from shimmy_plugins.backends.gguf.gguf_embedding import GGUFEmbeddingModel
    from shimmy_plugins.backends.gguf.gguf_model import GGUFModel


SYSFS_CPU = "/sys/devices/system/cpu"
UBATCH_WITHOUT_FLASH = 256   # most tokens llama.cpp computes at once when flash attention is off


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (a container's or ``taskset``'s share)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sysfs: str = SYSFS_CPU) -> int:
    """How many physical cores ``cpus`` span: distinct (package, core) pairs in sysfs, SMT
    siblings counted once.  Without sysfs, llama.cpp's own guess: all of up to 4 logical
    CPUs, else half."""
    cores = set()
    for cpu in cpus:
        try:
            topology = os.path.join(sysfs, f"cpu{cpu}", "topology")
            with open(os.path.join(topology, "physical_package_id")) as package, \
                    open(os.path.join(topology, "core_id")) as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(cpus) if len(cpus) <= 4 else len(cpus) // 2
    return max(1, len(cores))


def engine_threads(requested: int = 0, requested_batch: int = 0, *, cpus: list[int] | None = None,
                   sysfs: str = SYSFS_CPU) -> tuple[int, int]:
    """(threads for one-token steps, threads for batches of two or more tokens).

    llama.cpp runs a step with one token (one stream generating) on the first number and any
    larger batch (prompts, several streams generating together) on the second.  By default one
    thread per physical core for the first, as llama.cpp's own server does: SMT siblings add
    nothing to a memory-bound step.  (Shimmy used half the logical cores, which on a VM that
    shows no SMT left half of them idle: 2 threads beat 1 by 1.16-1.35x for one stream on 2-core
    Intel and AMD VMs, docs/performance.md.)  Every usable core for the second, which is
    compute-bound.  ``--threads`` sets both unless ``--threads-batch`` is given too."""
    cpus = usable_cpus() if cpus is None else cpus
    if requested:
        return requested, requested_batch or requested
    return physical_cores(cpus, sysfs), requested_batch or len(cpus)


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

        from shimmy_plugins.backends.gguf.gguf_placement import memory_facts

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

        from shimmy_plugins.backends.gguf.gguf_embedding import load_embedding_model
        from shimmy_plugins.backends.gguf.gguf_engine import Engine
        from shimmy_plugins.backends.gguf.gguf_model import GGUFModel
        from shimmy_plugins.backends.gguf.gguf_placement import check_attention, context_attention, model_params

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
        threads, batch_threads = engine_threads(settings.threads, settings.threads_batch)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = per_slot * slots
        cparams.n_batch = cparams.n_ubatch = min(settings.batch_size, per_slot)
        cparams.n_seq_max = slots
        # Each slot gets its own KV stream of per_slot cells: in one unified stream a sequence's
        # cells land between the others', and its greedy text changes with them (bench/kv_layout.py)
        cparams.kv_unified = False
        cparams.n_threads, cparams.n_threads_batch = threads, batch_threads
        cparams.no_perf = True
        if context_attention(llama_cpp, cparams, settings, plan) == "off":
            # Without flash attention each layer's scores fill a cells x ubatch x heads matrix:
            # 512-token ubatches prefilled 4,000 tokens 2-5% slower than 256 (docs/performance.md).
            # n_batch stays n_ubatch: llama.cpp never splits a decode, so no split leaves a
            # prompt token alone (the engine's determinism rules see every batch whole).
            cparams.n_batch = cparams.n_ubatch = min(cparams.n_batch, UBATCH_WITHOUT_FLASH)
        try:
            ctx = LlamaContext(model=lmodel, params=cparams, verbose=False)
        except ValueError as exc:
            lmodel.close()
            raise ModelLoadError(f"could not create a context for {model.id!r}: {exc}") from exc
        engine = Engine(lmodel, ctx, n_slots=slots, n_batch=cparams.n_batch, queue_size=settings.queue_size,
                        queue_timeout=settings.queue_timeout, invariant=settings.batch_invariant,
                        decode_threads=(threads,) if settings.threads else (threads, max(1, threads // 2)))
        loaded = GGUFModel(lmodel, ctx, engine, llama_cpp.llama_n_ctx_seq(ctx.ctx), settings.max_tokens_ceiling,
                           hints=model.extra)
        loaded.pinned = keep  # the override array and the split: llama.cpp holds pointers into them
        return loaded


@hookimpl
def shimmy_register_backends(register):
    register(GGUFBackend())


@hookimpl
def shimmy_register_formats(register):
    register(GGUFFormat())
