"""Log entries written once a burst of them quiets down, in order, with their own times.

When a shared lower comes back, hundreds of NICs reattach within a second
and each writes four entries. Written as they came (each formatted, each a
syscall, and on a host each datagram waking journald on a busy CPU), they
were about a sixth of netwatch's work in that second, in the way of the
reattaches themselves. So, inside the event loop, entries are held until
none came for ``quiet`` seconds, or ``longest`` after the first held one,
or ``limit`` are held; then all are written in order. A lone entry is
written ``quiet`` seconds late. Every entry keeps the time it was made
(stderr lines show it; the journal stamps an entry when it receives it),
and the message is fixed when it is made (its arguments may change later).
netwatch's own event entries (events.emit) are held as their parts, and
their log records are made only when they are written.

Held entries are written before netwatch answers a control request, when it
exits (logging's own shutdown flushes every handler) and before the CLI
prints a final error; only a SIGKILL can lose them (at most the last
``longest`` seconds of entries).
Outside an event loop (the CLI, the demo's own lines) entries go out at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

QUIET = 0.05
LONGEST = 1.0
LIMIT = 4096


@dataclass(frozen=True)
class Entry:
    """What a log record is made of, kept until it is written (making the record was most of an entry's cost)."""

    name: str
    level: int
    pathname: str
    lineno: int
    message: str
    func: str
    extra: dict[str, object]
    created: float = field(default_factory=time.time)

    def record(self) -> logging.LogRecord:
        record = logging.LogRecord(self.name, self.level, self.pathname, self.lineno, self.message, None, None,
                                   self.func)
        record.created = self.created
        record.msecs = (self.created - int(self.created)) * 1000
        record.__dict__.update(self.extra)
        return record


class BurstBuffer(logging.Handler):
    """Holds records for ``target`` while they come in a burst."""

    def __init__(self, target: logging.Handler, quiet: float = QUIET, longest: float = LONGEST,
                 limit: int = LIMIT) -> None:
        super().__init__()
        self.target = target
        self.quiet, self.longest, self.limit = quiet, longest, limit
        self._held: list[logging.LogRecord | Entry] = []
        self._first = self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            self.target.handle(record)
            return
        try:
            record.msg, record.args = record.getMessage(), None
        except Exception:  # noqa: BLE001 - a bad log call must not raise where it was made (logging's rule)
            self.handleError(record)
            return
        self._add(loop, record)

    def hold(self, entry: Entry) -> bool:
        """Hold an entry whose record is made only when it is written (events.emit); False outside the loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._add(loop, entry)
        return True

    def _add(self, loop: asyncio.AbstractEventLoop, item: logging.LogRecord | Entry) -> None:
        now = time.monotonic()
        if not self._held:
            self._first = now
        self._held.append(item)
        self._last = now
        if len(self._held) >= self.limit:
            self.flush()
        elif self._timer is None or self._timer_loop is not loop:
            # (A timer of a loop that has ended never fires: this loop gets its own.)
            self._timer, self._timer_loop = loop.call_later(self.quiet, self._due), loop

    def _due(self) -> None:
        self._timer = None
        if not self._held:
            return
        wait = min(self._last + self.quiet, self._first + self.longest) - time.monotonic()
        if wait > 0:
            self._timer = asyncio.get_running_loop().call_later(wait, self._due)
            self._timer_loop = asyncio.get_running_loop()
        else:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for item in held:
            self.target.handle(item if isinstance(item, logging.LogRecord) else item.record())
        self.target.flush()

    def close(self) -> None:
        self.flush()
        self.target.close()
        super().close()


def flush() -> None:
    """Write every held entry now (before an answer, or a last line of the CLI's own)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
