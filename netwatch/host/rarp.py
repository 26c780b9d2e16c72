"""The guest's MAC announced from the host: the RARP frames QEMU's
``announce-self`` sends, so that switches learn the guest's new path after
a reattach without anything asked of QEMU (a redirect NIC may have no
monitor netwatch can use)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

log = logging.getLogger(__name__)

ETH_P_RARP = 0x8035
# QEMU's announce-self defaults (net/announce.c): 50 ms, then 100 ms more each round, five rounds.
ROUNDS = (0.0, 0.05, 0.2, 0.45, 0.8)


def rarp_frame(mac: str) -> bytes:
    """QEMU's announcement (net/net.c announce_self_create): a RARP request for ``mac`` from ``mac``."""
    raw = bytes.fromhex(mac.replace(":", ""))
    payload = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + raw + bytes(4) + raw + bytes(4)
    frame = b"\xff" * 6 + raw + struct.pack("!H", ETH_P_RARP) + payload
    return frame + bytes(60 - len(frame))


def announce(ifname: str, mac: str) -> None:
    """Send ``mac``'s announcement on ``ifname`` now and in QEMU's later rounds (never blocking, never raising)."""
    loop = asyncio.get_running_loop()
    frame = rarp_frame(mac)
    for delay in ROUNDS:
        loop.call_later(delay, _send, ifname, frame)


# One send-only packet socket for the whole run (protocol 0: it receives nothing), never bound: each frame
# names its link. Opening and closing one per frame cost the event loop 5-19 ms each (the kernel waits in
# close), 19 s of stalls at 256 NICs.
_sock: socket.socket | None = None


def _send(ifname: str, frame: bytes) -> None:
    global _sock
    try:
        if _sock is None:
            _sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
        _sock.sendto(frame, (ifname, 0))
    except OSError as exc:  # the link went meanwhile, its queue is full, or packet sockets are not allowed
        log.debug("announcing on %s: %s", ifname, exc)
