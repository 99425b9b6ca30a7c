"""Stored responses of the Responses API: in this process's memory only, never on disk.

A response created with ``store`` (the default) is kept with the conversation it answered (the
items it continued, its own input items) so that ``previous_response_id``, ``GET`` and
``/input_items`` work.  The store is bounded three ways: the most responses
(``--stored-responses``), the most bytes as JSON (``--stored-responses-bytes``) and how long
each is kept (``--stored-responses-ttl``); the oldest goes first.  ``--no-store-responses``
keeps nothing.  Everything is gone when the server stops.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StoredResponse:
    response: dict          # the Response object as it was answered
    items: list[dict]       # the input items the model saw: the continued conversation, then this input
    size: int               # bytes, as JSON
    expires: float          # on the store's clock; inf: until evicted

    def conversation(self) -> list[dict]:
        """What a response continuing this one starts from: its input items, then its output."""
        return [*self.items, *self.response["output"]]


class ResponseStore:
    def __init__(self, enabled: bool, max_count: int, max_bytes: int, ttl: float,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled and max_count > 0 and max_bytes > 0
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self.bytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> "ResponseStore":
        return cls(settings.store_responses, settings.stored_responses, settings.stored_responses_bytes,
                   settings.stored_responses_ttl)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _expire(self) -> None:
        now = self.clock()  # one TTL for all: the oldest entry expires first
        while self._entries and next(iter(self._entries.values())).expires <= now:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size

    def put(self, response: dict, items: list[dict]) -> bool:
        """Keep a finished response; ``False`` when it is larger than the whole store."""
        if not self.enabled:
            return False
        size = len(json.dumps([response, items], ensure_ascii=False).encode("utf-8"))
        if size > self.max_bytes:
            return False
        expires = self.clock() + self.ttl if self.ttl > 0 else float("inf")
        with self._lock:
            self._expire()
            if response["id"] in self._entries:
                self._drop(response["id"])
            while self._entries and (len(self._entries) >= self.max_count or self.bytes + size > self.max_bytes):
                self._drop(next(iter(self._entries)))
            self._entries[response["id"]] = StoredResponse(response, items, size, expires)
            self.bytes += size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            self._expire()
            return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            self._expire()
            if response_id not in self._entries:
                return False
            self._drop(response_id)
            return True
