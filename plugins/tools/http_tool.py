"""The built-in ``http_request`` tool: GET (POST with ``--http-allow-post``) through the SSRF-safe
client in ``shimmy_core.tools.http_client`` (public addresses only, unless ``--http-allow HOST``).
Text protocol: ``<tool>http:https://example.com</tool>``."""

from __future__ import annotations

from shimmy_core.plugin_api import hookimpl


class HttpRequestTool:
    name = "http_request"
    description = "Fetch a web page or API over HTTP(S) and return the status and the body as text."
    parameters = {
        "type": "object",
        "properties": {
            "url": {"type": "string", "description": "an http or https URL"},
            "method": {"enum": ["GET", "POST"], "description": "GET unless the server allows POST"},
            "body": {"type": "string", "description": "the request body, for POST"},
        },
        "required": ["url"],
        "additionalProperties": False,
    }
    capabilities = frozenset({"network"})
    text_prefix = "http"
    text_argument = "url"
    timeout = 30.0

    def __init__(self) -> None:
        from shimmy_core.plugin_api import HttpPolicy

        self.policy = HttpPolicy()

    def configure(self, settings) -> None:
        from shimmy_core.plugin_api import HttpPolicy

        self.policy = HttpPolicy(allow=tuple(getattr(settings, "tool_http_allow", ()) or ()),
                                 allow_post=bool(getattr(settings, "tool_http_post", False)))

    def run(self, arguments: dict) -> str:
        from shimmy_core.plugin_api import RequestRefused, fetch
        from shimmy_core.plugin_api import ToolError

        body = arguments.get("body")
        try:
            response = fetch(arguments["url"], self.policy, arguments.get("method", "GET"),
                             body.encode("utf-8") if isinstance(body, str) else None)
        except RequestRefused as exc:
            raise ToolError(str(exc)) from None
        text = response.text()
        if response.truncated:
            text += f"\n[truncated at {self.policy.max_bytes} bytes]"
        kind = response.headers.get("content-type", "unknown")
        return f"HTTP {response.status} {response.reason}\nContent-Type: {kind}\n\n{text}"


@hookimpl
def shimmy_register_tools(register):
    register(HttpRequestTool())
