"""The SafeTensors backend: Hugging Face model folders (``config.json``,
``*.safetensors`` with their index when sharded, tokenizer files,
``generation_config.json``) run in-process through transformers and torch.

Importing this module imports neither: they are imported when such a model
loads (:mod:`shimmy_plugins.backends.safetensors.safetensors_model`), so a server with only GGUF
models never pays for them.  Without the ``safetensors`` extra the backend
still registers and says which pip command fixes it.

Safe loading only: the folder is checked again before anything is imported
(discovery, through :class:`SafeTensorsFormat`, already refuses such folders): weights must be SafeTensors (a
``pytorch_model.bin`` is never unpickled) and a folder whose ``config.json`` or
``tokenizer_config.json`` asks for its own Python code (``auto_map``) is
refused, whatever it also contains.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shimmy_core.plugin_api import CHAT, hookimpl, ModelLoadError
from shimmy_plugins.backends.safetensors.safetensors_format import SafeTensorsFormat

PIP_FIX = "pip install 'shimmy-server[safetensors]'"
REQUIRED_MODULES = ("torch", "transformers", "safetensors")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_folder(path: str | Path) -> Path:
    """The model folder at ``path`` if Shimmy may load it; else :class:`ModelLoadError` saying why.

    Reads ``config.json``, ``tokenizer_config.json`` and the SafeTensors headers only (through
    :class:`SafeTensorsFormat`, the rules ``shimmy list`` applies).
    """
    from shimmy_core.plugin_api import ModelFacts, Scanner, read_json

    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a model folder (config.json, *.safetensors, tokenizer files)")
    found = [f for f in Scanner([SafeTensorsFormat()], max_depth=0).path(folder) if f.path == folder]
    if not found:
        raise ModelLoadError(f"{folder} is not a model folder: no config.json with *.safetensors weights")
    result = found[0].result
    if not isinstance(result, ModelFacts):
        raise ModelLoadError(f"refusing to load {folder}: {result.reason}")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            doc = read_json(tokenizer_config)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"refusing to load {folder}: unreadable tokenizer_config.json ({exc})") from None
        if isinstance(doc, dict) and "auto_map" in doc:
            raise ModelLoadError(f"refusing to load {folder}: its tokenizer needs the model's own Python code "
                                 "(auto_map in tokenizer_config.json); Shimmy never runs it")
    return folder


class SafeTensorsBackend:
    name = "safetensors"
    formats = ("safetensors",)

    def unavailable_reason(self) -> str | None:
        missing = [m for m in REQUIRED_MODULES if not _installed(m)]
        if missing:
            return f"SafeTensors models need {', '.join(missing)} (not installed here): {PIP_FIX}"
        return None

    def memory_facts(self, model, settings):
        """What the model needs in memory, in the dtype it will load as (imports torch)."""
        check_folder(model.path)
        from shimmy_plugins.backends.safetensors.safetensors_model import memory_facts

        return memory_facts(model, settings)

    def load(self, model, settings, plan=None, progress=None):
        """Load ``model`` as ``plan`` places it, telling ``progress`` (the core's) how far it is."""
        check_folder(model.path)
        if model.kind != CHAT:  # an encoder or a cross-encoder
            from shimmy_plugins.backends.safetensors.safetensors_embedding import load_embedding_model

            return load_embedding_model(model, settings, progress)
        from shimmy_plugins.backends.safetensors.safetensors_model import load

        if plan is not None:
            settings = settings.replace(ctx_size=plan.ctx_per_slot, parallel=plan.slots)
        return load(model, settings, plan, progress)


@hookimpl
def shimmy_register_backends(register):
    register(SafeTensorsBackend())


@hookimpl
def shimmy_register_formats(register):
    register(SafeTensorsFormat())
