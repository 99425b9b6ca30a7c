"""shimmy_core.prompt_builder: the one place that renders, tokenizes and budgets prompts."""

from __future__ import annotations

import pytest

from shimmy_core.contract.generation import ContextLengthExceeded, GenerationRequest, SamplingParams
from shimmy_core.chat_template import CHATML_FALLBACK, ChatTemplate
from shimmy_core.prompt_builder import PromptBuilder
from shimmy_core.tools.tool_prompts import template_supports_tools

TOOL_AWARE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def builder(template: str, context: int = 64, ceiling: int = 16) -> PromptBuilder:
    return PromptBuilder(template=ChatTemplate(template), tokenize=lambda text, _: text.split(),
                         context_length=context, max_tokens_ceiling=ceiling, start_token=1,
                         turn_stops=("<|im_end|>",), default_system="Be brief.")


def test_a_tool_aware_template_gets_the_tools_itself():
    b = builder(TOOL_AWARE)
    assert template_supports_tools(b.template)
    text = b.render([{"role": "user", "content": "weather?"}], [WEATHER])
    assert text.startswith("<tools>get_weather;</tools>")
    assert "<system>Be brief." in text  # the default system prompt (Ollama's) is added


def test_a_template_without_tools_gets_a_generic_instruction():
    b = builder(CHATML_FALLBACK)
    assert not template_supports_tools(b.template)
    text = b.render([{"role": "user", "content": "weather?"}], [WEATHER])
    assert "get_weather" in text and "<|im_start|>user\nweather?" in text


def test_budget_and_context_errors():
    b = builder(CHATML_FALLBACK, context=10, ceiling=4)
    prepared = b.prepare(GenerationRequest(prompt="a b c"))
    assert prepared.tokens == ("a", "b", "c") and prepared.max_tokens == 4 and prepared.stop == ()
    assert b.prepare(GenerationRequest(prompt="")).tokens == (1,)  # nothing to decode: the start token
    with pytest.raises(ContextLengthExceeded):
        b.prepare(GenerationRequest(prompt="a " * 10))
    with pytest.raises(ContextLengthExceeded) as info:
        b.prepare(GenerationRequest(prompt="a b c", params=SamplingParams(max_tokens=8)))
    assert info.value.param == "max_tokens"
    chat = b.prepare(GenerationRequest(messages=({"role": "user", "content": "hi"},)))
    assert chat.stop == ("<|im_end|>",)
