"""The built-in ``file_read`` tool: text, Markdown and PDF files, only under the folders given with
``--tool-root DIR`` (none by default, so the tool is off).  Text protocol: ``<tool>file:notes.md</tool>``.
The checks live in ``shimmy_core.tools.files``."""

from __future__ import annotations

from shimmy_core.plugin_api import hookimpl


class FileReadTool:
    name = "file_read"
    description = ("Read a text, Markdown or PDF file and return its text. Paths are relative to an "
                   "allowed folder, or absolute inside one.")
    parameters = {
        "type": "object",
        "properties": {"path": {"type": "string", "description": "the file, e.g. notes/report.md"}},
        "required": ["path"],
        "additionalProperties": False,
    }
    capabilities = frozenset({"files"})
    text_prefix = "file"
    text_argument = "path"
    timeout = 20.0
    unavailable_reason: str | None = "no folder is allowed: start Shimmy with --tool-root DIR"

    def __init__(self) -> None:
        self.reader = None

    def configure(self, settings) -> None:
        from shimmy_core.plugin_api import FileReader

        roots = tuple(getattr(settings, "tool_roots", ()) or ())
        if not roots:
            return
        self.reader = FileReader.under(roots)  # ValueError names a root that is not a folder
        self.unavailable_reason = None

    def run(self, arguments: dict) -> str:
        from shimmy_core.plugin_api import FileReader

        reader = self.reader or FileReader(())
        return reader.read(arguments["path"])


@hookimpl
def shimmy_register_tools(register):
    register(FileReadTool())
