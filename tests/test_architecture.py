"""The layout the import-linter contracts in pyproject.toml enforce, and what they cannot say:
that their module lists name every module of the core, and that no import cycle exists."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = {c["name"]: c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}


def core_modules() -> set[str]:
    """The top-level modules and packages of shimmy_core, as import-linter names them."""
    found = set()
    for path in (ROOT / "shimmy_core").iterdir():
        if path.name.startswith("_") and path.name != "__main__.py":
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            found.add(f"shimmy_core.{path.stem}")
    return found


def architecture_stats():
    spec = importlib.util.spec_from_file_location("architecture_stats", ROOT / "scripts" / "architecture_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_contract_package_may_import_no_other_core_module():
    [contract] = [c for c in CONTRACTS.values() if c.get("source_modules") == ["shimmy_core.contract"]]
    assert set(contract["forbidden_modules"]) == core_modules() - {"shimmy_core.contract"} | {"shimmy_plugins"}


def test_plugins_may_import_only_the_plugin_api():
    [contract] = [c for c in CONTRACTS.values() if c.get("source_modules") == ["shimmy_plugins"]]
    assert set(contract["forbidden_modules"]) == core_modules() - {"shimmy_core.plugin_api"}


def test_every_core_module_has_its_layer():
    [layers] = [c for c in CONTRACTS.values() if c["type"] == "layers"]
    named = {".".join(m.strip().split(".")[:2]) for layer in layers["layers"] for m in layer.replace(":", "|").split("|")}
    assert named == core_modules() - {"shimmy_core.__main__"}


def test_no_import_cycles():
    stats = architecture_stats()
    mods = stats.modules()
    graph = {name: stats.imports(name, path, set(mods)) for name, path in mods.items()}
    assert stats.cycles(graph) == []


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None, reason="the test extra installs import-linter")
def test_the_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_a_light_start():
    """`import shimmy_core`, `shimmy --help` and loading every plugin import neither torch nor
    transformers nor llama_cpp: the backends import them when a model loads."""
    code = (
        "import sys, contextlib, io\n"
        "import shimmy_core, shimmy_core.plugin_api\n"
        "from shimmy_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "from shimmy_core.contract.settings import Settings\n"
        "from shimmy_core.plugin_manager import create_plugin_manager\n"
        "from shimmy_core.plugin_registry import build_registry\n"
        "registry = build_registry(create_plugin_manager(), Settings(demo=False))\n"
        "assert registry.backends and registry.sources\n"
        "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_a_start_puts_off_what_the_first_requests_need(smollm2_path, tmp_path):
    """Building the server over the demo model (what `shimmy serve` does before it answers)
    imports no JSON Schema validator, template engine, metrics library or model runtime; the
    warm-up that runs once the server answers brings in the first three (bench/ready_bench.py)."""
    code = (
        "import sys\n"
        "from shimmy_core.cli import _parser, _settings\n"
        "from shimmy_core.app import build, create_app\n"
        f"shimmy = build(_settings(_parser().parse_args(['serve', '--model', {str(smollm2_path)!r}, '--no-demo'])))\n"
        "create_app(shimmy)\n"
        "assert [m.id for m in shimmy.catalog.list()] == ['SmolLM2-135M-Instruct.Q4_1']\n"
        "LATER = ('jsonschema', 'jinja2', 'prometheus_client', 'regex', 'sqlite3', 'llama_cpp', 'torch')\n"
        "print(sorted(m for m in LATER if m in sys.modules))\n"
        "shimmy.warm_up()\n"
        "print(sorted(m for m in LATER if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SHIMMY_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = r.stdout.strip().splitlines()[-2:]
    assert before == "[]", before
    assert after == "['jinja2', 'jsonschema', 'prometheus_client']", after


def test_every_package_folder_is_installed():
    """A non-editable install ships only the packages pyproject.toml names: every folder with an
    ``__init__.py`` under shimmy_core/ and plugins/ must be there (the Anthropic dialect once was
    not, so a wheel had no /v1/messages)."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for package, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but not a package folder: {sorted(listed - found)}"
