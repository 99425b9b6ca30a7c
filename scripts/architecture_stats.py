"""Figures about the code's layout: modules, import cycles, the largest module, core lines
against plugin lines, and which core modules the plugins import.

    python scripts/architecture_stats.py

Reads the source with ``ast`` (imports inside functions count too, as import-linter counts
them); imports nothing from the project.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"shimmy_core": ROOT / "shimmy_core", "shimmy_plugins": ROOT / "plugins"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    lines = {name: len(path.read_text().splitlines()) for name, path in mods.items()}
    core = {n for n in mods if n.startswith("shimmy_core")}
    plugin = set(mods) - core
    largest = max(lines, key=lines.get)
    used = sorted({t for n in plugin for t in graph[n] if t in core})
    found = cycles(graph)
    print(f"modules: {len(mods)} ({len(core)} core, {len(plugin)} plugin)")
    print(f"lines: core {sum(lines[n] for n in core)}, plugins {sum(lines[n] for n in plugin)}")
    print(f"largest module: {largest} ({lines[largest]} lines)")
    print(f"import cycles: {len(found)}" + "".join(f"\n  {len(c)}: {', '.join(c)}" for c in found))
    print(f"core modules the plugins import: {len(used)}: {', '.join(used)}")


if __name__ == "__main__":
    main()
