"""Tokens to text for the SafeTensors backend, with a Hugging Face tokenizer.

* :class:`IncrementalDecoder` turns generated token ids into text as they
  come: it decodes a short window of recent ids and emits only what is
  stable, so a multi-byte character split over several tokens is sent once,
  whole, and SentencePiece-style leading spaces come out right.
* :class:`TokenPieces` gives the bytes of one token (for logprobs), the way
  llama.cpp's ``token_to_piece`` does for GGUF models: the raw bytes of a
  byte-level BPE token, the byte of a ``<0xNN>`` byte-fallback token, and
  nothing for control (special) tokens.

No torch here: only the tokenizer object.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_REPLACEMENT = "\ufffd"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _decoder_types(tokenizer: Any) -> set[str]:
    """The decoder steps of a fast tokenizer (``ByteLevel``, ``ByteFallback``, ``Metaspace``...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # an unusual decoder: fall back to decoding token by token
        return {type(decoder).__name__}
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(state)
    return found


class TokenPieces:
    """Bytes and display text of single tokens, cached."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = frozenset(int(i) for i, t in added.items() if getattr(t, "special", False))
        self.special_ids |= frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        self.added_ids = frozenset(int(i) for i in added) - self.special_ids
        types = _decoder_types(tokenizer)
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = "ByteFallback" in types or not types
        self.metaspace = "Metaspace" in types or "Replace" in types or not types
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token: int) -> bytes:
        if token in self.special_ids:
            return b""  # control tokens print as nothing, as llama.cpp's token_to_piece does
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return b""
        if token in self.added_ids:
            return piece.encode("utf-8")
        if self.byte_level:
            try:
                return bytes(_BYTE_DECODER[c] for c in piece)
            except KeyError:
                return piece.encode("utf-8")
        if self.byte_fallback:
            match = _BYTE_TOKEN.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
        if self.metaspace:
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token], skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False).encode("utf-8")

    def text(self, token: int) -> tuple[str, bytes]:
        raw = self.bytes(token)
        return raw.decode("utf-8", errors="replace"), raw


class IncrementalDecoder:
    """Generated ids in, new text out; never splits a character.

    The approach of text-generation-inference and vLLM: decode the ids from a
    ``prefix`` offset twice, without and with the new ones, and emit the
    difference once it does not end in a replacement character (an incomplete
    UTF-8 sequence).  The window keeps a few ids of context so that tokenizers
    that drop a leading space at the start of a decode (SentencePiece) still
    produce the spaces between words.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character is sent as U+FFFD, as GGUF does)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
