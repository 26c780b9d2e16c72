"""Owning tasks: stop them without swallowing our own cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def stop(tasks: Iterable[asyncio.Task[object] | asyncio.Task[None] | None]) -> None:
    """Cancel ``tasks`` and wait for them to end.

    Their CancelledError is expected and absorbed; a cancellation aimed at
    the caller itself is re-raised.
    """
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:  # noqa: BLE001 - a task's own failure was reported where it happened
            pass
