"""Actions out: announce-self, held until the host's reattaches have quieted down.

After a reattach QEMU announces the guest's MAC (RARP) so that switches
learn its path again. When a shared lower returns, hundreds of NICs are
reattached within a second, and each RARP is a broadcast that every other
macvtap on that lower receives: announced one by one, in the middle of
the burst, they slowed the burst itself (256 NICs back in 1.4-1.5 s
instead of 0.75-0.85 s, bench/scale.py). So requests from every VM wait
until none came for ``quiet`` seconds, or ``longest`` after the first, and
then each VM gets one announce-self for its NICs. A lone reattach is
announced ``quiet`` seconds later.

Each VM's announce-self is sent by a task of its own: a QEMU that does not
answer holds up only its own VM's next announcement (queued until its
last one ends), never another VM's. Before, the gate waited for a whole
batch, and requests made meanwhile waited for the next reattach anywhere
on the host (18 s late, where 50 ms is usual).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from netwatch import tasks

log = logging.getLogger(__name__)

QUIET = 0.05
LONGEST = 1.0

Announce = Callable[[list[str]], Awaitable[None]]


class AnnounceGate:
    """Shared by every VM's session; owns the task that gathers a batch and each VM's sending task."""

    def __init__(self, quiet: float = QUIET, longest: float = LONGEST) -> None:
        self.quiet, self.longest = quiet, longest
        self._pending: dict[Announce, set[str]] = {}
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None
        # Per VM: its announce-self under way, and its NICs that wait for that to end.
        self._sending: dict[Announce, asyncio.Task[None]] = {}
        self._queued: dict[Announce, set[str]] = {}

    def request(self, announce: Announce, nic: str) -> None:
        """Have ``announce`` called with ``nic`` (and its VM's other NICs waiting) once the host is quiet."""
        self._pending.setdefault(announce, set()).add(nic)
        self._last = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="netwatch-announce")

    async def _run(self) -> None:
        first = time.monotonic()
        while (wait := min(self._last + self.quiet, first + self.longest) - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        # Handed over without waiting for any QEMU: a request made from now
        # on starts the next batch.
        batch, self._pending = self._pending, {}
        for announce, nics in batch.items():
            if announce in self._sending:
                self._queued.setdefault(announce, set()).update(nics)
            else:
                task = asyncio.get_running_loop().create_task(self._send(announce, nics), name="netwatch-announce-vm")
                self._sending[announce] = task

    async def _send(self, announce: Announce, nics: set[str]) -> None:
        # One announce-self at a time per VM; what came meanwhile goes next.
        try:
            while nics:
                try:
                    await announce(sorted(nics))
                except Exception:  # a bug: reported, and the VM's next announcements still go
                    log.exception("announce-self for %s failed", ", ".join(sorted(nics)))
                nics = self._queued.pop(announce, set())
        finally:
            self._sending.pop(announce, None)

    async def close(self) -> None:
        await tasks.stop([self._task, *self._sending.values()])
