"""The response cache: which requests may be answered from it, their keys, what
is stored, and how a stored answer is replayed.

A cache plugin (``shimmy_register_caches``) stores JSON-compatible dicts under
hex keys; this module decides everything else:

- Only deterministic requests are cached: every prompt at temperature 0 or
  with an explicit seed.
- The key is the SHA-256 of the canonical JSON of the model's identity (path,
  size and modification time of its files, the backend serving it, the
  settings that change its output) and of every request field that changes
  the output (``stream``, ``stream_options``, ``user`` and the model's name are
  left out: a streamed request is answered from a non-streamed answer and the
  reverse, and every alias of a model shares its entries).
- What is stored is the run's neutral events (text, finish reason, usage, per
  choice); a hit replays them through the same builders and SSE writer as a
  fresh answer, under a fresh ``id`` and ``created``.
- A partial answer (cancelled, cut by a deadline or a shutdown) or one that ran
  a server-side tool is never stored, and a cache that fails is a miss, never
  an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from shimmy_core import __version__
from shimmy_core.contract.generation import Chunk, Finish, ReasoningDelta, TextDelta, TokenLogprob, TopLogprob, Usage
from shimmy_core.contract.model_info import ModelInfo
from shimmy_core.parsed_request import ParsedRequest
from shimmy_core.contract.settings import Settings

log = logging.getLogger("shimmy")

FORMAT = 1                      # bump when the stored entry changes shape
OFF = "off"                     # the cache setting that turns caching off
# Request fields that never change the generated text.
IGNORED_FIELDS = frozenset({"model", "stream", "stream_options", "user", "metadata", "store", "service_tier"})
# Settings that change what the server answers to the same request (the enabled server-side
# tools too: with one enabled, a model's text-protocol call runs instead of staying text).
OUTPUT_SETTINGS = ("ctx_size", "max_ctx", "max_tokens_ceiling", "gpu_layers", "device", "dtype", "batch_size",
                   "batch_invariant", "reasoning_budget", "enable_tools", "tool_max_steps",
                   # the context per slot depends on the slots; flash attention, the KV cache types
                   # and experts kept off the repacked CPU buffers change the numbers
                   "parallel", "moe_offload", "flash_attn", "cache_type_k", "cache_type_v")
# Entries larger than this (as JSON) are not stored.
MAX_ENTRY_BYTES = 8 * 1024 * 1024
_WARN_EVERY_S = 60.0


# ------------------------------------------------------------------ which requests, which key
def cacheable(parsed: ParsedRequest) -> bool:
    """Deterministic requests only: every prompt at temperature 0 or with an explicit seed."""
    return all(p.params.temperature == 0 or p.params.seed is not None for p in parsed.prompts)


def bypass(cache_control: str | None) -> tuple[bool, bool]:
    """``(read, write)`` for a request's ``Cache-Control`` header: ``no-cache`` skips the lookup
    (the fresh answer is stored), ``no-store`` skips both."""
    directives = {d.strip().split("=", 1)[0].lower() for d in (cache_control or "").split(",")}
    if "no-store" in directives:
        return False, False
    return "no-cache" not in directives, True


def _canonical(value: Any) -> Any:
    """Drop nulls (a null field means the default) and write integral floats as integers."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def model_identity(info: ModelInfo) -> list:
    """Path, size and modification time of the model's file, or of every file of its folder."""
    path = info.path
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        if not os.path.isdir(real):
            return [real, st.st_size, st.st_mtime_ns]
        files = []
        for root, dirs, names in os.walk(real):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                fst = os.stat(full)
                files.append([os.path.relpath(full, real), fst.st_size, fst.st_mtime_ns])
        return [real, files]
    except OSError:
        return [path, info.size_bytes, info.created]


def cache_key(kind: str, body: dict, info: ModelInfo, backend: str, settings: Settings) -> str:
    request = _canonical({k: v for k, v in body.items() if k not in IGNORED_FIELDS})
    material = {
        "format": FORMAT,
        "shimmy": __version__,
        "kind": kind,
        "model": model_identity(info),
        "backend": backend,
        "settings": {name: str(getattr(settings, name, None)) for name in OUTPUT_SETTINGS},
        "model_settings": _canonical(info.extra.get("model_settings") or {}),  # shimmy add --ctx-size ...
        "request": request,
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ what is stored
def _logprobs_json(items: Iterable[TokenLogprob]) -> list:
    return [[lp.token, lp.logprob, list(lp.bytes), [[t.token, t.logprob, list(t.bytes)] for t in lp.top]]
            for lp in items]


def _logprobs_from(items: list) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(str(token), float(logprob), tuple(int(b) for b in raw),
                     tuple(TopLogprob(str(t), float(lp), tuple(int(b) for b in tb)) for t, lp, tb in top))
        for token, logprob, raw, top in items
    )


@dataclass
class Recorder:
    """Collects a run's events as the JSON a cache stores; consecutive text of one choice is
    merged.  An event it does not know (a tool-call delta...) makes the run uncacheable."""

    kind: str
    events: list = field(default_factory=list)
    storable: bool = True

    def add(self, index: int, chunk: Chunk) -> None:
        if not self.storable:
            return
        if isinstance(chunk, TextDelta):
            last = self.events[-1] if self.events else None
            if last and last[0] == "t" and last[1] == index and bool(last[3]) == bool(chunk.logprobs):
                last[2] += chunk.text
                last[3].extend(_logprobs_json(chunk.logprobs))
            else:
                self.events.append(["t", index, chunk.text, _logprobs_json(chunk.logprobs)])
        elif isinstance(chunk, ReasoningDelta):
            last = self.events[-1] if self.events else None
            if last and last[0] == "r" and last[1] == index:
                last[2] += chunk.text
            else:
                self.events.append(["r", index, chunk.text])
        elif isinstance(chunk, Finish):
            self.events.append(["f", index, chunk.reason] + ([chunk.stop] if chunk.stop is not None else []))
        elif isinstance(chunk, Usage):
            self.events.append(["u", index, chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens,
                                chunk.reasoning_tokens])
        else:
            self.storable = False

    def entry(self) -> dict | None:
        """The entry to store, or None when this run must not be stored."""
        if not self.storable:
            return None
        finished = {e[1] for e in self.events if e[0] == "f"}
        started = {e[1] for e in self.events}
        if not started or finished != started:
            return None  # some choice never finished
        return {"format": FORMAT, "kind": self.kind, "events": self.events}


def replay(entry: dict) -> Iterator[tuple[int, Chunk]]:
    """The stored events as neutral chunks, for ``collect`` or ``stream``."""
    for event in entry["events"]:
        tag, index = event[0], int(event[1])
        if tag == "t":
            yield index, TextDelta(str(event[2]), _logprobs_from(event[3]))
        elif tag == "r":
            yield index, ReasoningDelta(str(event[2]))
        elif tag == "f":
            yield index, Finish(str(event[2]), str(event[3]) if len(event) > 3 else None)
        else:
            yield index, Usage(int(event[2]), int(event[3]), int(event[4]), int(event[5]) if len(event) > 5 else 0)


def valid_entry(entry: Any, kind: str) -> bool:
    """Whether a cache's answer is an entry this version can replay (anything else is a miss)."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("kind") != kind:
        return False
    try:
        events = entry["events"]
        if not isinstance(events, list) or not events:
            return False
        for event in events:
            tag = event[0]
            if tag == "t":
                if not isinstance(event[2], str):
                    return False
                _logprobs_from(event[3])
            elif tag in ("f", "r"):
                if not all(isinstance(v, str) for v in event[2:]):
                    return False
            elif tag == "u":
                int(event[2]), int(event[3]), int(event[4]), int(event[5]) if len(event) > 5 else 0
            else:
                return False
            if not isinstance(event[1], int) or event[1] < 0:
                return False
        return True
    except (TypeError, ValueError, IndexError, KeyError):
        return False


# ------------------------------------------------------------------ the cache in front of a plugin
class ResponseCache:
    """The selected cache plugin behind a guard: every failure of it is a logged miss."""

    def __init__(self, cache: Any | None, settings: Settings):
        self.cache = cache
        self.settings = settings
        self._warned_at = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.cache is not None and self.settings.cache_size > 0

    @property
    def name(self) -> str:
        return getattr(self.cache, "name", OFF) if self.cache is not None else OFF

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("cache %r: %s failed (%s: %s); answering without the cache",
                        self.name, what, type(exc).__name__, exc)

    def open(self) -> None:
        opener = getattr(self.cache, "open", None)
        if opener is not None:
            try:
                opener()
            except Exception as exc:
                self._warn("open", exc)

    def get(self, key: str, kind: str) -> dict | None:
        if not self.enabled:
            return None
        try:
            entry = self.cache.get(key)
        except Exception as exc:
            self._warn("get", exc)
            return None
        return entry if entry is not None and valid_entry(entry, kind) else None

    def set(self, key: str, entry: dict) -> None:
        if not self.enabled:
            return
        try:
            if len(json.dumps(entry, separators=(",", ":"))) > MAX_ENTRY_BYTES:
                return
            ttl = self.settings.cache_ttl if self.settings.cache_ttl > 0 else None
            self.cache.set(key, entry, ttl)
        except Exception as exc:
            self._warn("set", exc)

    def close(self) -> None:
        if self.cache is None:
            return
        try:
            self.cache.close()
        except Exception as exc:
            self._warn("close", exc)
