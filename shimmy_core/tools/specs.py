"""JSON tools: one file per tool, in OpenAI's function format, optionally with an implementation
Shimmy can run (an HTTP request, or a command run without a shell).

The format is published as a JSON Schema, :data:`META_SCHEMA_PATH` (``tool-spec.schema.json`` next
to this module); ``docs/tools.md`` explains it.  Files are checked at start-up: an error names the
file and the field (``weather.json: function.name: 'get weather' does not match ...``) and Shimmy
does not start.

Placeholders ``{name}`` in the URL (after the host), in ``argv`` items (not the first) and in
``stdin`` are replaced by the call's arguments: URL-encoded in a URL, as they are in ``argv`` and
``stdin`` (no shell ever parses them).  A placeholder must name a declared parameter.
"""

from __future__ import annotations

import json
import os
import signal
import string
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from shimmy_core.tools import schemas
from shimmy_core.tools.errors import ToolError, ToolSpecError
from shimmy_core.tools.http_client import HttpPolicy, RequestRefused, fetch

META_SCHEMA_PATH = Path(__file__).with_name("tool-spec.schema.json")
_META: dict | None = None


def meta_schema() -> dict:
    global _META
    if _META is None:
        _META = json.loads(META_SCHEMA_PATH.read_text(encoding="utf-8"))
    return _META


def _field(path) -> str:
    return schemas.json_path(path) or "(the file)"


def _check(doc: Any, where: str) -> None:
    import jsonschema  # only when there are JSON tool files to read

    meta = meta_schema()
    validator = jsonschema.Draft202012Validator(meta)
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is None:
        return
    path = list(error.absolute_path)
    impl = doc.get("implementation") if isinstance(doc, dict) else None
    if path[:1] == ["implementation"] and isinstance(impl, dict):
        branches = {b["properties"]["type"]["const"]: b for b in meta["properties"]["implementation"]["oneOf"]}
        branch = branches.get(impl.get("type"))
        if branch is None:
            raise ToolSpecError(f"{where}: implementation.type: must be one of {sorted(branches)}")
        sub = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(branch).iter_errors(impl))
        if sub is not None:
            error, path = sub, ["implementation", *sub.absolute_path]
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else "?"
        raise ToolSpecError(f"{where}: {_field(path + [missing])}: is required")
    raise ToolSpecError(f"{where}: {_field(path)}: {error.message}")


def _placeholders(template: str, where: str, field: str, declared: set[str]) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ToolSpecError(f"{where}: {field}: {exc}") from None
    for name in names:
        if name not in declared:
            raise ToolSpecError(f"{where}: {field}: placeholder {{{name}}} is not a declared parameter")
    return names


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


class _Filler(string.Formatter):
    def __init__(self, encode=lambda text: text):
        self.encode = encode

    def get_value(self, key, args, kwargs):
        return self.encode(_as_text(kwargs.get(key)))

    def format_field(self, value, format_spec):
        return value


class JsonTool:
    """A tool from a JSON file.  Without an implementation it is a definition only: requests may
    name it and get its schema, and its calls go back to the client."""

    executable = False
    capabilities: frozenset[str] = frozenset()

    def __init__(self, doc: dict, path: Path):
        function = doc["function"]
        self.name: str = function["name"]
        self.description: str = function["description"]
        self.parameters: dict = function["parameters"]
        self.path = path
        self.spec = doc

    def run(self, arguments: dict) -> str:
        raise ToolError(f"{self.name} has no implementation on the server")


class HttpTool(JsonTool):
    executable = True
    capabilities = frozenset({"network"})

    def __init__(self, doc: dict, path: Path, declared: set[str]):
        super().__init__(doc, path)
        impl = doc["implementation"]
        self.method = impl.get("method", "GET")
        self.url = impl["url"]
        self.headers = dict(impl.get("headers", {}))
        self.body = impl.get("body", "none")
        self.timeout = float(impl.get("timeout", 15))
        self.max_bytes = int(impl.get("max_bytes", 1024 * 1024))
        where = str(path)
        origin = urllib.parse.urlsplit(self.url)
        if "{" in origin.netloc or "}" in origin.netloc:
            raise ToolSpecError(f"{where}: implementation.url: placeholders may not appear in the host")
        _placeholders(self.url, where, "implementation.url", declared)
        host = origin.hostname or ""
        # The file's own host is trusted (its author chose it), even on the local network; any
        # other host (after a redirect) gets the full checks.
        self.policy = HttpPolicy(allow=(host,), allow_post=self.method == "POST", timeout=self.timeout,
                                 max_bytes=self.max_bytes)

    def run(self, arguments: dict) -> str:
        url = _Filler(lambda text: urllib.parse.quote(text, safe="")).format(self.url, **arguments)
        body = json.dumps(arguments).encode() if self.method == "POST" and self.body == "json" else None
        headers = dict(self.headers)
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        try:
            response = fetch(url, self.policy, self.method, body, headers)
        except RequestRefused as exc:
            raise ToolError(str(exc)) from None
        text = response.text()
        if response.truncated:
            text += f"\n[truncated at {self.max_bytes} bytes]"
        if response.status >= 400:
            raise ToolError(f"HTTP {response.status} {response.reason}: {text[:2000]}")
        return text


class CommandTool(JsonTool):
    executable = True
    capabilities = frozenset({"process"})

    def __init__(self, doc: dict, path: Path, declared: set[str]):
        super().__init__(doc, path)
        impl = doc["implementation"]
        where = str(path)
        self.argv: list[str] = list(impl["argv"])
        if _placeholders(self.argv[0], where, "implementation.argv[0]", declared):
            raise ToolSpecError(f"{where}: implementation.argv[0]: the program may not be a placeholder")
        for i, item in enumerate(self.argv[1:], 1):
            _placeholders(item, where, f"implementation.argv[{i}]", declared)
        self.stdin = impl.get("stdin")
        if self.stdin is not None:
            _placeholders(self.stdin, where, "implementation.stdin", declared)
        self.cwd = str((path.parent / impl.get("cwd", ".")).resolve())
        self.env = dict(impl.get("env", {}))
        self.timeout = float(impl.get("timeout", 10))
        self.max_bytes = int(impl.get("max_bytes", 1024 * 1024))

    def run(self, arguments: dict) -> str:
        filler = _Filler()
        argv = [self.argv[0]] + [filler.format(item, **arguments) for item in self.argv[1:]]
        stdin = filler.format(self.stdin, **arguments).encode() if self.stdin is not None else None
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **self.env}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.cwd, env=env,
                                    start_new_session=True)
        except OSError as exc:
            raise ToolError(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from None
        out, err = bytearray(), bytearray()
        flooded = threading.Event()
        readers = [threading.Thread(target=_drain, args=(proc.stdout, out, self.max_bytes, flooded), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, err, 65536, None), daemon=True)]
        for reader in readers:
            reader.start()
        if stdin is not None:
            try:
                proc.stdin.write(stdin)
                proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    code = proc.wait(0.05)
                    break
                except subprocess.TimeoutExpired:
                    if flooded.is_set():  # enough output: no need to let it run on
                        _kill(proc)
                        code = 0
                        break
                    if time.monotonic() > deadline:
                        _kill(proc)
                        raise ToolError(f"{self.name} took longer than {self.timeout:g} s and was stopped") from None
        finally:
            for reader in readers:
                reader.join(1.0)
        text = out[: self.max_bytes].decode("utf-8", errors="replace")
        if len(out) > self.max_bytes:
            text += f"\n[truncated at {self.max_bytes} bytes]"
        if code != 0:
            detail = err.decode("utf-8", errors="replace").strip()[-2000:]
            raise ToolError(f"{self.name} exited with status {code}" + (f": {detail}" if detail else ""))
        return text


def _drain(stream, sink: bytearray, cap: int, flooded: threading.Event | None) -> None:
    """Read a pipe to its end, keeping at most ``cap + 1`` bytes (so a flood cannot fill memory);
    ``flooded`` is set once there is more than ``cap``."""
    try:
        while True:
            data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not data:
                break
            if len(sink) <= cap:
                sink += data[: cap + 1 - len(sink)]
            if len(sink) > cap and flooded is not None:
                flooded.set()
    except (OSError, ValueError):
        pass
    finally:
        stream.close()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, AttributeError):
        proc.kill()
    proc.wait()


def load_spec(path: Path) -> JsonTool:
    """Read, check and build one JSON tool; :class:`ToolSpecError` names the file and the field."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolSpecError(f"{where}: cannot read the file: {exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ToolSpecError(f"{where}: not valid JSON: {exc}") from None
    _check(doc, where)
    parameters = doc["function"]["parameters"]
    try:
        schemas.check_schema(parameters)
    except schemas.SchemaProblem as exc:
        raise ToolSpecError(f"{where}: function.parameters: {exc}") from None
    declared = set((parameters.get("properties") or {}).keys())
    impl = doc.get("implementation")
    if impl is None:
        return JsonTool(doc, path)
    if impl["type"] == "http":
        return HttpTool(doc, path, declared)
    return CommandTool(doc, path, declared)


def load_dir(folder: Path) -> list[JsonTool]:
    """Every ``*.json`` tool in ``folder`` (not recursive); a missing folder holds none."""
    if not folder.is_dir():
        return []
    return [load_spec(path) for path in sorted(folder.glob("*.json")) if path.is_file()]
