"""End to end against a real server: hostile chat templates inside real GGUF
files, and clients that vanish mid-stream."""

from __future__ import annotations


import httpx
import openai
import pytest

from tests.conftest import MODEL_ID, open_stream
from tests.gguf_surgery import copy_with_metadata

CVE_2024_34359 = (
    "{% for x in ().__class__.__base__.__subclasses__() %}{% if \"warning\" in x.__name__ %}"
    "{{ x()._module.__builtins__['__import__']('os').popen(\"touch {MARKER}\").read() }}"
    "{% endif %}{% endfor %}"
)
HOSTILE = {
    "big": "{{ 'a'*200000000 }}",
    "slow": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
}


@pytest.fixture(scope="module")
def hostile_server(start_server, smollm2_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "pwned"
    templates = {**HOSTILE, "cve": CVE_2024_34359.replace("{MARKER}", str(marker))}
    for name, template in templates.items():
        copy_with_metadata(smollm2_path, folder / f"{name}.gguf", "tokenizer.chat_template", template)
    server = start_server(["--model-dir", str(folder), "--no-demo"])
    server.marker = marker
    return server


def test_hostile_templates_get_an_openai_error_and_the_server_stays_responsive(hostile_server):
    client = openai.OpenAI(base_url=hostile_server.url, api_key="x", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} == {"big", "slow", "cve"}
    for name in ("cve", "big", "slow"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert info.value.body["code"] == "template_error", info.value.body
        assert httpx.get(hostile_server.base + "/health", timeout=5).status_code == 200
    assert not hostile_server.marker.exists()
    # the same file still serves raw completions, which use no template
    r = client.completions.create(model="cve", prompt="Hello", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_disconnects_stops_its_generation(server):
    """1900 tokens take half a minute here; once the client is gone, the model is free at once."""
    sock = open_stream(server)
    sock.close()
    # Had the abandoned generation run on, this request would wait for it past the client's timeout.
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=30)
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None
