"""Reading text, Markdown and PDF files, only under the allowed roots.

A path is resolved completely (``..`` and every symlink) before it is compared with the roots, so
neither ``../../etc/passwd`` nor a symlink inside a root pointing out of it gets through; on Linux
the opened descriptor is checked again (``/proc/self/fd``), so a path swapped for a symlink after
the check is refused too.  Only regular files are opened (no devices, FIFOs or folders), never
larger than ``max_bytes``; text must be UTF-8 without NUL bytes (anything else is a binary file and
refused); a PDF is read for its text, at most ``max_pages`` pages; the text handed back is cut at
``max_chars``.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown")
PDF_SUFFIXES = (".pdf",)


class FileRefused(ValueError):
    """The file may not or cannot be read; the message says why (it goes back to the model)."""


@dataclass(frozen=True)
class FileReader:
    roots: tuple[str, ...]            # real paths of existing folders
    max_bytes: int = 10 * 1024 * 1024
    max_chars: int = 100_000
    max_pages: int = 50

    @classmethod
    def under(cls, roots: Sequence[str | os.PathLike], **limits) -> "FileReader":
        """A reader for these roots; every root must be an existing folder."""
        real = []
        for root in roots:
            path = os.path.realpath(os.path.expanduser(str(root)))
            if not os.path.isdir(path):
                raise ValueError(f"tool root {str(root)!r} is not a folder")
            real.append(path)
        return cls(tuple(real), **limits)

    # ------------------------------------------------------------ paths
    def resolve(self, requested: str) -> str:
        """The real path of ``requested`` if it lies under a root, else :class:`FileRefused`."""
        if not self.roots:
            raise FileRefused("file reading is off: no folder is allowed (start Shimmy with --tool-root DIR)")
        if not isinstance(requested, str) or not requested.strip() or "\x00" in requested:
            raise FileRefused("the path is empty or invalid")
        requested = requested.strip()
        if os.path.isabs(requested):
            candidates = [requested]
        else:
            candidates = [os.path.join(root, requested) for root in self.roots]
        for candidate in candidates:
            real = os.path.realpath(candidate)
            if self._inside(real) and os.path.lexists(real):
                return real
        real = os.path.realpath(candidates[0])
        if not self._inside(real):
            raise FileRefused(f"{requested!r} is outside the folders this tool may read")
        raise FileRefused(f"{requested!r} does not exist")

    def _inside(self, real: str) -> bool:
        return any(real == root or os.path.commonpath([real, root]) == root for root in self.roots)

    # ------------------------------------------------------------ reading
    def read(self, requested: str) -> str:
        real = self.resolve(requested)
        suffix = Path(real).suffix.lower()
        if suffix not in TEXT_SUFFIXES + PDF_SUFFIXES:
            raise FileRefused(f"only text, Markdown and PDF files can be read ({', '.join(TEXT_SUFFIXES + PDF_SUFFIXES)})")
        data = self._read_bytes(real)
        if suffix in PDF_SUFFIXES:
            text = self._pdf_text(data)
        else:
            text = self._text(data)
        if len(text) > self.max_chars:
            text = text[: self.max_chars] + f"\n[truncated: the file has more than {self.max_chars} characters]"
        return text

    def _read_bytes(self, real: str) -> bytes:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            raise FileRefused(f"cannot open the file: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FileRefused("not a regular file")
            opened = f"/proc/self/fd/{fd}"
            if os.path.exists(opened) and not self._inside(os.path.realpath(opened)):
                raise FileRefused("the file moved outside the allowed folders")
            if info.st_size > self.max_bytes:
                raise FileRefused(f"the file is larger than {self.max_bytes} bytes")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise FileRefused(f"the file is larger than {self.max_bytes} bytes")
            return data
        finally:
            os.close(fd)

    @staticmethod
    def _text(data: bytes) -> str:
        if b"\x00" in data:
            raise FileRefused("binary file refused (it contains NUL bytes)")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise FileRefused("binary file refused (it is not UTF-8 text)") from None
        controls = sum(1 for ch in text[:8192] if ord(ch) < 32 and ch not in "\t\n\r\f")
        if controls > 8:
            raise FileRefused("binary file refused (it contains control characters)")
        return text

    def _pdf_text(self, data: bytes) -> str:
        if not data.startswith(b"%PDF-"):
            raise FileRefused("not a PDF file")
        try:
            import pypdf
        except ImportError:
            raise FileRefused("reading PDF files needs pypdf: pip install 'shimmy-server[pdf]'") from None
        try:
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted:
                raise FileRefused("the PDF is encrypted")
            total = len(reader.pages)
            pages = []
            for number in range(min(total, self.max_pages)):
                pages.append(reader.pages[number].extract_text() or "")
                if sum(map(len, pages)) > self.max_chars:
                    break
        except FileRefused:
            raise
        except Exception as exc:  # pypdf raises many kinds of errors on damaged files
            raise FileRefused(f"the PDF could not be read: {type(exc).__name__}") from None
        text = "\n\n".join(f"[page {i + 1}]\n{page.strip()}" for i, page in enumerate(pages))
        if total > len(pages):
            text += f"\n[{total - len(pages)} more page(s) not read: at most {self.max_pages} pages]"
        return text
