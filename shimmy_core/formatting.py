"""Numbers for people: sizes in the units a listing or a log line shows."""

from __future__ import annotations


def human_size(n: int | None) -> str:
    """Bytes in decimal units (``1.4 GB``); ``-`` when unknown."""
    if not n:
        return "-"
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
