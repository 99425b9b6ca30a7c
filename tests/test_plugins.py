"""Plugins: every hook documented and tested, built-ins through entry points,
collection and decision hooks, broken and disabled plugins, the example
plugin really pip-installed, settings precedence and a light start."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shimmy_core.contract import hookspecs
from shimmy_core.contract.generation import BackendUnavailable
from shimmy_core.contract.hookspecs import hookimpl
from shimmy_core.catalog import ModelManager
from shimmy_core.contract.model_info import ModelInfo
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.plugin_registry import DuplicateNameError, build_registry
from shimmy_core.contract.settings import DEFAULT_PORT, Settings
from tests.conftest import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
HOOKS_DOC = ROOT / "docs" / "hooks.md"
EXAMPLE = ROOT / "examples" / "plugins" / "shimmy-hello"
BUILTINS = {"gguf", "local_files", "ollama", "huggingface", "lmstudio"}
HEAVY = ("torch", "transformers", "llama_cpp")
PLUGIN_ENV = ("SHIMMY_DISABLE_PLUGINS", "SHIMMY_LOAD_PLUGINS", "SHIMMY_TRACE_HOOKS")

HOOK_NAMES = sorted(
    name for name in dir(hookspecs)
    if name.startswith("shimmy_") and hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")
)
# The meta-tests below list every hook themselves, so they do not count as a hook's test.
META_TESTS = {"test_every_hook_is_documented_with_its_signature", "test_every_hook_has_a_test"}


@pytest.fixture(autouse=True)
def plugin_env(monkeypatch):
    """No SHIMMY_* plugin variable from the caller's shell leaks into a test."""
    for var in PLUGIN_ENV:
        monkeypatch.delenv(var, raising=False)


def settings(**overrides) -> Settings:
    return Settings.load(overrides, {})


def run_env(*pythonpath: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess: no SHIMMY_* from outside, ``pythonpath`` first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMMY_")}
    paths = [str(p) for p in pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def shimmy_command() -> list[str]:
    """The installed ``shimmy`` console script next to this interpreter."""
    script = Path(sys.executable).parent / ("shimmy.exe" if os.name == "nt" else "shimmy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shimmy_core"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", textwrap.dedent(code)], env)


# ------------------------------------------------------------------ small plugins and parts
class Named:
    def __init__(self, name: str, **attrs):
        self.name = name
        self.__dict__.update(attrs)


class FakeBackend:
    def __init__(self, name: str, formats: tuple[str, ...]):
        self.name = name
        self.formats = formats

    def unavailable_reason(self):
        return None

    def load(self, model, settings):
        return Named(f"{self.name}:{model.id}")


class Backends:
    """A plugin with two backends, one per format."""

    @hookimpl
    def shimmy_register_backends(self, register):
        register(FakeBackend("fast", ("gguf",)))
        register(FakeBackend("torchy", ("safetensors",)))


def model(fmt: str, model_id: str = "m") -> ModelInfo:
    return ModelInfo(id=model_id, path=f"/models/{model_id}.{fmt}", format=fmt, source="test")


# ------------------------------------------------------------------ meta-tests: docs and tests
def test_hookspecs_are_found():
    assert HOOK_NAMES, "no shimmy_* hookspec found in shimmy_core.contract.hookspecs"
    assert "shimmy_register_backends" in HOOK_NAMES
    assert "shimmy_backend_for_model" in HOOK_NAMES


def _doc_sections() -> dict[str, str]:
    text = HOOKS_DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## +(\S+) *$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def _defined_functions(section: str) -> dict[str, list[str]]:
    """Functions the section's ``python`` blocks define (blocks must parse), with their arguments."""
    found: dict[str, list[str]] = {}
    for block in re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.FunctionDef):
                found[node.name] = [a.arg for a in node.args.args if a.arg != "self"]
    return found


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_is_documented_with_its_signature(hook):
    sections = _doc_sections()
    assert hook in sections, f"docs/hooks.md has no '## {hook}' section"
    section = sections[hook]
    spec = getattr(hookspecs, hook)
    params = list(inspect.signature(spec).parameters)
    signature = f"{hook}({', '.join(params)})"
    assert signature in section, f"the {hook} section does not show its signature {signature}"
    example = _defined_functions(section)
    assert example.get(hook) == params, f"the {hook} section needs an example implementing {signature}"
    if getattr(spec, f"{hookspecs.PROJECT}_spec").get("firstresult"):
        assert "firstresult" in section
        assert "trylast" in section, f"the {hook} section should say its default is trylast"


def test_hooks_doc_has_no_stale_sections():
    documented = {name for name in _doc_sections() if name.startswith("shimmy_")}
    assert documented <= set(HOOK_NAMES), f"documented but not a hookspec: {documented - set(HOOK_NAMES)}"


@functools.lru_cache(maxsize=None)
def _test_sources() -> tuple[str, ...]:
    """The source of every test function under tests/, this module's meta-tests left out."""
    sources = []
    for path in sorted(TESTS.rglob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                if path.resolve() == Path(__file__).resolve() and node.name in META_TESTS:
                    continue
                sources.append(ast.get_source_segment(text, node) or "")
    return tuple(sources)


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_has_a_test(hook):
    assert any(hook in source for source in _test_sources()), f"no test under tests/ mentions {hook}"


# ------------------------------------------------------------------ built-ins through entry points
def test_builtins_load_through_entry_points():
    pm = create_plugin_manager()
    failures = {f.name: f.error for f in pm.report.failed}
    assert BUILTINS.isdisjoint(failures), f"built-in plugins failed to load: {failures}"
    for name in BUILTINS:
        assert pm.report.loaded.get(name) == "shimmy-server"
        assert pm.get_plugin(name).__name__ == BUILTIN_PLUGINS[name]
    assert pm.has_plugin("shimmy.defaults")

    registry = build_registry(pm, settings(demo=True))
    assert registry.owners[("backend", "gguf")] == "gguf"
    assert {"files", "dirs", "demo"} <= set(registry.sources)
    assert {registry.owners[("source", s)] for s in ("files", "dirs", "demo")} == {"local_files"}


# ------------------------------------------------------------------ collection hooks
def test_hook_shimmy_register_backends():
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("backends", Backends())])
    registry = build_registry(pm, settings())
    assert set(registry.backends) == {"fast", "torchy"}
    assert registry.backends["fast"].formats == ("gguf",)
    assert registry.owners[("backend", "torchy")] == "backends"


def test_hook_shimmy_register_sources_receives_settings():
    seen = []

    class Sources:
        @hookimpl
        def shimmy_register_sources(self, register, settings):
            seen.append(settings)
            register(Named("elsewhere", folders=settings.model_dirs))

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("sources", Sources())])
    given = settings(model_dirs=["/a", "/b"])
    registry = build_registry(pm, given)
    assert seen == [given]
    assert registry.sources["elsewhere"].folders == ("/a", "/b")
    assert registry.owners[("source", "elsewhere")] == "sources"


def test_hook_shimmy_register_caches():
    class Caches:
        @hookimpl
        def shimmy_register_caches(self, register):
            register(Named("memory"))

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("caches", Caches())])
    registry = build_registry(pm, settings())
    assert list(registry.caches) == ["memory"]
    assert registry.owners[("cache", "memory")] == "caches"


def test_hook_shimmy_register_tools():
    class Tools:
        @hookimpl
        def shimmy_register_tools(self, register):
            register(Named("clock", run=lambda arguments: "12:00"))
            register(Named("dice", run=lambda arguments: "4"))

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("tools", Tools())])
    registry = build_registry(pm, settings())
    assert set(registry.tools) == {"clock", "dice"}
    assert registry.tools["dice"].run({}) == "4"
    assert registry.owners[("tool", "clock")] == "tools"


def _ping_dialect(path: str = "/ping"):
    """The example dialect of docs/hooks.md."""
    from shimmy_core.plugin_api import HTTPRefusal, neutral_error

    class PingResource:
        def on_get(self, req, resp):
            resp.media = {"pong": True}

    class PingDialect:
        name = "ping"
        prefixes = ("/ping",)

        def add_routes(self, routes, server):
            routes.add(path, PingResource())

        def error_response(self, exc):
            exc = neutral_error(exc)
            return (exc.status if isinstance(exc, HTTPRefusal) else 500), {}, {"ping_error": str(exc)}

    class Plugin:
        @hookimpl
        def shimmy_register_dialects(self, register):
            register(PingDialect())

    return Plugin()


def _client(*plugins):
    import falcon.testing

    from shimmy_core.app import build, create_app

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=plugins)
    app = create_app(build(settings(), pm))
    return falcon.testing.TestClient(app, headers={"Host": "localhost"})


def test_hook_shimmy_register_dialects_adds_routes_and_answers_errors_in_its_envelope():
    from tests.conftest import builtin

    client = _client(("ping", _ping_dialect()), builtin("openai"))
    assert client.simulate_get("/ping").json == {"pong": True}
    missing = client.simulate_get("/ping/nothing")  # its prefix: its envelope
    assert missing.status_code == 404 and set(missing.json) == {"ping_error"}
    elsewhere = client.simulate_get("/nothing")     # the openai dialect claims "/"
    assert elsewhere.status_code == 404 and elsewhere.json["error"]["code"] == "not_found"
    assert client.simulate_get("/v1/models").json["object"] == "list"


def test_without_any_dialect_only_the_core_routes_answer():
    client = _client()
    assert client.simulate_get("/health").json["status"] == "ok"
    missing = client.simulate_get("/v1/models")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "not_found"


def test_two_dialects_adding_one_path_stop_the_start_naming_both():
    from shimmy_core.http.routes import RouteConflict
    from tests.conftest import builtin

    with pytest.raises(RouteConflict, match="'openai' and 'ping'"):
        _client(builtin("openai"), ("ping", _ping_dialect("/v1/models")))


def test_collection_hooks_also_run_for_module_plugins_with_fewer_arguments():
    class SourcesWithoutSettings:
        @hookimpl
        def shimmy_register_sources(self, register):  # pluggy lets an impl take fewer arguments
            register(Named("bare"))

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("bare", SourcesWithoutSettings())])
    assert set(build_registry(pm, settings()).sources) == {"bare"}


def test_same_backend_name_from_two_plugins_names_both():
    class Other:
        @hookimpl
        def shimmy_register_backends(self, register):
            register(FakeBackend("fast", ("gguf",)))

    pm = create_plugin_manager(
        load_entry_points=False, extra_plugins=[("first_plugin", Backends()), ("second_plugin", Other())]
    )
    with pytest.raises(DuplicateNameError) as caught:
        build_registry(pm, settings())
    message = str(caught.value)
    assert "'fast'" in message
    assert "first_plugin" in message and "second_plugin" in message


def test_registered_object_without_a_name_is_refused():
    class Nameless:
        @hookimpl
        def shimmy_register_tools(self, register):
            register(object())

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("nameless", Nameless())])
    registry = build_registry(pm, settings())  # a broken plugin is reported, not fatal
    assert registry.tools == {}
    [failure] = [f for f in pm.report.failed if f.name == "nameless"]
    assert "TypeError" in failure.error and "no 'name'" in failure.error


def test_a_plugin_whose_register_hook_raises_is_reported_and_skipped():
    class Exploding:
        @hookimpl
        def shimmy_register_tools(self, register):
            raise RuntimeError("boom")

    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("exploding", Exploding())])
    build_registry(pm, settings())
    [failure] = [f for f in pm.report.failed if f.name == "exploding"]
    assert "shimmy_register_tools raised RuntimeError: boom" in failure.error


# ------------------------------------------------------------------ the decision hook
def test_hook_shimmy_backend_for_model_default_picks_by_format():
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("backends", Backends())])
    registry = build_registry(pm, settings())
    choose = pm.hook.shimmy_backend_for_model
    assert choose(model=model("gguf"), backends=registry.backends) == "fast"
    assert choose(model=model("safetensors"), backends=registry.backends) == "torchy"
    assert choose(model=model("onnx"), backends=registry.backends) is None

    manager = ModelManager(pm, registry, settings())
    assert manager.backend_for(model("safetensors")).name == "torchy"
    with pytest.raises(BackendUnavailable, match="onnx"):
        manager.backend_for(model("onnx"))


def test_hook_shimmy_backend_for_model_plugin_beats_default():
    calls = []

    class PreferTorchy:
        @hookimpl
        def shimmy_backend_for_model(self, model, backends):
            calls.append(model.id)
            return "torchy" if model.id.startswith("big") else None

    pm = create_plugin_manager(
        load_entry_points=False, extra_plugins=[("backends", Backends()), ("prefer", PreferTorchy())]
    )
    registry = build_registry(pm, settings())
    choose = pm.hook.shimmy_backend_for_model
    assert choose(model=model("gguf", "big-one"), backends=registry.backends) == "torchy"
    assert choose(model=model("gguf", "small"), backends=registry.backends) == "fast"  # None: default decides
    assert calls == ["big-one", "small"]

    manager = ModelManager(pm, registry, settings())
    loaded = manager.get(model("gguf", "big-two"))
    assert loaded.name == "torchy:big-two"


# ------------------------------------------------------------------ broken plugins
class Misspelled:
    @hookimpl
    def shimmy_register_backend(self, register):  # missing "s": not a Shimmy hook
        register(FakeBackend("never", ("gguf",)))


def test_misspelled_hook_is_reported_and_others_still_load(capsys):
    pm = create_plugin_manager(extra_plugins=[("typo", Misspelled()), ("backends", Backends())])
    [failure] = [f for f in pm.report.failed if f.name == "typo"]
    assert "shimmy_register_backend" in failure.error
    assert "did you mean shimmy_register_backends?" in failure.error
    assert "typo" not in pm.report.loaded and not pm.has_plugin("typo")
    assert {"backends", *BUILTINS} <= set(pm.report.loaded)
    assert "did you mean shimmy_register_backends?" in capsys.readouterr().err

    registry = build_registry(pm, settings())
    assert "never" not in registry.backends
    assert {"fast", "torchy", "gguf"} <= set(registry.backends)


@pytest.fixture
def broken_site(tmp_path, monkeypatch):
    """A folder on sys.path holding an installed distribution ``broken-plugin`` with two
    entry points: ``broken`` raises on import, ``typo`` misspells a hook name."""
    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[shimmy]\nbroken = broken_plugin\ntypo = broken_plugin_typo\n")
    (site / "broken_plugin.py").write_text('raise RuntimeError("broken_plugin exploded on import")\n')
    (site / "broken_plugin_typo.py").write_text(
        "from shimmy_core.contract.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def shimmy_register_tool(register):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    for module in ("broken_plugin", "broken_plugin_typo"):
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


def test_plugin_that_fails_to_import_is_recorded(broken_site):
    pm = create_plugin_manager()
    failures = {f.name: f for f in pm.report.failed}
    assert "RuntimeError: broken_plugin exploded on import" in failures["broken"].error
    assert failures["broken"].distribution == "broken-plugin"
    assert "did you mean shimmy_register_tools?" in failures["typo"].error
    assert failures["typo"].distribution == "broken-plugin"
    for name in BUILTINS:
        assert pm.report.loaded.get(name) == "shimmy-server", failures
    assert not pm.has_plugin("broken") and not pm.has_plugin("typo")
    assert "gguf" in build_registry(pm, settings()).backends


def test_shimmy_plugins_shows_failures_and_exits_1(broken_site):
    result = run(shimmy_command() + ["plugins"], run_env(broken_site))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "broken  FAILED: RuntimeError: broken_plugin exploded on import" in result.stdout
    assert "typo  FAILED:" in result.stdout and "did you mean shimmy_register_tools?" in result.stdout
    assert re.search(r"^gguf  \(shimmy-server\)  hooks: shimmy_register_backends, shimmy_register_formats$",
                     result.stdout, re.M), output
    assert re.search(r"^local_files  \(shimmy-server\)  hooks: shimmy_register_sources$", result.stdout, re.M), output


def test_shimmy_plugins_exits_0_when_all_load():
    result = run(shimmy_command() + ["plugins"], run_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout


# ------------------------------------------------------------------ disabling and choosing plugins
def test_disable_by_name():
    pm = create_plugin_manager(disable=["gguf"])
    assert "gguf" not in pm.report.loaded and not pm.has_plugin("gguf")
    assert "gguf" in pm.report.disabled
    assert pm.report.loaded.get("local_files") == "shimmy-server"
    assert "gguf" not in build_registry(pm, settings()).backends


def test_disable_by_environment(monkeypatch):
    monkeypatch.setenv("SHIMMY_DISABLE_PLUGINS", "gguf")
    pm = create_plugin_manager()
    assert "gguf" not in pm.report.loaded and "gguf" in pm.report.disabled
    assert "local_files" in pm.report.loaded

    monkeypatch.setenv("SHIMMY_DISABLE_PLUGINS", " gguf , local_files ")
    pm = create_plugin_manager()
    assert {"gguf", "local_files"}.isdisjoint(pm.report.loaded)
    assert {"gguf", "local_files"} <= set(pm.report.disabled)


def test_disable_applies_to_extra_plugins_too():
    pm = create_plugin_manager(load_entry_points=False, disable=["backends"], extra_plugins=[("backends", Backends())])
    assert pm.report.disabled == ["backends"]
    assert build_registry(pm, settings()).backends == {}


def test_load_only_the_named_plugins(monkeypatch):
    monkeypatch.setenv("SHIMMY_LOAD_PLUGINS", "local_files")
    pm = create_plugin_manager()
    assert set(pm.report.loaded) == {"local_files"}
    assert "gguf" in pm.report.disabled and not pm.has_plugin("gguf")


def test_cli_disable_plugin_flag(capsys):
    from shimmy_core.cli import main

    assert main(["--disable-plugin", "gguf", "plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^gguf  disabled$", out, re.M), out
    assert re.search(r"^local_files  \(shimmy-server\)", out, re.M), out


def test_trace_hooks(monkeypatch, capsys):
    monkeypatch.setenv("SHIMMY_TRACE_HOOKS", "1")
    pm = create_plugin_manager(load_entry_points=False, extra_plugins=[("backends", Backends())])
    registry = build_registry(pm, settings())
    assert pm.hook.shimmy_backend_for_model(model=model("gguf"), backends=registry.backends) == "fast"
    err = capsys.readouterr().err
    assert "shimmy_backend_for_model [hook]" in err
    assert "finish shimmy_backend_for_model --> fast" in err


# ------------------------------------------------------------------ the example plugin, pip-installed
@pytest.fixture(scope="module")
def hello_target(tmp_path_factory) -> Path:
    """examples/plugins/shimmy-hello, really installed with pip into a temporary folder."""
    work = tmp_path_factory.mktemp("hello")
    source = work / "shimmy-hello"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "target"
    result = run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
        run_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "shimmy_hello.py").is_file()
    assert list(target.glob("shimmy_hello-0.1.0.dist-info"))
    return target


HELLO_REPORT = """
import json
from jsonschema import Draft202012Validator
from shimmy_core.plugin_manager import create_plugin_manager
from shimmy_core.plugin_registry import build_registry
from shimmy_core.contract.settings import Settings

pm = create_plugin_manager()
registry = build_registry(pm, Settings.load({}, {}))
tool = registry.tools["hello"]
Draft202012Validator.check_schema(tool.parameters)
Draft202012Validator(tool.parameters).validate({"name": "Ada"})
print(json.dumps({
    "loaded": pm.report.loaded,
    "tools": {name: registry.owners[("tool", name)] for name in registry.tools},
    "description": tool.description,
    "run": tool.run({"name": "Ada"}),
}))
"""


def hello_report(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_example_plugin_installs_and_registers_hello(hello_target):
    report = hello_report(run_python(HELLO_REPORT, run_env(hello_target)))
    assert report["loaded"]["hello"] == "shimmy-hello"
    assert report["tools"] == {"hello": "hello", "calculator": "tools_calculator", "file_read": "tools_files",
                               "http_request": "tools_http"}  # the example's tool, and the built-in ones
    assert report["description"]
    assert report["run"] == "Hello, Ada!"


def test_example_plugin_in_shimmy_plugins(hello_target):
    result = run(shimmy_command() + ["plugins"], run_env(hello_target))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^hello  \(shimmy-hello\)  hooks: shimmy_register_tools$", result.stdout, re.M), output

    disabled = run(shimmy_command() + ["plugins"], run_env(hello_target, SHIMMY_DISABLE_PLUGINS="hello"))
    assert re.search(r"^hello  disabled$", disabled.stdout, re.M), disabled.stdout + disabled.stderr


def test_example_plugin_editable_install_sees_edits(tmp_path):
    """docs/plugins.md's path: ``pip install -e .`` in a fresh virtual environment that sees
    Shimmy, then an edit to the plugin shows up without reinstalling."""
    import site
    import venv

    source = tmp_path / "shimmy-hello"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    new_site = run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], run_env()).stdout.strip()
    # This environment sees the one running the tests (Shimmy, pip, setuptools), like a user's venv.
    Path(new_site, "shimmy_test_parent.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages())
    )
    install = run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-e", str(source)],
        run_env(),
    )
    assert install.returncode == 0, install.stdout + install.stderr

    module = source / "shimmy_hello.py"
    code = module.read_text()
    assert 'f"Hello, ' in code
    module.write_text(code.replace('f"Hello, ', 'f"Hi there, '))
    report = hello_report(run([str(python), "-c", HELLO_REPORT], run_env()))
    assert report["loaded"]["hello"] == "shimmy-hello"
    assert report["run"] == "Hi there, Ada!"


# ------------------------------------------------------------------ settings
def test_settings_flags_beat_environment_beat_defaults():
    assert Settings.load({"port": 1}, {"SHIMMY_PORT": "2"}).port == 1
    assert Settings.load({}, {"SHIMMY_PORT": "2"}).port == 2
    assert Settings.load({}, {}).port == DEFAULT_PORT
    assert Settings.load({"port": None}, {"SHIMMY_PORT": "2"}).port == 2  # None: flag not given
    assert Settings.load({}, {"SHIMMY_PORT": ""}).port == DEFAULT_PORT  # empty: not set
    assert Settings.load({"host": "0.0.0.0"}, {"SHIMMY_HOST": "::1"}).host == "0.0.0.0"
    assert Settings.load({}, {"SHIMMY_HOST": "::1"}).host == "::1"


def test_settings_coerce_environment_strings():
    loaded = Settings.load({}, {
        "SHIMMY_DEMO": "0",
        "SHIMMY_REQUEST_TIMEOUT": "2.5",
        "SHIMMY_GPU_LAYERS": "-1",
        "SHIMMY_HOME": "/srv/shimmy",
        "SHIMMY_DISABLE_PLUGINS": "gguf, hello",
    })
    assert loaded.demo is False
    assert loaded.request_timeout == 2.5
    assert loaded.gpu_layers == -1
    assert loaded.home == Path("/srv/shimmy")
    assert loaded.disable_plugins == ("gguf", "hello")
    assert Settings.load({"demo": False}, {"SHIMMY_DEMO": "1"}).demo is False  # a False flag still wins
    assert Settings.load({}, {"SHIMMY_DEMO": "yes"}).demo is True


def test_settings_model_paths_split_on_pathsep():
    env = {"SHIMMY_MODEL_PATHS": os.pathsep.join(["/models/a", "", "/models/b"])}
    assert Settings.load({}, env).model_dirs == ("/models/a", "/models/b")
    assert Settings.load({"model_dirs": ["/flag"]}, env).model_dirs == ("/flag",)
    assert Settings.load({"model_dirs": []}, env).model_dirs == ("/models/a", "/models/b")  # []: not given
    assert Settings.load({"models": ["x.gguf", "y.gguf"]}, {}).models == ("x.gguf", "y.gguf")


def test_settings_are_read_only():
    loaded = Settings.load({}, {})
    with pytest.raises(Exception):
        loaded.port = 1  # type: ignore[misc]
    assert loaded.replace(port=1).port == 1 and loaded.port == DEFAULT_PORT


# ------------------------------------------------------------------ light start
REPORT_HEAVY = """
import json, sys
print(json.dumps({
    "heavy": [m for m in %r if m in sys.modules],
    "plugins": sorted(m for m in sys.modules if m.startswith("shimmy_plugins")),
}))
""" % (HEAVY,)

LIGHT_START = {
    "import": "import shimmy_core, shimmy_core.cli, shimmy_core.app\n",
    "help": (
        "import contextlib, io\n"
        "from shimmy_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), exit.code\n"
        "assert 'usage: shimmy' in out.getvalue(), out.getvalue()\n"
    ),
    "plugins": (
        "from shimmy_core.plugin_manager import create_plugin_manager\n"
        "from shimmy_core.plugin_registry import build_registry\n"
        "from shimmy_core.contract.settings import Settings\n"
        "pm = create_plugin_manager()\n"
        "assert 'gguf' in pm.report.loaded, pm.report.failed\n"
        "build_registry(pm, Settings.load({}, {}))\n"
    ),
}


@pytest.mark.parametrize("step", list(LIGHT_START))
def test_light_start_imports_no_heavy_library(step):
    result = run_python(LIGHT_START[step] + REPORT_HEAVY, run_env())
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"{step} imported {report['heavy']}"
    if step != "plugins":
        assert report["plugins"] == [], f"{step} imported plugins at import time: {report['plugins']}"
