"""A hostile QMP peer for tests: ``python -m tests.hostile_peer MODE SOCKET``.

What a QEMU a guest has taken over (or a process squatting on a VM's socket
path) may do to netwatch; each mode is one behaviour from the security
review. It serves until killed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

GREETING = json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                               "capabilities": []}}).encode() + b"\n"
# Clears the screen, homes the cursor and draws a line of its own.
ESCAPES = "\x1b[2J\x1b[H\x1b[32mvm1/net0 attached\x1b[0m\r\nwarning: forged line"


def answer_commands(conn: socket.socket, error: str | None = None) -> None:
    # Like QEMU's parser: JSON objects back to back, newlines optional.
    decoder = json.JSONDecoder()
    buffer = ""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buffer += data.decode()
        while buffer.strip():
            try:
                request, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                break
            buffer = buffer.lstrip()[end:]
            if request.get("execute") == "query-status":
                reply = {"return": {"status": "running", "running": True}, "id": request.get("id")}
            elif request.get("execute") == "qmp_capabilities" or error is None:
                reply = {"return": {}, "id": request.get("id")}
            else:
                reply = {"error": {"class": "GenericError", "desc": error}, "id": request.get("id")}
            conn.sendall(json.dumps(reply).encode() + b"\n")


def serve(mode: str, path: str) -> None:
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
            handle(mode, conn)
        except OSError:
            pass
        finally:
            conn.close()


def handle(mode: str, conn: socket.socket) -> None:
    conn.sendall(GREETING)
    if mode == "greet-hangup":
        return
    if mode == "accept-drop":
        # A whole session, then gone: what a crash-looping QEMU looks like.
        conn.recv(65536)
        conn.sendall(b'{"return": {}}\n')
        time.sleep(0.02)  # the session is up on netwatch's side; then it ends
        return
    if mode == "escapes":
        answer_commands(conn, ESCAPES + "x" * 200_000)
        return
    # The floods answer the capabilities negotiation first, as a real QEMU would.
    conn.recv(65536)
    conn.sendall(b'{"return": {}, "id": "__qmp#00000"}\n')
    if mode == "giant-lines":
        line = b'{"event": "X", "data": {"pad": "' + b"x" * (9 * 1024 * 1024) + b'"}}\n'
        while True:
            conn.sendall(line)
    if mode == "event-flood":
        event = b'{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}\n' * 1000
        while True:
            conn.sendall(event)
    if mode == "impostor":
        impostor(conn)
        return  # and waits for the next connection, as a squatter would
    raise SystemExit(f"unknown mode {mode}")


def impostor(conn: socket.socket) -> None:
    """Answer every command as a willing QEMU would; print each one and every fd passed.

    Prints ``command NAME`` per command, ``fds N`` per message that
    carried file descriptors (closed at once) and ``closed`` when the
    connection ends, so that a test can tell exactly what netwatch handed over.
    """
    try:
        _impostor(conn)
    finally:
        print("closed", flush=True)


def _impostor(conn: socket.socket) -> None:
    decoder = json.JSONDecoder()
    buffer = ""
    while True:
        data, ancillary, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]))
        for fd in fds:
            os.close(fd)
        if fds:
            print(f"fds {len(fds)}", flush=True)
        if not data:
            return
        buffer += data.decode(errors="replace")
        while buffer.strip():
            try:
                request, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                break
            buffer = buffer.lstrip()[end:]
            command = request.get("execute") if isinstance(request, dict) else None
            print(f"command {command}", flush=True)
            if command == "query-status":
                reply = {"return": {"status": "running", "running": True}, "id": request.get("id")}
            else:
                reply = {"return": {}, "id": request.get("id") if isinstance(request, dict) else None}
            conn.sendall(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
