"""The ``memory`` response cache (the default): a least-recently-used dict with a
time to live per entry, in this process only.  Nothing is written to disk."""

from __future__ import annotations

import collections
import threading
import time

from shimmy_core.plugin_api import hookimpl


class MemoryCache:
    name = "memory"

    def __init__(self, max_entries: int = 256):
        self.max_entries = max(0, max_entries)
        self._data: collections.OrderedDict[str, tuple[float | None, dict]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            expires, value = item
            if expires is not None and time.monotonic() >= expires:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return value

    def set(self, key: str, value: dict, ttl: float | None = None) -> None:
        if self.max_entries == 0:
            return
        expires = time.monotonic() + ttl if ttl is not None else None
        with self._lock:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def close(self) -> None:
        with self._lock:
            self._data.clear()


@hookimpl
def shimmy_register_caches(register, settings):
    register(MemoryCache(settings.cache_size))
