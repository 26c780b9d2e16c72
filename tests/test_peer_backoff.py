"""A peer that keeps failing meets the growing delay, whatever it does to its socket file (issue 21 item 9).

Found in review: a peer that hung up after its greeting and touched its
socket once a second was reconnected 42 times a second, forever, with no
line in the journal: every inotify event on the socket's name cut the
connect delay short (and opened 2 s of retries every 20 ms). Only a
socket file other than the one that failed (a new QEMU) may end the wait
early, and only once a streak.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest
from tenacity import wait_fixed

from netwatch.qemu.qmp import VmSession
from netwatch.sandbox.testbed import until, wait_until

from .peer_process import hostile
from .test_qmp_session import GREETING
from .world import World

MAC = "52:54:00:70:0c:01"


class GreetHangup:
    """A listener at ``path`` that greets each connection and hangs up (a QEMU failing at once)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind anew: another socket file at the same path, as a new QEMU makes."""
        if self.server is not None:
            self.server.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

        async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.write(json.dumps(GREETING).encode() + b"\n")
            writer.close()
        self.server = await asyncio.start_unix_server(greet, self.path)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def quiet_for(seconds: float, what: str, condition: object) -> None:
    """Nothing happens for ``seconds`` (``condition`` must stay false): a delay of 30 s is not cut short."""
    assert callable(condition)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert not condition(), what
        await asyncio.sleep(0.01)


def test_touching_the_socket_does_not_end_the_delay(short_tmp: Path) -> None:
    async def main() -> None:
        peer = GreetHangup(str(short_tmp / "vm.qmp"))
        await peer.start()
        async with VmSession("t", peer.path, lambda: None, timeout=1, connect_wait=wait_fixed(0.05),
                             short_session_wait=wait_fixed(30)):
            await until(lambda: peer.connections == 1, "the first connection")
            for _ in range(10):  # touched 20 times a second for half a second
                os.utime(peer.path)
                await asyncio.sleep(0.05)
            # Before the fix: 25 more connections in this second.
            await quiet_for(1, "a touch ended the 30 s delay", lambda: peer.connections > 1)
        peer.close()
    asyncio.run(main())


def test_a_new_socket_ends_the_delay_once_a_streak(short_tmp: Path) -> None:
    """A new QEMU after a failing one is connected at once; a peer that keeps making new sockets is not."""
    async def main() -> None:
        peer = GreetHangup(str(short_tmp / "vm.qmp"))
        await peer.start()
        async with VmSession("t", peer.path, lambda: None, timeout=1, connect_wait=wait_fixed(0.05),
                             short_session_wait=wait_fixed(30)):
            await until(lambda: peer.connections == 1, "the first connection")
            await peer.start()  # a new QEMU: well before the 30 s
            await until(lambda: peer.connections == 2, "the new socket tried at once", timeout=10)
            await peer.start()  # and again: this one waits its turn
            await quiet_for(1, "a second new socket in the streak ended the delay", lambda: peer.connections > 2)
        peer.close()
    asyncio.run(main())


def test_a_socket_that_accepts_nothing_is_still_retried_soon(short_tmp: Path) -> None:
    """No listener (QEMU not started yet) is no failing peer: the connect delay applies, not the growing one."""
    async def main() -> None:
        path = str(short_tmp / "vm.qmp")
        bound = socket.socket(socket.AF_UNIX)
        bound.bind(path)  # a file, nobody listening
        peer = GreetHangup(path)
        async with VmSession("t", path, lambda: None, timeout=1, connect_wait=wait_fixed(0.05),
                             short_session_wait=wait_fixed(30)):
            await asyncio.sleep(0.3)  # refused a few times
            bound.close()
            await peer.start()
            await until(lambda: peer.connections >= 1, "a connection once it listens")
        peer.close()
    asyncio.run(main())


@pytest.mark.integration
def test_a_touching_peer_is_tried_at_the_growing_delay(world: World) -> None:
    world.vm("t", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": MAC})
    world.lower("lo0", "wi0")
    path = str(world.vm_dict("t")["qmp"])
    with hostile("touch", path, output=world.tmp / "peer.out") as peer:
        netwatch = world.start_netwatch()
        peer.wait_for("accepted")
        first, started = peer.count("accepted"), time.monotonic()
        wait_until(lambda: time.monotonic() - started >= 6, 10, "a 6 s window")
        accepted = peer.count("accepted") - first
    # Before the fix: 42 a second. The growing delay (0.1, 0.2, 0.4 ... s, up to
    # 30 s) allows about 6 in 6 s.
    assert 1 <= accepted <= 10, f"{accepted} connections in 6 s"
    log = netwatch.log()
    assert "next try in" in log, log[-3000:]
    assert len([line for line in log.splitlines() if "QMP session on" in line]) <= 12, log[-3000:]
