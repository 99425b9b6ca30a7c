"""How Ollama describes a model (``/api/tags``, ``/api/show``, ``/api/ps``), from the
:class:`ModelInfo` that discovery made without loading it."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from shimmy_core.plugin_api import CHAT, EMBEDDING_KIND, ModelInfo

# Marks of a template that thinks: Ollama's Go templates ({{ .Think }}) and Jinja ones (<think>).
THINKING_MARKS = (".Think", "<think>", "enable_thinking", "reasoning_content")


def parameter_size(count: int | None) -> str:
    if not count:
        return ""
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def digest(info: ModelInfo) -> str:
    """The blob's sha256 for a model of the Ollama store; a stable stand-in for the others."""
    name = info.path.replace("\\", "/").rsplit("/", 1)[-1]
    if name.startswith("sha256-") and len(name) == 71:
        return name[len("sha256-"):]
    return hashlib.sha256(f"{info.id}\0{info.path}\0{info.size_bytes}\0{info.created}".encode()).hexdigest()


def modified_at(info: ModelInfo) -> str:
    return datetime.fromtimestamp(info.created or 0, timezone.utc).isoformat().replace("+00:00", "Z")


def details(info: ModelInfo) -> dict:
    family = (info.architecture or "").lower()
    return {"parent_model": "", "format": info.format, "family": family, "families": [family] if family else None,
            "parameter_size": parameter_size(info.parameters), "quantization_level": info.quantization or ""}


def tag_entry(info: ModelInfo) -> dict:
    """A model as ``/api/tags`` lists it: Ollama's ``name:tag`` for the models of its store, the
    Shimmy id for the others."""
    return {"name": info.id, "model": info.id, "modified_at": modified_at(info), "size": info.size_bytes,
            "digest": digest(info), "details": details(info)}


def capabilities(info: ModelInfo) -> list[str]:
    if info.kind == EMBEDDING_KIND:
        return ["embedding"]
    if info.kind != CHAT:
        return []
    found = ["completion", "tools"]  # every chat model takes tools: the core writes them into the prompt
    template = info.extra.get("template")
    if isinstance(template, str) and any(mark in template for mark in THINKING_MARKS):
        found.append("thinking")
    return found


def parameters_text(info: ModelInfo) -> str:
    """The Modelfile parameters Ollama's ``show`` prints, one ``name value`` a line."""
    rows = [f"stop {json.dumps(s)}" for s in info.extra.get("stop") or ()]
    rows += [f"{k} {v}" for k, v in sorted((info.extra.get("options") or {}).items())]
    return "\n".join(rows)


def show_body(info: ModelInfo) -> dict:
    arch = (info.architecture or "").lower()
    model_info: dict = {"general.architecture": arch, "general.parameter_count": info.parameters,
                        "general.quantization": info.quantization, "shimmy.source": info.source,
                        "shimmy.path": info.path, "shimmy.kind": info.kind}
    if arch and info.context_length:
        model_info[f"{arch}.context_length"] = info.context_length
    body = {"modelfile": f"# Served by Shimmy from the {info.source} source\nFROM {info.path}\n",
            "parameters": parameters_text(info), "template": info.extra.get("template") or "",
            "details": details(info), "model_info": model_info, "capabilities": capabilities(info),
            "modified_at": modified_at(info)}
    if isinstance(info.extra.get("system"), str):
        body["system"] = info.extra["system"]
    return body


def ps_entry(info: ModelInfo, keep_alive: float) -> dict:
    """A loaded model as ``/api/ps`` lists it; ``expires_at`` follows the server's ``--keep-alive``
    (counted from now: Shimmy unloads a model that long after its last use)."""
    if keep_alive < 0:
        expires = "9999-12-31T23:59:59Z"
    else:
        expires = datetime.fromtimestamp(datetime.now(timezone.utc).timestamp() + keep_alive,
                                         timezone.utc).isoformat().replace("+00:00", "Z")
    return {**tag_entry(info), "expires_at": expires, "size_vram": 0, "context_length": info.context_length}
