"""The chat page at ``/`` (plugins/webui, docs/webui.md), in a real Chromium (Debian's ``chromium``
and ``chromium-driver``, driven by Selenium) against real servers: the SmolLM2 GGUF model for
streaming and stopping, and an echo backend (registered in the server process by a prelude) whose
replies the tests choose, for the untrusted-output, reasoning, tool-call and model-switching checks.
Each browser test saves a screenshot under its pytest temporary folder.  The checks that need no
browser (headers, ``--no-webui``, path traversal) use httpx."""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path

import falcon.testing
import httpx
import pytest

from shimmy_core.app import build, create_app
from shimmy_core.contract.settings import Settings
from shimmy_core.plugin_manager import create_plugin_manager
from tests.conftest import MODEL_ID, builtin

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
KEY = "sk-webui-test"
STATIC = Path(__file__).resolve().parent.parent / "plugins" / "webui" / "static"

# A backend whose model answers with the last user message, six characters at a time: "<think>…</think>"
# at its start becomes reasoning (the core's parser splits it), "CALL NAME {json}" becomes a tool call.
# Two models, "echo" and "parrot", for the model picker.
ECHO = r'''
import time
import shimmy_core.plugin_manager as _plugin_manager
from shimmy_core.plugin_api import (DiscoveryResult, Finish, ModelInfo, PreparedPrompt, ReasoningSyntax,
                                    TextDelta, ToolCallDelta, Usage, hookimpl)


class EchoModel:
    context_length = 4096

    def prepare(self, request):
        said = next((m["content"] for m in reversed(request.messages or ()) if m["role"] == "user"), "")
        return PreparedPrompt(text=said, tokens=tuple(range(len(said.split()))), max_tokens=4096,
                              reasoning=ReasoningSyntax("<think>", "</think>"))

    def generate(self, prepared, params, cancelled):
        text = prepared.text
        if text.startswith("CALL "):
            _, name, arguments = text.split(" ", 2)
            yield ToolCallDelta(0, id="call_echo", name=name)
            for i in range(0, len(arguments), 6):
                yield ToolCallDelta(0, arguments=arguments[i:i + 6])
            yield Finish("tool_calls")
        else:
            for i in range(0, len(text), 6):
                if cancelled():
                    break
                time.sleep(0.005)
                yield TextDelta(text[i:i + 6])
            yield Finish("stop")
        yield Usage(len(prepared.tokens), len(text.split()))

    def close(self):
        pass


class EchoBackend:
    name = "echo"
    formats = ("echo",)

    def unavailable_reason(self):
        return None

    def load(self, model, settings):
        return EchoModel()


class EchoSource:
    name = "echo"

    def discover(self):
        return DiscoveryResult(models=[ModelInfo(id=name, format="echo", path="/nonexistent/" + name, source="echo",
                                                 context_length=4096) for name in ("echo", "parrot")])


class EchoPlugin:
    @hookimpl
    def shimmy_register_sources(self, register, settings):
        register(EchoSource())

    @hookimpl
    def shimmy_register_backends(self, register):
        register(EchoBackend())


_create = _plugin_manager.create_plugin_manager


def _with_echo(*args, **kwargs):
    kwargs["extra_plugins"] = [*kwargs.get("extra_plugins", ()), ("echo", EchoPlugin())]
    return _create(*args, **kwargs)


_plugin_manager.create_plugin_manager = _with_echo
'''


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver"
    return None


# ------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def echo_server(start_server):
    server = start_server(["--no-demo"], prelude=ECHO)
    httpx.get(server.base + "/health", timeout=30).raise_for_status()
    return server


@pytest.fixture(scope="module")
def key_server(start_server):
    server = start_server(["--no-demo", "--api-key", KEY], prelude=ECHO)
    httpx.get(server.base + "/health", timeout=30).raise_for_status()
    return server


# ------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def driver():
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")  # Debian's; Selenium Manager downloads nothing
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


def wait_until(driver, condition, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def find_all(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def console_errors(driver, ignore: tuple[str, ...] = ()) -> list[str]:
    """The browser console's errors since the last call (CSP violations included)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(part in entry["message"] for part in ignore)]


def open_page(driver, server, *, ready: bool = True) -> None:
    """The page on a fresh slate: this origin's localStorage emptied, then the page loaded until its
    model list is in."""
    driver.get(server.base + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    if ready:
        wait_until(driver, lambda: driver.execute_script("return document.documentElement.dataset.ready"))


def send(driver, text: str) -> None:
    """Type ``text`` in the message box and press Enter."""
    from selenium.webdriver.common.keys import Keys

    box = by_id(driver, "input")
    driver.execute_script("arguments[0].value = arguments[1]", box, text)
    box.send_keys(Keys.ENTER)


def last_reply(driver):
    return find_all(driver, ".message.assistant")[-1]


def reply_done(driver) -> bool:
    replies = find_all(driver, ".message.assistant")
    return bool(replies) and "streaming" not in replies[-1].get_attribute("class")


def set_field(driver, name: str, value: str) -> None:
    """Set a settings field as a user would: open the panel, clear it, type."""
    if by_id(driver, "settings").get_attribute("hidden") is not None:
        by_id(driver, "settings-toggle").click()
    field = by_id(driver, name)
    field.clear()
    field.send_keys(value)


# ------------------------------------------------------------------ in the browser
def test_the_page_loads_with_a_strict_csp_and_no_console_errors(driver, gguf_server, tmp_path):
    page = httpx.get(gguf_server.base + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    open_page(driver, gguf_server)
    driver.save_screenshot(str(tmp_path / "loaded.png"))
    assert driver.title == "Shimmy"
    assert [o.get_attribute("value") for o in find_all(driver, "#model option")] == [MODEL_ID]
    assert by_id(driver, "notice").get_attribute("hidden") is not None  # nothing went wrong
    for theme in ("light", "dark"):  # auto, then pinned by the theme button
        by_id(driver, "theme-toggle").click()
        assert driver.execute_script("return document.documentElement.dataset.theme") == theme
        assert by_id(driver, f"code-{theme}").get_attribute("media") == "all"
    assert console_errors(driver) == []


def test_a_message_streams_a_reply_from_the_model(driver, gguf_server, tmp_path):
    open_page(driver, gguf_server)
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "32")
    send(driver, "Write a Python function that adds two numbers.")
    assert by_id(driver, "stop").is_displayed()
    wait_until(driver, lambda: reply_done(driver))
    driver.save_screenshot(str(tmp_path / "reply.png"))
    reply = last_reply(driver)
    assert reply.find_element("css selector", ".content").text.strip()
    meta = reply.find_element("css selector", ".meta").text
    assert "32 completion tokens" in meta and "tokens/s" in meta and "token limit" in meta, meta
    assert by_id(driver, "send").is_displayed() and not by_id(driver, "stop").is_displayed()
    if reply.find_elements("css selector", ".code-block"):  # SmolLM2 usually answers with one
        copy = reply.find_element("css selector", ".code-block .copy")
        copy.click()
        wait_until(driver, lambda: copy.text == "Copied", timeout=5)
    stored = json.loads(driver.execute_script("return localStorage.getItem('shimmy.conversations')"))
    assert [m["role"] for m in stored[0]["messages"]] == ["user", "assistant"]
    assert stored[0]["messages"][1]["content"].strip()
    assert console_errors(driver) == []


def test_stop_ends_a_stream(driver, gguf_server, tmp_path):
    """Esc, then the stop button: each ends its reply at once, marked as stopped."""
    from selenium.webdriver.common.keys import Keys

    open_page(driver, gguf_server)
    set_field(driver, "max-tokens", "400")
    for how in ("escape", "button"):
        send(driver, "Tell me a very long story about a dragon and a knight.")
        reply = last_reply(driver)
        wait_until(driver, lambda: reply.find_element("css selector", ".content").text.strip())
        if how == "escape":
            by_id(driver, "input").send_keys(Keys.ESCAPE)
        else:
            by_id(driver, "stop").click()
        wait_until(driver, lambda: reply_done(driver), timeout=3)
        text = reply.find_element("css selector", ".content").text
        assert "stopped" in reply.find_element("css selector", ".meta").text
        assert by_id(driver, "send").is_displayed()
        driver.execute_script("return new Promise((done) => setTimeout(done, 300))")
        assert reply.find_element("css selector", ".content").text == text  # nothing arrives after the stop
    driver.save_screenshot(str(tmp_path / "stopped.png"))
    assert console_errors(driver) == []


def test_switching_models(driver, echo_server, tmp_path):
    from selenium.webdriver.support.ui import Select

    open_page(driver, echo_server)
    picker = Select(by_id(driver, "model"))
    assert [o.get_attribute("value") for o in picker.options] == ["echo", "parrot"]
    for model in ("parrot", "echo"):
        picker.select_by_value(model)
        send(driver, f"Hello {model}.")
        wait_until(driver, lambda: reply_done(driver))
        reply = last_reply(driver)
        assert reply.find_element("css selector", ".role").text == model  # the model the server answered as
        assert reply.find_element("css selector", ".content").text == f"Hello {model}."
    driver.save_screenshot(str(tmp_path / "models.png"))
    stored = json.loads(driver.execute_script("return localStorage.getItem('shimmy.preferences')"))
    assert stored["model"] == "echo"
    assert console_errors(driver) == []


def test_server_errors_show_as_text(driver, echo_server, tmp_path):
    open_page(driver, echo_server)
    set_field(driver, "temperature", "7")
    send(driver, "Hello.")
    wait_until(driver, lambda: reply_done(driver))
    error = last_reply(driver).find_element("css selector", ".error")
    assert error.is_displayed() and "temperature" in error.text, error.text  # the body's error.message
    driver.save_screenshot(str(tmp_path / "error.png"))
    assert console_errors(driver, ignore=("status of 400",)) == []


def test_model_output_renders_inert(driver, echo_server, tmp_path):
    """What the model writes is text and Markdown, never live HTML: no handler or script runs, raw
    HTML shows as the characters it is made of, and a javascript: link loses its target."""
    open_page(driver, echo_server)
    hostile = ('Look: <img src=x onerror="window.__pwned = 1"> then <script>window.__pwned = 2</script> '
               'and **bold** [a link](javascript:window.__pwned=3) <svg onload="window.__pwned = 4"></svg>')
    send(driver, hostile)
    wait_until(driver, lambda: reply_done(driver))
    driver.save_screenshot(str(tmp_path / "inert.png"))
    reply = last_reply(driver).find_element("css selector", ".content")
    assert driver.execute_script("return window.__pwned") is None
    assert "<img src=x onerror=" in reply.text and "<script>" in reply.text  # shown, as text
    assert reply.find_element("css selector", "strong").text == "bold"     # Markdown still works
    for css in ("img", "script", "svg", "[onerror]", "[onload]"):
        assert find_all(driver, f"#messages {css}") == [], css
    hrefs = [a.get_attribute("href") for a in find_all(driver, "#messages a")]
    assert not any(h and h.startswith("javascript:") for h in hrefs), hrefs
    assert console_errors(driver) == []


def test_reasoning_shows_collapsed_and_tool_calls_show(driver, echo_server, tmp_path):
    open_page(driver, echo_server)
    send(driver, "<think>The user wants the answer.</think>The answer is 42.")
    wait_until(driver, lambda: reply_done(driver))
    reply = last_reply(driver)
    details = reply.find_element("css selector", "details.reasoning")
    assert details.is_displayed() and details.get_attribute("open") is None  # collapsed
    thought = details.find_element("css selector", ".reasoning-text")
    assert not thought.is_displayed()
    assert reply.find_element("css selector", ".content").text == "The answer is 42."
    driver.save_screenshot(str(tmp_path / "reasoning-collapsed.png"))
    details.find_element("css selector", "summary").click()
    assert thought.is_displayed() and thought.text == "The user wants the answer."

    send(driver, 'CALL get_weather {"city": "Paris"}')
    wait_until(driver, lambda: reply_done(driver))
    call = last_reply(driver).find_element("css selector", ".tool-call")
    assert call.find_element("css selector", ".tool-name").text == "get_weather()"
    assert json.loads(call.find_element("css selector", "pre").text) == {"city": "Paris"}
    driver.save_screenshot(str(tmp_path / "tool-call.png"))
    assert console_errors(driver) == []


def test_the_api_key_is_asked_for(driver, key_server, tmp_path):
    assert httpx.get(key_server.base + "/", timeout=30).status_code == 200        # the page needs no key
    assert httpx.get(key_server.base + "/v1/models", timeout=30).status_code == 401  # the API does
    open_page(driver, key_server, ready=False)
    dialog = by_id(driver, "key-dialog")
    wait_until(driver, lambda: dialog.get_attribute("open") is not None)
    assert "API key" in by_id(driver, "key-reason").text
    driver.save_screenshot(str(tmp_path / "key-asked.png"))
    by_id(driver, "key-input").send_keys("sk-wrong")
    by_id(driver, "key-save").click()
    wait_until(driver, lambda: "Incorrect API key" in by_id(driver, "key-reason").text)
    by_id(driver, "key-input").send_keys(KEY)
    by_id(driver, "key-save").click()
    wait_until(driver, lambda: driver.execute_script("return document.documentElement.dataset.ready"))
    assert dialog.get_attribute("open") is None
    send(driver, "Hello with a key.")
    wait_until(driver, lambda: reply_done(driver))
    assert last_reply(driver).find_element("css selector", ".content").text == "Hello with a key."
    assert json.loads(driver.execute_script("return localStorage.getItem('shimmy.apiKey')")) == KEY
    driver.save_screenshot(str(tmp_path / "key-given.png"))
    assert console_errors(driver, ignore=("status of 401",)) == []


# ------------------------------------------------------------------ without a browser
def raw_get(server, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` exactly as written (httpx would resolve the dots first)."""
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", [
    "/ui/../webui_dialect.py", "/ui/%2e%2e/webui_dialect.py", "/ui/..%2fwebui_dialect.py",
    "/ui/vendor/../../webui_resources.py", "/ui/%2e%2e%2f%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/ui//etc/passwd", "/ui/%2fetc%2fpasswd", "/ui/vendor/marked/LICENSE", "/ui/VERSIONS.md", "/ui/nothing.js",
])
def test_static_files_refuse_paths_outside_the_served_files(echo_server, path):
    status, headers, body = raw_get(echo_server, path)
    assert status in (400, 404), (status, body[:200])
    if status == 404:
        assert json.loads(body)["error"]["code"] == "not_found"
        assert headers["content-security-policy"] == CSP


def test_static_files_have_their_content_types_and_revalidate(echo_server):
    types = {"/ui/webui.js": "text/javascript; charset=utf-8", "/ui/webui.css": "text/css; charset=utf-8",
             "/ui/vendor/dompurify/purify.min.js": "text/javascript; charset=utf-8",
             "/ui/vendor/highlightjs/github.min.css": "text/css; charset=utf-8", "/ui/icon.svg": "image/svg+xml",
             "/": "text/html; charset=utf-8", "/ui/index.html": "text/html; charset=utf-8"}
    for path, kind in types.items():
        r = httpx.get(echo_server.base + path, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == kind, path
        assert r.headers["content-security-policy"] == CSP and r.headers["x-content-type-options"] == "nosniff"
        again = httpx.get(echo_server.base + path, headers={"If-None-Match": r.headers["etag"]}, timeout=30)
        assert again.status_code == 304, path
    # every file the page names is served
    page = (STATIC / "index.html").read_text()
    for name in ("webui.js", "webui.css", "vendor/marked/marked.umd.js", "vendor/highlightjs/highlight.min.js"):
        assert f"/ui/{name}" in page


def test_errors_at_the_root_keep_the_openai_envelope(echo_server):
    r = httpx.post(echo_server.base + "/", json={}, timeout=30)
    assert r.status_code == 405
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_no_webui_leaves_the_page_out(start_server):
    server = start_server(["--no-demo", "--no-webui"])
    for path in ("/", "/ui/webui.js"):
        r = httpx.get(server.base + path, timeout=30)
        assert r.status_code == 404, path
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200


def test_shimmy_webui_0_leaves_the_page_out(tmp_path):
    settings = Settings.load({"demo": False}, {"SHIMMY_WEBUI": "0"}).replace(home=tmp_path)
    assert settings.webui is False
    for webui, status in ((False, 404), (True, 200)):
        pm = create_plugin_manager(load_entry_points=False, extra_plugins=[builtin("openai"), builtin("webui")])
        shimmy = build(settings.replace(webui=webui), pm)
        try:
            client = falcon.testing.TestClient(create_app(shimmy), headers={"Host": "localhost"})
            assert client.simulate_get("/").status_code == status
        finally:
            shimmy.close()


def test_a_wheel_ships_every_static_file():
    """pyproject.toml's package-data globs cover every file under static/, so that a non-editable
    ``pip install`` serves the same page."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((STATIC.parent.parent.parent / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["shimmy_plugins.webui"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert files
    # setuptools' "*" does not cross "/", as fnmatch's does: compare the number of parts too
    missed = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert missed == []
