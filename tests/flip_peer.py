"""A QMP peer that flips its run state on demand (issue 21 item 7): ``python -m tests.flip_peer SOCKET [RATE]``.

A willing QEMU otherwise: every command is answered with success (the fds
it is handed are kept, as QEMU keeps a tap's: a tap whose last fd closes is
gone), ``device_del`` followed by its DEVICE_DELETED, ``query-status`` with
its current state. Signals steer it:

* SIGUSR1 starts a flood: STOP and RESUME events in turn, as many as fit
  with its answers in RATE messages a second (380 by default: under
  netwatch's QMP budget of 400 in any second, netwatch/qemu/qmp.py), and
  each ``query-status`` answered ``finish-migrate`` and ``running`` in turn,
  so that every question netwatch asks finds the state changed, and a
  routed tap is deconfigured and configured again each time.
* SIGUSR2 during a flood ends it: the state settles at ``running`` (with a
  RESUME) and ``calm EVENTS`` is printed. Outside a flood it makes one
  change, as an admin's pause or resume would: running <-> paused, with its
  event, and prints ``flipped STATE``.

Prints ``listening``, ``accepted`` per connection, ``flooding`` when a
flood starts and ``sent N`` every 100 events of it. Serves until killed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}
FLOOD_STATES = ("finish-migrate", "running")


class Peer:
    def __init__(self, rate: float) -> None:
        self.rate = int(rate)
        self.period = 1.0 / rate
        self.recent: deque[float] = deque()  # when each message of the last second went out
        self.state = "running"
        self.flooding = False
        self.answers = 0  # query-status answers during a flood: which of FLOOD_STATES is next
        self.sent = 0  # events sent during the current flood
        self.signals: list[int] = []
        self.kept: list[int] = []  # every fd netwatch handed over, never closed

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def send(self, conn: socket.socket, message: dict[str, object]) -> None:
        self.recent.append(time.monotonic())
        conn.sendall(json.dumps(message).encode() + b"\n")

    def room(self) -> bool:
        """Whether one more message keeps the last second within the rate."""
        now = time.monotonic()
        while self.recent and self.recent[0] <= now - 1.0:
            self.recent.popleft()
        return len(self.recent) < self.rate - 1  # one left for an answer

    def event(self, conn: socket.socket, name: str) -> None:
        stamp = time.time()
        self.send(conn, {"event": name, "timestamp": {"seconds": int(stamp), "microseconds": int(stamp % 1 * 1e6)}})

    def steer(self, conn: socket.socket) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGUSR1 and not self.flooding:
                self.flooding, self.sent, self.answers = True, 0, 0
                print("flooding", flush=True)
            elif signum == signal.SIGUSR2 and self.flooding:
                self.flooding, self.state = False, "running"
                self.event(conn, "RESUME")
                print(f"calm {self.sent}", flush=True)
            elif signum == signal.SIGUSR2:
                self.state = "paused" if self.state == "running" else "running"
                self.event(conn, "STOP" if self.state == "paused" else "RESUME")
                print(f"flipped {self.state}", flush=True)

    def status(self) -> str:
        if not self.flooding:
            return self.state
        self.answers += 1
        return FLOOD_STATES[self.answers % 2]

    def serve(self, conn: socket.socket) -> None:
        self.send(conn, GREETING)
        decoder = json.JSONDecoder()
        buffer = ""
        next_event = time.monotonic()
        while True:
            self.steer(conn)
            timeout = max(0.0, next_event - time.monotonic()) if self.flooding else 0.1
            readable, _, _ = select.select([conn], [], [], timeout)
            if self.flooding and time.monotonic() >= next_event and self.room():
                self.event(conn, "STOP" if self.sent % 2 == 0 else "RESUME")
                self.sent += 1
                if self.sent % 100 == 0:
                    print(f"sent {self.sent}", flush=True)
                # A steady rate, not a catch-up burst after a slow moment.
                next_event = max(next_event + self.period, time.monotonic() - self.period)
            if not readable:
                continue
            data, ancillary, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.kept.extend(struct.unpack(f"{len(payload) // 4}i",
                                                   payload[:len(payload) - len(payload) % 4]))
            if not data:
                return
            buffer += data.decode(errors="replace")
            while buffer.strip():
                try:
                    request, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break
                buffer = buffer.lstrip()[end:]
                if not isinstance(request, dict):
                    continue
                command, arguments = request.get("execute"), request.get("arguments") or {}
                if command == "query-status":
                    state = self.status()
                    reply: dict[str, object] = {"return": {"status": state, "running": state == "running"}}
                else:
                    reply = {"return": {}}
                self.send(conn, {**reply, "id": request.get("id")})
                if command == "device_del":
                    self.send(conn, {"event": "DEVICE_DELETED", "data": {"device": arguments.get("id")},
                                     "timestamp": {"seconds": int(time.time()), "microseconds": 0}})


def main(path: str, rate: float = 380.0) -> None:
    peer = Peer(rate)
    signal.signal(signal.SIGUSR1, peer.on_signal)
    signal.signal(signal.SIGUSR2, peer.on_signal)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path)
    server.listen(16)
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        print("accepted", flush=True)
        try:
            peer.serve(conn)
        except OSError:
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    main(sys.argv[1], *(float(arg) for arg in sys.argv[2:3]))
