"""The tools a server knows, which of them it may run itself, and running them.

Tools come from plugins (``shimmy_register_tools``) and from JSON files (``$SHIMMY_HOME/tools``
and ``--tools-dir``).  A tool is an object with ``name``, ``description``, ``parameters`` (a JSON
Schema) and ``run(arguments)``; optionally:

- ``configure(settings)``: called once at start-up; raise ``ValueError`` to say the tool cannot
  be used with these settings (the message says why);
- ``unavailable_reason``: after ``configure``, why the tool cannot run here (``None`` if it can);
- ``executable``: ``False`` for a definition only (its calls always go back to the client);
- ``capabilities``: what running it can do, among ``files``, ``network`` and ``process``;
- ``text_prefix`` and ``text_argument``: the tool also answers the text protocol
  ``<tool>PREFIX:TEXT</tool>``, with TEXT as the argument ``text_argument``;
- ``timeout``: seconds one run may take (the server's ``--tool-timeout`` caps it).

The server runs a tool only if it was enabled at start-up (``--enable-tool NAME``) and the request
names it.  Arguments are parsed and validated against the tool's schema before it runs; when they
are invalid the tool does not run and the model is told why.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from shimmy_core.contract.settings import SettingsError
from shimmy_core.tools import schemas
from shimmy_core.tools.errors import ToolError, ToolSpecError

log = logging.getLogger("shimmy")

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_OUTPUT_CHARS = 20_000
MAX_ARGUMENT_CHARS = 100_000


class ToolConfigError(SettingsError):
    """The tools cannot be set up as asked (an unknown tool enabled, a broken JSON tool, a file
    tool together with a network tool...); Shimmy does not start, and the message says why."""


@dataclass
class ToolEntry:
    tool: Any
    source: str                      # the plugin that registered it, or the JSON file
    enabled: bool = False
    reason: str | None = None        # why it cannot run here
    checked: bool = False            # its parameters passed the full JSON Schema check
    _validator: Any = None

    def check(self) -> None:
        """The full JSON Schema check of the parameters (the first one imports jsonschema);
        raises :class:`~shimmy_core.tools.schemas.SchemaProblem`."""
        if not self.checked:
            schemas.check_schema(self.tool.parameters)
            self.checked = True

    @property
    def validator(self) -> Any:
        """The validator of the call arguments, built on first use."""
        if self._validator is None:
            self._validator = schemas.validator_for(self.tool.parameters)
        return self._validator

    @property
    def name(self) -> str:
        return self.tool.name

    @property
    def executable(self) -> bool:
        return bool(getattr(self.tool, "executable", True)) and self.reason is None

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(getattr(self.tool, "capabilities", ()) or ())

    def definition(self) -> dict:
        """The tool as an OpenAI function tool."""
        return {"type": "function", "function": {
            "name": self.tool.name, "description": self.tool.description, "parameters": self.tool.parameters}}


@dataclass(frozen=True)
class ToolOutcome:
    output: str
    is_error: bool = False


@dataclass
class ToolBox:
    entries: dict[str, ToolEntry] = field(default_factory=dict)
    max_steps: int = 5
    timeout: float = 30.0

    # ------------------------------------------------------------ building
    @classmethod
    def build(cls, registered: dict[str, Any], owners: dict[tuple[str, str], str], settings: Any) -> "ToolBox":
        """Gather plugin tools and JSON tools, configure them, and enable the ones ``settings``
        names; raises :class:`ToolConfigError`."""
        box = cls(max_steps=getattr(settings, "tool_max_steps", 5), timeout=getattr(settings, "tool_timeout", 30.0))
        if box.max_steps < 1 or not box.timeout > 0:
            raise ToolConfigError("--tool-max-steps must be at least 1 and --tool-timeout more than 0")
        for name, tool in registered.items():
            box._add(tool, owners.get(("tool", name), "?"), checked=False)
        home = Path(getattr(settings, "home", Path.home() / ".shimmy"))
        folders = [home / "tools", *(Path(d).expanduser() for d in getattr(settings, "tools_dirs", ()))]
        for folder in dict.fromkeys(folders):
            if folder != home / "tools" and not folder.is_dir():
                raise ToolConfigError(f"--tools-dir {str(folder)!r} is not a folder")
            if not folder.is_dir():
                continue  # no JSON tools (the loader is not even imported)
            from shimmy_core.tools import specs

            try:
                loaded = specs.load_dir(folder)
            except ToolSpecError as exc:
                raise ToolConfigError(str(exc)) from None
            for tool in loaded:
                box._add(tool, str(tool.path), checked=True)  # load_dir checked the parameters
        for entry in box.entries.values():
            configure = getattr(entry.tool, "configure", None)
            if configure is not None:
                try:
                    configure(settings)
                except ValueError as exc:
                    raise ToolConfigError(f"tool {entry.name!r}: {exc}") from None
            entry.reason = getattr(entry.tool, "unavailable_reason", None)
        box._enable(getattr(settings, "enable_tools", ()), getattr(settings, "tool_allow_file_and_network", False))
        return box

    def _add(self, tool: Any, source: str, checked: bool) -> None:
        """A tool, with its parameters' references checked; the full JSON Schema check of a
        plugin's tool waits until it is enabled or :meth:`check_schemas` runs (after the
        server is up), so that a start imports no jsonschema."""
        name = getattr(tool, "name", None)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolConfigError(f"tool {name!r} from {source}: a name is 1 to 64 letters, digits, '_' or '-'")
        if name in self.entries:
            raise ToolConfigError(f"tool name {name!r} is used by both {self.entries[name].source} and {source}")
        parameters = getattr(tool, "parameters", None)
        if not isinstance(parameters, dict):
            raise ToolConfigError(f"tool {name!r} from {source} has no JSON Schema 'parameters' object")
        try:
            schemas.check_references(parameters)
        except schemas.SchemaProblem as exc:
            raise ToolConfigError(f"tool {name!r} from {source}: parameters: {exc}") from None
        self.entries[name] = ToolEntry(tool, source, checked=checked)

    def _enable(self, names: Iterable[str], allow_file_and_network: bool) -> None:
        for name in names:
            entry = self.entries.get(name)
            if entry is None:
                known = ", ".join(sorted(self.entries)) or "none"
                raise ToolConfigError(f"--enable-tool {name}: no such tool (known: {known})")
            if not getattr(entry.tool, "executable", True):
                raise ToolConfigError(f"--enable-tool {name}: {entry.source} has no implementation to run")
            if entry.reason:
                raise ToolConfigError(f"--enable-tool {name}: {entry.reason}")
            try:
                entry.check()
            except schemas.SchemaProblem as exc:
                raise ToolConfigError(f"tool {name!r} from {entry.source}: parameters: {exc}") from None
            entry.enabled = True
        enabled = [e for e in self.entries.values() if e.enabled]
        # A command can do anything, so it counts as both; one tool alone is never refused.
        reads = [e.name for e in enabled if e.capabilities & {"files", "process"}]
        sends = [e.name for e in enabled if e.capabilities & {"network", "process"}]
        if any(r != s for r in reads for s in sends) and not allow_file_and_network:
            raise ToolConfigError(
                f"enabling {', '.join(sorted(set(reads)))} (can read files) together with "
                f"{', '.join(sorted(set(sends)))} (can send data out) lets a prompt-injected document "
                "send your files away; pass --allow-file-and-network if you accept that")

    def check_schemas(self) -> None:
        """The full JSON Schema check of every tool not checked yet (plugin tools nobody enabled):
        one whose parameters fail it cannot run here, and says why (a broken plugin does not stop
        the server)."""
        for entry in self.entries.values():
            try:
                entry.check()
            except schemas.SchemaProblem as exc:
                entry.reason = f"parameters: {exc}"
                log.warning("tool %r from %s: parameters: %s", entry.name, entry.source, exc)

    # ------------------------------------------------------------ reading
    def get(self, name: str) -> ToolEntry | None:
        return self.entries.get(name)

    def runs(self, name: str) -> bool:
        """Whether the server runs calls of ``name`` itself."""
        entry = self.entries.get(name)
        return entry is not None and entry.enabled

    def text_tools(self) -> dict[str, ToolEntry]:
        """Enabled tools that answer the text protocol, by prefix."""
        return {e.tool.text_prefix: e for e in self.entries.values()
                if e.enabled and getattr(e.tool, "text_prefix", None)}

    def listing(self) -> list[dict]:
        """What ``GET /v1/tools`` and ``shimmy tools`` show."""
        self.check_schemas()
        rows = []
        for entry in sorted(self.entries.values(), key=lambda e: e.name):
            rows.append({
                "name": entry.name,
                "object": "tool",
                "type": "function",
                "function": entry.definition()["function"],
                "source": entry.source,
                "executable": bool(getattr(entry.tool, "executable", True)),
                "enabled": entry.enabled,
                "unavailable_reason": entry.reason,
                "capabilities": sorted(entry.capabilities),
                "text_prefix": getattr(entry.tool, "text_prefix", None),
            })
        return rows

    # ------------------------------------------------------------ running
    def execute(self, name: str, arguments: str | dict, deadline: float | None = None) -> ToolOutcome:
        """Run an enabled tool on the model's arguments: parsed, validated, then run under the
        tool's timeout (and the caller's ``deadline``).  Never raises: failures come back as an
        outcome with ``is_error`` for the model to read."""
        entry = self.entries.get(name)
        if entry is None or not entry.enabled:
            return ToolOutcome(f"error: the tool {name!r} is not available on this server", True)
        if isinstance(arguments, str):
            if len(arguments) > MAX_ARGUMENT_CHARS:
                return ToolOutcome("error: the arguments are too long", True)
            try:
                args = json.loads(arguments) if arguments.strip() else {}
            except ValueError as exc:
                return ToolOutcome(f"error: the arguments are not valid JSON ({exc}); the tool did not run", True)
        else:
            args = arguments
        if not isinstance(args, dict):
            return ToolOutcome("error: the arguments must be a JSON object; the tool did not run", True)
        problems = schemas.errors(entry.validator, args)
        if problems:
            return ToolOutcome("error: invalid arguments, the tool did not run: " + "; ".join(problems), True)
        limit = min(float(getattr(entry.tool, "timeout", self.timeout) or self.timeout), self.timeout)
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
        if limit <= 0:
            return ToolOutcome("error: no time left to run the tool", True)
        return _run_with_timeout(entry, args, limit)


def _run_with_timeout(entry: ToolEntry, args: dict, limit: float) -> ToolOutcome:
    box: dict[str, ToolOutcome] = {}

    def work() -> None:
        try:
            result = entry.tool.run(args)
            text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
            box["outcome"] = ToolOutcome(text)
        except (ToolError, ValueError) as exc:
            box["outcome"] = ToolOutcome(f"error: {exc}", True)
        except Exception as exc:  # a plugin's bug must not take the request down
            log.exception("tool %s failed", entry.name)
            box["outcome"] = ToolOutcome(f"error: the tool failed ({type(exc).__name__})", True)

    worker = threading.Thread(target=work, name=f"shimmy-tool-{entry.name}", daemon=True)
    worker.start()
    worker.join(limit)
    outcome = box.get("outcome")
    if outcome is None:
        return ToolOutcome(f"error: the tool {entry.name!r} took longer than {limit:.1f} s", True)
    if len(outcome.output) > MAX_OUTPUT_CHARS:
        return ToolOutcome(outcome.output[:MAX_OUTPUT_CHARS] + f"\n[truncated at {MAX_OUTPUT_CHARS} characters]",
                           outcome.is_error)
    return outcome
