"""A hostile QMP peer for tests: ``python -m tests.hostile_peer MODE SOCKET``.

What a QEMU a guest has taken over (or a process squatting on a VM's socket
path) may do to netwatch; each mode is one behaviour from the security
review. It serves until killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
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


# -- modes with a loop of their own (issue 21 items 1, 6, 9) ---------------------


class Hop(Exception):
    """SIGUSR1: leave the first socket for the second."""


def _listen(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path)
    server.listen(16)
    print("listening", path, flush=True)
    return server


def answer_keeping_fds(conn: socket.socket, where: str, kept: list[int]) -> None:
    """Like answer_commands, but every fd netwatch hands over is kept (and reported), as a QEMU keeps it."""
    decoder = json.JSONDecoder()
    buffer = ""
    while True:
        data, ancillary, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]):
                    kept.append(fd)
                    print("fd", where, os.readlink(f"/proc/self/fd/{fd}"), flush=True)
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
            else:
                reply = {"return": {}, "id": request.get("id")}
            conn.sendall(json.dumps(reply).encode() + b"\n")


def hop(first: str, second: str) -> None:
    """One process serving ``first`` as a willing QEMU, then (on SIGUSR1) ``second``: one QEMU, two VMs' sockets."""
    def on_usr1(_signum: int, _frame: object) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        raise Hop
    signal.signal(signal.SIGUSR1, on_usr1)
    kept: list[int] = []  # never closed: what netwatch handed over stays with this process
    server = _listen(first)
    try:
        while True:
            conn, _ = server.accept()
            print("accepted", first, flush=True)
            try:
                conn.sendall(GREETING)
                answer_keeping_fds(conn, first, kept)
            except OSError:
                pass
            finally:
                conn.close()
    except Hop:
        server.close()
        os.unlink(first)
    server = _listen(second)
    while True:
        conn, _ = server.accept()
        print("accepted", second, flush=True)
        try:
            conn.sendall(GREETING)
            answer_keeping_fds(conn, second, kept)
        except OSError:
            pass
        finally:
            conn.close()


def deaf(path: str) -> None:
    """A peer that serves as a willing QEMU until netwatch is idle (its NICs attached), then never reads again.

    It peeks (MSG_PEEK leaves the bytes queued) to answer each command by
    its id, and sends RESUME to have netwatch ask query-status again, so
    netwatch keeps writing until the socket holds all it can; "full" is
    printed once nothing more arrived for a second. (A peek stops at a
    message carrying an fd: the fds are taken while it still reads.)
    """
    server = _listen(path)
    while True:
        conn, _ = server.accept()
        print("accepted", flush=True)
        try:
            _deaf(conn)
        except OSError:
            pass
        finally:
            conn.close()


def _deaf(conn: socket.socket) -> None:
    # As the review did; for AF_UNIX streams it is netwatch's send buffer that fills, not this one.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.sendall(GREETING)
    conn.settimeout(1)
    try:
        answer_keeping_fds(conn, "willing", [])
        return  # netwatch hung up
    except TimeoutError:
        pass  # a second without a command: from now on nothing is read
    conn.settimeout(None)
    print("deaf", flush=True)
    decoder = json.JSONDecoder()
    answered = 0  # the peeked bytes always start at the first request: the first `answered` are done
    resume = b'{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}\n'
    queued, since, full = -1, time.monotonic(), False
    while True:
        try:
            peeked = conn.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            peeked = b"\0"  # nothing queued (b"" is netwatch gone)
        if not peeked:
            return
        text = peeked.decode(errors="replace").rstrip("\0")
        position, index = 0, 0
        while (start := text.find("{", position)) >= 0:
            try:
                request, position = decoder.raw_decode(text, start)
            except ValueError:
                break
            index += 1
            if index <= answered:
                continue
            answered = index
            exec_id = request.get("id") if isinstance(request, dict) else None
            if request.get("execute") == "query-status":
                reply: dict[str, object] = {"return": {"status": "running", "running": True}}
            else:
                reply = {"return": {}}
            conn.sendall(json.dumps({**reply, "id": exec_id} if exec_id else reply).encode() + b"\n")
        if len(text) != queued:
            queued, since = len(text), time.monotonic()
        elif not full and queued > 4096 and time.monotonic() - since > 1:
            full = True
            print("full", queued, flush=True)
        conn.sendall(resume)  # netwatch looks at the run state again: one more query-status
        time.sleep(0.01)


def touch(path: str) -> None:
    """Hangs up after each greeting, and touches its socket file once a second (the file stays the same)."""
    server = _listen(path)
    server.settimeout(0.05)
    touched = time.monotonic()
    while True:
        if time.monotonic() - touched >= 1:
            os.utime(path)
            touched = time.monotonic()
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        print("accepted", flush=True)
        with contextlib.suppress(OSError):
            conn.sendall(GREETING)
        conn.close()


OWN_LOOPS = {"hop": hop, "deaf": deaf, "touch": touch}


if __name__ == "__main__":
    if sys.argv[1] in OWN_LOOPS:
        OWN_LOOPS[sys.argv[1]](*sys.argv[2:])
    else:
        serve(sys.argv[1], sys.argv[2])
