"""When a VM's QMP socket is tried again: the pacing of a session's connection attempts.

Two waits: while nothing listens on the socket (QEMU not started yet), a
short one that a socket appearing ends at once; after a session that
failed or did not last, a growing one, which only a new socket file (a new
QEMU) may cut short, once a streak.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential
from tenacity.wait import wait_base

from netwatch.errors import QmpError
from netwatch.qemu.peer import file_id
from netwatch.qemu.sockwatch import SocketWatch

log = logging.getLogger(__name__)

T = TypeVar("T")


class NoListener(QmpError):
    """Nothing accepted a connection on the socket (absent, or nobody listening yet)."""


class PeerFailed(QmpError):
    """Something accepted the connection and then failed QMP's greeting or negotiation."""


def default_connect_wait() -> wait_base:
    return wait_exponential(multiplier=0.05, min=0.05, max=2.0)


def default_short_session_wait() -> wait_base:
    # A QEMU whose sessions keep ending at once (crash-looping, or a peer
    # that accepts and drops) is tried less and less often, up to twice a
    # minute, instead of filling the journal: 92 lines/s before.
    return wait_exponential(multiplier=0.1, min=0.1, max=30.0)


class Redial:
    """The waits between one VM's attempts to connect to its QMP socket; owns the socket's watch."""

    def __init__(self, vm: str, path: str, connect_wait: wait_base | None = None,
                 short_session_wait: wait_base | None = None) -> None:
        self.vm = vm
        self.path = path
        self.connect_wait = connect_wait or default_connect_wait()
        self.short_session_wait = short_session_wait or default_short_session_wait()
        self._socket_watch = SocketWatch(path)
        # Which file the socket last tried was (peer.file_id): a new QEMU's is another.
        self._tried_socket: tuple[int, int, int] | None = None

    def start(self) -> None:
        self._socket_watch.start()

    def close(self) -> None:
        self._socket_watch.close()

    def trying(self) -> None:
        """A connection attempt starts: the socket file there now is the one tried."""
        self._tried_socket = file_id(self.path)

    async def connect(self, attempt: Callable[[], Awaitable[T]], waiting: Callable[[], None]) -> T:
        """``attempt`` until something listens (it raises NoListener until then); ``waiting`` before each wait."""
        # Each delay ends early when the socket appears (a QEMU starting). A
        # peer that accepted and then failed is the session's to retry, after
        # the growing delay.
        async for retry in AsyncRetrying(wait=self.connect_wait, retry=retry_if_exception_type(NoListener),
                                         sleep=self._socket_watch.sleep, reraise=True,
                                         before_sleep=lambda _state: waiting()):
            with retry:
                return await attempt()
        raise AssertionError("unreachable: retries never stop")

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` sessions in a row that failed or did not last."""
        state = RetryCallState(AsyncRetrying(), None, (), {})
        state.attempt_number = failures
        return float(self.short_session_wait(state))

    async def back_off(self, seconds: float, shortcut: bool) -> bool:
        """Wait ``seconds`` before trying again; whether a new socket may still cut a later wait short.

        Only a socket file other than the one last connected to (a new
        QEMU) ends the wait early, and only once a streak: touching the
        socket, or a peer that keeps making new ones and failing, meets the
        growing delay in full (before, a peer touching its socket once a
        second was tried 42 times a second).
        """
        if not shortcut:
            await asyncio.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        appeared = self._socket_watch.appeared
        while True:
            appeared.clear()
            now = file_id(self.path)
            if now is not None and now != self._tried_socket:
                log.info("%s: a new socket at %s: trying it now, not %.3g s later", self.vm, self.path,
                         deadline - time.monotonic())
                return False
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await appeared.wait()
            except TimeoutError:
                return True
