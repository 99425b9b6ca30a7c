"""Privacy with default settings: a whole session (models, chat, streaming, a
cache hit, completions, metrics, and the server-side calculator when the tools
are installed) against a real server whose outbound connections and name
lookups are guarded (loopback only), after which nothing but Shimmy's own model
registry exists under its home folder (which is also $HOME), and nothing was
opened for writing there during the session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from shimmy_core.contract.settings import Settings
from tests.conftest import server_env

# Runs inside the server before it starts: Python's audit hooks see every socket connect,
# send and name lookup, and every file opened for writing.
GUARD = r'''
import ipaddress, os, sys

_HOME = os.path.realpath(os.environ["SHIMMY_HOME"])
_LOCAL_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def _local(host):
    if host is None or isinstance(host, (bytes, bytearray)):
        return True
    host = str(host).split("%")[0].strip("[]").lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _report(kind, detail):
    sys.__stderr__.write(f"PRIVACY {kind}: {detail!r}\n")
    sys.__stderr__.flush()


def _guard(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        address = args[1] if len(args) > 1 else None
        if isinstance(address, tuple) and not _local(address[0]):
            _report("OUTBOUND", (event, address))
            raise PermissionError(f"privacy guard: no outbound connection to {address!r}")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                   "socket.gethostbyaddr"):
        if not _local(args[0]):
            _report("LOOKUP", (event, args[0]))
            raise PermissionError(f"privacy guard: no name lookup of {args[0]!r}")
    elif event == "open":
        path, mode, flags = args[0], args[1], args[2]
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                  (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            real = os.path.realpath(os.fsdecode(path))
            if real == _HOME or real.startswith(_HOME + os.sep):
                _report("WRITE", real)
    elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree", "os.symlink"):
        path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
        real = os.path.realpath(path) if path else ""
        if real and (real == _HOME or real.startswith(_HOME + os.sep)):
            _report("WRITE", (event, real))


sys.addaudithook(_guard)
'''

PROMPT = "The secret word is pineapple. Say hi."


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def private_home(tmp_path, smollm2_path) -> Path:
    """A Shimmy home with the test model registered through `shimmy add` (Shimmy's own registry)."""
    home = tmp_path / "home"
    home.mkdir()
    env = server_env(home)
    done = subprocess.run([sys.executable, "-m", "shimmy_core", "add", str(smollm2_path), "--name", "private"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(files_under(home)) == {"registered-models.json"}
    return home


def run_session(server) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="local", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["private"]
    messages = [{"role": "user", "content": PROMPT}]
    first = client.chat.completions.with_raw_response.create(model="private", messages=messages, max_tokens=8,
                                                             temperature=0)
    again = client.chat.completions.with_raw_response.create(model="private", messages=messages, max_tokens=8,
                                                             temperature=0)
    assert (first.headers["x-shimmy-cache"], again.headers["x-shimmy-cache"]) == ("miss", "hit")
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    streamed = client.chat.completions.create(model="private", messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert client.completions.create(model="private", prompt="Once upon", max_tokens=4).choices
    assert httpx.get(server.base + "/metrics", timeout=10).status_code == 200


def check_nothing_left(server, home: Path, before: dict[str, bytes]) -> None:
    assert server.stop() == 0
    output = "".join(server.lines)
    assert "PRIVACY" not in output, output
    assert PROMPT not in output  # prompts are not logged by default
    assert files_under(home) == before, "the session wrote under the Shimmy home"


def test_a_whole_session_leaves_nothing_behind(start_server, private_home):
    before = files_under(private_home)
    server = start_server(["--no-demo"], prelude=GUARD, SHIMMY_HOME=str(private_home), HOME=str(private_home))
    run_session(server)
    check_nothing_left(server, private_home, before)


def test_the_guard_catches_outbound_connections_and_writes(start_server, private_home):
    """The guard itself works: a server told to phone home is caught."""
    probe = GUARD + r'''
import socket
for call in (lambda: socket.socket().connect(("192.0.2.1", 80)), lambda: socket.getaddrinfo("example.com", 80)):
    try:
        call()
    except OSError:
        pass
open(os.path.join(_HOME, "leak.txt"), "w").close()
'''
    server = start_server(["--no-demo"], prelude=probe, SHIMMY_HOME=str(private_home), HOME=str(private_home))
    assert server.stop() == 0
    output = "".join(server.lines)
    assert "PRIVACY OUTBOUND" in output and "PRIVACY LOOKUP" in output
    assert "PRIVACY WRITE" in output and "leak.txt" in output


def calculator_missing() -> str | None:
    """Why the calculator step cannot run here: the server-side tools (issue 6) are not installed."""
    from dataclasses import fields

    from shimmy_core.plugin_manager import create_plugin_manager
    from shimmy_core.plugin_registry import build_registry

    if "enable_tools" not in {f.name for f in fields(Settings)}:
        return "the server-side tools (issue 6) are not there: no enable_tools setting"
    if "calculator" not in build_registry(create_plugin_manager(), Settings.load({}, {})).tools:
        return "the server-side 'calculator' tool (issue 6) is not registered"
    return None


def calculator_step(server) -> None:
    """The session's calculator step: the server runs its calculator, and the answer is not cached."""
    body = {"model": "private", "temperature": 0, "max_tokens": 48,
            "messages": [{"role": "user", "content": "What is 6*7? Use the calculator."}],
            "tools": [{"type": "function", "function": {"name": "calculator"}}],
            "tool_choice": {"type": "function", "function": {"name": "calculator"}}}
    for _ in range(2):
        r = httpx.post(server.url + "/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        assert r.headers["x-shimmy-cache"] == "miss"  # an answer that ran a server-side tool is never cached
        executed = r.json()["choices"][0]["message"].get("executed_tool_calls") or []
        assert executed and executed[0]["function"]["name"] == "calculator", r.json()


@pytest.mark.skipif(calculator_missing() is not None, reason=str(calculator_missing()))
def test_a_whole_session_with_the_calculator_leaves_nothing_behind(start_server, private_home):
    before = files_under(private_home)
    server = start_server(["--no-demo"], prelude=GUARD, SHIMMY_HOME=str(private_home), HOME=str(private_home),
                          SHIMMY_ENABLE_TOOLS="calculator")
    run_session(server)
    calculator_step(server)
    check_nothing_left(server, private_home, before)
