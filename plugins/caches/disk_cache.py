"""The ``disk`` response cache (``--cache disk``): diskcache's SQLite store under
``--cache-dir`` (default ``$SHIMMY_HOME/cache``), so that answers survive a restart.

It stores prompts' answers on disk, which is why it is opt-in.  What it stores
is JSON, never a pickle: diskcache pickles (and unpickles when it reads) any
value that is not bytes or text, so this cache hands it JSON bytes and a
``Disk`` that refuses to read anything but inline bytes.  The folder is made
readable by the user only.  Every failure (a read-only or full disk, a lock held
too long, a corrupt entry or database) is a miss, never an error; a database
that SQLite cannot open is replaced, and SQLite's journal repairs what a crash
interrupted.  diskcache (and sqlite3) are imported only when the cache opens.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

from shimmy_core.plugin_api import hookimpl

log = logging.getLogger("shimmy")

DB_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")   # all diskcache writes with inline values
LOCK_TIMEOUT_S = 0.1     # how long a request waits for another writer before it counts as a miss
INLINE = 2**62           # every value stays inside the database: no value files to leak or orphan
SIZE_LIMIT = 2**30       # bytes; diskcache's own bound, next to the entry count


def _safe_disk():
    from diskcache import Disk
    from diskcache.core import MODE_RAW

    class JSONBytesDisk(Disk):
        """Keys are hex strings and values JSON bytes, both stored as they are; a row that says
        otherwise (a pickle, a file) is refused instead of being unpickled or opened."""

        def get(self, key, raw):
            if not raw:
                raise ValueError("refusing a pickled key")
            return super().get(key, raw)

        def store(self, value, read, key=None):
            if type(value) is not bytes or read:
                raise TypeError("the disk cache stores JSON bytes only")
            return super().store(value, read)

        def fetch(self, mode, filename, value, read):
            if mode != MODE_RAW or filename is not None or read:
                raise ValueError(f"refusing a cache row of mode {mode}")
            return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else value

    return JSONBytesDisk


class DiskCache:
    name = "disk"

    def __init__(self, directory: Path, max_entries: int = 256, timeout: float = LOCK_TIMEOUT_S):
        self.directory = Path(directory).expanduser()
        self.max_entries = max(0, max_entries)
        self.timeout = timeout
        self._cache = None
        self._failed: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ opening
    def open(self) -> None:
        """Create the folder (mode 0700) and the database; replace a database SQLite cannot read."""
        with self._lock:
            if self._cache is not None or self._failed is not None:
                return
            try:
                self._cache = self._open()
            except Exception as exc:
                self._failed = f"{type(exc).__name__}: {exc}"
                log.warning("disk cache at %s cannot be used (%s); answering without it", self.directory,
                            self._failed)

    def _open(self):
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = stat.S_IMODE(self.directory.stat().st_mode)
        if mode & 0o077:
            # Tighten a folder that holds nothing but this cache; never someone else's folder.
            if any(entry.name not in DB_FILES for entry in self.directory.iterdir()):
                raise PermissionError(f"{self.directory} is readable by other users (mode {mode:o}): "
                                      "chmod 700 it or choose another --cache-dir")
            os.chmod(self.directory, 0o700)
        import sqlite3

        try:
            cache = self._connect()
            ok = cache._sql("PRAGMA quick_check").fetchall() == [("ok",)]
        except sqlite3.DatabaseError as exc:
            log.warning("disk cache at %s is damaged (%s); starting it afresh", self.directory, exc)
            ok, cache = False, None
        if not ok:
            if cache is not None:
                cache.close()
            for name in DB_FILES:
                (self.directory / name).unlink(missing_ok=True)
            cache = self._connect()
        cache.expire()
        for name in DB_FILES:
            path = self.directory / name
            if path.exists():
                os.chmod(path, 0o600)
        return cache

    def _connect(self):
        import diskcache

        return diskcache.Cache(
            str(self.directory), timeout=self.timeout, disk=_safe_disk(),
            eviction_policy="least-recently-stored",  # reads never write
            disk_min_file_size=INLINE, size_limit=SIZE_LIMIT, statistics=0,
        )

    def _ready(self):
        if self._cache is None and self._failed is None:
            self.open()
        return self._cache

    # ------------------------------------------------------------ the cache interface
    def get(self, key: str) -> dict | None:
        cache = self._ready()
        if cache is None:
            return None
        try:
            raw = cache.get(key)
            if raw is None:
                return None
            value = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
            return value if isinstance(value, dict) else None
        except Exception as exc:  # corrupt row, refused mode, I/O error: a miss
            log.debug("disk cache: unreadable entry %s (%s)", key[:12], exc)
            self._forget(cache, key)
            return None

    def set(self, key: str, value: dict, ttl: float | None = None) -> None:
        cache = self._ready()
        if cache is None or self.max_entries == 0:
            return
        data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        try:
            cache.set(key, data, expire=ttl)
            self._trim()
        except Exception as exc:  # read-only or full disk, lock timeout: nothing stored
            log.debug("disk cache: could not store %s (%s)", key[:12], exc)

    def _trim(self) -> None:
        """Drop expired entries, then the oldest beyond ``max_entries`` (plain SQL on diskcache's
        table, whose triggers keep its totals right: no row is ever deserialised here)."""
        import sqlite3

        con = sqlite3.connect(self.directory / DB_FILES[0], timeout=self.timeout, isolation_level=None)
        try:
            con.execute("DELETE FROM Cache WHERE expire_time IS NOT NULL AND expire_time < ?", (time.time(),))
            con.execute("DELETE FROM Cache WHERE rowid NOT IN "
                        "(SELECT rowid FROM Cache ORDER BY rowid DESC LIMIT ?)", (self.max_entries,))
        finally:
            con.close()

    def _forget(self, cache, key: str) -> None:
        try:
            cache.delete(key)
        except Exception:
            pass

    def close(self) -> None:
        with self._lock:
            cache, self._cache = self._cache, None
            self._failed = "closed"
        if cache is not None:
            cache.close()


def cache_folder(settings) -> Path:
    return Path(settings.cache_dir).expanduser() if settings.cache_dir else Path(settings.home) / "cache"


@hookimpl
def shimmy_register_caches(register, settings):
    # Nothing touches the disk until the cache is opened, and only the selected cache is opened.
    register(DiskCache(cache_folder(settings), settings.cache_size))
