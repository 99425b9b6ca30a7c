"""The neutral request an API dialect hands the service: what to generate, from which model,
how many choices, and the tools, with every field already validated by the dialect."""

from __future__ import annotations

from dataclasses import dataclass

from shimmy_core.contract.generation import GenerationRequest
from shimmy_core.tools.requested import ToolRequest


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: one :class:`GenerationRequest` per prompt, ``n`` choices each."""

    kind: str                       # "chat" | "completion"
    model: str
    prompts: tuple[GenerationRequest, ...]
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    tools: ToolRequest | None = None        # chat: tools, tool_choice, parallel_tool_calls, response_format
