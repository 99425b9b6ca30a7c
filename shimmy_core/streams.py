"""The chunk iterators that flow from a backend to a dialect hold a model slot until they are
closed: :func:`close` closes one, whatever it is (a generator, a list, a file-like body)."""

from __future__ import annotations


def close(stream: object) -> None:
    """Call ``stream.close()`` when it has one (generators do; lists and tuples do not)."""
    closer = getattr(stream, "close", None)
    if closer is not None:
        closer()
