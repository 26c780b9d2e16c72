"""journald's native protocol: one datagram per entry, structured fields.

Entries too large for a datagram go in a sealed memfd passed over
SCM_RIGHTS, as journald expects. Without a journal socket, or while it
refuses, netwatch logs plain lines to stderr instead (see events.setup).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
import traceback

DEFAULT_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "netwatch"
# Seconds an entry may wait for room in journald's full queue, and how often it looks.
ROOM_WAIT = 0.05
ROOM_POLL = 0.0005

# logging level -> syslog priority
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
_F_SEAL_SHRINK, _F_SEAL_GROW, _F_SEAL_WRITE, _F_SEAL_SEAL = 0x2, 0x4, 0x8, 0x1
_F_ADD_SEALS = 1033


def socket_path() -> str:
    # A journald namespace (LogNamespace=, or a test's own journald) has its own socket.
    return os.environ.get("NETWATCH_JOURNAL_SOCKET", DEFAULT_SOCKET)


def priority(level: int) -> int:
    for threshold in sorted(_PRIORITY, reverse=True):
        if level >= threshold:
            return _PRIORITY[threshold]
    return 7


def encode(fields: dict[str, str]) -> bytes:
    """The native wire format: KEY=value lines, or KEY + length for values with newlines."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def field_name(name: str) -> str:
    """A valid journal field name: upper case, letters, digits and underscores."""
    cleaned = "".join(c if c.isalnum() else "_" for c in name.upper())
    return cleaned.lstrip("_") or "FIELD"


class JournalHandler(logging.Handler):
    """Sends records to journald with netwatch's NETWATCH_* fields.

    A journal that refuses (journald restarting, a stale socket file, a full
    queue) costs no message: the record goes to ``fallback`` (plain lines on
    stderr) and the journal is tried again with the next record. The socket
    never blocks, so a stuck journald cannot stall the event loop (an entry
    meeting a full queue waits at most ROOM_WAIT for room, and only while
    the journal answers).
    """

    def __init__(self, path: str | None = None, fallback: logging.Handler | None = None) -> None:
        super().__init__()
        self.path = path or socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.fallback = fallback or logging.StreamHandler()
        self.down: str | None = None  # why the journal refused, while it does
        self.diverted = 0

    @staticmethod
    def available(path: str | None = None) -> bool:
        return os.path.exists(path or socket_path())

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info))
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(priority(record.levelno)),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "CODE_FILE": record.pathname or "",
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName or "",
            "LOGGER": record.name,
            # journald stamps an entry when it receives it, and entries of a burst are held and written
            # together (logbuffer.py): up to a second late. This is when netwatch made it, on the clock
            # udevadm monitor and `journalctl -o short-monotonic` use.
            "NETWATCH_MONOTONIC_USEC": str(int((time.monotonic() - max(0.0, time.time() - record.created)) * 1e6)),
        }
        for attr, key in (("nw_vm", "NETWATCH_VM"), ("nw_nic", "NETWATCH_NIC"), ("nw_lower", "NETWATCH_LOWER"),
                          ("nw_event", "NETWATCH_EVENT"), ("nw_message_id", "MESSAGE_ID")):
            value = getattr(record, attr, None)
            if value:
                fields[key] = str(value)
        for name, value in (getattr(record, "nw_fields", None) or {}).items():
            if value is not None:
                fields[f"NETWATCH_{field_name(name)}"] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = encode(self.fields(record))
            self.send(payload)
        except OSError as exc:
            self._divert(record, f"the journal at {self.path} refused a message ({exc.strerror or exc})")
            return
        except Exception as exc:  # noqa: BLE001 - logging must never take the service down
            self._divert(record, f"a message could not be encoded for the journal ({exc!r})")
            return
        if self.down is not None:
            self.down = None
            self._fallback_line(f"the journal at {self.path} answers again; {self.diverted} messages went to "
                                "stderr meanwhile", logging.WARNING)
            self.diverted = 0

    def _divert(self, record: logging.LogRecord, why: str) -> None:
        if self.down is None:
            self.down = why
            self._fallback_line(f"{why}; logging plain lines to stderr until it answers", logging.WARNING)
        self.diverted += 1
        with contextlib.suppress(Exception):  # nowhere left to report to
            self.fallback.handle(record)

    def _fallback_line(self, message: str, level: int) -> None:
        record = logging.LogRecord("netwatch", level, __file__, 0, message, None, None)
        with contextlib.suppress(Exception):
            self.fallback.handle(record)

    def send(self, payload: bytes) -> None:
        try:
            self._send_one(payload)
        except BlockingIOError:
            # journald's queue is full (net.unix.max_dgram_qlen: 512 with
            # systemd's defaults, 10 without): a burst of held entries is
            # written at once (netwatch/logbuffer.py). Wait for room, briefly:
            # once the journal is known not to answer, not at all, so a stuck
            # journald costs the event loop at most ROOM_WAIT once.
            if self.down is not None:
                raise
            deadline = time.monotonic() + ROOM_WAIT
            while True:
                time.sleep(ROOM_POLL)
                try:
                    self._send_one(payload)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise

    def _send_one(self, payload: bytes) -> None:
        try:
            self.sock.sendto(payload, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_large(payload)

    def _send_large(self, payload: bytes) -> None:
        fd = os.memfd_create("netwatch-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            import fcntl
            fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE | _F_SEAL_SEAL)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        self.fallback.close()
        super().close()
