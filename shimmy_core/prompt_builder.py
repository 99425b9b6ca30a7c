"""Turn a neutral generation request into a prompt a backend can run: render
the chat template (in the sandbox), tokenize, and check the context window.
Every backend prepares prompts here, so they agree on errors and limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from shimmy_core.contract.generation import (
    ContextLengthExceeded,
    GenerationRequest,
    InvalidPrompt,
    PreparedPrompt,
    ReasoningOptions,
    ReasoningSyntax,
)
from shimmy_core.chat_template import ChatTemplate, TemplateError
from shimmy_core.reasoning import opens_thinking, reasoning_syntax

NO_THINK = "/no_think"   # the switch of templates that read it from the system prompt (SmolLM3)


@dataclass
class PromptBuilder:
    """What a loaded model knows about its prompts.

    ``tokenize(text, add_prefix)`` returns token ids; ``add_prefix`` says whether the
    model's own start token (BOS) should be added: chat prompts whose template already
    wrote ``bos_text`` pass False.
    """

    template: ChatTemplate
    tokenize: Callable[[str, bool], Sequence[int]]
    context_length: int
    max_tokens_ceiling: int
    start_token: int                 # decoded first when a prompt tokenizes to nothing
    bos_text: str = ""
    turn_stops: tuple[str, ...] = ()
    default_system: str | None = None
    reasoning: ReasoningSyntax | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        source = getattr(self.template, "source", "") or ""
        self.reasoning = reasoning_syntax(source)
        if self.reasoning is not None and self.reasoning.close in self.turn_stops:
            # a channel template's end-of-message marker ends the analysis, not the turn
            self.turn_stops = tuple(s for s in self.turn_stops if s != self.reasoning.close)

    def _switches(self, reasoning: ReasoningOptions | None, messages: list[dict]) -> dict[str, Any]:
        """The template's own thinking switches for a requested effort: ``enable_thinking``
        (Qwen 3), ``reasoning_effort`` (gpt-oss) and ``/no_think`` in the system prompt."""
        effort = reasoning.effort if reasoning is not None else None
        if effort is None or self.reasoning is None:
            return {}
        switches: dict[str, Any] = {"enable_thinking": effort != "none"}
        if effort in ("low", "medium", "high"):
            switches["reasoning_effort"] = effort
        elif effort in ("none", "minimal"):
            switches["reasoning_effort"] = "low"
        source = getattr(self.template, "source", "") or ""
        if effort == "none" and NO_THINK in source:
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = f"{messages[0].get('content') or ''}\n{NO_THINK}".lstrip()
            else:
                messages.insert(0, {"role": "system", "content": NO_THINK})
        return switches

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               reasoning: ReasoningOptions | None = None) -> str:
        """The chat prompt; ``tools`` go through the template's own ``tools`` variable when it
        knows tools, else as a generic instruction (``shimmy_core.tools.tool_prompts``)."""
        from shimmy_core.tools.tool_prompts import render_chat

        messages = [dict(m) for m in messages]
        if self.default_system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.default_system})
        switches = self._switches(reasoning, messages)
        try:
            return render_chat(self.template, messages, tools, add_generation_prompt=True, **switches)
        except TemplateError as exc:
            raise InvalidPrompt(f"The model's chat template failed: {exc}", param="messages",
                                code="template_error") from None

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        chat = request.messages is not None or request.continues
        if request.messages is not None:
            text = self.render(request.messages, request.tools, request.reasoning)
            param = "messages"
        else:
            text = request.prompt or ""
            param = "prompt"
        add_prefix = not (chat and self.bos_text and text.startswith(self.bos_text))
        stops = request.params.stop + (self.turn_stops if chat else ())
        tokens = list(self.tokenize(text, add_prefix)) or [self.start_token]
        reasoning = self.reasoning if chat else None
        return PreparedPrompt(text=text, tokens=tuple(tokens), stop=stops,
                              max_tokens=self.completion_budget(len(tokens), request.params.max_tokens, param),
                              reasoning=reasoning, thinking=opens_thinking(reasoning, text))

    def completion_budget(self, n_prompt: int, requested: int | None, param: str) -> int:
        """Tokens a prompt of ``n_prompt`` tokens may generate; OpenAI's errors when it cannot fit."""
        n_ctx = self.context_length
        if n_prompt >= n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, your {param} "
                f"resulted in {n_prompt} tokens. Please reduce the length of the {param}.",
                param=param, prompt_tokens=n_prompt, context_length=n_ctx,
            )
        if requested is not None and n_prompt + requested > n_ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{n_prompt + requested} tokens ({n_prompt} in the {param}, {requested} in the completion). "
                f"Please reduce the length of the {param} or completion.",
                param="max_tokens", prompt_tokens=n_prompt, requested=requested, context_length=n_ctx,
            )
        return min(requested or self.max_tokens_ceiling, self.max_tokens_ceiling, n_ctx - n_prompt)
