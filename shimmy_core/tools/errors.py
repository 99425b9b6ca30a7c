"""The tools' errors, apart from the code that raises them, so that what catches them need not
import it (the JSON tool loader is imported only when a tools folder exists)."""

from __future__ import annotations


class ToolSpecError(ValueError):
    """A JSON tool file that cannot be used; the message names the file and the field."""


class ToolError(Exception):
    """A tool ran and failed in a way the model should hear about (the message goes back to it)."""
