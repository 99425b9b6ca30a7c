"""The hooks a Shimmy plugin can implement.

Collection hooks receive a ``register`` callback and may call it any number of
times.  Decision hooks are ``firstresult``: the first non-``None`` answer wins,
and Shimmy's own default is marked ``trylast`` so that any plugin can override
it.  Every hook here is documented in ``docs/hooks.md`` (a test checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from shimmy_core.contract.dialect import Dialect
    from shimmy_core.contract.generation import Backend
    from shimmy_core.contract.model_formats import ModelFormat
    from shimmy_core.contract.model_info import DiscoverySource, ModelInfo
    from shimmy_core.contract.settings import Settings

PROJECT = "shimmy"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def shimmy_register_backends(register: Callable[["Backend"], None]) -> None:
    """Register inference backends.

    Call ``register(backend)`` for each backend this plugin provides.  A backend
    has a unique ``name``, the model ``formats`` it serves (``"gguf"``,
    ``"safetensors"``...) and loads models into objects that generate neutral
    chunks (see :mod:`shimmy_core.contract.generation`).  Backends never see HTTP.
    """


@hookspec
def shimmy_register_formats(register: Callable[["ModelFormat"], None]) -> None:
    """Register model formats: recognizers of model files and folders.

    Call ``register(model_format)`` for each format this plugin recognizes.  A format
    has a unique ``name`` (the ``ModelInfo.format`` of its models: ``"gguf"``), the
    file suffixes it claims and methods that describe a file, a set of files or a
    folder from their headers (see :class:`shimmy_core.contract.model_formats.ModelFormat`).
    Discovery knows no format but these: a new format comes as a plugin alone.
    """


@hookspec
def shimmy_register_sources(
    register: Callable[["DiscoverySource"], None], settings: "Settings",
    formats: "tuple[ModelFormat, ...]",
) -> None:
    """Register model discovery sources.

    Call ``register(source)`` for each place this plugin knows how to look for
    models.  A source has a unique ``name`` and a ``discover()`` method returning
    :class:`shimmy_core.contract.model_info.ModelInfo` objects (and skipped files with their
    reasons).  ``settings`` carries ``--model``/``--model-dir`` and friends;
    ``formats`` are the registered model formats, for the source's ``Scanner``.
    """


@hookspec
def shimmy_register_caches(register: Callable[[object], None], settings: "Settings") -> None:
    """Register response cache implementations.

    Call ``register(cache)`` for each cache this plugin provides; the one named
    by ``--cache`` (``settings.cache``) is used.  A cache has a unique ``name``
    and the methods ``get(key) -> dict | None``, ``set(key, value, ttl)`` (``ttl``
    in seconds, ``None`` for no expiry) and ``close()``, and may have ``open()``,
    called once at start-up.  Keys are hex strings, values JSON-compatible
    dicts.  Registering must be cheap and touch no disk: only the selected cache
    is opened.  ``settings`` carries ``cache_size``, ``cache_dir`` and friends.
    """


@hookspec
def shimmy_register_tools(register: Callable[[object], None]) -> None:
    """Register tools a model can call.

    Call ``register(tool)`` for each tool; a tool has a unique ``name``, a
    ``description``, a JSON Schema ``parameters`` object and a ``run(arguments)``
    method.
    """


@hookspec
def shimmy_register_dialects(register: Callable[["Dialect"], None]) -> None:
    """Register API dialects (wire formats).

    Call ``register(dialect)`` for each dialect; a dialect has a unique ``name``, the URL path
    ``prefixes`` whose errors it answers, ``add_routes(routes, server)`` to add its Falcon
    resources, and ``error_response(exc)`` giving ``(status, headers, JSON body)`` in its error
    envelope (see :mod:`shimmy_core.contract.dialect`).  A dialect translates its requests into
    the neutral :class:`shimmy_core.parsed_request.ParsedRequest` and the neutral chunks back;
    backends never see it.  Two dialects adding the same path stop the start.
    """


@hookspec(firstresult=True)
def shimmy_backend_for_model(model: "ModelInfo", backends: dict[str, "Backend"]) -> str | None:
    """Choose the backend that serves ``model``; return its name.

    ``backends`` maps registered backend names to backends.  The first plugin
    that returns a name wins.  Shimmy's default (``trylast``) picks the first
    backend whose ``formats`` include ``model.format``.
    """
