"""Tools: the toolbox (enabling rules, arguments validated before anything runs), each built-in
tool against its attack list (the calculator's bombs; file_read's escapes, huge and binary files;
http_request's SSRF disguises, redirects, gzip bombs and dripping servers, all against real HTTP
servers on loopback), JSON tool files and their validation errors, every example in
examples/tools, ``GET /v1/tools`` and ``shimmy tools``."""

from __future__ import annotations

import gzip
import http.server
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shimmy_core.contract.hookspecs import hookimpl
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.plugin_registry import build_registry
from shimmy_core.contract.settings import Settings
from shimmy_core.tools import schemas
from shimmy_core.tools.calculator import CalculatorError, evaluate, format_number
from shimmy_core.tools.files import FileReader, FileRefused
from shimmy_core.tools.http_client import HttpPolicy, RequestRefused, address_refusal, fetch
from shimmy_core.tools.specs import ToolSpecError, load_spec, meta_schema
from shimmy_core.tools.toolbox import ToolBox, ToolConfigError
from tests.conftest import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "tools"
BUILTIN_TOOLS = ("tools_calculator", "tools_files", "tools_http")


def settings(tmp_path: Path, **overrides) -> Settings:
    return Settings.load({"demo": False}, {}).replace(home=tmp_path / "home", **overrides)


def toolbox(tmp_path: Path, *extra: tuple[str, object], **overrides) -> ToolBox:
    plugins = [(name, importlib.import_module(BUILTIN_PLUGINS[name])) for name in BUILTIN_TOOLS] + list(extra)
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=plugins)
    s = settings(tmp_path, **overrides)
    registry = build_registry(pm, s)
    return ToolBox.build(registry.tools, registry.owners, s)


# ------------------------------------------------------------------ the toolbox
def test_builtin_tools_register_through_the_hook_and_are_off_by_default(tmp_path):
    box = toolbox(tmp_path)
    rows = {row["name"]: row for row in box.listing()}
    assert set(rows) == {"calculator", "file_read", "http_request"}
    assert not any(row["enabled"] for row in rows.values())
    assert rows["file_read"]["unavailable_reason"] and "--tool-root" in rows["file_read"]["unavailable_reason"]
    assert rows["calculator"]["text_prefix"] == "calc" and rows["file_read"]["capabilities"] == ["files"]
    assert box.execute("calculator", '{"expression": "1+1"}').output.startswith("error: the tool")  # not enabled


def test_enabling_checks_names_and_availability(tmp_path):
    with pytest.raises(ToolConfigError, match="no such tool.*known: calculator"):
        toolbox(tmp_path, enable_tools=("calculater",))
    with pytest.raises(ToolConfigError, match="--tool-root"):
        toolbox(tmp_path, enable_tools=("file_read",))
    with pytest.raises(ToolConfigError, match="not a folder"):
        toolbox(tmp_path, tool_roots=(str(tmp_path / "missing"),))


def test_a_file_tool_and_a_network_tool_need_explicit_permission(tmp_path):
    both = dict(enable_tools=("file_read", "http_request"), tool_roots=(str(tmp_path),))
    with pytest.raises(ToolConfigError, match="--allow-file-and-network"):
        toolbox(tmp_path, **both)
    box = toolbox(tmp_path, tool_allow_file_and_network=True, **both)
    assert box.runs("file_read") and box.runs("http_request")
    assert toolbox(tmp_path, enable_tools=("file_read", "calculator"), tool_roots=(str(tmp_path),)).runs("file_read")
    (tmp_path / "home" / "tools").mkdir(parents=True)
    shutil.copy(EXAMPLES / "word_count.json", tmp_path / "home" / "tools")
    with pytest.raises(ToolConfigError, match="--allow-file-and-network"):  # a command can do anything
        toolbox(tmp_path, enable_tools=("word_count", "file_read"), tool_roots=(str(tmp_path),))
    assert toolbox(tmp_path, enable_tools=("word_count",)).runs("word_count")


class _Counting:
    name = "counting"
    description = "Counts its runs."
    parameters = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(a|aa)+$"},
                                                   "n": {"type": "integer", "maximum": 3}},
                  "required": ["n"], "additionalProperties": False}

    def __init__(self):
        self.runs = 0

    def run(self, arguments):
        self.runs += 1
        if arguments["n"] == 3:
            raise RuntimeError("secret detail")
        if arguments["n"] == 2:
            time.sleep(5)
        return {"n": arguments["n"], "long": "x" * 30000} if arguments["n"] == 1 else "ran"


class _CountingPlugin:
    def __init__(self):
        self.tool = _Counting()

    @hookimpl
    def shimmy_register_tools(self, register):
        register(self.tool)


def test_hook_shimmy_register_tools_runs_a_python_tool_with_validated_arguments(tmp_path):
    plugin = _CountingPlugin()
    box = toolbox(tmp_path, ("counting", plugin), enable_tools=("counting",), tool_timeout=1.0)
    assert box.get("counting").source == "counting"
    assert box.execute("counting", '{"n": 0}').output == "ran"
    for bad, why in [('{"n": 9}', "9 is greater than the maximum of 3"), ('{"m": 1}', "'n' is a required property"),
                     ("[1]", "must be a JSON object"), ("{nope", "not valid JSON"),
                     ('{"n": 0, "code": "b"}', "does not match")]:
        outcome = box.execute("counting", bad)
        assert outcome.is_error and why in outcome.output, outcome.output
    assert plugin.tool.runs == 1  # none of the invalid calls ran
    failed = box.execute("counting", '{"n": 3}')
    assert failed.is_error and "RuntimeError" in failed.output and "secret" not in failed.output
    slow = box.execute("counting", '{"n": 2}')
    assert slow.is_error and "took longer" in slow.output
    long = box.execute("counting", '{"n": 1}')
    assert long.output.endswith("[truncated at 20000 characters]")


class _BrokenSchema:
    name = "broken"
    description = "Its parameters are not a JSON Schema."
    parameters = {"type": "object", "properties": {"n": {"type": 7}}}

    def run(self, arguments):  # pragma: no cover - never runs
        return "ran"


class _BrokenPlugin:
    @hookimpl
    def shimmy_register_tools(self, register):
        register(_BrokenSchema())


def test_a_plugin_tool_with_a_broken_schema_is_set_aside_not_fatal(tmp_path):
    """A start checks only what it must (the references of every tool, the full schema of the
    tools it enables); the rest is checked after it (Shimmy.warm_up): a broken plugin tool nobody
    enabled is then shown as unavailable, and enabling it stops the start with the reason."""
    box = toolbox(tmp_path, ("broken", _BrokenPlugin()))
    assert not box.get("broken").checked and box.get("broken").reason is None
    box.check_schemas()
    assert "parameters: invalid JSON Schema at /properties/n/type" in box.get("broken").reason
    assert box.get("calculator").checked and box.get("calculator").reason is None
    rows = {row["name"]: row for row in toolbox(tmp_path, ("broken", _BrokenPlugin())).listing()}
    assert "invalid JSON Schema" in rows["broken"]["unavailable_reason"]  # GET /v1/tools and `shimmy tools`
    with pytest.raises(ToolConfigError, match="tool 'broken' from broken: parameters: invalid JSON Schema"):
        toolbox(tmp_path, ("broken", _BrokenPlugin()), enable_tools=("broken",))


@pytest.mark.timeout(60)
def test_a_catastrophic_pattern_cannot_hang_validation():
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a|aa)+$"}},
              "patternProperties": {"^(b|bb)+$": {"type": "string"}}, "additionalProperties": False}
    schemas.check_schema(schema)
    validator = schemas.validator_for(schema)
    evil = {"s": "a" * 5000 + "!", "b" * 5000 + "!": "x"}
    problems = schemas.errors(validator, evil)
    assert problems and any("too long" in p or "ran out of time" in p for p in problems)


def test_remote_refs_are_never_fetched(monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a schema validator tried to fetch a URL")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    remote = {"type": "object", "properties": {"x": {"$ref": "http://127.0.0.1:9/evil.json"}}}
    with pytest.raises(schemas.SchemaProblem, match="not local"):
        schemas.check_schema(remote)
    # even a validator built over it fetches nothing: the reference is simply unresolvable
    problems = schemas.errors(schemas.validator_for(remote), {"x": 1})
    assert problems and "could not be applied" in problems[0]


# ------------------------------------------------------------------ calculator
@pytest.mark.parametrize("expression,value", [
    ("2*(3+4)", "14"), ("2^10", "1024"), ("10/4", "2.5"), ("7//2", "3"), ("-3 % 5", "2"), ("sqrt(16)", "4"),
    ("factorial(20)", "2432902008176640000"), ("round(pi, 3)", "3.142"), ("log(e)", "1"), ("log(8, 2)", "3"),
    ("max(1, 5, 3)", "5"), ("comb(5, 2)", "10"), ("2**-2", "0.25"), ("1e3 + 1", "1001"), ("abs(-2.5)", "2.5"),
])
def test_calculator_computes(expression, value):
    assert format_number(evaluate(expression)) == value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("expression", [
    "9**9**9", "9^9^9", "10**10**10", "2**100000", "(10**100)**100", "factorial(10**6)", "factorial(100000)",
    "factorial(1000)*factorial(1000)", "comb(10**9, 5)", "pow(10, 10**6)", "1<<10**9", "1e308*10", "exp(1000)",
    "2.5**100000", "10**2000", "-" * 300 + "1", "-(" * 100 + "1" + ")" * 100, "abs(" * 60 + "1" + ")" * 60,
    "x" * 600, "__import__('os').system('id')", "(1).real", "().__class__", "lambda: 1", "'a'*10", "[1]*10",
    "open('/etc/passwd')", "eval('1')", "True+1", "1 if 1 else 2", "sqrt(-1)", "1/0", "1%0", "0**-1",
    "log(0)", "asin(2)", "", "   ", "1;2", "a=1", "(-8)**(1/3)", "min()", "sin(x=1)",
])
def test_calculator_refuses_bombs_and_code(expression):
    started = time.monotonic()
    with pytest.raises(CalculatorError):
        evaluate(expression)
    assert time.monotonic() - started < 30  # a hang guard, not a benchmark


def test_calculator_tool_and_text_prefix(tmp_path):
    box = toolbox(tmp_path, enable_tools=("calculator",))
    assert box.execute("calculator", '{"expression": "6*7"}').output == "42"
    bomb = box.execute("calculator", '{"expression": "9**9**9"}')
    assert bomb.is_error and "too large" in bomb.output
    assert box.text_tools()["calc"].name == "calculator"


# ------------------------------------------------------------------ file_read
@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.md").write_text("# Notes\nhello from markdown\n")
    (folder / "sub" / "plain.txt").write_text("plain text")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02binary\xff")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "script.py").write_text("print('hi')")
    with open(folder / "huge.txt", "wb") as handle:
        handle.truncate(200 * 1024 * 1024)  # sparse: 200 MB that take no disk
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret")
    os.symlink(outside, folder / "escape.txt")
    os.symlink("/etc/passwd", folder / "passwd.txt")
    os.symlink(folder / "notes.md", folder / "alias.md")
    os.symlink(tmp_path, folder / "up")
    os.mkfifo(folder / "fifo.txt")
    return folder


def test_file_read_reads_under_its_root(root):
    reader = FileReader.under([root])
    assert "hello from markdown" in reader.read("notes.md")
    assert reader.read(str(root / "sub" / "plain.txt")) == "plain text"
    assert reader.read("sub/../notes.md").startswith("# Notes")
    assert "hello" in reader.read("alias.md")  # a symlink that stays inside is fine


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path,why", [
    ("../secret.txt", "outside"), ("sub/../../secret.txt", "outside"), ("/etc/passwd", "outside"),
    ("escape.txt", "outside"), ("passwd.txt", "outside"), ("up/secret.txt", "outside"), ("/", "outside"),
    ("missing.md", "does not exist"), ("huge.txt", "larger than"), ("binary.txt", "binary"),
    ("latin1.txt", "binary"), ("script.py", "only text, Markdown and PDF"), ("sub", "only text"),
    ("fifo.txt", "not a regular file"), ("notes.md\x00.txt", "invalid"), ("", "invalid"),
])
def test_file_read_refuses(root, path, why):
    reader = FileReader.under([root])
    with pytest.raises(FileRefused, match=why):
        reader.read(path)


def _pdf(pages: list[str]) -> bytes:
    """A small valid PDF with one line of text per page."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 24 Tf 72 700 Td ({text}) Tj ET".encode()
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n{body}\nendobj\n".encode())
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def test_file_read_pdf_with_a_page_cap(root):
    (root / "report.pdf").write_bytes(_pdf(["First page", "Second page", "Third page"]))
    (root / "fake.pdf").write_text("not a pdf at all")
    reader = FileReader.under([root], max_pages=2)
    text = reader.read("report.pdf")
    assert "First page" in text and "Second page" in text and "Third page" not in text
    assert "1 more page(s) not read" in text
    with pytest.raises(FileRefused, match="not a PDF"):
        reader.read("fake.pdf")


def test_file_read_tool_needs_a_root_and_answers_the_text_protocol(root, tmp_path):
    box = toolbox(tmp_path, enable_tools=("file_read",), tool_roots=(str(root),))
    assert "hello" in box.execute("file_read", {"path": "notes.md"}).output
    refused = box.execute("file_read", {"path": "/etc/passwd"})
    assert refused.is_error and "outside" in refused.output
    assert box.text_tools()["file"].name == "file_read"


# ------------------------------------------------------------------ http_request: loopback targets
class _Handler(http.server.BaseHTTPRequestHandler):
    posts: list[bytes] = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, **headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path == "/":
            self._send(200, b"hello from loopback", Content_Type="text/plain; charset=utf-8")
        elif self.path == "/redirect-local":
            self._send(302, b"", Location=f"http://localhost:{port}/")
        elif self.path == "/redirect-same":
            self._send(302, b"", Location="/")
        elif self.path == "/redirect-metadata":
            self._send(302, b"", Location="http://169.254.169.254/latest/meta-data/")
        elif self.path == "/redirect-loop":
            self._send(302, b"", Location="/redirect-loop")
        elif self.path == "/gzip-bomb":
            self._send(200, BOMB, Content_Encoding="gzip", Content_Type="text/plain")
        elif self.path == "/big":
            self._send(200, b"x" * (3 * 1024 * 1024))
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self._drip()
        elif self.path == "/drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._drip()
        elif self.path.startswith("/search"):
            body = json.dumps({"query": self.path, "results": [{"title": "Shimmy"}]}).encode()
            self._send(200, body, Content_Type="application/json")
        else:
            self._send(404, b"no")

    def _drip(self):
        try:
            for _ in range(600):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        _Handler.posts.append(self.rfile.read(length))
        self._send(200, b"posted")


BOMB = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)


@pytest.fixture(scope="module")
def loopback():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.server_address[1]
    server.shutdown()


ALLOW = HttpPolicy(allow=("127.0.0.1",), timeout=10)


def test_loopback_is_refused_unless_allow_listed(loopback):
    url, port = loopback
    with pytest.raises(RequestRefused, match="loopback"):
        fetch(url + "/", HttpPolicy())
    response = fetch(url + "/", ALLOW)
    assert response.status == 200 and response.text() == "hello from loopback"
    assert fetch(url + "/", HttpPolicy(allow=("127.0.0.0/8",))).status == 200
    with pytest.raises(RequestRefused, match="loopback"):
        fetch(f"http://localhost:{port}/", HttpPolicy())  # a name that resolves to loopback


@pytest.mark.parametrize("host", [
    "127.0.0.1", "[::1]", "localhost", "169.254.169.254", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1",
    "100.100.100.200", "0.0.0.0", "224.0.0.1", "[::]", "[fd00:ec2::254]", "[fe80::1]", "[::ffff:127.0.0.1]",
    "[::ffff:169.254.169.254]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[2002:7f00:1::]", "[2002:a00:1::]",
    "[::127.0.0.1]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "[64:ff9b:1::1]", "2130706433", "0x7f000001",
    "0177.0.0.1", "127.1", "0x7f.1", "017700000001", "168.63.129.16", "255.255.255.255",
])
def test_private_addresses_and_their_disguises_are_refused(host, loopback):
    _, port = loopback
    with pytest.raises(RequestRefused, match="refused to connect"):
        fetch(f"http://{host}:{port}/", HttpPolicy(timeout=5))


@pytest.mark.parametrize("address,refused", [
    ("8.8.8.8", False), ("1.1.1.1", False), ("2606:4700:4700::1111", False), ("::ffff:8.8.8.8", False),
    ("64:ff9b::808:808", False), ("2002:808:808::1", False), ("100.63.255.255", False), ("100.128.0.1", False),
    ("100.64.0.0", True), ("100.127.255.255", True), ("::ffff:10.1.2.3", True), ("::ffff:100.64.1.1", True),
    ("64:ff9b::c0a8:101", True), ("2002:c0a8:101::", True), ("2001:db8::1", True), ("ff02::1", True),
    ("fec0::1", True), ("192.0.2.1", True), ("198.18.0.1", True), ("240.0.0.1", True),
])
def test_address_checks(address, refused):
    assert (address_refusal(address) is not None) is refused, address_refusal(address)


@pytest.mark.parametrize("url,why", [
    ("file:///etc/passwd", "only http and https"), ("ftp://127.0.0.1/", "only http and https"),
    ("gopher://127.0.0.1:70/", "only http and https"), ("javascript:alert(1)", "only http and https"),
    ("//127.0.0.1/", "only http and https"), ("http://user:pw@example.com/", "credentials"),
    ("http://example.com@127.0.0.1/", "credentials"), ("http://127.0.0.1\\@example.com/", "backslashes"),
    ("http://exa mple.com/", "spaces"), ("http://[fe80::1%25eth0]/", "zone"), ("http:///path", "no host"),
    ("http://example.com:99999/", "invalid port"),
])
def test_bad_urls_are_refused(url, why):
    with pytest.raises(RequestRefused, match=why):
        fetch(url, HttpPolicy(allow=("127.0.0.1", "example.com")))


def test_redirects_are_checked_again(loopback):
    url, _ = loopback
    assert fetch(url + "/redirect-same", ALLOW).text() == "hello from loopback"
    with pytest.raises(RequestRefused, match="localhost.*loopback"):
        fetch(url + "/redirect-local", ALLOW)
    with pytest.raises(RequestRefused, match="169.254.169.254"):
        fetch(url + "/redirect-metadata", ALLOW)
    with pytest.raises(RequestRefused, match="more than 3 redirects"):
        fetch(url + "/redirect-loop", ALLOW)


@pytest.mark.timeout(120)
def test_gzip_bombs_and_big_bodies_stop_at_the_cap(loopback):
    url, _ = loopback
    policy = HttpPolicy(allow=("127.0.0.1",), max_bytes=1024 * 1024, timeout=30)
    bomb = fetch(url + "/gzip-bomb", policy)
    assert bomb.truncated and len(bomb.body) == 1024 * 1024
    big = fetch(url + "/big", policy)
    assert big.truncated and len(big.body) == 1024 * 1024


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_dripping_server_cannot_outlast_the_deadline(loopback, path):
    url, _ = loopback
    with pytest.raises(RequestRefused, match="deadline"):
        fetch(url + path, HttpPolicy(allow=("127.0.0.1",), timeout=1.5))


def test_post_only_when_enabled(loopback):
    url, _ = loopback
    with pytest.raises(RequestRefused, match="POST requests are off"):
        fetch(url + "/", ALLOW, "POST", b"data")
    response = fetch(url + "/", HttpPolicy(allow=("127.0.0.1",), allow_post=True), "POST", b"data")
    assert response.text() == "posted" and _Handler.posts[-1] == b"data"


def test_the_host_is_resolved_once_and_every_address_checked(loopback):
    url, port = loopback
    calls = []

    def resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["8.8.8.8"]  # a rebinding DNS would answer differently later

    policy = HttpPolicy(allow=("127.0.0.0/8",), resolver=resolver)
    assert fetch(f"http://rebind.test:{port}/", policy).status == 200
    assert calls == ["rebind.test"]  # connected to the checked address, no second lookup
    mixed = HttpPolicy(resolver=lambda host, port: ["8.8.8.8", "127.0.0.1"])
    with pytest.raises(RequestRefused, match="127.0.0.1"):
        fetch(f"http://mixed.test:{port}/", mixed)


def test_http_request_tool(loopback, tmp_path):
    url, _ = loopback
    box = toolbox(tmp_path, enable_tools=("http_request",))
    refused = box.execute("http_request", {"url": url + "/"})
    assert refused.is_error and "loopback" in refused.output
    box = toolbox(tmp_path, enable_tools=("http_request",), tool_http_allow=("127.0.0.1",))
    outcome = box.execute("http_request", {"url": url + "/"})
    assert outcome.output.startswith("HTTP 200 OK") and "hello from loopback" in outcome.output
    assert "POST requests are off" in box.execute("http_request", {"url": url + "/", "method": "POST"}).output


# ------------------------------------------------------------------ JSON tools
GOOD = {"type": "function", "function": {"name": "echo", "description": "Echo.", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}


@pytest.mark.parametrize("change,field", [
    (lambda d: d["function"].pop("name"), "function.name: is required"),
    (lambda d: d["function"].update(name="bad name"), "function.name: 'bad name' does not match"),
    (lambda d: d["function"].pop("description"), "function.description: is required"),
    (lambda d: d["function"].update(parameters={"type": 7}), "function.parameters: invalid JSON Schema"),
    (lambda d: d["function"].update(parameters={"$ref": "https://example.com/x.json"}), "function.parameters: $ref"),
    (lambda d: d.update(type="custom"), "type: 'function' was expected"),
    (lambda d: d.update(extra=1), "Additional properties are not allowed"),
    (lambda d: d.update(implementation={"type": "shell", "cmd": "ls"}), "implementation.type: must be one of"),
    (lambda d: d.update(implementation={"type": "command"}), "implementation.argv: is required"),
    (lambda d: d.update(implementation={"type": "command", "argv": []}), "implementation.argv: [] should be non-empty"),
    (lambda d: d.update(implementation={"type": "command", "argv": ["{text}"]}), "implementation.argv[0]"),
    (lambda d: d.update(implementation={"type": "command", "argv": ["echo", "{nope}"]}),
     "implementation.argv[1]: placeholder {nope} is not a declared parameter"),
    (lambda d: d.update(implementation={"type": "command", "argv": ["echo", "{text.__class__}"]}),
     "implementation.argv[1]: placeholder"),
    (lambda d: d.update(implementation={"type": "command", "argv": ["echo"], "timeout": "soon"}),
     "implementation.timeout: 'soon' is not of type 'number'"),
    (lambda d: d.update(implementation={"type": "http", "url": "ftp://x/"}), "implementation.url"),
    (lambda d: d.update(implementation={"type": "http", "url": "http://{text}.evil.com/"}), "implementation.url"),
    (lambda d: d.update(implementation={"type": "http", "url": "http://x.com/{nope}"}),
     "implementation.url: placeholder {nope}"),
    (lambda d: d.update(implementation={"type": "http", "url": "http://x.com/", "method": "DELETE"}),
     "implementation.method"),
])
def test_json_tool_errors_name_the_file_and_the_field(tmp_path, change, field):
    doc = json.loads(json.dumps(GOOD))
    change(doc)
    path = tmp_path / "echo.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ToolSpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ")
    assert field in str(info.value), str(info.value)


def test_json_tool_that_is_not_json(tmp_path):
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(ToolSpecError, match="broken.json: not valid JSON"):
        load_spec(tmp_path / "broken.json")


def test_a_broken_json_tool_stops_the_start_with_its_name(tmp_path, smollm2_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "bad.json").write_text(json.dumps({**GOOD, "function": {**GOOD["function"], "name": "bad name"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMMY_")}
    env["SHIMMY_HOME"] = str(tmp_path / "home")
    result = subprocess.run([sys.executable, "-m", "shimmy_core", "serve", "--port", "0", "--no-demo",
                             "--tools-dir", str(tools)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{tools / 'bad.json'}: function.name" in result.stderr


def test_meta_schema_is_published_and_valid():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(meta_schema())
    for path in EXAMPLES.glob("*.json"):
        jsonschema.validate(json.loads(path.read_text()), meta_schema())


def test_duplicate_tool_names_name_both_sources(tmp_path):
    (tmp_path / "home" / "tools").mkdir(parents=True)
    (tmp_path / "home" / "tools" / "calc.json").write_text(json.dumps(
        {**GOOD, "function": {**GOOD["function"], "name": "calculator"}}))
    with pytest.raises(ToolConfigError, match="'calculator' is used by both tools_calculator and .*calc.json"):
        toolbox(tmp_path)


# ------------------------------------------------------------------ the examples
def test_every_example_is_exercised():
    exercised = {"get_weather.json", "word_count.json", "utc_time.json", "searxng_search.json"}
    assert {p.name for p in EXAMPLES.glob("*.json")} == exercised


def test_example_get_weather_is_a_definition_for_clients(tmp_path):
    box = toolbox(tmp_path, tools_dirs=(str(EXAMPLES),))
    entry = box.get("get_weather")
    assert entry.executable is False and entry.definition()["function"]["parameters"]["required"] == ["city", "unit"]
    with pytest.raises(ToolConfigError, match="no implementation"):
        toolbox(tmp_path, tools_dirs=(str(EXAMPLES),), enable_tools=("get_weather",))


def test_example_word_count_runs_without_a_shell(tmp_path):
    box = toolbox(tmp_path, tools_dirs=(str(EXAMPLES),), enable_tools=("word_count",))
    assert box.execute("word_count", {"text": "one two three; rm -rf / $(id) `id`"}).output.strip() == "8"
    assert box.execute("word_count", {}).is_error  # validated first: text is required


def test_example_utc_time_runs(tmp_path):
    box = toolbox(tmp_path, tools_dirs=(str(EXAMPLES),), enable_tools=("utc_time",))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n?", box.execute("utc_time", {}).output)


def test_example_searxng_search_queries_its_host(loopback, tmp_path):
    url, port = loopback
    folder = tmp_path / "tools"
    folder.mkdir()
    spec = (EXAMPLES / "searxng_search.json").read_text().replace("127.0.0.1:8888", f"127.0.0.1:{port}")
    (folder / "searxng_search.json").write_text(spec)
    box = toolbox(tmp_path, tools_dirs=(str(folder),), enable_tools=("searxng_search",))
    output = box.execute("searxng_search", {"query": "shimmy & co/?", "language": "en"}).output
    body = json.loads(output)
    assert body["query"] == "/search?q=shimmy%20%26%20co%2F%3F&language=en&format=json"


def test_command_tools_time_out_and_cap_output(tmp_path):
    folder = tmp_path / "tools"
    folder.mkdir()
    for name, argv, extra in [("sleeper", ["sleep", "30"], {"timeout": 0.5}),
                              ("flood", ["yes"], {"timeout": 5, "max_bytes": 1000}),
                              ("failing", ["ls", "/nonexistent-shimmy"], {})]:
        (folder / f"{name}.json").write_text(json.dumps({**GOOD, "function": {**GOOD["function"], "name": name},
                                                         "implementation": {"type": "command", "argv": argv, **extra}}))
    box = toolbox(tmp_path, tools_dirs=(str(folder),), enable_tools=("sleeper",))
    assert "took longer" in box.execute("sleeper", {"text": "x"}).output
    box = toolbox(tmp_path, tools_dirs=(str(folder),), enable_tools=("flood",))
    flood = box.execute("flood", {"text": "x"})
    assert flood.output.endswith("[truncated at 1000 bytes]") and len(flood.output) < 1100
    box = toolbox(tmp_path, tools_dirs=(str(folder),), enable_tools=("failing",))
    failing = box.execute("failing", {"text": "x"})
    assert failing.is_error and "exited with status" in failing.output


# ------------------------------------------------------------------ listing
def test_get_v1_tools(make_api):
    api = make_api(enable_tools=("calculator",), tools_dirs=(str(EXAMPLES),))
    result = api.client.simulate_get("/v1/tools")
    assert result.status_code == 200
    body = result.json
    assert body["object"] == "list"
    rows = {row["name"]: row for row in body["data"]}
    assert rows["calculator"]["enabled"] is True and rows["calculator"]["function"]["parameters"]["required"] == ["expression"]
    assert rows["get_weather"]["executable"] is False and rows["get_weather"]["source"].endswith("get_weather.json")
    assert rows["word_count"]["executable"] is True and rows["word_count"]["enabled"] is False


def test_shimmy_tools_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMMY_")}
    env["SHIMMY_HOME"] = str(tmp_path)
    base = [sys.executable, "-m", "shimmy_core", "tools", "--tools-dir", str(EXAMPLES)]
    result = subprocess.run(base + ["--enable-tool", "calculator"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^calculator  \[enabled\]  from tools_calculator$", result.stdout, re.M), result.stdout
    assert re.search(r"^get_weather  \[definition only\]", result.stdout, re.M)
    assert re.search(r"^file_read  \[off \(no folder is allowed", result.stdout, re.M)
    assert '"expression"' in result.stdout
    listing = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, env=env, timeout=120).stdout)
    assert {row["name"] for row in listing} >= {"calculator", "file_read", "http_request", "get_weather", "word_count"}
    refused = subprocess.run(base + ["--enable-tool", "nope"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "no such tool" in refused.stderr


@pytest.fixture
def make_api(validate, tmp_path, monkeypatch):
    from tests.test_function_calling import make_api_for

    for var in ("SHIMMY_DISABLE_PLUGINS", "SHIMMY_LOAD_PLUGINS", "SHIMMY_TRACE_HOOKS"):
        monkeypatch.delenv(var, raising=False)
    made = []

    def make(**overrides):
        api = make_api_for(validate, tmp_path, None, **overrides)
        made.append(api)
        return api

    yield make
    for api in made:
        api.shimmy.close()
