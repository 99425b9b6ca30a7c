"""The Responses API routes: create (whole or streamed), retrieve, delete, list input items, count
input tokens.  Thin Falcon resources over the core's generation flow and the in-memory store."""

from __future__ import annotations

import contextlib

import falcon

from shimmy_core.plugin_api import (
    ContextLengthExceeded,
    DialectServer,
    Generation,
    parse_json,
    read_body,
    UnsupportedOutputSchema,
)
from shimmy_plugins.dialects.openai.openai_errors import APIError, invalid
from shimmy_plugins.dialects.openai.responses_bodies import collect, ResponseRun, stream
from shimmy_plugins.dialects.openai.responses_requests import (
    parse_responses_request,
    ResponsesRequest,
    truncated,
    unsupported_schema,
)
from shimmy_plugins.dialects.openai.responses_store import ResponseStore, StoredResponse


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id {response_id!r} not found.", param="response_id", code="not_found")


class _Parsing:
    """What the create and count routes share: the body, the conversation it continues, the check."""

    def __init__(self, server: DialectServer, store: ResponseStore):
        self.settings = server.settings
        self.store = store

    def context(self, body: dict) -> list[dict]:
        """The stored conversation ``previous_response_id`` continues (400 when there is none)."""
        previous = body.get("previous_response_id")
        if not isinstance(previous, str):
            return []  # absent, or a wrong type the schema check reports
        if not self.store.enabled:
            raise invalid("'previous_response_id' needs stored responses, and this server keeps none "
                          "(it runs with --no-store-responses): send the whole conversation as 'input'.",
                          param="previous_response_id", code="storage_disabled")
        entry = self.store.get(previous)
        if entry is None:
            raise invalid(f"Previous response with id {previous!r} not found: it was never stored (store: false), "
                          "was deleted, expired, or the server restarted.", param="previous_response_id",
                          code="previous_response_not_found")
        return entry.conversation()

    def parse(self, req: falcon.Request, count_only: bool = False) -> tuple[dict, ResponsesRequest]:
        body = parse_json(read_body(req, self.settings.max_body_bytes))
        request = parse_responses_request(body, self.context(body), count_only, self.settings.sampling_defaults())
        req.context.model = request.parsed.model
        count = len(request.parsed.prompts[0].messages or ())
        if count > self.settings.max_messages:
            raise invalid(f"Too many input items: {count} messages; this server accepts at most "
                          f"{self.settings.max_messages} (SHIMMY_MAX_MESSAGES).", param="input",
                          code="too_many_messages")
        return body, request


class ResponsesResource(_Parsing):
    """``POST /v1/responses``."""

    def __init__(self, server: DialectServer, store: ResponseStore):
        super().__init__(server, store)
        self.generation = Generation("responses", server)

    def _begin(self, req: falcon.Request, body: dict, request: ResponsesRequest):
        """Start the run; with ``truncation: auto`` a conversation too long for the context loses
        its oldest turns until it fits (OpenAI's behaviour), else the error stands."""
        # The cache key sees the conversation a previous_response_id stands for, not the id.
        key = dict(body, previous_response_id=request.context) if request.context else body
        parsed = request.parsed
        while True:
            try:
                return self.generation.begin(req, parsed, key)
            except UnsupportedOutputSchema as exc:
                raise unsupported_schema(exc, body) from None
            except ContextLengthExceeded as exc:
                shorter = truncated(parsed) if request.echo["truncation"] == "auto" else None
                if shorter is None:
                    raise invalid(str(exc), param="input", code="context_length_exceeded") from None
                parsed, key = shorter, dict(key, truncated=len(shorter.prompts[0].messages or ()))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, request = self.parse(req)
        model_id, events = self._begin(req, body, request)
        store = request.store and self.store.enabled
        run = ResponseRun(request, model_id, store)
        items = [*request.context, *request.items]

        def keep(response: dict) -> None:
            if store:
                self.store.put(response, items)

        if not request.parsed.stream:
            with contextlib.closing(events):
                response = collect(run, events)
            keep(response)
            resp.media = response
            return
        resp.content_type = "text/event-stream"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        resp.stream = stream(run, events, on_end=keep, on_close=events.close)


class InputTokensResource(_Parsing):
    """``POST /v1/responses/input_tokens``: the prompt's size in tokens, tools and instructions
    included, as the model would see it (the model is loaded to tokenize; nothing is generated)."""

    def __init__(self, server: DialectServer, store: ResponseStore):
        super().__init__(server, store)
        self.service = server.service

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, request = self.parse(req, count_only=True)
        try:
            tokens = self.service.count_tokens(request.parsed)
        except UnsupportedOutputSchema as exc:
            raise unsupported_schema(exc, body) from None
        resp.media = {"object": "response.input_tokens", "input_tokens": tokens}


class StoredResponseResource:
    """``GET`` and ``DELETE /v1/responses/{response_id}``, ``GET .../input_items``."""

    def __init__(self, store: ResponseStore):
        self.store = store

    def _entry(self, response_id: str) -> StoredResponse:
        entry = self.store.get(response_id)
        if entry is None:
            raise _not_found(response_id)
        return entry

    def on_get(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        resp.media = self._entry(response_id).response

    def on_delete(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        if not self.store.delete(response_id):
            raise _not_found(response_id)
        resp.media = {"id": response_id, "object": "response", "deleted": True}

    def on_get_items(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        """The input items the response answered (the conversation it continued included), newest
        first unless ``order=asc``; ``limit`` 1 to 100 (default 20), ``after`` an item id."""
        items = self._entry(response_id).items
        order = req.get_param("order", default="desc")
        if order not in ("asc", "desc"):
            raise invalid("Invalid value for 'order': expected asc or desc.", param="order", code="invalid_value")
        try:
            limit = int(req.get_param("limit", default="20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise invalid("Invalid value for 'limit': a whole number from 1 to 100.", param="limit",
                          code="invalid_value")
        ordered = items if order == "asc" else items[::-1]
        after = req.get_param("after")
        if after is not None:
            ids = [item.get("id") for item in ordered]
            if after not in ids:
                raise invalid(f"No input item {after!r} in this response.", param="after", code="invalid_value")
            ordered = ordered[ids.index(after) + 1:]
        page = ordered[:limit]
        resp.media = {"object": "list", "data": page, "has_more": len(ordered) > limit,
                      "first_id": page[0]["id"] if page else "", "last_id": page[-1]["id"] if page else ""}
