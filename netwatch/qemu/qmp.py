"""Actions out: one QMP session per VM, kept connected with backoff.

qemu.qmp has no timeouts and no reconnect; both live here. A VM whose
socket is absent is simply not connected yet. Every new connection gets a
new session number so that NICs know to re-read QEMU's view (QEMU may have
restarted, or netwatch may have missed what happened).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.message import Message
from qemu.qmp.protocol import SocketAddrT
from tenacity.wait import wait_base

from netwatch import events, tasks
from netwatch.errors import QmpError
from netwatch.qemu.announce import AnnounceGate
from netwatch.qemu.deletions import DeviceDeletions
from netwatch.qemu.peer import Identity, Peer, QemuClaims
from netwatch.qemu.process import QemuProcess
from netwatch.qemu.redial import NoListener, PeerFailed, Redial
from netwatch.qemu.runstate import POSTMIGRATE, RUN_EVENTS, RunStateWatch, parse_status
from netwatch.untrusted import clean

log = logging.getLogger(__name__)

# " \ nw-net0-up3: nw-net0-tap3: index=0,type=tap,fd=12" under "hub 0"
_INFO_HUB = re.compile(r"^hub (\d+)$")
_INFO_PORT = re.compile(r"^ \\ (\S+): (\S+): index=\d+,type=(\w+)")
# A netdev on no hub: "nw-net0-tap4: index=0,type=tap,fd=12"
_INFO_TOP = re.compile(r"^(\S+): index=\d+,type=(\w+)")
# Its peer, on the next line: " \ nw-net0-tap4: index=0,type=tap,fd=12"
_INFO_PEER = re.compile(r"^ \\ (\S+): index=\d+,type=(\w+)")
_INFO_MAC = re.compile(r"macaddr=([0-9a-fA-F:]{17})")


@dataclass(frozen=True)
class HubPort:
    hub: int
    port: str
    peer: str
    peer_type: str


@dataclass(frozen=True)
class NetworkInfo:
    ports: tuple[HubPort, ...]
    netdevs: frozenset[str]
    # A net client on no hub -> the client it is peered with (a NIC -> its tap netdev).
    peers: tuple[tuple[str, str], ...] = ()
    # A NIC's device id -> its MAC ("macaddr=" of a type=nic client).
    macs: tuple[tuple[str, str], ...] = ()

    def peer_of(self, name: str) -> str | None:
        return next((peer for client, peer in self.peers if client == name), None)

    def mac_of(self, name: str) -> str | None:
        return next((mac for client, mac in self.macs if client == name), None)


def parse_info_network(text: str) -> NetworkInfo:
    """Hub ports and every net client named by HMP ``info network``."""
    ports: list[HubPort] = []
    names: set[str] = set()
    peers: list[tuple[str, str]] = []
    macs: list[tuple[str, str]] = []
    hub: int | None = None
    top: str | None = None
    for line in text.splitlines():
        if match := _INFO_HUB.match(line):
            hub, top = int(match.group(1)), None
        elif match := _INFO_PORT.match(line):
            names.update((match.group(1), match.group(2)))
            if hub is not None:
                ports.append(HubPort(hub, match.group(1), match.group(2), match.group(3)))
        elif match := _INFO_PEER.match(line):
            names.add(match.group(1))
            if top is not None:
                peers.append((top, match.group(1)))
        elif match := _INFO_TOP.match(line):
            hub, top = None, match.group(1)
            names.add(top)
            if match.group(2) == "nic" and (mac := _INFO_MAC.search(line)):
                macs.append((top, mac.group(1).lower()))
    return NetworkInfo(tuple(ports), frozenset(names), tuple(peers), tuple(macs))


# What one QEMU may send: a line longer than READ_LIMIT, or more than
# BUDGET_MESSAGES lines or BUDGET_BYTES bytes within BUDGET_WINDOW seconds,
# ends its session (and the reconnect backoff grows). netwatch's largest
# answer is "info network", about 100 bytes per net client; a flood from a
# QEMU a guest has taken over must not cost the other VMs their event loop.
READ_LIMIT = 256 * 1024
BUDGET_WINDOW = 1.0
BUDGET_MESSAGES = 400
BUDGET_BYTES = 2 * 1024 * 1024
# What netwatch keeps for a QEMU that does not read: past this many unsent
# bytes the session ends (commands are a few hundred bytes; the kernel's
# socket buffer holds about 280 of them before anything stays here).
WRITE_LIMIT = 256 * 1024
# Seconds a disconnect may wait for QEMU to read what is left to send:
# then the connection is cut without it (a peer that stopped reading held
# a reload, and the service's stop, for good).
DISCONNECT_TIMEOUT = 1.0


class PeerFlood(QmpError):
    """QEMU sent more than a QMP session may: the session is dropped."""


class PeerStalled(QmpError):
    """QEMU stopped reading what netwatch sends: the session is dropped."""


class LeanClient(QMPClient):
    """qemu.qmp's client with a bounded read and a per-session budget, and
    without pretty-printing every message for a debug log (the base hooks
    format each message as indented JSON even when debug logging is off: a
    tenth of netwatch's CPU time when 256 NICs reattach).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name, readbuflen=READ_LIMIT)
        self._window_start = time.monotonic()
        self._window_messages = 0
        self._window_bytes = 0
        # Whether the socket accepted the connection: a failure after that is the peer's.
        self.reached = False

    async def _do_connect(self, address: SocketAddrT | socket.socket, ssl: SSLContext | None = None) -> None:
        await super()._do_connect(address, ssl)
        self.reached = True

    def _do_send(self, msg: Message) -> None:
        writer = self._writer
        unsent = writer.transport.get_write_buffer_size() if writer is not None else 0
        if unsent > WRITE_LIMIT:
            raise PeerStalled(f"QEMU has not read the last {unsent} bytes netwatch sent")
        super()._do_send(msg)

    async def _readline(self) -> bytes:
        # Checked before a message is parsed: past the budget nothing more is.
        line = await super()._readline()
        now = time.monotonic()
        if now - self._window_start > BUDGET_WINDOW:
            self._window_start, self._window_messages, self._window_bytes = now, 0, 0
        self._window_messages += 1
        self._window_bytes += len(line)
        if self._window_messages > BUDGET_MESSAGES or self._window_bytes > BUDGET_BYTES:
            raise PeerFlood(f"QEMU sent more than {BUDGET_MESSAGES} messages or {BUDGET_BYTES} bytes "
                            f"within {BUDGET_WINDOW:g} s")
        return line

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg


# Seconds a QMP session must last before a reconnect is immediate again.
STABLE_SESSION = 5.0


class VmSession:
    """The QMP connection to one VM; an async context manager owning its task.

    The QEMU at the other end (which process, whether it runs, its claim)
    is ``process``'s (process.py); when the socket is tried again is
    ``redial``'s (redial.py).
    """

    def __init__(self, name: str, path: str, on_change: Callable[[], None], timeout: float = 5.0,
                 connect_wait: wait_base | None = None, short_session_wait: wait_base | None = None,
                 identity: Identity | None = None, peers: QemuClaims | None = None,
                 recorded: Callable[[], list[tuple[int, int | None]]] | None = None, machine: str = "pc",
                 announce_gate: AnnounceGate | None = None) -> None:
        self.name = name
        # QEMU's machine type as the config says ("pc", "q35"): where hotplug can go.
        self.machine = machine
        # Shared by all VMs: announcements wait for the host's reattaches to quiet down.
        self._own_gate = announce_gate is None
        self.announce_gate = announce_gate or AnnounceGate()
        self.identity = identity or Identity()
        # The QEMU last connected (its exit is a change too), and which VM each QEMU is.
        self.process = QemuProcess(name, on_change, peers, recorded)
        # Why the last peer was refused (None: it was not).
        self.refused: str | None = None
        self.redial = Redial(name, path, connect_wait, short_session_wait)
        self.path = path
        self.on_change = on_change
        self.timeout = timeout
        self.session = 0
        # Why the last connection attempt failed, for status while not connected.
        self.last_error: str | None = None
        self._client: QMPClient | None = None
        self._fd_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._connected_at = 0.0
        # device id -> futures told when QEMU reports it deleted (DEVICE_DELETED).
        self._deleted = DeviceDeletions()
        # Set once the first connection attempt is over, whatever its outcome.
        self.first_attempt = asyncio.Event()
        self.runstate = RunStateWatch(name, self._query_status, on_change)
        # QMP sessions that failed and commands QEMU never answered (a metric).
        self.errors = 0

    @property
    def run_state(self) -> str | None:
        """QEMU's run state ("running", "paused", "inmigrate", "postmigrate", ...); None while not connected."""
        return self.runstate.state if self.connected else None

    # netwatch's own monitor: QMP commands, the guest's carrier, hot-add.
    monitored = True

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    @property
    def present(self) -> bool:
        """QEMU runs as far as netwatch can act on it: its monitor is connected."""
        return self.connected

    @property
    def pid(self) -> int | None:
        """The QEMU last connected (it may have exited since)."""
        return self.process.pid

    @property
    def pid_start(self) -> int | None:
        return self.process.start

    def qemu_alive(self) -> bool:
        """Whether the QEMU last connected still runs (False if unknown)."""
        return self.process.alive()

    async def __aenter__(self) -> VmSession:
        self.redial.start()
        self._task = asyncio.create_task(self._run(), name=f"netwatch-qmp-{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await tasks.stop([self._task])
        if self._own_gate:
            await self.announce_gate.close()
        await self._drop()
        self.process.unwatch()
        self.redial.close()

    async def _run(self) -> None:
        # Supervised: whatever ends a session (QEMU, qemu.qmp, or a bug here)
        # is reported and followed by a new attempt, never by silence. A peer
        # that keeps failing (hanging up at its greeting, refused, or gone
        # soon after connecting) meets a growing delay, which only a session
        # that lasted resets and nothing but a new socket cuts short.
        failures, delay = 0, 0.0
        shortcut = True  # whether a new socket may still end this streak's delay early
        while True:
            if failures:
                shortcut = await self.redial.back_off(delay, shortcut)
            session = self.session
            failed: Exception | None = None
            try:
                await self._session()
            except Exception as exc:
                failed = exc
                self.errors += 1
                log.debug("%s: QMP session failed", self.name, exc_info=True)
                await self._drop()
                self.first_attempt.set()
            # A QEMU that sent its guest away and was ended is no crash loop,
            # however short its life: the next one (the guest coming back,
            # as migrations ping-pong) is connected at once.
            # Timed from the session's start, not the attempt's: a peer that
            # accepts and never greets fails after the QMP timeout, and it
            # had no session at all.
            connected = self.session != session
            migrated = connected and self.runstate.last == POSTMIGRATE
            lasted = connected and (time.monotonic() - self._connected_at >= STABLE_SESSION or migrated)
            failures = 0 if lasted else failures + 1
            shortcut = shortcut or lasted
            delay = self.redial.delay(failures) if failures else 0.0
            if failed is not None:
                after = f"; next try in {delay:.3g} s" if failures else ""
                events.emit("error", f"QMP session on {self.path} failed: {clean(failed)}{after}", vm=self.name)
                self.on_change()

    async def _session(self) -> None:
        client = await self._connect()
        peer = _peer(client)
        refusal = await self._refusal(client, peer)
        if refusal is None and peer is not None and (other := self.process.other_vm(peer.pid)):
            # Claimed for another VM while this one waited for QEMU (query-uuid).
            refusal = f"pid {peer.pid} is the QEMU of VM '{other}'"
        if refusal is not None:
            await _quiet_disconnect(client)
            if refusal != self.refused:
                events.emit("error", f"refusing the QMP peer on {self.path}"
                            f"{f' (pid {peer.pid})' if peer else ''}: {refusal}; nothing of the VM's is touched",
                            vm=self.name)
            self.refused = refusal
            self.first_attempt.set()
            self.on_change()
            return
        assert peer is not None
        self.refused = None
        # Claimed in the same step as the check (no await between): two VMs'
        # sessions to one QEMU must not both pass it. The claim outlives the
        # session: it ends when the process does.
        self.process.claim(peer.pid)
        # Registered before the first query-status: a change after it is not missed.
        listener = EventListener(("DEVICE_DELETED", *RUN_EVENTS))
        client.register_listener(listener)
        try:
            # Read before any NIC acts: an incoming QEMU's NICs are configured differently.
            run_state = await self._ask_status(client)
        except BaseException:
            client.remove_listener(listener)
            await _quiet_disconnect(client)
            self.first_attempt.set()  # NICs wait for a first outcome, not for a success
            raise
        self.runstate.start(run_state, peer.pid)
        try:
            self._client = client
            self.session += 1
            self._connected_at = time.monotonic()
            self.process.follow(peer.pid)
            events.emit("vm-connected", f"connected to QEMU (pid {self.pid}, {run_state}) on {self.path}", vm=self.name,
                        run_state=run_state)
            self.first_attempt.set()
            self.on_change()
            owned = [asyncio.create_task(self._events(listener), name=f"netwatch-qmp-events-{self.name}"),
                     asyncio.create_task(self.runstate.run(), name=f"netwatch-runstate-{self.name}"),
                     asyncio.create_task(_until_closed(client), name=f"netwatch-qmp-closed-{self.name}")]
            try:
                done, _pending = await asyncio.wait(owned, return_when=asyncio.FIRST_COMPLETED)
                for task in owned[:2]:
                    if task in done:
                        task.result()  # a failure ends the session, reported by _run
                        raise QmpError(f"{task.get_name()} ended")
            finally:
                await tasks.stop(owned)
                client.remove_listener(listener)
        finally:
            self.runstate.gone()
            ended = await self._drop()
            self._deleted.fail_all(f"QEMU of {self.name} went away before it deleted the device")
        why = f": {clean(ended)}" if ended is not None and not isinstance(ended, EOFError) else ""
        events.emit("vm-gone", f"QMP connection to QEMU closed{why}", vm=self.name)
        self.on_change()

    async def _ask_status(self, client: QMPClient) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                return parse_status(await client.execute("query-status"))
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            raise QmpError(f"query-status failed: {clean(exc) or type(exc).__name__}") from exc

    async def _query_status(self) -> str:
        return parse_status(await self.execute("query-status"))

    async def _events(self, listener: EventListener) -> None:
        # Drained as they come (the listener's queue has no bound); only
        # awaited devices are remembered, and a run-state event only asks
        # for query-status. The event's data is QEMU's: a device id is
        # compared, never used.
        async for event in listener:
            if event.get("event") in RUN_EVENTS:
                self.runstate.poke()
                continue
            data = event.get("data")
            device = data.get("device") if isinstance(data, dict) else None
            if isinstance(device, str):
                self._deleted.deleted(device)

    def expect_deleted(self, device: str) -> asyncio.Future[None]:
        """A future done when QEMU reports ``device`` deleted; ask before the device_del."""
        return self._deleted.expect(device)

    def forget_deleted(self, device: str, waiter: asyncio.Future[None]) -> None:
        self._deleted.forget(device, waiter)

    async def _refusal(self, client: QMPClient, peer: Peer | None) -> str | None:
        """Why ``peer`` is not provably this VM's QEMU, or None (peer.py has the reasoning)."""
        problem = self.process.refusal(peer, self.path, self.identity)
        if problem is not None or self.identity.uuid is None:
            return problem
        try:
            async with asyncio.timeout(self.timeout):
                answer = await client.execute("query-uuid")
        except Exception as exc:  # noqa: BLE001 - any failure here is a refusal
            return f"query-uuid failed: {clean(exc) or type(exc).__name__}"
        uuid = answer.get("UUID") if isinstance(answer, dict) else None
        if not isinstance(uuid, str) or uuid.lower() != self.identity.uuid:
            return f"its UUID is {clean(uuid, 40)}, not {self.identity.uuid}"
        return None

    async def _connect(self) -> QMPClient:
        # A peer that accepted and then failed is _run's to retry, after the growing delay.
        return await self.redial.connect(self._connect_once, self.first_attempt.set)

    async def _connect_once(self) -> QMPClient:
        self.redial.trying()
        client = LeanClient(self.name)
        # The default listener keeps every event it accepts forever (and
        # cannot be removed); netwatch needs no events, so it accepts none.
        client.events.event_filter = lambda _event: False
        try:
            async with asyncio.timeout(self.timeout):
                await client.connect(self.path)
        except Exception as exc:
            # Not only ConnectError/OSError: a peer that hangs up right after
            # its greeting makes qemu.qmp's connect() raise AssertionError.
            await _quiet_disconnect(client)
            self.last_error = f"cannot connect to {self.path}: {clean(exc) or type(exc).__name__}"
            raise (PeerFailed if client.reached else NoListener)(self.last_error) from exc
        self.last_error = None
        return client

    async def _drop(self) -> BaseException | None:
        # The QEMU's claim stays (peer.py's QemuClaims): it is this VM's until it exits.
        client, self._client = self._client, None
        return await _quiet_disconnect(client) if client is not None else None

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        client = self._client
        if client is None or client.runstate != Runstate.RUNNING:
            raise QmpError(f"QEMU of {self.name} is not connected")
        try:
            async with asyncio.timeout(self.timeout):
                return await client.execute(command, arguments)
        except TimeoutError as exc:
            self.errors += 1
            raise QmpError(f"{command} got no answer within {self.timeout:g} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            if not isinstance(exc, ExecuteError):  # QEMU's own "no" (an absent device, say) is an answer
                self.errors += 1
            # QEMU's words: a guest that owns QEMU chooses them.
            raise QmpError(f"{command} failed: {clean(exc)}") from exc

    async def pass_fd(self, fd: int, fdname: str) -> None:
        """Hand ``fd`` to QEMU under ``fdname`` (getfd over SCM_RIGHTS)."""
        # QEMU keeps only the last fd received, so fd-send and getfd go together.
        async with self._fd_lock:
            client = self._client
            if client is None or client.runstate != Runstate.RUNNING:
                raise QmpError(f"QEMU of {self.name} is not connected")
            try:
                client.send_fd_scm(fd)
            except (QMPError, OSError) as exc:
                raise QmpError(f"cannot send a file descriptor to QEMU: {exc}") from exc
            await self.execute("getfd", {"fdname": fdname})

    def announce(self, nic: str) -> None:
        """Have QEMU announce ``nic``'s MAC (RARP) once the host's reattaches quiet down (netwatch/qemu/announce.py)."""
        self.announce_gate.request(self.announce_now, nic)

    async def announce_now(self, nics: list[str]) -> None:
        try:
            await self.execute("announce-self", {"initial": 50, "max": 550, "rounds": 3, "step": 100,
                                                 "interfaces": nics})
        except QmpError as exc:
            log.warning("%s: announce-self for %s failed: %s", self.name, ", ".join(nics), exc)

    async def network(self) -> NetworkInfo:
        text = await self.execute("human-monitor-command", {"command-line": "info network"})
        return parse_info_network(str(text))


async def _until_closed(client: QMPClient) -> None:
    while client.runstate == Runstate.RUNNING:
        await client.runstate_changed()


async def _quiet_disconnect(client: QMPClient) -> Exception | None:
    """Disconnect, within bounds; return what ended the session (EOFError when QEMU went away), if anything did.

    qemu.qmp's disconnect waits until QEMU has read everything sent, with
    no bound: a peer that stops reading held it (and with it a reload, and
    the service's stop) for good. Nobody waits for those bytes any more, so
    what QEMU has not read is dropped with the connection.
    """
    if _unsent(client):
        _abort(client)
    # A task of its own, never cancelled halfway through qemu.qmp's teardown:
    # once the connection is cut it ends by itself.
    closing = asyncio.ensure_future(client.disconnect())
    closing.add_done_callback(_retrieved)
    try:
        done, _ = await asyncio.wait([closing], timeout=DISCONNECT_TIMEOUT)
        if not done:
            _abort(client)  # written meanwhile and not read: the close no longer waits for QEMU
            done, _ = await asyncio.wait([closing], timeout=DISCONNECT_TIMEOUT)
    except asyncio.CancelledError:
        _abort(client)  # nothing of the connection outlives its owner's task
        raise
    if not done:
        closing.cancel()
        return QmpError(f"the QMP connection did not close within {2 * DISCONNECT_TIMEOUT:g} s")
    exc = None if closing.cancelled() else closing.exception()
    if exc is not None:
        log.debug("QMP disconnect: %r", exc)
    return exc if isinstance(exc, Exception) else None


def _retrieved(task: asyncio.Future[None]) -> None:
    # Reported by _quiet_disconnect when it still waits; not again at garbage collection.
    if not task.cancelled():
        task.exception()


def _transport(client: QMPClient) -> asyncio.WriteTransport | None:
    writer = getattr(client, "_writer", None)
    return writer.transport if isinstance(writer, asyncio.StreamWriter) else None


def _unsent(client: QMPClient) -> int:
    transport = _transport(client)
    return transport.get_write_buffer_size() if transport is not None else 0


def _abort(client: QMPClient) -> None:
    transport = _transport(client)
    if transport is not None:
        transport.abort()


def _peer(client: QMPClient) -> Peer | None:
    """The peer's pid and uid as the kernel saw them when it connected: not the peer's to forge."""
    writer = getattr(client, "_writer", None)
    sock = writer.transport.get_extra_info("socket") if writer is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return Peer(int(pid), int(uid)) if pid else None
