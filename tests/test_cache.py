"""The response cache: what is cached and what is not, hits and misses over
Falcon's TestClient with the fake backend, replay as JSON and as SSE, the
``memory`` and ``disk`` plugins (JSON only, private folder, every failure a
miss), and the disk cache surviving a restart of a real server."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import stat
import threading
import time
from pathlib import Path

import falcon.testing
import httpx
import pytest

import shimmy_plugins.caches.disk_cache as disk_cache_plugin
import shimmy_plugins.caches.memory_cache as memory_cache_plugin
from shimmy_core import response_cache
from shimmy_core.app import build, create_app, select_cache
from shimmy_core.contract.hookspecs import hookimpl
from shimmy_core.contract.model_info import ModelInfo
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.plugin_registry import build_registry
from shimmy_core.service import CompletionService
from shimmy_core.contract.settings import Settings, SettingsError
from shimmy_plugins.caches.disk_cache import DiskCache
from shimmy_plugins.caches.memory_cache import MemoryCache
from tests.conftest import builtin, MODEL_ID
from tests.test_openai_api import HI, MODEL, FakePlugin, Harness, sse_events

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# ------------------------------------------------------------------ harness
class Cached(Harness):
    def ask(self, path: str = CHAT, headers: dict | None = None, **body) -> falcon.testing.Result:
        body.setdefault("model", MODEL)
        if path == CHAT:
            body.setdefault("messages", HI)
        else:
            body.setdefault("prompt", "Once upon a time")
        return self.client.simulate_post(path, json=body, headers=headers or {})

    @property
    def generations(self) -> int:
        return len(self.model.generated)


@pytest.fixture
def make_cached(validate, tmp_path):
    """``make_cached(**settings)``: the fake backend with the built-in cache plugins."""
    made = []

    def make(*more_plugins, **overrides) -> Cached:
        settings = Settings.load({"demo": False}, {}).replace(home=tmp_path / "home", **overrides)
        plugin = FakePlugin()
        plugins = [("fake", plugin), ("memory_cache", memory_cache_plugin), ("disk_cache", disk_cache_plugin),
                   builtin("openai"), *more_plugins]
        pm = create_plugin_manager(load_entry_points=False, extra_plugins=plugins)
        shimmy = build(settings, pm)
        made.append(shimmy)
        client = falcon.testing.TestClient(create_app(shimmy), headers={"Host": "localhost"})
        return Cached(client, plugin, settings, validate)

    yield make
    for shimmy in made:
        shimmy.close()


@pytest.fixture
def api(make_cached) -> Cached:
    return make_cached()


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def stream_text(result) -> tuple[str, str, dict | None]:
    events = sse_events(result)
    ids = {e["id"] for e in events}
    assert len(ids) == 1
    text = "".join((c.get("delta", {}).get("content") or c.get("text") or "") for e in events for c in e["choices"])
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    usage = next((e["usage"] for e in events if e.get("usage")), None)
    return text, reasons[-1], usage


# ------------------------------------------------------------------ hits and misses
def test_deterministic_request_is_a_miss_then_a_hit_with_a_fresh_id(api, monkeypatch):
    first = api.ask(temperature=0, max_tokens=3)
    assert first.status_code == 200, first.text
    assert first.headers["x-shimmy-cache"] == "miss"
    later = time.time() + 5
    monkeypatch.setattr("shimmy_plugins.dialects.openai.openai_bodies.time.time", lambda: later)
    second = api.ask(temperature=0, max_tokens=3)
    assert second.headers["x-shimmy-cache"] == "hit"
    api.validate(second.json, "CreateChatCompletionResponse")
    assert api.generations == 1
    assert without_ids(second.json) == without_ids(first.json)
    assert second.json["id"] != first.json["id"] and second.json["id"].startswith("chatcmpl-")
    assert second.json["created"] == int(later) != first.json["created"]


def test_seeded_requests_are_cached_and_sampled_ones_are_not(api):
    for _ in range(2):
        assert api.ask(temperature=1.0, max_tokens=2).headers["x-shimmy-cache"] == "miss"
    assert api.generations == 2
    assert api.ask(temperature=1.0, seed=5, max_tokens=2).headers["x-shimmy-cache"] == "miss"
    assert api.ask(temperature=1.0, seed=5, max_tokens=2).headers["x-shimmy-cache"] == "hit"
    assert api.ask(temperature=1.0, seed=6, max_tokens=2).headers["x-shimmy-cache"] == "miss"
    assert api.generations == 4


def test_fields_that_change_the_output_change_the_key_and_others_do_not(api):
    api.ask(temperature=0, max_tokens=3, user="alice")
    assert api.ask(temperature=0.0, max_tokens=3, user="bob", top_p=None).headers["x-shimmy-cache"] == "hit"
    assert api.ask(temperature=0, max_tokens=4).headers["x-shimmy-cache"] == "miss"
    assert api.ask(temperature=0, max_tokens=3, stop=["zz"]).headers["x-shimmy-cache"] == "miss"
    other = [{"role": "user", "content": "Say goodbye."}]
    assert api.ask(temperature=0, max_tokens=3, messages=other).headers["x-shimmy-cache"] == "miss"
    assert api.generations == 4


def test_every_generation_answer_says_hit_or_miss(api):
    assert api.ask(model="nope", temperature=0).headers["x-shimmy-cache"] == "miss"  # a 404
    assert api.ask(path=COMPLETIONS, temperature=0).headers["x-shimmy-cache"] == "miss"
    assert api.ask(path=COMPLETIONS, temperature=0).headers["x-shimmy-cache"] == "hit"
    assert "x-shimmy-cache" not in api.client.simulate_get("/v1/models").headers


# ------------------------------------------------------------------ stream and non-stream
def test_a_stream_is_answered_from_a_non_streamed_answer(api):
    whole = api.ask(temperature=0, max_tokens=4).json
    streamed = api.ask(temperature=0, max_tokens=4, stream=True, stream_options={"include_usage": True})
    assert streamed.headers["x-shimmy-cache"] == "hit"
    for event in sse_events(streamed):
        api.validate(event, "CreateChatCompletionStreamResponse")
    text, reason, usage = stream_text(streamed)
    assert text == whole["choices"][0]["message"]["content"]
    assert reason == whole["choices"][0]["finish_reason"]
    assert usage == whole["usage"]
    assert api.generations == 1


def test_a_non_streamed_request_is_answered_from_a_stream(api):
    streamed = api.ask(path=COMPLETIONS, temperature=0, max_tokens=5, stream=True)
    assert streamed.headers["x-shimmy-cache"] == "miss"
    text, reason, _ = stream_text(streamed)
    whole = api.ask(path=COMPLETIONS, temperature=0, max_tokens=5)
    assert whole.headers["x-shimmy-cache"] == "hit"
    api.validate(whole.json, "CreateCompletionResponse")
    assert whole.json["choices"][0]["text"] == text and whole.json["choices"][0]["finish_reason"] == reason
    assert api.generations == 1


@pytest.mark.parametrize("path, body", [
    (CHAT, {"logprobs": True, "top_logprobs": 2, "n": 2, "max_tokens": 3, "seed": 4}),
    (COMPLETIONS, {"prompt": ["one two", "three"], "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0}),
    (COMPLETIONS, {"prompt": "x y", "n": 3, "max_tokens": 2, "stop": ["gam"], "temperature": 0}),
])
def test_a_replayed_answer_equals_the_fresh_one(api, path, body):
    fresh = api.ask(path=path, **body)
    replayed = api.ask(path=path, **body)
    assert (fresh.headers["x-shimmy-cache"], replayed.headers["x-shimmy-cache"]) == ("miss", "hit")
    assert without_ids(replayed.json) == without_ids(fresh.json)
    fresh_stream = api.ask(path=path, headers={"Cache-Control": "no-cache"}, stream=True, **body)
    replayed_stream = api.ask(path=path, stream=True, **body)
    assert replayed_stream.headers["x-shimmy-cache"] == "hit"
    fresh_events, merged = sse_events(fresh_stream), sse_events(replayed_stream)
    # A replay sends each choice's text in one chunk: the same text, logprobs and finish reasons.
    if path == CHAT:
        for event in fresh_events + merged:
            api.validate(event, "CreateChatCompletionStreamResponse")

    def summary(events):
        out: dict = {}
        for event in events:
            for c in event["choices"]:
                item = out.setdefault(c["index"], {"text": "", "tokens": [], "finish": None})
                item["text"] += (c.get("delta") or {}).get("content") or c.get("text") or ""
                lp = c.get("logprobs") or {}
                item["tokens"] += [t["token"] for t in lp.get("content") or []] + list(lp.get("tokens") or [])
                item["finish"] = c["finish_reason"] or item["finish"]
        return out

    assert summary(merged) == summary(fresh_events)


# ------------------------------------------------------------------ bypass, expiry, eviction
def test_cache_control_no_cache_skips_the_lookup_and_no_store_skips_both(api):
    api.ask(temperature=0, max_tokens=2)
    fresh = api.ask(temperature=0, max_tokens=2, headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-shimmy-cache"] == "miss"
    assert api.generations == 2
    r = api.ask(temperature=0, max_tokens=3, headers={"Cache-Control": "no-store"})
    assert r.headers["x-shimmy-cache"] == "miss"
    assert api.ask(temperature=0, max_tokens=3).headers["x-shimmy-cache"] == "miss"  # nothing was stored
    assert api.ask(temperature=0, max_tokens=3).headers["x-shimmy-cache"] == "hit"


def test_an_entry_expires_after_the_ttl(make_cached):
    api = make_cached(cache_ttl=0.05)
    api.ask(temperature=0, max_tokens=2)
    assert api.ask(temperature=0, max_tokens=2).headers["x-shimmy-cache"] == "hit"
    time.sleep(0.1)
    assert api.ask(temperature=0, max_tokens=2).headers["x-shimmy-cache"] == "miss"


def test_the_least_recently_used_entry_is_evicted(make_cached):
    api = make_cached(cache_size=2)
    for tokens in (1, 2):
        api.ask(temperature=0, max_tokens=tokens)
    assert api.ask(temperature=0, max_tokens=1).headers["x-shimmy-cache"] == "hit"  # 1 is now the newest
    api.ask(temperature=0, max_tokens=3)                                            # evicts 2
    assert api.ask(temperature=0, max_tokens=1).headers["x-shimmy-cache"] == "hit"
    assert api.ask(temperature=0, max_tokens=2).headers["x-shimmy-cache"] == "miss"


def test_no_cache_turns_the_cache_off(make_cached):
    api = make_cached(cache="off")
    for _ in range(2):
        assert api.ask(temperature=0, max_tokens=2).headers["x-shimmy-cache"] == "miss"
    assert api.generations == 2


# ------------------------------------------------------------------ never stored
def test_a_cancelled_stream_is_not_stored(api):
    gone = api.client.simulate_post(CHAT, json={"model": MODEL, "messages": HI, "temperature": 0, "stream": True},
                                    extras={"waitress.client_disconnected": lambda: True})
    assert gone.status_code == 200
    assert stream_text(gone)[1] == "length"  # cut short
    assert api.ask(temperature=0).headers["x-shimmy-cache"] == "miss"
    assert api.ask(temperature=0).headers["x-shimmy-cache"] == "hit"


def test_an_answer_that_ran_a_server_side_tool_is_not_stored(api, monkeypatch):
    start = CompletionService.start

    def start_with_tools(self, parsed, disconnected=lambda: False, info=None):
        run = start(self, parsed, disconnected, info)
        run.uses_server_tools = True
        return run

    monkeypatch.setattr(CompletionService, "start", start_with_tools)
    for _ in range(2):
        assert api.ask(temperature=0, max_tokens=2).headers["x-shimmy-cache"] == "miss"


def test_an_answer_with_an_unknown_chunk_is_not_stored():
    recorder = response_cache.Recorder("chat")
    recorder.add(0, object())
    assert recorder.entry() is None


# ------------------------------------------------------------------ a broken cache is a miss
class BrokenCache:
    name = "broken"

    def __init__(self, mode: str):
        self.mode = mode

    def get(self, key):
        if self.mode == "raise":
            raise OSError("disk on fire")
        return {"format": response_cache.FORMAT, "kind": "chat", "events": [["t", 0, 42, "not logprobs"]]}

    def set(self, key, value, ttl):
        raise OSError("disk on fire")

    def close(self):
        raise OSError("disk on fire")


class BrokenCaches:
    @hookimpl
    def shimmy_register_caches(self, register):
        register(BrokenCache("raise"))
        register(type("Garbage", (BrokenCache,), {"name": "garbage"})("garbage"))


@pytest.mark.parametrize("name", ["broken", "garbage"])
def test_a_failing_cache_makes_every_request_a_miss(make_cached, name, caplog):
    api = make_cached(("broken", BrokenCaches()), cache=name)
    for stream in (False, True):
        r = api.ask(temperature=0, max_tokens=2, stream=stream)
        assert r.status_code == 200 and r.headers["x-shimmy-cache"] == "miss"
    assert api.generations == 2


def test_the_selected_cache_must_exist(tmp_path):
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("memory_cache", memory_cache_plugin)])
    settings = Settings.load({"demo": False, "home": tmp_path}, {})
    registry = build_registry(pm, settings)
    assert select_cache(settings, registry)[0].name == "memory"
    with pytest.raises(SettingsError, match="--cache nope.*registered: memory"):
        select_cache(settings.replace(cache="nope"), registry)
    empty = build_registry(create_plugin_manager(load_entry_points=False), settings)
    cache, notes = select_cache(settings, empty)  # the default plugin disabled: no cache, and a note
    assert not cache.enabled and "not cached" in notes[0]


def test_hook_shimmy_register_caches_registers_the_built_in_caches(tmp_path):
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[
        ("memory_cache", memory_cache_plugin), ("disk_cache", disk_cache_plugin)])
    settings = Settings.load({"demo": False, "home": tmp_path, "cache_size": 7, "cache_dir": str(tmp_path / "c")}, {})
    registry = build_registry(pm, settings)
    assert set(registry.caches) == {"memory", "disk"}
    assert registry.caches["memory"].max_entries == 7
    assert registry.caches["disk"].directory == tmp_path / "c"
    assert not (tmp_path / "c").exists()  # registering touches no disk
    assert hasattr(pm.hook, "shimmy_register_caches")


# ------------------------------------------------------------------ the key
def test_the_key_includes_the_model_files_identity(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    info = ModelInfo(id="m", path=str(model), format="gguf", source="files")
    settings = Settings.load({"demo": False}, {})
    body = {"model": "m", "messages": HI, "temperature": 0}
    key = response_cache.cache_key("chat", body, info, "gguf", settings)
    assert key == response_cache.cache_key("chat", {**body, "model": "alias", "stream": True}, info, "gguf", settings)
    assert key != response_cache.cache_key("completion", body, info, "gguf", settings)
    assert key != response_cache.cache_key("chat", body, info, "other", settings)
    assert key != response_cache.cache_key("chat", body, info, "gguf", settings.replace(max_tokens_ceiling=9))
    os.utime(model, ns=(1, 1))
    assert key != response_cache.cache_key("chat", body, info, "gguf", settings)


# ------------------------------------------------------------------ the memory cache
def test_memory_cache_lru_and_ttl():
    cache = MemoryCache(2)
    cache.set("a", {"v": 1}, None)
    cache.set("b", {"v": 2}, 0.05)
    assert cache.get("a") == {"v": 1}
    cache.set("c", {"v": 3}, None)  # b is the least recently used
    assert cache.get("b") is None and cache.get("c") == {"v": 3}
    cache.set("d", {"v": 4}, 0.01)  # evicts a
    time.sleep(0.05)
    assert cache.get("d") is None and cache.get("a") is None and len(cache) == 1
    cache.close()
    assert len(cache) == 0


# ------------------------------------------------------------------ the disk cache
@pytest.fixture
def disk(tmp_path):
    cache = DiskCache(tmp_path / "cache", max_entries=3)
    yield cache
    cache.close()


def rows(folder: Path) -> list[tuple]:
    with sqlite3.connect(folder / "cache.db") as con:
        return con.execute("SELECT key, mode, filename, value FROM Cache ORDER BY rowid").fetchall()


def test_disk_cache_stores_json_in_a_folder_only_the_user_can_read(disk):
    disk.set("k1", {"answer": "hé", "n": [1, 2]}, None)
    assert disk.get("k1") == {"answer": "hé", "n": [1, 2]}
    assert disk.get("k2") is None
    assert stat.S_IMODE(disk.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((disk.directory / "cache.db").stat().st_mode) == 0o600
    [(key, mode, filename, value)] = rows(disk.directory)
    assert key == "k1" and filename is None and mode == 1  # diskcache's MODE_RAW: bytes, inline
    assert json.loads(bytes(value)) == {"answer": "hé", "n": [1, 2]}
    assert sorted(p.name for p in disk.directory.iterdir()) <= ["cache.db", "cache.db-shm", "cache.db-wal"]


class _Boom:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_disk_cache_never_unpickles_a_row(disk, tmp_path):
    disk.set("seed", {"v": 1}, None)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(str(marker)))
    with sqlite3.connect(disk.directory / "cache.db") as con:
        con.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, mode, value) "
                    "VALUES ('evil', 1, 0, NULL, 0, 4, ?)", (payload,))
        con.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, mode, value) "
                    "VALUES ('garbage', 1, 0, NULL, 0, 1, ?)", (b"\x00not json",))
        con.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, mode, value) "
                    "VALUES (?, 0, 0, NULL, 0, 1, ?)", (pickle.dumps("pickled-key"), b"{}"))
    assert disk.get("evil") is None and disk.get("garbage") is None
    assert not marker.exists()
    assert disk.get("seed") == {"v": 1}
    assert [r[0] for r in rows(disk.directory)].count("evil") == 0  # unreadable entries are dropped
    for i in range(4):  # eviction goes past the pickled key without reading it
        disk.set(f"more{i}", {"v": i}, None)
    assert not marker.exists()
    assert [r[0] for r in rows(disk.directory)] == ["more1", "more2", "more3"]


def test_disk_cache_read_only_or_full_database_is_a_miss(disk):
    disk.set("a", {"v": 1}, None)
    con = disk._cache._con  # this thread's connection
    con.execute("PRAGMA query_only = 1")  # as a read-only disk does
    disk.set("b", {"v": 2}, None)
    assert disk.get("b") is None and disk.get("a") == {"v": 1}
    con.execute("PRAGMA query_only = 0")
    (pages,), = con.execute("PRAGMA page_count").fetchall()
    con.execute(f"PRAGMA max_page_count = {pages}")  # a full disk
    disk.set("big", {"v": "x" * 200_000}, None)
    assert disk.get("big") is None and disk.get("a") == {"v": 1}


def test_disk_cache_lock_timeout_is_a_miss(disk):
    disk.set("a", {"v": 1}, None)
    other = sqlite3.connect(disk.directory / "cache.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (disk.set("b", {"v": 2}, None), done.set()), daemon=True).start()
        assert done.wait(30), "a locked database must not block a request"
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert disk.get("a") == {"v": 1}
    assert disk.get("b") is None


def test_disk_cache_evicts_the_oldest_and_expires(disk):
    for i in range(5):
        disk.set(f"k{i}", {"i": i}, None)
    assert [disk.get(f"k{i}") for i in range(5)] == [None, None, {"i": 2}, {"i": 3}, {"i": 4}]
    disk.set("short", {"v": 1}, 0.05)
    time.sleep(0.1)
    assert disk.get("short") is None


def test_disk_cache_survives_reopening_and_a_damaged_database_is_replaced(tmp_path):
    folder = tmp_path / "cache"
    first = DiskCache(folder)
    first.set("k", {"v": 1}, None)
    first.close()
    again = DiskCache(folder)
    assert again.get("k") == {"v": 1}
    again.close()
    (folder / "cache.db").write_bytes(b"this is not a database" * 100)
    for name in ("cache.db-wal", "cache.db-shm"):
        (folder / name).unlink(missing_ok=True)
    fresh = DiskCache(folder)
    assert fresh.get("k") is None
    fresh.set("k", {"v": 2}, None)
    assert fresh.get("k") == {"v": 2}
    fresh.close()


def test_disk_cache_in_an_unusable_folder_is_always_a_miss(tmp_path):
    (tmp_path / "file").write_text("x")
    cache = DiskCache(tmp_path / "file" / "cache")
    cache.set("k", {"v": 1}, None)
    assert cache.get("k") is None
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    (shared / "notes.txt").write_text("someone else's")
    loose = DiskCache(shared)
    loose.set("k", {"v": 1}, None)
    assert loose.get("k") is None
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # not ours to change
    assert not (shared / "cache.db").exists()


# ------------------------------------------------------------------ a real server
def ask_http(server, content: str, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, "stream": stream}
    return httpx.post(server.url + "/chat/completions", json=body, timeout=120)


def test_real_model_stream_and_non_stream_cross_hits(server):
    whole = ask_http(server, "Cross hit: name a fruit.")
    assert whole.status_code == 200 and whole.headers["x-shimmy-cache"] == "miss"
    streamed = ask_http(server, "Cross hit: name a fruit.", stream=True)
    assert streamed.headers["x-shimmy-cache"] == "hit"
    events = [json.loads(line[6:]) for line in streamed.text.split("\n\n") if line.startswith("data: {")]
    assert streamed.text.endswith("data: [DONE]\n\n")
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == whole.json()["choices"][0]["message"]["content"]
    assert events[0]["id"] != whole.json()["id"]


def test_disk_cache_survives_a_restart_and_a_crash(start_server, smollm2_path, tmp_path):
    folder = tmp_path / "responses"
    args = ["--model", str(smollm2_path), "--no-demo", "--cache", "disk", "--cache-dir", str(folder)]
    first = start_server(args)
    assert ask_http(first, "Remember me.").headers["x-shimmy-cache"] == "miss"
    assert first.stop() == 0
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    second = start_server(args)
    r = ask_http(second, "Remember me.")
    assert r.headers["x-shimmy-cache"] == "hit"
    assert ask_http(second, "And me.").headers["x-shimmy-cache"] == "miss"
    second.proc.kill()  # a crash: no clean close
    second.proc.wait(timeout=30)
    third = start_server(args)
    assert ask_http(third, "And me.").headers["x-shimmy-cache"] == "hit"
    assert ask_http(third, "Remember me.").json()["choices"] == r.json()["choices"]
