"""Compatibility tests for the private and undocumented APIs that Shimmy relies on.

Shimmy reaches into the internals of some of its dependencies: it subclasses waitress's
request parser and drives its event loop by hand, extends Jinja's code generator and
sandbox, reads diskcache's SQLite tables directly, drives llama.cpp through
llama-cpp-python's ``_internals`` and ctypes bindings, and walks the parse trees of
Python's own ``re`` module.  It also relies on documented but young behaviour of llguidance
(its grammar-error text, its JSON options, its bitmask layout).  None of this is covered by the projects' compatibility
promises.  pyproject.toml bounds these packages below their next major version (and
llama-cpp-python below 0.4), but even patch releases have changed such internals, so these
tests check that every private name Shimmy uses is still there, with the shape Shimmy
needs: an upgrade that breaks one fails here loudly and by name, not in production.

Every assertion names the Shimmy file that depends on the API: when one fails, fix that
file (or bound the dependency in pyproject.toml) before accepting the upgrade.

The tests are fast: they load no model and serve no request.  They inspect modules,
classes and signatures, and build tiny objects (a diskcache in tmp_path, a llama_batch,
a sampler chain, a waitress server on a loopback port that is closed at once).
"""

from __future__ import annotations

import importlib
import json
import inspect
import socket
import sqlite3
import time
from typing import Any

import pytest

SERVER = "shimmy_core/http/server.py"
CHAT_TEMPLATE = "shimmy_core/chat_template.py"
DISK_CACHE = "plugins/caches/disk_cache.py"
GGUF = "plugins/backends/gguf/gguf_backend.py"
GGUF_ENGINE = "plugins/backends/gguf/gguf_engine.py"
GGUF_PLACEMENT = "plugins/backends/gguf/gguf_placement.py"
PLUGIN_MANAGER = "shimmy_core/plugin_manager.py"
SCHEMAS = "shimmy_core/tools/schemas.py"
GRAMMAR = "plugins/backends/gguf/gbnf.py"
SAFETENSORS_ENGINE = "plugins/backends/safetensors/safetensors_engine.py"
CONSTRAINTS = "plugins/backends/safetensors/safetensors_constraints.py"


def require(user: str, module: str, name: str | None = None) -> Any:
    """Import ``module`` and return its attribute ``name`` (dotted), failing with a message that
    names the Shimmy file ``user`` that relies on it."""
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{user} relies on the module {module}, which no longer imports: {exc}")
    for part in (name or "").split(".") if name else ():
        if not hasattr(obj, part):
            pytest.fail(f"{user} relies on {module}.{name}, which is gone")
        obj = getattr(obj, part)
    return obj


def params(func: Any) -> list[str]:
    """The parameter names of ``func``, without ``self``."""
    return [name for name in inspect.signature(func).parameters if name != "self"]


# ============================================================================ waitress
def _waitress_server(**extra: Any):
    """A waitress server on a free loopback port, with the adjustments make_server passes."""
    create_server = require(SERVER, "waitress.server", "create_server")

    def app(environ, start_response):  # never called
        start_response("204 No Content", [])
        return []

    return create_server(
        app, host="127.0.0.1", port=0, threads=1, connection_limit=8, channel_timeout=5,
        cleanup_interval=2, channel_request_lookahead=5, max_request_body_size=1 << 20,
        max_request_header_size=1 << 16, inbuf_overflow=1 << 20, outbuf_overflow=1 << 20,
        outbuf_high_watermark=1 << 20, clear_untrusted_proxy_headers=True, ident="shimmy", **extra,
    )


def _close_waitress(server) -> None:
    from waitress import wasyncore

    server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
    wasyncore.close_all(server._map, ignore_all=True)


def test_waitress_parser_internals():
    """StrictRequestParser overrides HTTPRequestParser.parse_header and reads chunked/headers."""
    parser_class = require(SERVER, "waitress.parser", "HTTPRequestParser")
    parsing_error = require(SERVER, "waitress.parser", "ParsingError")
    assert params(parser_class.parse_header) == ["header_plus"], (
        f"{SERVER} relies on waitress HTTPRequestParser.parse_header(header_plus)")
    assert issubclass(parsing_error, Exception), f"{SERVER} relies on waitress.parser.ParsingError"
    assert params(parser_class.__init__) == ["adj"], f"{SERVER} relies on waitress HTTPRequestParser(adj)"


def test_waitress_parser_sets_chunked_and_keeps_content_length():
    """After parse_header, a chunked request has ``chunked`` set and Content-Length still in
    ``headers`` (Transfer-Encoding is popped): what StrictRequestParser checks."""
    from waitress.adjustments import Adjustments
    from waitress.parser import HTTPRequestParser

    parser = HTTPRequestParser(Adjustments())
    parser.received(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n")
    assert parser.error is None, f"waitress refused the request itself: {parser.error}"
    assert parser.chunked is True, f"{SERVER} relies on waitress HTTPRequestParser.chunked after parse_header"
    assert isinstance(parser.headers, dict) and "CONTENT_LENGTH" in parser.headers, (
        f"{SERVER} relies on waitress HTTPRequestParser.headers holding CONTENT_LENGTH")


def test_waitress_turns_parsing_error_from_parse_header_into_400():
    """A ParsingError raised by an overridden parse_header becomes a 400 for that request."""
    from waitress.adjustments import Adjustments
    from waitress.parser import HTTPRequestParser, ParsingError

    class Refusing(HTTPRequestParser):
        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            raise ParsingError("refused")

    parser = Refusing(Adjustments())
    parser.received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parser.completed and parser.error is not None and parser.error.code == 400, (
        f"{SERVER} relies on waitress answering 400 when parse_header raises ParsingError")


def test_waitress_channel_and_server_internals():
    """The attributes serve(), _flushed() and make_server() use on waitress's server and channel."""
    channel_class = require(SERVER, "waitress.channel", "HTTPChannel")
    parser_class = require(SERVER, "waitress.parser", "HTTPRequestParser")
    wasyncore = require(SERVER, "waitress", "wasyncore")
    assert channel_class.parser_class is parser_class, f"{SERVER} relies on waitress HTTPChannel.parser_class"
    assert "total_outbufs_len" in vars(channel_class), f"{SERVER} relies on waitress HTTPChannel.total_outbufs_len"
    assert "self.requests = []" in inspect.getsource(channel_class.__init__), (
        f"{SERVER} relies on waitress HTTPChannel.requests")
    loop_params = params(wasyncore.loop)
    assert {"timeout", "use_poll", "map", "count"} <= set(loop_params), (
        f"{SERVER} relies on waitress wasyncore.loop(timeout, use_poll, map, count)")
    assert {"map", "ignore_all"} <= set(params(wasyncore.close_all)), (
        f"{SERVER} relies on waitress wasyncore.close_all(map, ignore_all)")
    shutdown = require(SERVER, "waitress.task", "ThreadedTaskDispatcher.shutdown")
    assert {"cancel_pending", "timeout"} <= set(params(shutdown)), (
        f"{SERVER} relies on waitress ThreadedTaskDispatcher.shutdown(cancel_pending, timeout)")
    task_source = inspect.getsource(require("shimmy_core/http/dialect_kit.py", "waitress.task", "WSGITask"))
    assert "waitress.client_disconnected" in task_source, (
        "shimmy_core/http/dialect_kit.py relies on waitress setting environ['waitress.client_disconnected']")


def test_waitress_server_uses_channel_class_and_parser_class():
    """A live server: _map, asyncore, adj.asyncore_use_poll, task_dispatcher and effective_port
    exist, accepted connections get ``server.channel_class`` and requests ``parser_class``."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser

    class MarkerParser(HTTPRequestParser):
        pass

    class MarkerChannel(HTTPChannel):
        parser_class = MarkerParser

    server = _waitress_server()
    client = None
    try:
        for name in ("_map", "asyncore", "adj", "task_dispatcher", "effective_port", "channel_class"):
            assert hasattr(server, name), f"{SERVER} relies on the waitress server attribute {name!r}"
        assert isinstance(server._map, dict), f"{SERVER} relies on waitress server._map being a dict"
        assert isinstance(server.adj.asyncore_use_poll, bool), f"{SERVER} relies on waitress adj.asyncore_use_poll"
        server.channel_class = MarkerChannel
        client = socket.create_connection(("127.0.0.1", server.effective_port), timeout=5)
        client.sendall(b"GET / HTTP/1.1\r\n")  # an unfinished header: nothing is dispatched

        def channel():
            return next((c for c in list(server._map.values()) if isinstance(c, MarkerChannel)), None)

        deadline = time.monotonic() + 5
        while (channel() is None or channel().request is None) and time.monotonic() < deadline:
            server.asyncore.loop(timeout=0.05, map=server._map, use_poll=server.adj.asyncore_use_poll, count=1)
        accepted = channel()
        assert accepted is not None, f"{SERVER} relies on waitress creating channels from server.channel_class"
        assert type(accepted.request) is MarkerParser, f"{SERVER} relies on waitress HTTPChannel.parser_class"
        assert accepted.requests == [] and accepted.total_outbufs_len == 0, (
            f"{SERVER} relies on waitress channel.requests and channel.total_outbufs_len")
    finally:
        if client is not None:
            client.close()
        _close_waitress(server)


# ============================================================================ jinja2
def test_jinja2_internal_names_exist():
    """The compiler, node, sandbox, parser and runtime names chat_template.py imports or uses."""
    for module, name in [
        ("jinja2.compiler", "CodeGenerator"), ("jinja2.compiler", "Frame"), ("jinja2.compiler", "optimizeconst"),
        ("jinja2.nodes", "Concat"), ("jinja2.nodes", "List"), ("jinja2.nodes", "Dict"), ("jinja2.nodes", "Tuple"),
        ("jinja2.nodes", "Scope"), ("jinja2.nodes", "EvalContext"), ("jinja2.parser", "Parser"),
        ("jinja2.runtime", "Context"), ("jinja2.sandbox", "ImmutableSandboxedEnvironment"),
        ("jinja2.utils", "Namespace"), ("jinja2.ext", "Extension"), ("jinja2.exceptions", "SecurityError"),
    ]:
        require(CHAT_TEMPLATE, module, name)


def test_jinja2_code_generator_visitors():
    """_GuardedCodeGenerator overrides visit_Concat/List/Dict/Tuple(node, frame), reads
    frame.eval_ctx.volatile/autoescape, writes str_join/markup_join, and reads node.nodes/node.ctx."""
    from jinja2 import Environment, nodes, runtime
    from jinja2.compiler import CodeGenerator, Frame

    for name in ("visit_Concat", "visit_List", "visit_Dict", "visit_Tuple"):
        method = getattr(CodeGenerator, name, None)
        assert method is not None and params(method) == ["node", "frame"], (
            f"{CHAT_TEMPLATE} relies on jinja2 CodeGenerator.{name}(node, frame)")
    frame = Frame(nodes.EvalContext(Environment()))
    assert hasattr(frame.eval_ctx, "volatile") and hasattr(frame.eval_ctx, "autoescape"), (
        f"{CHAT_TEMPLATE} relies on jinja2 Frame.eval_ctx.volatile and .autoescape")
    assert {"str_join", "markup_join"} <= set(runtime.exported), (
        f"{CHAT_TEMPLATE} relies on jinja2.runtime exporting str_join and markup_join to generated code")
    assert nodes.Concat.fields == ("nodes",), f"{CHAT_TEMPLATE} relies on jinja2 nodes.Concat.nodes"
    assert "ctx" in nodes.Tuple.fields, f"{CHAT_TEMPLATE} relies on jinja2 nodes.Tuple.ctx"
    assert nodes.Scope.fields == ("body",), f"{CHAT_TEMPLATE} relies on jinja2 nodes.Scope(body)"


def test_jinja2_code_generator_class_is_used():
    """Environment.code_generator_class picks the generator, and optimizeconst decorates visitors."""
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Marking(CodeGenerator):
        @optimizeconst
        def visit_Concat(self, node, frame):
            self.write("marked_concat(")
            super().visit_Concat(node, frame)
            self.write(")")

        def visit_List(self, node, frame):
            self.write("marked_list(")
            super().visit_List(node, frame)
            self.write(")")

    class Env(ImmutableSandboxedEnvironment):
        code_generator_class = Marking

    source = Env().compile("{{ [x] }}{{ x ~ y }}", raw=True)
    assert "marked_list(" in source and "marked_concat(" in source, (
        f"{CHAT_TEMPLATE} relies on jinja2 Environment.code_generator_class and optimizeconst")


def test_jinja2_sandbox_hooks():
    """intercepted_binops routes operators to call_binop(context, operator, left, right), which may
    use binop_table; calls go through call(context, obj, ...); wrap_str_format exists (3.1.5+)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert params(ImmutableSandboxedEnvironment.call_binop) == ["context", "operator", "left", "right"], (
        f"{CHAT_TEMPLATE} relies on jinja2 SandboxedEnvironment.call_binop(context, operator, left, right)")
    assert len(params(ImmutableSandboxedEnvironment.call)) >= 2, (
        f"{CHAT_TEMPLATE} relies on jinja2 SandboxedEnvironment.call(context, obj, *args, **kwargs)")
    assert hasattr(ImmutableSandboxedEnvironment, "wrap_str_format"), (
        f"{CHAT_TEMPLATE} relies on jinja2 SandboxedEnvironment.wrap_str_format (jinja2>=3.1.5)")
    seen: list[tuple[str, str]] = []

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            seen.append(("binop", operator))
            return self.binop_table[operator](left, right)

        def call(self, context, obj, /, *args, **kwargs):
            seen.append(("call", obj.__name__))
            return super().call(context, obj, *args, **kwargs)

        def wrap_str_format(self, value):
            seen.append(("format", value.__name__))
            return super().wrap_str_format(value)

    out = Env().from_string("{{ a * b }}{{ a + b }}{{ '{}'.format(a) }}{{ f(a) }}").render(a=2, b=3, f=str)
    assert out == "6522", f"sandbox rendered {out!r}"
    assert ("binop", "*") in seen and ("binop", "+") in seen, (
        f"{CHAT_TEMPLATE} relies on jinja2 routing intercepted_binops to call_binop")
    assert ("call", "str") in seen, f"{CHAT_TEMPLATE} relies on jinja2 routing template calls to Environment.call"
    assert ("format", "format") in seen, (
        f"{CHAT_TEMPLATE} relies on jinja2 routing str.format through SandboxedEnvironment.wrap_str_format")


def test_jinja2_generated_code_uses_environment_concat_and_context_call_kwargs():
    """Captured blocks are joined with environment.concat; calls in loops pass _loop_vars, which
    jinja2.runtime.Context.call consumes (and _block_vars)."""
    from jinja2.runtime import Context
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    joined: list[list[str]] = []
    env = ImmutableSandboxedEnvironment()
    env.concat = lambda pieces: joined.append(list(pieces)) or "".join(joined[-1])
    assert env.from_string("{% set x %}a{{ y }}{% endset %}{{ x }}").render(y="1") == "a1"
    assert ["a", "1"] in joined, f"{CHAT_TEMPLATE} relies on jinja2 joining captured blocks with environment.concat"
    source = ImmutableSandboxedEnvironment().compile("{% for i in [1] %}{{ f(i) }}{% endfor %}", raw=True)
    assert "environment.call(context, " in source and "_loop_vars=_loop_vars" in source, (
        f"{CHAT_TEMPLATE} relies on jinja2 generated calls passing _loop_vars through Environment.call")
    call_source = inspect.getsource(Context.call)
    assert "_loop_vars" in call_source and "_block_vars" in call_source, (
        f"{CHAT_TEMPLATE} relies on jinja2 Context.call consuming _loop_vars and _block_vars")


def test_jinja2_filters_and_globals():
    """The filter parameter names _check_filter reads, jinja_pass_arg, lipsum and namespace globals,
    the '<template>' file name of from_string, and Parser.parse_statements for the generation tag."""
    from jinja2 import Environment
    from jinja2.defaults import DEFAULT_FILTERS, DEFAULT_NAMESPACE
    from jinja2.parser import Parser
    from jinja2.utils import Namespace

    expected = {
        "format": ["value", "args", "kwargs"],
        "join": ["value", "d"],
        "replace": ["s", "old", "new", "count"],
        "indent": ["s", "width"],
        "wordwrap": ["environment", "s", "wrapstring"],
    }
    for name, needed in expected.items():
        names = params(DEFAULT_FILTERS[name])
        assert set(needed) <= set(names), f"{CHAT_TEMPLATE} relies on jinja2 filter {name}({', '.join(needed)})"
    for name in ("join", "replace", "wordwrap"):
        assert hasattr(DEFAULT_FILTERS[name], "jinja_pass_arg"), (
            f"{CHAT_TEMPLATE} relies on jinja2 marking pass_* filters with jinja_pass_arg ({name})")
    assert not hasattr(DEFAULT_FILTERS["indent"], "jinja_pass_arg"), (
        f"{CHAT_TEMPLATE} relies on jinja_pass_arg being set only on pass_* filters")
    assert hasattr(Environment(), "newline_sequence"), f"{CHAT_TEMPLATE} relies on jinja2 Environment.newline_sequence"
    assert "lipsum" in DEFAULT_NAMESPACE, f"{CHAT_TEMPLATE} deletes the jinja2 global 'lipsum'"
    assert DEFAULT_NAMESPACE.get("namespace") is Namespace, (
        f"{CHAT_TEMPLATE} replaces the jinja2 global 'namespace' with a jinja2.utils.Namespace subclass")
    template = Environment().from_string("x")
    assert template.root_render_func.__code__.co_filename == "<template>", (
        f"{CHAT_TEMPLATE} relies on jinja2 compiling from_string templates under the file name '<template>'")
    assert {"end_tokens", "drop_needle"} <= set(params(Parser.parse_statements)), (
        f"{CHAT_TEMPLATE} relies on jinja2 Parser.parse_statements(end_tokens, drop_needle)")


# ============================================================================ diskcache
def _recording_disk(calls: list[tuple]):
    """A diskcache Disk that records the arguments of the methods JSONBytesDisk overrides."""
    from diskcache import Disk

    class Recording(Disk):
        def get(self, key, raw):
            calls.append(("get", raw))
            return super().get(key, raw)

        def store(self, value, read, key=None):
            calls.append(("store", type(value), read))
            return super().store(value, read)

        def fetch(self, mode, filename, value, read):
            calls.append(("fetch", mode, filename, type(value), read))
            return super().fetch(mode, filename, value, read)

    return Recording


def _disk_cache(directory, disk):
    import diskcache

    return diskcache.Cache(
        str(directory), timeout=0.1, disk=disk, eviction_policy="least-recently-stored",
        disk_min_file_size=2**62, size_limit=2**30, statistics=0,
    )


def test_diskcache_disk_hooks(tmp_path):
    """JSONBytesDisk overrides Disk.get(key, raw), store(value, read, key) and
    fetch(mode, filename, value, read), and expects inline bytes to come back as MODE_RAW."""
    from diskcache import Disk

    mode_raw = require(DISK_CACHE, "diskcache.core", "MODE_RAW")
    assert params(Disk.get) == ["key", "raw"], f"{DISK_CACHE} relies on diskcache Disk.get(key, raw)"
    assert params(Disk.store)[:2] == ["value", "read"] and "key" in params(Disk.store), (
        f"{DISK_CACHE} relies on diskcache Disk.store(value, read, key)")
    assert params(Disk.fetch) == ["mode", "filename", "value", "read"], (
        f"{DISK_CACHE} relies on diskcache Disk.fetch(mode, filename, value, read)")
    calls: list[tuple] = []
    cache = _disk_cache(tmp_path, _recording_disk(calls))
    try:
        cache.set("ab12", b'{"x":1}')
        raw = cache.get("ab12")
        assert bytes(raw) == b'{"x":1}'
        assert list(cache) == ["ab12"]
    finally:
        cache.close()
    assert ("store", bytes, False) in calls, f"{DISK_CACHE} relies on diskcache calling Disk.store(value, read=False)"
    fetched = [c for c in calls if c[0] == "fetch"]
    assert fetched and fetched[0][1] == mode_raw and fetched[0][2] is None and fetched[0][4] is False, (
        f"{DISK_CACHE} relies on diskcache fetching inline bytes as (MODE_RAW, filename=None, read=False), "
        f"got {fetched}")
    assert ("get", True) in calls, f"{DISK_CACHE} relies on diskcache calling Disk.get(key, raw=True) for str keys"


def test_diskcache_sql_and_files(tmp_path):
    """Cache._sql runs SQL on diskcache's connection; everything lives in cache.db (+ WAL files)."""
    from shimmy_plugins.caches.disk_cache import DB_FILES

    cache = _disk_cache(tmp_path, _recording_disk([]))
    try:
        assert hasattr(cache, "_sql"), f"{DISK_CACHE} relies on diskcache Cache._sql"
        assert cache._sql("PRAGMA quick_check").fetchall() == [("ok",)], (
            f"{DISK_CACHE} relies on diskcache Cache._sql(statement) returning a cursor")
        cache.set("k1", b"{}")
        files = {p.name for p in tmp_path.iterdir()}
    finally:
        cache.close()
    assert "cache.db" in files and files <= set(DB_FILES), (
        f"{DISK_CACHE} relies on diskcache keeping everything in {DB_FILES}, found {sorted(files)}")


def test_diskcache_table_schema_and_triggers(tmp_path):
    """_trim deletes rows of the Cache table by rowid and expire_time with plain SQL, and relies on
    diskcache's triggers to keep the entry count and size in the Settings table right."""
    cache = _disk_cache(tmp_path, _recording_disk([]))
    try:
        for i in range(5):
            cache.set(f"k{i}", b"0123456789", expire=None if i else 0.001)
        time.sleep(0.01)
        con = sqlite3.connect(tmp_path / "cache.db", timeout=0.1, isolation_level=None)
        try:
            columns = {row[1] for row in con.execute("PRAGMA table_info(Cache)")}
            assert {"expire_time", "key", "raw", "size"} <= columns, (
                f"{DISK_CACHE} relies on diskcache's table Cache(expire_time, ...), found {sorted(columns)}")
            triggers = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
            assert {"Settings_count_delete", "Settings_size_delete"} <= triggers, (
                f"{DISK_CACHE} relies on diskcache's delete triggers on Cache, found {sorted(triggers)}")
            size_before = con.execute("SELECT value FROM Settings WHERE key = 'size'").fetchone()[0]
            con.execute("DELETE FROM Cache WHERE expire_time IS NOT NULL AND expire_time < ?", (time.time(),))
            con.execute("DELETE FROM Cache WHERE rowid NOT IN (SELECT rowid FROM Cache ORDER BY rowid DESC LIMIT ?)",
                        (2,))
            size_after = con.execute("SELECT value FROM Settings WHERE key = 'size'").fetchone()[0]
            stored = con.execute("SELECT COALESCE(SUM(size), 0) FROM Cache").fetchone()[0]
        finally:
            con.close()
        assert len(cache) == 2, f"{DISK_CACHE} relies on diskcache's triggers keeping the count, got {len(cache)}"
        assert size_after == stored, (
            f"{DISK_CACHE} relies on diskcache's triggers keeping the size ({size_before} -> {size_after}, "
            f"rows hold {stored})")
        assert sorted(cache) == ["k3", "k4"], f"{DISK_CACHE} relies on rowid order being insertion order"
    finally:
        cache.close()


# ============================================================================ llama-cpp-python
def test_llama_cpp_internal_classes():
    """gguf.py and gguf_engine.py use llama_cpp._internals.LlamaModel/LlamaContext and _logger.set_verbose."""
    model = require(GGUF, "llama_cpp._internals", "LlamaModel")
    context = require(GGUF, "llama_cpp._internals", "LlamaContext")
    set_verbose = require(GGUF, "llama_cpp._logger", "set_verbose")
    assert params(set_verbose) == ["verbose"], f"{GGUF} relies on llama_cpp._logger.set_verbose(verbose)"
    assert {"path_model", "params", "verbose"} <= set(params(model.__init__)), (
        f"{GGUF} relies on llama_cpp._internals.LlamaModel(path_model=, params=, verbose=)")
    assert {"model", "params", "verbose"} <= set(params(context.__init__)), (
        f"{GGUF} relies on llama_cpp._internals.LlamaContext(model=, params=, verbose=)")
    for name, needed in [("n_vocab", []), ("n_ctx_train", []), ("token_bos", []), ("token_eos", []),
                         ("token_get_text", ["token"]), ("add_bos_token", []), ("metadata", []),
                         ("tokenize", ["text", "add_bos", "special"]), ("close", [])]:
        method = getattr(model, name, None)
        assert method is not None and set(needed) <= set(params(method)), (
            f"{GGUF} relies on llama_cpp._internals.LlamaModel.{name}({', '.join(needed)})")
    assert callable(getattr(context, "close", None)), f"{GGUF} relies on llama_cpp._internals.LlamaContext.close"
    assert "self.vocab" in inspect.getsource(model.__init__), (
        f"{GGUF_ENGINE} relies on llama_cpp._internals.LlamaModel.vocab")
    assert "self.ctx" in inspect.getsource(context.__init__), (
        f"{GGUF_ENGINE} relies on llama_cpp._internals.LlamaContext.ctx")


def test_llama_cpp_model_load_failure_is_caught():
    """GGUFBackend.load catches ValueError, RuntimeError and OSError from LlamaModel."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    with pytest.raises((ValueError, RuntimeError, OSError)):
        LlamaModel(path_model="/nonexistent/shimmy-test.gguf", params=llama_cpp.llama_model_default_params(),
                   verbose=False)


def test_llama_cpp_sampler_chain():
    """Engine._sampler builds a LlamaSampler chain with these methods and arguments."""
    import llama_cpp

    sampler_class = require(GGUF_ENGINE, "llama_cpp._internals", "LlamaSampler")
    for name, needed in [("add_logit_bias", ["n_vocab", "logit_bias"]),
                         ("add_penalties", ["n_vocab", "penalty_last_n", "penalty_repeat", "penalty_freq",
                                            "penalty_present"]),
                         ("add_greedy", []), ("add_top_k", ["k"]), ("add_temp", ["temp"]),
                         ("add_top_p", ["p", "min_keep"]), ("add_min_p", ["p", "min_keep"]),
                         ("add_dist", ["seed"]), ("sample", ["ctx", "idx"])]:
        method = getattr(sampler_class, name, None)
        assert method is not None, f"{GGUF_ENGINE} relies on llama_cpp._internals.LlamaSampler.{name}"
        assert params(method)[: len(needed)] == needed, (
            f"{GGUF_ENGINE} relies on llama_cpp._internals.LlamaSampler.{name}({', '.join(needed)}), "
            f"found {name}{inspect.signature(method)}")
    sampler = sampler_class()
    greedy = sampler_class()
    try:
        sampler.add_logit_bias(16, {1: 2.0})
        sampler.add_penalties(16, 256, 1.0, 0.1, 0.2)
        sampler.add_top_k(40)
        sampler.add_temp(0.7)
        sampler.add_top_p(0.9, 1)
        sampler.add_min_p(0.05, 1)
        sampler.add_dist(1234)
        greedy.add_greedy()
        assert llama_cpp.llama_sampler_chain_n(sampler.sampler) == 7, (
            f"{GGUF_ENGINE} relies on LlamaSampler.sampler being the llama.cpp sampler chain")
    finally:
        sampler.close()
        greedy.close()


# The low-level functions Shimmy calls, with the number of arguments it passes.
LLAMA_FUNCTIONS = {
    "llama_model_default_params": (GGUF, 0),
    "llama_context_default_params": (GGUF, 0),
    "llama_supports_gpu_offload": (GGUF_PLACEMENT, 0),
    "llama_max_devices": (GGUF_PLACEMENT, 0),
    "llama_n_ctx_seq": (GGUF, 1),
    "llama_get_memory": (GGUF_ENGINE, 1),
    "llama_batch_init": (GGUF_ENGINE, 3),
    "llama_batch_free": (GGUF_ENGINE, 1),
    "llama_decode": (GGUF_ENGINE, 2),
    "llama_memory_seq_rm": (GGUF_ENGINE, 4),
    "llama_memory_seq_cp": (GGUF_ENGINE, 5),
    "llama_sampler_init_grammar": (GGUF_ENGINE, 3),
    "llama_sampler_init_grammar_lazy_patterns": (GGUF_ENGINE, 7),
    "llama_sampler_chain_add": (GGUF_ENGINE, 2),
    "llama_sampler_free": (GGUF_ENGINE, 1),
    "llama_vocab_is_eog": (GGUF_ENGINE, 2),
    "llama_token_to_piece": (GGUF_ENGINE, 6),
    "llama_get_logits_ith": (GGUF_ENGINE, 2),
}


@pytest.mark.parametrize("name", sorted(LLAMA_FUNCTIONS))
def test_llama_cpp_low_level_functions(name):
    """Each ctypes binding exists and takes as many arguments as Shimmy passes."""
    import llama_cpp

    user, n_args = LLAMA_FUNCTIONS[name]
    func = getattr(llama_cpp, name, None)
    assert func is not None, f"{user} relies on llama_cpp.{name}, which is gone"
    argtypes = getattr(func, "argtypes", None)
    if argtypes is not None:
        assert len(argtypes) == n_args, (
            f"{user} relies on llama_cpp.{name} taking {n_args} arguments, it now takes {len(argtypes)}")
    else:
        assert len(inspect.signature(func).parameters) == n_args, (
            f"{user} relies on llama_cpp.{name} taking {n_args} arguments, found {inspect.signature(func)}")


def test_llama_cpp_param_struct_fields():
    """The fields of llama_model_params and llama_context_params that GGUFBackend.load sets."""
    import llama_cpp

    for name in ("LLAMA_FLASH_ATTN_TYPE_DISABLED", "LLAMA_FLASH_ATTN_TYPE_ENABLED", "LLAMA_FLASH_ATTN_TYPE_AUTO"):
        assert isinstance(getattr(llama_cpp, name, None), int), f"{GGUF_PLACEMENT} relies on llama_cpp.{name}"
    model_fields = {name for name, _ in llama_cpp.llama_model_params._fields_}
    for field in ("n_gpu_layers", "use_extra_bufts", "tensor_buft_overrides", "main_gpu", "tensor_split"):
        assert field in model_fields, f"{GGUF_PLACEMENT} relies on llama_cpp.llama_model_params.{field}"
    context_fields = {name for name, _ in llama_cpp.llama_context_params._fields_}
    for field in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "kv_unified", "n_threads", "n_threads_batch",
                  "no_perf", "flash_attn_type", "type_k", "type_v"):
        assert field in context_fields, f"{GGUF} relies on llama_cpp.llama_context_params.{field}"
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0x7FFFFFFF
    mparams.use_extra_bufts = False
    assert mparams.n_gpu_layers == 0x7FFFFFFF and mparams.use_extra_bufts is False
    cparams = llama_cpp.llama_context_default_params()
    cparams.kv_unified = False
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert cparams.kv_unified is False and cparams.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


def test_tensor_buffer_type_overrides():
    """llama-cpp-python leaves tensor_buft_overrides unused; gguf_placement fills it with its own
    array of (pattern, buffer type) and ggml's CPU buffer type, found in the library llama_cpp ships."""
    import ctypes

    import llama_cpp

    from shimmy_plugins.backends.gguf.gguf_placement import ExpertOverrides, cpu_buffer_type

    assert cpu_buffer_type(), f"{GGUF_PLACEMENT} relies on ggml_backend_cpu_buffer_type in llama_cpp/lib"
    overrides = ExpertOverrides(2, 4)
    mparams = llama_cpp.llama_model_default_params()
    overrides.apply(mparams)
    assert mparams.tensor_buft_overrides == ctypes.addressof(overrides.array)
    assert overrides.array[0].pattern == rb"blk\.(0|1)\.ffn_(up|down|gate|gate_up)_exps"
    assert overrides.array[1].pattern is None and not overrides.array[1].buft  # the terminator
    assert llama_cpp.llama_max_tensor_buft_overrides() >= 2


def test_llama_cpp_batch_fields():
    """Engine._add and _decode fill a llama_batch through token, pos, n_seq_id, seq_id, logits, n_tokens."""
    import llama_cpp

    fields = {name for name, _ in llama_cpp.llama_batch._fields_}
    for field in ("n_tokens", "token", "pos", "n_seq_id", "seq_id", "logits"):
        assert field in fields, f"{GGUF_ENGINE} relies on llama_cpp.llama_batch.{field}"
    batch = llama_cpp.llama_batch_init(8, 0, 1)
    try:
        batch.token[3] = 42
        batch.pos[3] = 7
        batch.n_seq_id[3] = 1
        batch.seq_id[3][0] = 2
        batch.logits[3] = True
        batch.n_tokens = 4
        assert (batch.token[3], batch.pos[3], batch.n_seq_id[3], batch.seq_id[3][0], batch.n_tokens) == (
            42, 7, 1, 2, 4), f"{GGUF_ENGINE} relies on writing llama_batch arrays by index"
        assert batch.logits[3], f"{GGUF_ENGINE} relies on llama_batch.logits"
    finally:
        llama_cpp.llama_batch_free(batch)


# ============================================================================ pluggy
def test_pluggy_hookimpl_marker_attribute_and_tracing():
    """_unknown_hooks finds hook implementations by the attribute '<project>_impl' that
    HookimplMarker sets; SHIMMY_TRACE_HOOKS uses pm.trace.root.setwriter."""
    import pluggy

    @pluggy.HookimplMarker("shimmy")
    def shimmy_something():
        pass

    assert hasattr(shimmy_something, "shimmy_impl"), (
        f"{PLUGIN_MANAGER} relies on pluggy HookimplMarker('shimmy') setting the attribute 'shimmy_impl'")
    pm = pluggy.PluginManager("shimmy")
    assert callable(getattr(getattr(getattr(pm, "trace", None), "root", None), "setwriter", None)), (
        f"{PLUGIN_MANAGER} relies on pluggy PluginManager.trace.root.setwriter")


# ============================================================================ jsonschema
def test_jsonschema_validator_descend():
    """The patternProperties/additionalProperties keywords call validator.descend(instance,
    schema, path=, schema_path=), which is not part of jsonschema's documented Validator protocol."""
    from jsonschema import Draft202012Validator, ValidationError, validators
    from referencing import Registry

    assert {"instance", "schema", "path", "schema_path"} <= set(params(Draft202012Validator.descend)), (
        f"{SCHEMAS} relies on jsonschema Validator.descend(instance, schema, path=, schema_path=)")

    def each_value(validator, subschema, instance, schema):
        for key, value in instance.items():
            yield from validator.descend(value, subschema, path=key, schema_path="x")

    def never(validator, value, instance, schema):
        yield ValidationError("refused")

    extended = validators.extend(Draft202012Validator, {"x-each": each_value, "x-never": never})
    validator = extended({"x-each": {"x-never": True}}, registry=Registry())
    errors = list(validator.iter_errors({"a": 1}))
    assert [list(e.absolute_path) for e in errors] == [["a"]], (
        f"{SCHEMAS} relies on jsonschema Validator.descend putting path= into the error's absolute_path")


# ============================================================================ Python's re internals
def test_python_re_parser_internals():
    """PatternGrammar walks the parse tree of re._parser (sre_parse on Python 3.10)."""
    try:  # the same imports as plugins/backends/gguf/gbnf.py
        from re import _constants as sre_c  # type: ignore[attr-defined]
        from re import _parser as sre_parse  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_constants as sre_c  # type: ignore[no-redef]
        import sre_parse  # type: ignore[no-redef]

    assert isinstance(sre_c.SRE_FLAG_UNICODE, int) and hasattr(sre_c, "MAXREPEAT"), (
        f"{GRAMMAR} relies on re._constants.SRE_FLAG_UNICODE and MAXREPEAT")
    tree = sre_parse.parse(r"^a[^b-d\d]x{2,}(?:ab|cd)(k)*?.$")
    assert tree.state.flags & ~sre_c.SRE_FLAG_UNICODE == 0, f"{GRAMMAR} relies on re._parser tree.state.flags"
    assert sre_parse.parse("(?i)a").state.flags & ~sre_c.SRE_FLAG_UNICODE, (
        f"{GRAMMAR} relies on inline flags showing in tree.state.flags")
    items = [(str(op), av) for op, av in tree]
    names = [name for name, _ in items]
    assert names == ["AT", "LITERAL", "IN", "MAX_REPEAT", "BRANCH", "MIN_REPEAT", "ANY", "AT"], (
        f"{GRAMMAR} relies on re._parser opcode names, got {names}")
    assert str(items[0][1]) == "AT_BEGINNING" and str(items[-1][1]) == "AT_END", (
        f"{GRAMMAR} relies on re._parser AT_BEGINNING/AT_END")
    assert items[1][1] == ord("a"), f"{GRAMMAR} relies on LITERAL carrying a code point"
    in_items = [(str(op), av) for op, av in items[2][1]]
    assert [n for n, _ in in_items] == ["NEGATE", "RANGE", "CATEGORY"], f"{GRAMMAR} relies on IN items, got {in_items}"
    assert tuple(in_items[1][1]) == (ord("b"), ord("d")) and str(in_items[2][1]) == "CATEGORY_DIGIT", (
        f"{GRAMMAR} relies on RANGE (lo, hi) and CATEGORY_* names")
    lo, hi, sub = items[3][1]
    assert (lo, hi == sre_c.MAXREPEAT, str(list(sub)[0][0])) == (2, True, "LITERAL"), (
        f"{GRAMMAR} relies on MAX_REPEAT (lo, hi, sub)")
    branch = items[4][1]
    assert branch[0] is None and len(branch[1]) == 2, f"{GRAMMAR} relies on BRANCH (None, [branches])"
    lo, hi, sub = items[5][1]
    op, av = list(sub)[0]
    assert str(op) == "SUBPATTERN" and len(av) == 4 and av[1] == av[2] == 0, (
        f"{GRAMMAR} relies on SUBPATTERN (group, add_flags, del_flags, sub)")


# ============================================================================ transformers (optional)
def test_transformers_dynamic_cache_layers():
    """BatchEngine merges and trims rows by editing DynamicCache.layers[i].keys/.values, tensors
    of shape [batch, heads, seq, head_dim], and the cache's length follows them."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    cache = DynamicCache()
    assert hasattr(cache, "layers"), f"{SAFETENSORS_ENGINE} relies on transformers DynamicCache.layers (>=4.56)"
    cache.update(torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5), 0)
    layer = cache.layers[0]
    assert tuple(layer.keys.shape) == (2, 3, 4, 5) and tuple(layer.values.shape) == (2, 3, 4, 5), (
        f"{SAFETENSORS_ENGINE} relies on DynamicCache layer keys/values of shape [batch, heads, seq, head_dim]")
    layer.keys = layer.keys[:1, :, 1:, :]
    layer.values = layer.values[:1, :, 1:, :]
    assert cache.get_seq_length() == 3, (
        f"{SAFETENSORS_ENGINE} relies on DynamicCache's length following layer.keys after they are replaced")


def test_transformers_forward_arguments():
    """BatchEngine passes the cache as 'cache' or 'past_key_values' and trims logits with
    'logits_to_keep' or 'num_logits_to_keep' (checked on the Llama family, SmolLM2's)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    names = set(inspect.signature(transformers.LlamaForCausalLM.forward).parameters)
    assert names & {"cache", "past_key_values"}, (
        f"{SAFETENSORS_ENGINE} relies on forward() taking 'cache' or 'past_key_values', found {sorted(names)}")
    assert names & {"logits_to_keep", "num_logits_to_keep"}, (
        f"{SAFETENSORS_ENGINE} relies on forward() taking 'logits_to_keep', found {sorted(names)}")


# ============================================================================ llguidance (optional)
def test_llguidance_api_and_error_text():
    """safetensors_constraints.py uses llguidance's public API only, but relies on the shape of what it
    returns: the "x-guidance" JSON options (json.dumps's separators, no other whitespace), grammar errors
    as 'at L(C): failed to compile JSON schema: DETAIL' (DETAIL becomes the 400's message), and a
    bitmask of little-endian 32-bit words, bit i of word j for token 32*j+i (checked with SmolLM2's
    tokenizer in tests/test_safetensors_constraints.py).  pyproject.toml bounds llguidance below 2."""
    pytest.importorskip("transformers")
    pytest.importorskip("llguidance")
    matcher = require(CONSTRAINTS, "llguidance", "LLMatcher")
    from_tokenizer = require(CONSTRAINTS, "llguidance.hf", "from_tokenizer")
    assert {"n_vocab", "eos_token"} <= set(params(from_tokenizer)), (
        f"{CONSTRAINTS} relies on llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=, eos_token=)")
    for name in ("grammar_from_lark", "validate_grammar", "deep_copy", "compute_bitmask", "consume_token",
                 "is_error", "get_error", "is_stopped"):
        assert callable(getattr(matcher, name, None)), f"{CONSTRAINTS} relies on llguidance.LLMatcher.{name}"
    from shimmy_plugins.backends.safetensors.safetensors_constraints import JSON_OPTIONS, _detail

    ok = matcher.grammar_from_lark("start: %json " + json.dumps({"type": "object", "x-guidance": JSON_OPTIONS}))
    assert matcher.validate_grammar(ok) == "", f"{CONSTRAINTS} relies on the x-guidance options {JSON_OPTIONS}"
    error = matcher.validate_grammar(matcher.grammar_from_lark('start: %json {"not": {}}'))
    assert _detail(error) == 'Unimplemented keys: ["not"]', (
        f"{CONSTRAINTS} relies on llguidance's error text 'at L(C): failed to compile JSON schema: ...', got {error!r}")
