"""Discovery benchmark: time a full scan and a cached rescan over a tree of
10,000 files under a temporary HOME.

The tree is what a busy machine holds: Shimmy's models folder with GGUF files
(tiny, written with the ``gguf`` writer: headers and a few small tensors, of
every kind discovery must tell apart), split sets, SafeTensors model folders,
partial downloads and a lot of unrelated files and folders; a Hugging Face cache
(``models--org--name`` repos with snapshots symlinked into blobs); an Ollama
store (manifests and blobs); an LM Studio folder.  Every built-in discovery
source runs, through its plugin hook, exactly as ``shimmy serve`` runs them.

    .venv/bin/python bench/discovery_bench.py            # 10,000 files
    .venv/bin/python bench/discovery_bench.py --files 50000 --json

The target is a full scan of 10,000 files in under one second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (architecture, general.type, file_type) of the GGUF templates; copies of them fill the tree.
KINDS = [
    ("llama", None, 15), ("qwen2", None, 7), ("gemma3", None, 1), ("phi3", None, 30), ("mistral3", None, 12),
    ("llama", "adapter", 1), ("clip", "mmproj", 1), ("whisper", None, 1), ("bert", None, 1), ("flux", None, 2),
]
JUNK = [".txt", ".md", ".json", ".png", ".py", ".log", ".yaml", ".csv"]


def write_gguf(path: Path, arch: str, kind: str | None, file_type: int, seed: int) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    if kind:
        writer.add_type(kind)
    writer.add_name(f"Bench {arch} {seed}")
    writer.add_context_length(4096)
    writer.add_file_type(file_type)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(200)])
    for i in range(4):
        writer.add_tensor(f"blk.{i}.weight", np.zeros((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def safetensors_bytes() -> bytes:
    header = {"w": {"dtype": "BF16", "shape": [16, 16], "data_offsets": [0, 512]}}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(512)


class Tree:
    """Counts the files it writes, so the benchmark reports the real number."""

    def __init__(self, home: Path, templates: list[bytes], rng: random.Random):
        self.home, self.templates, self.rng, self.files = home, templates, rng, 0

    def write(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files += 1
        return path

    def gguf(self) -> bytes:
        return self.rng.choice(self.templates)

    def shimmy_models(self, budget: int) -> None:
        models = self.home / ".shimmy" / "models"
        n = 0
        while self.files < budget:
            folder = models / f"collection-{n // 50:03d}" / f"group-{n % 7}"
            roll = n % 20
            if roll < 6:
                self.write(folder / f"model-{n}.Q4_K_M.gguf", self.gguf())
            elif roll == 6:
                for part in range(1, 4):
                    self.write(folder / f"big-{n}-{part:05d}-of-00003.gguf", self.templates[0])
            elif roll == 7:
                st = folder / f"st-model-{n}"
                self.write(st / "config.json", json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                           "max_position_embeddings": 4096}).encode())
                self.write(st / "model.safetensors", safetensors_bytes())
                self.write(st / "tokenizer.json", b"{}")
            elif roll == 8:
                self.write(folder / f"download-{n}.gguf.part", b"\0" * 64)
            elif roll == 9:
                self.write(folder / "notes" / f"deep-{n}" / "more" / f"file-{n}.txt", b"hello")
            else:
                self.write(folder / f"file-{n}{JUNK[n % len(JUNK)]}", b"not a model\n")
            n += 1

    def hf_cache(self, repos: int) -> None:
        hub = self.home / ".cache" / "huggingface" / "hub"
        revision = "c" * 40
        for r in range(repos):
            repo = hub / f"models--org{r % 13}--Model-{r}-GGUF"
            self.write(repo / "refs" / "main", revision.encode())
            for q in ("Q4_K_M", "Q8_0"):
                data = self.gguf()
                blob = self.write(repo / "blobs" / hashlib.sha256(data + bytes([r]) + q.encode()).hexdigest(), data)
                link = repo / "snapshots" / revision / f"model-{r}.{q}.gguf"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blob, link.parent))
            self.write(repo / "snapshots" / revision / "README.md", b"# model card\n")

    def ollama(self, models: int) -> None:
        store = self.home / ".ollama" / "models"
        for m in range(models):
            data = self.gguf() + m.to_bytes(4, "little")  # unique blobs
            digest = hashlib.sha256(data).hexdigest()
            self.write(store / "blobs" / f"sha256-{digest}", data)
            manifest = {"schemaVersion": 2, "layers": [
                {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)}]}
            self.write(store / "manifests" / "registry.ollama.ai" / "library" / f"model{m}" / "latest",
                       json.dumps(manifest).encode())

    def lmstudio(self, models: int) -> None:
        root = self.home / ".lmstudio" / "models"
        for m in range(models):
            self.write(root / f"publisher{m % 5}" / f"Model-{m}-GGUF" / f"Model-{m}-Q4_K_M.gguf", self.gguf())


def build_tree(home: Path, files: int) -> int:
    scratch = home / "scratch-templates"
    scratch.mkdir(parents=True)
    templates = []
    for i, (arch, kind, file_type) in enumerate(KINDS):
        path = scratch / f"t{i}.gguf"
        write_gguf(path, arch, kind, file_type, i)
        templates.append(path.read_bytes())
    shutil.rmtree(scratch)
    tree = Tree(home, templates, random.Random(1))
    tree.hf_cache(max(files // 50, 1))
    tree.ollama(max(files // 50, 1))
    tree.lmstudio(max(files // 100, 1))
    tree.shimmy_models(files)
    return tree.files


def catalog(home: Path):
    from shimmy_core.catalog import ModelCatalog
    from shimmy_core.plugin_manager import create_plugin_manager
    from shimmy_core.plugin_registry import build_registry
    from shimmy_core.contract.settings import Settings
    from shimmy_plugins.backends.gguf import gguf_backend
    from shimmy_plugins.backends.safetensors import safetensors_backend
    from shimmy_plugins.sources import huggingface
    from shimmy_plugins.sources import lmstudio
    from shimmy_plugins.sources import local_files
    from shimmy_plugins.sources import ollama

    # The formats come from the backend plugins; the sources from theirs.
    plugins = [("gguf", gguf_backend), ("safetensors", safetensors_backend), ("local_files", local_files),
               ("ollama", ollama), ("huggingface", huggingface), ("lmstudio", lmstudio)]
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=plugins)
    settings = Settings.load({"demo": False}, {"SHIMMY_HOME": str(home / ".shimmy")})
    return ModelCatalog(build_registry(pm, settings).sources.values())


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="files in the tree (10,000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each kind; the best is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="shimmy-discovery-bench-") as tmp:
        home = Path(tmp)
        old_env = {k: os.environ.get(k) for k in ("HOME", "OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME")}
        for key in old_env:
            os.environ.pop(key, None)
        os.environ["HOME"] = str(home)
        try:
            started = time.perf_counter()
            files = build_tree(home, args.files)
            build_s = time.perf_counter() - started
            cold, warm, result = [], [], None
            for _ in range(args.repeat):
                cat = catalog(home)  # new sources: empty header caches
                cold.append(timed(cat.refresh))
                warm.append(timed(cat.refresh))
                result = cat
            models, skipped = len(result.list()), len(result.skipped())
        finally:
            for key, value in old_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    report = {
        "files": files, "models": models, "skipped": skipped,
        "full_scan_s": round(min(cold), 4), "cached_rescan_s": round(min(warm), 4),
        "full_scan_files_per_s": round(files / min(cold)), "cached_rescan_files_per_s": round(files / min(warm)),
        "tree_build_s": round(build_s, 2), "machine": machine(),
        "command": "python bench/discovery_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"tree: {files} files ({models} models listed, {skipped} skipped), built in {build_s:.1f} s")
        print(f"machine: {report['machine']}")
        cold_rate, warm_rate = report["full_scan_files_per_s"], report["cached_rescan_files_per_s"]
        print(f"full scan (cold header cache): {min(cold) * 1000:7.1f} ms  {cold_rate:>9,} files/s"
              f"  (best of {args.repeat})")
        print(f"cached rescan:                 {min(warm) * 1000:7.1f} ms  {warm_rate:>9,} files/s")
        print("target: full scan of 10,000 files under 1 s: " + ("met" if min(cold) * 10_000 / files < 1 else "MISSED"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
