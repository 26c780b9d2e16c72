"""The control socket: line-delimited JSON requests from the CLI.

One request per line, one answer per line: ``{"cmd": "status"}`` ->
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
Requests are bounded in size and time; a bad one harms nothing else.
A client that does not read its answers is dropped, and one that holds a
slot while waiting on its peer gives it up to a newcomer when all are taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from netwatch import logbuffer, tasks
from netwatch.errors import BadRequest, ConfigError, ControlError, NetwatchError, ServiceNotRunning
from netwatch.untrusted import clean

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0
# Idle clients cost a file descriptor each: past this many, a newcomer takes
# the slot of the client that has waited longest on its peer, and is refused
# at once only while netwatch is busy answering all of them, so other users
# can neither starve netwatch of fds nor lock root out.
MAX_CLIENTS = 32
# How long an answer may wait for its client to read it (the CLI reads at
# once): a client that pipelines requests and never reads is dropped, not
# waited on for good with its slot held.
SEND_TIMEOUT = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


class ControlServer:
    """Serves requests on ``state_dir/control.sock`` (mode 0600, owner only)."""

    def __init__(self, state_dir: str, handlers: dict[str, Handler], group: str | None = None,
                 root_only: set[str] | frozenset[str] = frozenset()) -> None:
        self.path = socket_path(state_dir)
        self.group = group
        self.handlers = handlers
        # Commands only root may send (libvirt's hook runs as root; control_group members only look and steer).
        self.root_only = frozenset(root_only)
        self._server: asyncio.Server | None = None
        # Each client's task -> since when it waits on its peer (for a request,
        # or for room to write its answer); None while netwatch answers it.
        self._clients: dict[asyncio.Task[None], float | None] = {}

    async def __aenter__(self) -> ControlServer:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        try:
            if self.group is None:
                os.chmod(self.path, 0o600)
            else:
                grant_group(self.path, self.group)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        await tasks.stop(list(self._clients))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        # Who may not use netwatch is turned away before taking a client slot.
        creds = _peer_creds(writer)
        refusal = ("permission denied" if not peer_allowed(creds, self.group) else
                   f"too many control connections ({MAX_CLIENTS})" if not self._free_slot() else None)
        if refusal is not None:
            with contextlib.suppress(OSError, TimeoutError):
                await _send(writer, {"ok": False, "error": refusal})
            _hang_up(writer)
            return
        self._clients[task] = time.monotonic()
        # drain() returns once the answer is all with the kernel, not merely
        # below the default 64 KiB high-water mark: what is left unsent at
        # the end was refused by a client that does not read.
        writer.transport.set_write_buffer_limits(high=0)
        try:
            while True:
                self._clients[task] = time.monotonic()
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        line = await reader.readline()
                except TimeoutError:
                    await self._reply(task, writer, {"ok": False, "error": "request timed out"})
                    return
                except (asyncio.LimitOverrunError, ValueError):
                    await self._reply(task, writer,
                                      {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
                    return
                if not line:
                    return
                if not line.endswith(b"\n"):
                    await self._reply(task, writer, {"ok": False, "error": "incomplete request (no newline)"})
                    return
                self._clients[task] = None
                await self._reply(task, writer, await self._answer(line, creds[0]))
        except TimeoutError:
            log.debug("control client dropped: it read no answer for %g s", SEND_TIMEOUT)
        except (ConnectionError, OSError) as exc:
            log.debug("control client went away: %s", exc)
        finally:
            self._clients.pop(task, None)
            _hang_up(writer)

    def _free_slot(self) -> bool:
        """Whether a new client may have a slot, after taking one from whoever waited longest on its peer.

        Clients that hold their slots without reading answers or sending
        requests would otherwise lock root out of ``status`` for as long as
        they keep reconnecting; one that netwatch is answering keeps its slot.
        """
        if len(self._clients) < MAX_CLIENTS:
            return True
        waiting = [(since, task) for task, since in self._clients.items() if since is not None]
        if not waiting:
            return False
        _since, oldest = min(waiting, key=lambda item: item[0])
        # Its finally closes the connection; the slot is free from now on.
        del self._clients[oldest]
        oldest.cancel()
        log.debug("control client dropped: all %d slots taken and it waited longest on its peer", MAX_CLIENTS)
        return True

    async def _reply(self, task: asyncio.Task[None], writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        if task in self._clients:
            self._clients[task] = time.monotonic()
        await _send(writer, answer)

    async def _answer(self, line: bytes, uid: int) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": "request must be an object with a string 'cmd'"}
        handler = self.handlers.get(request["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command '{clean(request['cmd'], 40)}'"}
        if request["cmd"] in self.root_only and uid != 0:
            return {"ok": False, "error": f"permission denied: only root may send {request['cmd']}"}
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                result = await handler(request)
            return {"ok": True, "result": result}
        except ConfigError as exc:
            return {"ok": False, "error": str(exc), "kind": "input", "problems": exc.problems}
        except NetwatchError as exc:
            return {"ok": False, "error": str(exc), "kind": "input" if isinstance(exc, BadRequest) else "runtime"}
        except TimeoutError:
            return {"ok": False, "error": f"the service did not answer within {REQUEST_TIMEOUT:g} s "
                    "(a reload goes on in the background)"}
        except Exception:  # a bug answers as an error; the service serves on
            log.exception("control request %s failed", clean(request["cmd"], 40))
            return {"ok": False, "error": "internal error (the journal has the details)"}


def grant_group(path: str, group: str) -> None:
    """Let members of ``group`` use the socket at ``path`` (read and write).

    A POSIX ACL needs no privilege beyond owning the file, so the hardened
    unit can do without CAP_CHOWN (which would cost it its @privileged
    system call filter). Where the filesystem has no ACLs, chown instead.
    """
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ControlError(f"cannot open the control socket to group '{group}': there is no such group") from exc
    try:
        os.setxattr(path, "system.posix_acl_access", acl_xattr(gid))
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise ControlError(f"cannot open the control socket {path} to group '{group}' "
                               f"(setting its ACL failed: {exc.strerror or exc})") from exc
    try:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    except OSError as exc:
        raise ControlError(f"cannot open the control socket {path} to group '{group}': the filesystem has no "
                           f"ACLs and chown failed ({exc.strerror or exc})") from exc


def acl_xattr(gid: int) -> bytes:
    """``system.posix_acl_access`` for u::rw-, g::---, g:<gid>:rw-, m::rw-, o::---."""
    # The kernel's posix_acl_xattr format: version 2, then (tag, perm, id)
    # entries sorted by tag; ids other than the named group's are unused.
    unused = 0xFFFFFFFF
    entries = ((0x01, 6, unused), (0x04, 0, unused), (0x08, 6, gid), (0x10, 6, unused), (0x20, 0, unused))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


def _peer_creds(writer: asyncio.StreamWriter) -> tuple[int, int]:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    return uid, gid


def peer_allowed(creds: tuple[int, int], group: str | None) -> bool:
    """root, netwatch's own user, and (when configured) members of ``group``."""
    uid, gid = creds
    if uid in (0, os.getuid()):
        return True
    if group is None:
        return False
    try:
        entry = grp.getgrnam(group)
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return gid == entry.gr_gid or user in entry.gr_mem


async def _send(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
    # What the request did is in the journal by the time its answer arrives.
    logbuffer.flush()
    writer.write(json.dumps(answer).encode() + b"\n")
    async with asyncio.timeout(SEND_TIMEOUT):
        await writer.drain()


def _hang_up(writer: asyncio.StreamWriter) -> None:
    # close() would keep the connection (and its fd) until the unsent rest
    # is read, which a client that does not read never does.
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


def request(state_dir: str, cmd: str, timeout: float = 15.0, **arguments: Any) -> Any:
    """Send one request to the running service and return its result."""
    path = socket_path(state_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ServiceNotRunning(f"netwatch is not running (no service on {path})") from exc
        except OSError as exc:
            raise ControlError(f"cannot reach netwatch on {path}: {exc.strerror or exc}") from exc
        try:
            sock.sendall(json.dumps({"cmd": cmd, **arguments}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ControlError(f"netwatch did not answer on {path}: {exc.strerror or exc}") from exc
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"netwatch sent an unreadable answer on {path}") from exc
    if not isinstance(answer, dict):
        raise ControlError(f"netwatch sent an unreadable answer on {path}")
    if not answer.get("ok"):
        problems = answer.get("problems")
        raise ControlError(str(answer.get("error", "request failed")), bad_request=answer.get("kind") == "input",
                           problems=[str(p) for p in problems] if isinstance(problems, list) else None)
    return answer.get("result")
