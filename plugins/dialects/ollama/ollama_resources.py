"""The Ollama routes: thin Falcon resources over the core (the completion service through
:class:`Generation`, the embedding service, the catalog and the model manager)."""

from __future__ import annotations

import contextlib
import time
from importlib import metadata

import falcon

from shimmy_core.plugin_api import CHAT, DialectServer, EMBEDDING_KIND, Generation, ModelInfo, ModelNotFound, read_body
from shimmy_core.plugin_api import WrongModelKind
from shimmy_plugins.dialects.ollama import ollama_requests as requests
from shimmy_plugins.dialects.ollama.ollama_errors import bad_request, OllamaError
from shimmy_plugins.dialects.ollama.ollama_models import ps_entry, show_body, tag_entry
from shimmy_plugins.dialects.ollama.ollama_replies import lines, NDJSON, now_iso, Reply, whole

# The Ollama API version whose requests this dialect takes (``think`` levels came with 0.12).
OLLAMA_API_VERSION = "0.12.0"


def _body(req: falcon.Request, server: DialectServer, validator) -> dict:
    body = requests.read_json(read_body(req, server.settings.max_body_bytes))
    requests.check(validator, body)
    return body


def _model(server: DialectServer, name: str, kind: str | None = None) -> ModelInfo:
    info = requests.find_model(server.catalog, name)
    if info is None:
        raise ModelNotFound(name)
    if kind is not None and info.kind != kind:
        raise WrongModelKind(info.id, info.kind, kind)
    return info


class VersionResource:
    """``GET /api/version``."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            shimmy = metadata.version("shimmy-server")
        except metadata.PackageNotFoundError:  # pragma: no cover - a source checkout not installed
            shimmy = "unknown"
        resp.media = {"version": OLLAMA_API_VERSION, "shimmy_version": shimmy}


class TagsResource:
    """``GET /api/tags``: every model the catalog has."""

    def __init__(self, server: DialectServer):
        self.catalog = server.catalog

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"models": [tag_entry(info) for info in self.catalog.list()]}


class ShowResource:
    """``POST /api/show``."""

    def __init__(self, server: DialectServer):
        self.server = server

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = _body(req, self.server, requests.NAMED)
        resp.media = show_body(_model(self.server, requests.model_name(body)))


class PsResource:
    """``GET /api/ps``: the loaded models, as ``/health`` reports them."""

    def __init__(self, server: DialectServer):
        self.server = server

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        models = []
        for stat in self.server.manager.stats():
            info = self.server.catalog.get(stat["id"])
            if info is not None:
                models.append(ps_entry(info, self.server.settings.keep_alive))
        resp.media = {"models": models}


class GenerateResource:
    """``POST /api/chat`` (``chat``) and ``POST /api/generate``: NDJSON unless ``stream`` is false."""

    def __init__(self, chat: bool, server: DialectServer):
        self.chat = chat
        self.server = server
        self.generation = Generation("ollama_chat" if chat else "ollama_generate", server)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        started = getattr(req.context, "started", None) or time.perf_counter()
        body = _body(req, self.server, requests.CHAT if self.chat else requests.GENERATE)
        name = requests.model_name(body)
        req.context.model = name
        info = _model(self.server, name, CHAT)
        if not (body.get("messages") if self.chat else body.get("prompt")):
            self._load_only(body, info, resp)
            return
        defaults = self.server.settings.sampling_defaults()
        if self.chat:
            parsed = requests.chat_request(body, info, self.server.settings.max_messages, defaults)
        else:
            parsed = requests.generate_request(body, info, defaults)
        keep_alive = requests.keep_alive_seconds(body.get("keep_alive"))
        model_id, events = self.generation.begin(req, parsed, body)
        if keep_alive is not None:  # from now on; 0: unloaded as soon as this request ends
            self.server.manager.keep_alive(info, keep_alive)
        reply = Reply(self.chat, model_id, started, time.perf_counter())
        if not parsed.stream:
            with contextlib.closing(events):
                resp.media = whole(reply, events)
            return
        resp.content_type = NDJSON
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        resp.stream = lines(reply, events, on_close=events.close)

    def _load_only(self, body: dict, info: ModelInfo, resp: falcon.Response) -> None:
        """No prompt: Ollama's way to load a model ahead of use."""
        keep_alive = requests.keep_alive_seconds(body.get("keep_alive"))
        if keep_alive == 0:  # Ollama's "unload now"
            self.server.manager.keep_alive(info, 0)
            reason = "unload"
        else:
            lease = self.server.manager.get(info)
            del lease
            if keep_alive is not None:
                self.server.manager.keep_alive(info, keep_alive)
            reason = "load"
        body_out: dict = {"model": info.id, "created_at": now_iso(), "done": True, "done_reason": reason}
        body_out.update({"message": {"role": "assistant", "content": ""}} if self.chat else {"response": ""})
        resp.media = body_out


class EmbedResource:
    """``POST /api/embed`` (``input``: a text or texts) and the older ``POST /api/embeddings``
    (``prompt``: one text, answered as ``embedding``).  Inputs over the context are cut, as
    Ollama does, unless ``truncate`` is false."""

    def __init__(self, legacy: bool, server: DialectServer):
        self.legacy = legacy
        self.server = server

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        started = time.perf_counter()
        if self.server.embeddings is None:
            raise falcon.HTTPNotFound()
        body = _body(req, self.server, requests.EMBED)
        name = requests.model_name(body)
        req.context.model = name
        if self.legacy:
            inputs = [body.get("prompt") or ""]
        else:
            raw = body.get("input")
            if raw is None:
                raise bad_request("input is required")
            inputs = [raw] if isinstance(raw, str) else list(raw)
        if any(not text for text in inputs) and not self.legacy:
            raise bad_request("an input must not be an empty string")
        info = _model(self.server, name, EMBEDDING_KIND)
        cancelled = req.env.get("waitress.client_disconnected") or (lambda: False)
        result = self.server.embeddings.embed(info.id, inputs, truncate=body.get("truncate") is not False,
                                              dimensions=body.get("dimensions"), cancelled=cancelled)
        req.context.model = result.model
        req.context.usage = (result.prompt_tokens, 0)
        if self.legacy:
            resp.media = {"embedding": result.vectors[0]}
            return
        took = int((time.perf_counter() - started) * 1e9)
        resp.media = {"model": result.model, "embeddings": result.vectors, "total_duration": took,
                      "load_duration": 0, "prompt_eval_count": result.prompt_tokens}


class RefusedResource:
    """A model-store route Shimmy does not have (pull, push, create, copy, delete): Ollama's
    error shape with what to do instead."""

    def __init__(self, message: str):
        self.message = message

    def _refuse(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise OllamaError(501, self.message)

    on_post = on_delete = _refuse


STORE_ROUTES = {
    "/api/pull": "Shimmy does not download models: it serves the models it finds on this machine. Pull with "
                 "Ollama itself (ollama pull NAME); Shimmy serves Ollama's store as it is.",
    "/api/push": "Shimmy does not push models to a registry; use Ollama itself (ollama push NAME).",
    "/api/create": "Shimmy does not create models from a Modelfile; create it with Ollama (ollama create) "
                   "or register a model file with shimmy add PATH.",
    "/api/copy": "Shimmy does not copy models; register the file under another name with shimmy add PATH --name NAME.",
    "/api/delete": "Shimmy does not delete model files. Remove a model you registered with shimmy remove NAME; "
                   "delete one of Ollama's with ollama rm NAME.",
}
