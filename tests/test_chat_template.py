"""Tests for shimmy_core.chat_template: Hugging Face compatibility and the sandbox's budgets."""

from __future__ import annotations

import json
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from shimmy_core.chat_template import (
    CHATML_FALLBACK,
    ChatTemplate,
    TemplateError,
    template_stop_strings,
)

# tokenizer_config.json of HuggingFaceTB/SmolLM2-135M-Instruct.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template, with the role check of Mistral-style templates added.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


def render_source(source: str, **kwargs: Any) -> str:
    return ChatTemplate(source).render([{"role": "user", "content": "x"}], **kwargs)


def repeated(assignment: str, *, initial: str) -> str:
    """A template that starts from `ns.v = initial` and then runs `set assignment` 40 times."""
    return (
        "{% set ns = namespace(v=" + initial + ") %}"
        "{% for i in range(40) %}{% set " + assignment + " %}{% endfor %}"
    )


# -- Hugging Face compatibility -----------------------------------------------------------------


def test_smollm2_template_renders_exactly() -> None:
    assert ChatTemplate(SMOLLM2).render(CHAT) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_adds_default_system_prompt_and_honours_generation_flag() -> None:
    messages = [{"role": "user", "content": "Hi!"}]
    assert ChatTemplate(SMOLLM2).render(messages, add_generation_prompt=False) == (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
    )


def test_llama3_template_uses_bos_token() -> None:
    template = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    messages = [{"role": "user", "content": " Hi! "}, {"role": "assistant", "content": "Hello."}]
    assert template.render(messages) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_raise_exception_gives_the_templates_message() -> None:
    template = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>")
    with pytest.raises(TemplateError, match=r"^Conversation roles must alternate user/assistant"):
        template.render([{"role": "assistant", "content": "Hello."}])


def test_chatml_fallback_handles_none_and_text_parts() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image"},
                {"type": "text", "text": "a cat"},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    assert ChatTemplate(CHATML_FALLBACK).render(messages) == (
        "<|im_start|>user\nLook: a cat<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ChatTemplate(CHATML_FALLBACK).render(messages[:1], add_generation_prompt=False) == (
        "<|im_start|>user\nLook: a cat<|im_end|>\n"
    )


def test_messages_are_passed_through_unchanged() -> None:
    source = "{{ messages[0]['content'] is none }} {{ messages[1]['content'][0]['text'] }}"
    messages: list[dict[str, Any]] = [
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "t"}]},
    ]
    assert ChatTemplate(source).render(messages) == "True t"


def test_tojson_behaves_like_hugging_face() -> None:
    value = {"b": "<é>", "a": [1, None]}
    assert render_source("{{ v|tojson }}", v=value) == json.dumps(value, ensure_ascii=False)
    assert render_source("{{ v|tojson(indent=2, sort_keys=True) }}", v=value) == json.dumps(
        value, ensure_ascii=False, indent=2, sort_keys=True
    )
    compact = render_source("{{ v|tojson(separators=(',', ':'), ensure_ascii=True) }}", v=value)
    assert compact == json.dumps(value, separators=(",", ":"))


def test_tools_only_defined_when_given_and_extra_variables_pass_through() -> None:
    source = "{{ tools is defined }}{% if tools %} {{ tools[0].name }}{% endif %} {{ date_string }}"
    assert render_source(source, date_string="today") == "False today"
    assert render_source(source, tools=[{"name": "f"}], date_string="today") == "True f today"


def test_hugging_face_extensions_and_globals() -> None:
    source = (
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "{% generation %}[{{ 'g' }}]{% endgeneration %}"
        "{{ strftime_now('%Y') }}"
    )
    assert render_source(source) == f"01[g]{time.strftime('%Y')}"


def test_template_stop_strings() -> None:
    assert template_stop_strings(SMOLLM2) == ["<|im_end|>"]
    assert template_stop_strings(LLAMA3) == ["<|eot_id|>"]
    gemma_like = "{{ '<start_of_turn>' }}{{ '<end_of_turn>' }}{{ eos_token }}{{ '</s>' }}"
    assert template_stop_strings(gemma_like) == ["<end_of_turn>", "</s>"]
    assert template_stop_strings("{{ messages }}") == []


# -- errors -------------------------------------------------------------------------------------


def test_syntax_error_raised_at_construction() -> None:
    with pytest.raises(TemplateError, match="syntax error at line 1"):
        ChatTemplate("{% for message in messages %}{{ message }}")


def test_undefined_and_type_errors_become_template_errors() -> None:
    with pytest.raises(TemplateError):
        render_source("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TemplateError):
        render_source("{{ nothing.here.at_all }}")


def test_recursive_macro_is_refused() -> None:
    with pytest.raises(TemplateError, match="recursed too deeply"):
        render_source("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}")


# -- security -----------------------------------------------------------------------------------


def test_cve_2024_34359_payload_is_inert(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    payload = (
        '{% for x in ().__class__.__base__.__subclasses__() %}{% if "warning" in x.__name__ %}'
        "{{ x()._module.__builtins__['__import__']('os')"
        '.popen("touch ' + str(target) + '").read() }}'
        "{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate(payload).render(CHAT)
    assert not target.exists()


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a' * 200000000 }}",
        "{{ ['a'] * 200000000 }}",
        "{{ 'a'.ljust(10**9) }}",
        "{{ 'a'|center(10**9) }}",
        "{{ 'a'|center(1000000000) }}",
        "{{ 10 ** 1000000000 }}",
        repeated("ns.v = ns.v * ns.v", initial="3"),
        "{{ '%1000000000s' % 'a' }}",
        "{{ '{:>1000000000}'.format('a') }}",
        "{{ '{:{w}}'.format('a', w='1000000000') }}",
        "{{ ('a' * 1000)|replace('a', 'b' * 10000) }}",
        "{{ ('a' * 1000).replace('a', 'b' * 10000) }}",
        "{{ ('a\n' * 1000)|indent('b' * 10000) }}",
        "{{ ('b' * 10000).join(['a'] * 1000) }}",
        "{{ (['a' * 10000] * 90)|join('b' * 100000) }}",
        # doubling, by every way of building a value
        repeated("ns.v = ns.v ~ ns.v", initial="'ab'"),
        repeated("ns.v = ns.v + ns.v", initial="'ab'"),
        repeated("ns.v = [ns.v, ns.v]", initial="[0]"),
        repeated("ns.v = dict(a=ns.v, b=ns.v)", initial="{}"),
        # a captured block that would join 10**8 characters
        "{% set s = 'a' * 1000 %}"
        "{% set x %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endset %}",
        # plain output beyond the budget
        "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    ],
)
def test_size_budget_is_enforced_quickly(source: str) -> None:
    # The size budget must stop these long before they finish: with a clock budget far beyond
    # what the size check needs (even on a loaded machine), only the size check may answer.
    template = ChatTemplate(source, time_budget_s=30)
    with pytest.raises(TemplateError, match="exceeds"):
        template.render(CHAT)


def test_values_kept_alive_count_against_the_allocation_budget() -> None:
    # Each string is within budget, but a chain of generators would keep all of them alive.
    source = (
        "{% set ns = namespace(chain=none) %}{% for i in range(1000) %}"
        "{% set ns.chain = [ns.chain, ('' ~ i).ljust(9000)]|select %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="allocation budget"):
        ChatTemplate(source, max_output_chars=10_000).render(CHAT)


def test_constant_filters_are_not_evaluated_while_compiling() -> None:
    source = "{{ " + " ~ ".join(["('a'|center(900000))"] * 50) + " }}"
    tracemalloc.start()
    try:
        template = ChatTemplate(source)
        assert tracemalloc.get_traced_memory()[1] < 10_000_000
    finally:
        tracemalloc.stop()
    with pytest.raises(TemplateError, match="exceeds"):
        template.render(CHAT)


def test_large_conversations_fit_the_budgets() -> None:
    messages = [
        {"role": ("user", "assistant")[i % 2], "content": "word " * 18_000} for i in range(10)
    ]
    rendered = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>").render(messages)
    assert 900_000 < len(rendered) <= 1_000_000


def test_size_budget_follows_max_output_chars() -> None:
    assert len(ChatTemplate("{{ 'a' * 100 }}", max_output_chars=100).render(CHAT)) == 100
    with pytest.raises(TemplateError, match="exceeds"):
        ChatTemplate("{{ 'a' * 101 }}", max_output_chars=100).render(CHAT)
    with pytest.raises(TemplateError, match="exceeds"):
        ChatTemplate("{{ 'a' * 60 }}{{ 'b' * 60 }}", max_output_chars=100).render(CHAT)


def test_everyday_operations_still_work() -> None:
    source = (
        "{{ range(4)|list|join(', ') }};{{ '-'.join(['a', 'b']) }};{{ '%s=%d' % ('n', 3) }};"
        "{{ '{}/{}'.format(1, 2) }};{{ 'abc'.replace('b', 'B') }};{{ 'x'|center(5) }};"
        "{{ 2 ** 10 }};{{ [1] + [2] }};{{ {'k': 'v'}['k'] }};{{ 'a' ~ 1 }}"
        "{% for a, b in [(1, 2)] %};{{ a + b }}{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        ";{{ ns.n }}"
    )
    assert render_source(source) == "0, 1, 2, 3;a-b;n=3;1/2;aBc;  x  ;1024;[1, 2];v;a1;3;1"


def test_time_budget_aborts_in_place() -> None:
    template = ChatTemplate(NESTED_LOOPS, time_budget_s=0.5)
    start = time.monotonic()
    with pytest.raises(TemplateError, match=r"longer than 0\.5 s"):
        template.render(CHAT)
    assert time.monotonic() - start < 0.5 + 3

    # Nothing keeps running once render has raised.
    cpu_before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu_before < 0.25

    assert ChatTemplate(SMOLLM2).render(CHAT).endswith("<|im_start|>assistant\n")
    with pytest.raises(TemplateError, match="longer than"):
        template.render(CHAT)  # the compiled template stays usable, and keeps its budget


def test_previous_trace_function_is_restored() -> None:
    def tracer(frame: object, event: str, arg: object) -> None:
        return None

    original = sys.gettrace()
    sys.settrace(tracer)
    try:
        ChatTemplate(SMOLLM2).render(CHAT)
        assert sys.gettrace() is tracer
        with pytest.raises(TemplateError):
            ChatTemplate(NESTED_LOOPS, time_budget_s=0.2).render(CHAT)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(original)


def test_concurrent_renders_are_identical_and_independent() -> None:
    template = ChatTemplate(SMOLLM2)
    slow = ChatTemplate(NESTED_LOOPS, time_budget_s=0.5)
    expected = template.render(CHAT)
    barrier = threading.Barrier(9)
    results: list[list[str]] = [[] for _ in range(8)]
    timeouts: list[TemplateError] = []

    def render_many(index: int) -> None:
        barrier.wait()
        for _ in range(200):
            results[index].append(template.render(CHAT))

    def render_slow() -> None:
        barrier.wait()
        try:
            slow.render(CHAT)
        except TemplateError as exc:
            timeouts.append(exc)

    threads = [threading.Thread(target=render_many, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=render_slow))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert all(outputs == [expected] * 200 for outputs in results)
    assert len(timeouts) == 1
