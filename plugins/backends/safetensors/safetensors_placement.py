"""Where a SafeTensors model's weights go: what it needs in memory (from the SafeTensors
headers and config.json, in the dtype it will load as), and the ``device_map`` and
``max_memory`` that carry out a plan through accelerate: layers on the GPU from the last,
the routed experts of the first layers kept in CPU memory."""

from __future__ import annotations

import re
from pathlib import Path

from shimmy_core.plugin_api import DENSE, EXPERT, INPUT, MemoryFacts, ModelLoadError, OUTPUT, Plan, WeightTensor
from shimmy_plugins.backends.safetensors.safetensors_header import (
    DTYPE_BYTES,
    SafeTensorsError,
    read_safetensors_header,
)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERTS = re.compile(r"\.experts\.")   # routed experts (Mixtral, Qwen3-MoE...); shared_expert(s) stay
_FLOATS = {"F16", "BF16", "F32", "F64"}
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _part(name: str) -> tuple[str, int | None]:
    match = _LAYER.search(name)
    if match:
        return (EXPERT if _EXPERTS.search(name) else DENSE), int(match.group(1))
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return INPUT, None
    return OUTPUT, None


def text_config(config: dict) -> dict:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def memory_facts(folder: str, config: dict, element_bytes: int, context_train: int | None,
                 settings, gpu_capable: bool) -> MemoryFacts:
    """Weights by tensor as they will sit in memory (floats cast to ``element_bytes``), and the
    KV cache per token from ``config.json``.  The engine's cache grows with use (transformers'
    dynamic cache), so the KV figure is the most it can reach with every slot full."""
    tensors = []
    try:
        for path in sorted(Path(folder).glob("*.safetensors")):
            header = read_safetensors_header(path, keep_tensors=True)
            for name, dtype, elements in header.tensors:
                nbytes = int(elements * (element_bytes if dtype in _FLOATS else DTYPE_BYTES[dtype]))
                tensors.append(WeightTensor(name, nbytes, *_part(name)))
    except (SafeTensorsError, OSError) as exc:
        raise ModelLoadError(f"could not read the SafeTensors headers in {folder}: {exc}") from exc
    text = text_config(config)
    n_layers = int(text.get("num_hidden_layers") or 1 + max((t.layer or 0 for t in tensors), default=0))
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    hidden = int(text.get("hidden_size") or 0)
    head_dim = int(text.get("head_dim") or (hidden // heads if hidden else 64))
    vocab = int(text.get("vocab_size") or 32000)
    batch = max(1, settings.batch_size)
    n_experts = next((int(text[k]) for k in EXPERT_KEYS if isinstance(text.get(k), int)), 0)
    return MemoryFacts(
        tensors=tuple(tensors), n_layers=n_layers,
        kv_bytes_per_token=2 * n_layers * kv_heads * head_dim * element_bytes,
        context_train=context_train, n_experts=n_experts,
        # a prompt chunk's logits and activations; attention scores per cell of a slot
        compute_base=batch * (vocab + 8 * hidden) * 4, compute_per_cell=batch * heads * 4,
        gpu_capable=gpu_capable,
    )


def device_map(plan: Plan, main: str) -> dict[str, str] | None:
    """accelerate's ``device_map`` for a plan with GPU layers (None: everything on one device):
    the last ``gpu_layers`` layers on ``main``, the rest and the first ``cpu_expert_layers``
    layers' experts on the CPU; the output head on ``main`` when every layer is there.  Later
    keys win over earlier ones for the parameters they name."""
    n = plan.n_layers
    if not plan.gpu_layers or (plan.gpu_layers >= n and not plan.cpu_expert_layers):
        return None
    first_gpu = n - plan.gpu_layers
    mapping = {"model.embed_tokens": "cpu" if first_gpu else main, "model.rotary_emb": main}
    for i in range(n):
        mapping[f"model.layers.{i}"] = main if i >= first_gpu else "cpu"
    for i in range(min(plan.cpu_expert_layers, n)):
        mapping[f"model.layers.{i}.mlp.experts"] = "cpu"
    head = main if plan.gpu_layers >= n else "cpu"
    mapping["model.norm"] = head
    mapping["lm_head"] = head
    return mapping


def max_memory(plan: Plan) -> dict:
    """accelerate's ``max_memory``: what the plan gives each device."""
    out: dict = {}
    for use in plan.uses:
        key = "cpu" if use.device == "cpu" else int(use.device.split(":")[-1] or 0)
        out[key] = max(use.total, 1)
    return out
