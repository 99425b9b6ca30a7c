"""What a request asks of tools, as a dialect validated it: light types the neutral request
carries (:mod:`shimmy_core.tools.loop` resolves them against the server's tools)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestedTool:
    """One entry of a request's ``tools``: a full definition, or a name to look up on the server."""

    name: str
    description: str | None = None
    parameters: Any = None            # None: not given
    index: int = 0


@dataclass(frozen=True)
class ToolRequest:
    """The tool-related part of a validated chat request."""

    tools: tuple[RequestedTool, ...] = ()
    choice: str = "auto"              # "none" | "auto" | "required" | "function"
    function: str | None = None       # the named function when choice is "function"
    allowed: tuple[str, ...] | None = None   # tool_choice allowed_tools
    parallel: bool | None = None      # parallel_tool_calls; only an explicit true lets a forced call be several
    answer_schema: Any = None         # response_format json_schema's schema, or {"type": "object"}
