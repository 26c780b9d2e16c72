"""Text netwatch does not control (QEMU's error messages, hook output, link
names from the kernel) made safe to show: one line, no terminal controls,
bounded length. Applied where such text enters netwatch's own messages."""

from __future__ import annotations

LIMIT = 240


def one_line(text: str) -> str:
    """Control characters escaped: the text cannot start a line or move a terminal's cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def clean(text: object, limit: int = LIMIT) -> str:
    """``one_line`` of ``text``, cut to ``limit`` characters with a note of how much was left out."""
    raw = str(text)
    cut = raw[:limit]
    safe = one_line(cut)
    return safe if len(raw) <= limit else f"{safe}... ({len(raw) - limit} more characters)"
