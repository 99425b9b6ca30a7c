"""Where a GGUF model's tensors go: what it needs in memory (from its header, for the core's
planner), and the llama.cpp parameters that carry out a plan: GPU layers, experts kept in CPU
memory through tensor buffer-type overrides, the split across GPUs, flash attention and the
KV cache types.

llama-cpp-python 0.3.36 declares ``tensor_buft_overrides`` in ``llama_model_params`` but never
fills it; :class:`ExpertOverrides` builds the NULL-terminated array of
``llama_model_tensor_buft_override`` itself, with the CPU buffer type from ggml's own CPU
library, and keeps the pattern bytes alive for as long as the model.
"""

from __future__ import annotations

import ctypes
import re
from typing import Callable
from pathlib import Path

from shimmy_core.plugin_api import (
    DENSE,
    EXPERT,
    INPUT,
    InvalidRequest,
    MemoryFacts,
    OUTPUT,
    Plan,
    WeightTensor,
)
from shimmy_plugins.backends.gguf.gguf_header import ArraySummary, read_gguf_header

# ggml types of a KV cache, and their bytes per element (blocks of 32 for the quantized ones)
CACHE_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32), "f32": (0, 4.0)}
FLASH_ATTN = ("auto", "on", "off")
_LAYER = re.compile(r"^blk\.(\d+)\.")
# llama-server's pattern for the routed experts (--cpu-moe, --n-cpu-moe); shared experts (_shexp) stay
EXPERT_PATTERN = r"ffn_(up|down|gate|gate_up)_exps"


def cache_type(name: str) -> int:
    try:
        return CACHE_TYPES[name.lower()][0]
    except KeyError:
        raise InvalidRequest(f"KV cache type {name!r}: use {', '.join(t for t in CACHE_TYPES if t != 'f32')}",
                             code="invalid_cache_type") from None


def _part(name: str) -> tuple[str, int | None]:
    match = _LAYER.match(name)
    if match:
        return (EXPERT if re.search(EXPERT_PATTERN, name) else DENSE), int(match.group(1))
    if name.startswith(("token_embd", "per_layer_token_embd")):
        return INPUT, None
    return OUTPUT, None


def _per_layer(value: object, n_layers: int, default: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value[:n_layers]] + [default] * max(0, n_layers - len(value))
    return [int(value) if isinstance(value, int) and not isinstance(value, bool) else default] * n_layers


def check_attention(settings) -> None:
    """The flash attention and KV cache settings, refused with a reason before any load."""
    for name in (settings.cache_type_k, settings.cache_type_v):
        cache_type(name)
    if settings.flash_attn not in FLASH_ATTN:
        raise InvalidRequest(f"--flash-attn {settings.flash_attn!r}: use auto, on or off", code="invalid_flash_attn")
    if settings.cache_type_v.lower() != "f16" and settings.flash_attn == "off":
        raise InvalidRequest(f"--cache-type-v {settings.cache_type_v} needs flash attention: llama.cpp keeps a "
                             "quantized V cache only for its flash-attention kernels (use --flash-attn on or "
                             "auto, or an f16 V cache)", code="invalid_cache_type")


def flash_attention(settings, on_gpu: bool) -> str:
    """on, off or auto (llama.cpp decides).  ``auto`` is off on the CPU: there flash attention
    changes the numbers of every step and greedy text drifts (bench/kv_layout.py); on a GPU
    llama.cpp decides.  A quantized V cache turns it on, since it needs it."""
    if settings.flash_attn != "auto":
        return settings.flash_attn
    if settings.cache_type_v.lower() != "f16":
        return "on"
    return "auto" if on_gpu else "off"


def memory_facts(path: str, settings, *, gpu_capable: bool) -> MemoryFacts:
    """What the model at ``path`` needs, from its header: weights by tensor, the KV cache per
    token in the cache types asked for, and llama.cpp's compute buffers (measured on the demo
    model: 77 MiB for a 512-token batch plus 11 KiB per KV cell of a slot without flash
    attention; the formula below comes within 10% of both)."""
    check_attention(settings)
    header = read_gguf_header(path, keep_tensors=True)
    meta, arch = header.metadata, header.architecture or "llama"

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else default

    n_layers = num("block_count") or 1 + max((_part(n)[1] or 0 for n, _ in header.tensors), default=0)
    n_embd, n_head = num("embedding_length", 1), num("attention.head_count", 1)
    head_k = num("attention.key_length", n_embd // max(1, n_head))
    head_v = num("attention.value_length", head_k)
    kv_heads = _per_layer(meta.get(f"{arch}.attention.head_count_kv"), n_layers, n_head)
    size_k, size_v = CACHE_TYPES[settings.cache_type_k.lower()][1], CACHE_TYPES[settings.cache_type_v.lower()][1]
    kv_per_token = int(sum(h * (head_k * size_k + head_v * size_v) for h in kv_heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, ArraySummary) else len(tokens) if isinstance(tokens, list) else 32000
    n_ff = max(_per_layer(meta.get(f"{arch}.feed_forward_length"), n_layers, 4 * n_embd) or [0])
    n_ubatch = max(1, settings.batch_size)
    flash = flash_attention(settings, gpu_capable) == "on"
    tensors = tuple(WeightTensor(name, nbytes, *_part(name)) for name, nbytes in header.tensors)
    notes = []
    if meta.get(f"{arch}.attention.sliding_window") or meta.get(f"{arch}.ssm.state_size"):
        notes.append("sliding-window or recurrent layers: the KV cache is planned as if every layer kept "
                     "the whole context (an overestimate)")
    return MemoryFacts(
        tensors=tensors, n_layers=n_layers, kv_bytes_per_token=kv_per_token, context_train=header.context_length,
        n_experts=num("expert_count"),
        compute_base=int(n_ubatch * (n_vocab + 4 * n_embd + 2 * n_ff) * 4 * 0.75),
        compute_per_cell=n_ubatch * 4 if flash else n_ubatch * n_head * 4 * 5 // 8,
        gpu_capable=gpu_capable, notes=tuple(notes),
    )


# ------------------------------------------------------------------ carrying out a plan
class _Override(ctypes.Structure):
    """``struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }``"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_buffer_type() -> int:
    """``ggml_backend_cpu_buffer_type()`` from the ggml CPU library llama_cpp loaded (the same
    file, so the same buffer type object)."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll", "libggml.so", "libggml-base.so"):
        path = lib_dir / name
        if not path.exists():
            continue
        lib = ctypes.CDLL(str(path))
        fn = getattr(lib, "ggml_backend_cpu_buffer_type", None)
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_void_p, []
            buft = fn()
            if buft:
                return buft
    raise RuntimeError(f"ggml_backend_cpu_buffer_type not found in {lib_dir}")


def expert_pattern(cpu_layers: int, n_layers: int) -> str:
    """The regular expression of the experts of the first ``cpu_layers`` layers."""
    if cpu_layers >= n_layers:
        return r"\." + EXPERT_PATTERN
    return r"blk\.(" + "|".join(str(i) for i in range(cpu_layers)) + r")\." + EXPERT_PATTERN


class ExpertOverrides:
    """The NULL-terminated override array that keeps the experts of the first N layers in CPU
    memory; keep this object as long as the model (the array points at its pattern bytes)."""

    def __init__(self, cpu_layers: int, n_layers: int):
        self.pattern = expert_pattern(cpu_layers, n_layers).encode()
        self.array = (_Override * 2)()
        self.array[0].pattern = self.pattern
        self.array[0].buft = cpu_buffer_type()
        self.array[1].pattern = None  # the terminator
        self.array[1].buft = None

    def apply(self, mparams) -> None:
        mparams.tensor_buft_overrides = ctypes.cast(self.array, ctypes.c_void_p)


def tensor_split(text: str, max_devices: int):
    """``--tensor-split 3,1`` as llama.cpp's float array (one entry per possible device), or None."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidRequest(f"--tensor-split {text!r}: use proportions such as 3,1", code="invalid_tensor_split") from None
    if not values or len(values) > max_devices or any(v < 0 for v in values):
        raise InvalidRequest(f"--tensor-split {text!r}: 1 to {max_devices} non-negative proportions",
                             code="invalid_tensor_split")
    return (ctypes.c_float * max_devices)(*values)


def model_params(llama_cpp, settings, plan: Plan | None, progress: Callable[[float], None] | None = None):
    """``llama_model_params`` for a plan, and what must stay alive with the model; ``progress``
    receives llama.cpp's load progress (its ``progress_callback``, which goes on loading when it
    returns true)."""
    mparams = llama_cpp.llama_model_default_params()
    keep: list[object] = []
    if progress is not None:
        def report(fraction: float, _user_data) -> bool:
            try:
                progress(fraction)
            except Exception:  # a display never stops a load
                pass
            return True

        callback = llama_cpp.llama_progress_callback(report)
        mparams.progress_callback = callback
        keep.append(callback)
    gpu = llama_cpp.llama_supports_gpu_offload()
    if plan is not None:
        layers = plan.gpu_layers if plan.gpu_layers < plan.n_layers else 0x7FFFFFFF
    else:
        layers = settings.gpu_layers if settings.gpu_layers >= 0 else (0x7FFFFFFF if gpu else 0)
    mparams.n_gpu_layers = layers if gpu else 0
    if plan is not None and plan.cpu_expert_layers:
        overrides = ExpertOverrides(plan.cpu_expert_layers, plan.n_layers)
        overrides.apply(mparams)
        keep.append(overrides)
    split = tensor_split(settings.tensor_split, llama_cpp.llama_max_devices())
    if split is not None:
        mparams.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        keep.append(split)
    mparams.main_gpu = settings.main_gpu
    # llama.cpp repacks some weight types for its CPU kernels (Q4_0, Q4_K, IQ4_NL, MXFP4 on
    # AVX2); their 4-row kernel rounds unlike the 1-row one, so a stream's numbers change
    # once 4 streams share a step.  Unrepacked, every row is computed alike
    # (--batch-invariant; the engine then also cuts prompts at fixed positions).  Tensors an
    # override sends to the CPU buffer type are never repacked either.
    mparams.use_extra_bufts = not settings.batch_invariant
    return mparams, keep


def context_attention(llama_cpp, cparams, settings, plan: Plan | None) -> str:
    """Flash attention and cache types into ``cparams``; the flash attention mode used."""
    mode = flash_attention(settings, bool(plan and plan.gpu_layers) and llama_cpp.llama_supports_gpu_offload())
    cparams.flash_attn_type = {"on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                               "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                               "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[mode]
    cparams.type_k, cparams.type_v = cache_type(settings.cache_type_k), cache_type(settings.cache_type_v)
    return mode
