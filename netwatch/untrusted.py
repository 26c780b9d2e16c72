"""Text netwatch does not control (QEMU's error messages, hook output, link
names from the kernel) made safe to show: one line, no terminal controls,
bounded length. Applied where such text enters netwatch's own messages.

Link names are bytes to the kernel, not always UTF-8: netwatch holds each
as the str os.fsdecode makes of it (undecodable bytes as surrogate escapes,
so it goes back to the same bytes for hooks' environment) and shows those
bytes as ``\\xff``.
"""

from __future__ import annotations

import re
from typing import Any

LIMIT = 240
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode
        return f"\\x{code - 0xDC00:02x}"
    return repr(char)[1:-1]


def one_line(text: str) -> str:
    """Control characters escaped: the text cannot start a line or move a terminal's cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def clean(text: object, limit: int = LIMIT) -> str:
    """``one_line`` of ``text``, cut to ``limit`` characters with a note of how much was left out."""
    raw = str(text)
    cut = raw[:limit]
    safe = one_line(cut)
    return safe if len(raw) <= limit else f"{safe}... ({len(raw) - limit} more characters)"


def displayable(value: Any) -> Any:
    """``value`` (JSON-shaped) with undecodable bytes in its strings escaped: plain Unicode any JSON reader takes.

    Only what cannot be encoded changes; control characters are JSON's to escape.
    """
    if isinstance(value, str):
        return _SURROGATE.sub(lambda match: _escaped(match.group()), value) if _SURROGATE.search(value) else value
    if isinstance(value, dict):
        return {displayable(key): displayable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [displayable(item) for item in value]
    return value
