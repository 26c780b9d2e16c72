"""Paced test-frame streams for loss measurements (tests and bench).

``python -m netwatch.sandbox.streams send QEMU_DGRAM_PATH COUNT RATE SRC_MAC TAG``
sends COUNT frames at RATE per second into a NIC's hub, as the guest would;
``python -m netwatch.sandbox.streams count TAG COUNT SECONDS WIRE...`` (inside the
namespace) counts which of them came out on any of the wires and prints a
JSON summary. ``python -m netwatch.sandbox.streams cross FROM_WIRE TO_WIRE COUNT RATE
TAG`` sends COUNT broadcasts at RATE per second on one lower's wire and
counts how many come out on another's: frames that crossed the guest's hub
from one network into the other. Separate processes, so a test can act
while frames flow.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

from netwatch.sandbox.testbed import ETH_P_TEST, frame_payload, test_frame

PEER_MAC = "02:00:00:00:00:01"
CROSS_MAC = "02:00:00:00:00:0c"
PROGRESS_STEP = 250


def send(path: str, count: int, rate: float, src_mac: str, tag: bytes) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    start = time.monotonic()
    for seq in range(count):
        delay = start + seq / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendto(test_frame(PEER_MAC, src_mac, tag + struct.pack("!I", seq)), path)
    sock.close()


def count(tag: bytes, expected: int, seconds: float, wires: list[str]) -> dict[str, object]:
    socks = []
    for wire in wires:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
        sock.bind((wire, ETH_P_TEST))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        socks.append(sock)
    print("ready", flush=True)
    seen: set[int] = set()
    frames = 0
    reported = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(seen) < expected:
        readable, _, _ = select.select(socks, [], [], 0.05)
        for sock in readable:
            payload = frame_payload(sock.recv(2048))
            if payload is not None and payload.startswith(tag):
                frames += 1
                seen.add(struct.unpack_from("!I", payload, len(tag))[0])
        if len(seen) >= reported + PROGRESS_STEP:
            reported = len(seen) - len(seen) % PROGRESS_STEP
            print(f"progress {reported}", flush=True)
    missing = sorted(set(range(expected)) - seen)
    return {"expected": expected, "received": len(seen), "lost": len(missing), "duplicates": frames - len(seen),
            "first_missing": missing[:20]}


def cross(src: str, dst: str, count_: int, rate: float, tag: bytes, drain: float = 0.5) -> dict[str, object]:
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
    tx.bind((src, ETH_P_TEST))
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
    rx.bind((dst, ETH_P_TEST))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    print("ready", flush=True)
    crossed: set[int] = set()
    start = time.monotonic()
    seq = 0
    end = start + count_ / rate + drain
    while time.monotonic() < end:
        now = time.monotonic()
        while seq < count_ and start + seq / rate <= now:
            tx.send(test_frame("ff:ff:ff:ff:ff:ff", CROSS_MAC, tag + struct.pack("!I", seq)))
            seq += 1
            if seq % PROGRESS_STEP == 0:
                print(f"progress {seq}", flush=True)
        wait = max(0.0, min(start + seq / rate, end) - time.monotonic()) if seq < count_ else 0.05
        readable, _, _ = select.select([rx], [], [], wait)
        if readable:
            payload = frame_payload(rx.recv(2048))
            if payload is not None and payload.startswith(tag):
                crossed.add(struct.unpack_from("!I", payload, len(tag))[0])
    tx.close()
    rx.close()
    return {"sent": seq, "crossed": len(crossed), "first_crossed": sorted(crossed)[:20]}


def main(argv: list[str]) -> int:
    if argv[0] == "send":
        send(argv[1], int(argv[2]), float(argv[3]), argv[4], argv[5].encode())
        return 0
    if argv[0] == "cross":
        print(json.dumps(cross(argv[1], argv[2], int(argv[3]), float(argv[4]), argv[5].encode())), flush=True)
        return 0
    if argv[0] == "count":
        print(json.dumps(count(argv[1].encode(), int(argv[2]), float(argv[3]), argv[4:])), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
