"""Discovery end to end: the new source plugins load through entry points,
``shimmy add``/``remove``/``list --json``/``discover`` round-trip through the real
CLI, a real ``shimmy serve`` serves the model found in an Ollama store and chats
with the openai SDK, sees ``shimmy add``/``remove`` without a restart, and
``shimmy probe`` times a real load and generation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.test_discovery import (
    STORE_VARS,
    build_hf_cache,
    build_lmstudio,
    build_ollama_store,
    build_shimmy_models,
    write_gguf,
)

NEW_SOURCES = ("ollama", "huggingface", "lmstudio")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment whose HOME and stores are all under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMMY_") and k not in STORE_VARS}
    env.update({"HOME": str(home), "SHIMMY_HOME": str(home / ".shimmy"), "OLLAMA_MODELS": str(home / "ollama"),
                "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / ".cache"), **extra})
    return env


def shimmy(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shimmy_core", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, smollm2_path) -> Path:
    """A HOME with every store (see tests/test_discovery.py)."""
    home = tmp_path_factory.mktemp("cli-world")
    scratch = home / "scratch"
    scratch.mkdir()
    build_shimmy_models(home / ".shimmy" / "models", scratch)
    build_ollama_store(home / "ollama", smollm2_path)
    build_hf_cache(home / "hf" / "hub", scratch)
    build_lmstudio(home / ".lmstudio" / "models")
    return home


def test_source_plugins_load_through_entry_points(tmp_path):
    result = shimmy(["plugins"], cli_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    for name in NEW_SOURCES:
        assert re.search(rf"^{name}  \(shimmy-server\)  hooks: shimmy_register_sources$", result.stdout, re.M), \
            f"{name} missing (reinstall after changing pyproject.toml: pip install -e .)\n{result.stdout}"
    disabled = shimmy(["--disable-plugin", "ollama", "list", "--json", "--no-demo"], cli_env(tmp_path))
    assert disabled.returncode == 0 and json.loads(disabled.stdout) == []


def test_add_list_remove_round_trip(tmp_path):
    env = cli_env(tmp_path)
    model = write_gguf(tmp_path / "downloads" / "tiny.Q4_K_M.gguf", name="Tiny")
    added = shimmy(["add", str(model), "--name", "my-tiny"], env)
    assert added.returncode == 0, added.stderr
    assert f"Added {model} as my-tiny" in added.stdout
    assert "my-tiny" in json.loads((tmp_path / ".shimmy" / "registered-models.json").read_text())["models"][0]["name"]

    listed = shimmy(["list", "--json", "--no-demo"], env)
    assert listed.returncode == 0, listed.stderr
    [record] = json.loads(listed.stdout)
    assert record == {
        "name": "my-tiny", "kind": "chat", "format": "gguf", "architecture": "llama", "parameters": 256, "quantization": "Q4_K_M",
        "context": 4096, "size": model.stat().st_size, "source": "registered", "path": str(model),
        "aliases": ["my-tiny:tiny.Q4_K_M", "my-tiny:Q4_K_M", "tiny.Q4_K_M.gguf", "tiny.Q4_K_M"],
        "status": "servable",
    }
    table = shimmy(["list", "--no-demo"], env).stdout.splitlines()
    assert table[0].split() == ["NAME", "KIND", "FORMAT", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "SOURCE"]
    assert table[1].split() == ["my-tiny", "chat", "gguf", "llama", "256", "Q4_K_M", "4K", "1.5", "KB", "registered"]

    again = shimmy(["add", str(model)], env)
    assert again.returncode == 1 and "already registered as 'my-tiny'" in again.stderr
    lora = write_gguf(tmp_path / "lora.gguf", kind="adapter")
    refused = shimmy(["add", str(lora)], env)
    assert refused.returncode == 1 and "LoRA adapter" in refused.stderr

    removed = shimmy(["remove", "my-tiny"], env)
    assert removed.returncode == 0 and "its files were not touched" in removed.stdout
    assert json.loads(shimmy(["list", "--json", "--no-demo"], env).stdout) == []
    assert model.is_file()
    missing = shimmy(["remove", "my-tiny"], env)
    assert missing.returncode == 1 and "not registered" in missing.stderr


def test_list_all_shows_every_skip_with_its_reason(stores):
    result = shimmy(["list", "--all", "--json"], cli_env(stores))
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    servable = {r["name"]: r for r in records if r["status"] == "servable"}
    skipped = [r for r in records if r["status"] == "skipped"]
    assert {"smollm2:135m", "acme/tiny-llama", "big-model", "mlx-community/Tiny-4bit"} <= set(servable)
    assert servable["smollm2:135m"]["path"].endswith(".gguf") is False  # an Ollama blob
    assert {r["category"] for r in skipped} >= {"adapter", "projector", "speech", "diffusion", "embedding",
                                                 "incomplete", "not-gguf", "corrupt", "custom-code"}
    assert all(r["reason"] and r["source"] for r in skipped)

    table = shimmy(["list", "--all"], cli_env(stores)).stdout
    assert "Skipped:" in table and "LoRA adapter (general.type adapter)" in table


def test_discover_counts_per_source_and_reason(stores):
    result = shimmy(["discover"], cli_env(stores))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^Scanned 7 sources in \d+\.\d\d s: 14 model\(s\) listed, \d+ skipped\.$", out, re.M), out
    assert re.search(r"^ollama\s+4\s+3\s+2$", out, re.M), out  # 4 names, 3 models (two tags share one), 2 skipped
    assert re.search(r"^dirs\s+3\s+3\s+16$", out, re.M), out
    assert re.search(r"^corrupt\s+7\s+", out, re.M), out
    assert re.search(r"^incomplete\s+6\s+", out, re.M), out


# ------------------------------------------------------------------ a real server and a real model
@pytest.fixture(scope="module")
def ollama_only(tmp_path_factory, smollm2_path) -> Path:
    home = tmp_path_factory.mktemp("ollama-home")
    build_ollama_store(home / "ollama", smollm2_path)
    return home


@pytest.mark.slow
def test_serve_the_ollama_model_and_chat(start_server, ollama_only, validate):
    import openai

    env = cli_env(ollama_only)
    server = start_server(["--no-demo"], **{k: env[k] for k in ("HOME", "SHIMMY_HOME", "OLLAMA_MODELS", "HF_HOME",
                                                                "XDG_CACHE_HOME")})
    body = httpx.get(server.url + "/models", timeout=30).json()
    validate(body, "ListModelsResponse")
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {"smollm2:135m", "someone/tiny:latest", "hf.co/acme/Tiny-GGUF:Q4_K_M"}
    smol = models["smollm2:135m"]
    validate(smol, "Model")
    assert smol["owned_by"] == "library" and smol["source"] == "ollama" and smol["format"] == "gguf"
    assert (smol["architecture"], smol["quantization"], smol["context_window"]) == ("llama", "Q4_1", 8192)
    assert smol["parameters"] == 134_515_008 and smol["size_bytes"] > 90_000_000
    assert smol["created"] > 0
    validate(httpx.get(server.url + "/models/smollm2:latest", timeout=30).json(), "Model")

    client = openai.OpenAI(base_url=server.url, api_key="sk-local", max_retries=0, timeout=120)
    for name in ("smollm2:135m", "smollm2"):
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0)
        validate(reply.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
        assert reply.model == "smollm2:135m"
        assert reply.choices[0].message.content.strip()
        assert reply.usage.completion_tokens > 0

    # The running server sees models added and removed since it started.
    extra = write_gguf(ollama_only / "new" / "fresh.Q8_0.gguf", file_type=7)
    assert shimmy(["add", str(extra), "--name", "fresh"], env).returncode == 0
    assert wait_for(lambda: "fresh" in model_ids(server)), model_ids(server)
    assert shimmy(["remove", "fresh"], env).returncode == 0
    assert wait_for(lambda: "fresh" not in model_ids(server)), model_ids(server)


def model_ids(server) -> set[str]:
    return {m["id"] for m in httpx.get(server.url + "/models", timeout=30).json()["data"]}




@pytest.mark.slow
def test_probe_loads_generates_and_times(ollama_only):
    result = shimmy(["probe", "smollm2:135m", "--max-tokens", "8"], cli_env(ollama_only), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^load time: \d+\.\d\d s$", result.stdout, re.M), result.stdout
    assert re.search(r"^generated [1-8] tokens in \d+\.\d\d s: \d+\.\d tokens/s", result.stdout, re.M), result.stdout
    unknown = shimmy(["probe", "smollm3"], cli_env(ollama_only))
    assert unknown.returncode == 1 and "did you mean smollm2:135m" in unknown.stderr
