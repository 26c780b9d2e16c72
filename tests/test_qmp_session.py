"""VmSession against a fake QMP server: only for what a real QEMU will not do on demand."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from tenacity import wait_fixed

from netwatch.errors import QmpError
from netwatch.qemu.qmp import VmSession
from netwatch.sandbox.testbed import until

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}

Behaviour = Callable[[dict[str, object], asyncio.StreamWriter], Awaitable[None]]


async def fake_qemu(path: str, behaviour: Behaviour, run_state: str | None = "running",
                    sock: socket.socket | None = None) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\n")
        decoder, buffer = json.JSONDecoder(), ""
        try:
            # qemu.qmp sends no newline after a command: split the stream by JSON values.
            while chunk := await reader.read(65536):
                buffer += chunk.decode()
                while buffer.strip():
                    try:
                        msg, end = decoder.raw_decode(buffer.lstrip())
                    except ValueError:
                        break
                    buffer = buffer.lstrip()[end:]
                    if msg["execute"] == "qmp_capabilities":
                        writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\n")
                    elif msg["execute"] == "query-status" and run_state is not None:
                        answer = {"status": run_state, "running": run_state == "running", "singlestep": False}
                        writer.write(json.dumps({"return": answer, "id": msg.get("id")}).encode() + b"\n")
                    else:
                        await behaviour(msg, writer)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
    if sock is not None:  # bound already: listens from now on
        return await asyncio.start_unix_server(serve, sock=sock)
    return await asyncio.start_unix_server(serve, path)


async def with_session(tmp_path: Path, behaviour: Behaviour,
                       body: Callable[[VmSession], Awaitable[None]]) -> None:
    path = str(tmp_path / "fake.qmp")
    server = await fake_qemu(path, behaviour)
    changes = asyncio.Event()
    async with VmSession("fake", path, changes.set, timeout=0.3, connect_wait=wait_fixed(0.05)) as session:
        async with asyncio.timeout(5):
            while not session.connected:
                await changes.wait()
                changes.clear()
        await body(session)
    server.close()


def test_command_that_never_answers_times_out(tmp_path: Path) -> None:
    async def hang(msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
        return

    async def body(session: VmSession) -> None:
        with pytest.raises(QmpError, match=r"set_link got no answer within 0\.3 s"):
            await session.execute("set_link", {"name": "net0", "up": True})
    asyncio.run(with_session(tmp_path, hang, body))


def test_error_reply_is_a_qmp_error(tmp_path: Path) -> None:
    async def refuse(msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
        error = {"class": "GenericError", "desc": "Device 'nw-net0-tap9' not found"}
        writer.write(json.dumps({"error": error, "id": msg.get("id")}).encode() + b"\n")

    async def body(session: VmSession) -> None:
        with pytest.raises(QmpError, match="netdev_del failed: Device 'nw-net0-tap9' not found"):
            await session.execute("netdev_del", {"id": "nw-net0-tap9"})
    asyncio.run(with_session(tmp_path, refuse, body))


def test_garbage_reply_drops_the_session_and_it_reconnects(tmp_path: Path) -> None:
    replies = iter([b"this is not json\n"])

    async def garbage_once(msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
        reply = next(replies, None)
        writer.write(reply or json.dumps({"return": "fine", "id": msg.get("id")}).encode() + b"\n")

    async def body(session: VmSession) -> None:
        first = session.session
        with pytest.raises(QmpError):
            await session.execute("query-name")
        async with asyncio.timeout(5):
            while not (session.connected and session.session > first):
                await asyncio.sleep(0.01)
        assert await session.execute("query-name") == "fine"
    asyncio.run(with_session(tmp_path, garbage_once, body))


def test_absent_socket_is_waiting_not_an_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with VmSession("ghost", str(tmp_path / "none.qmp"), lambda: None, timeout=0.2,
                             connect_wait=wait_fixed(0.01)) as session:
            await asyncio.sleep(0.1)
            assert not session.connected
            with pytest.raises(QmpError, match="not connected"):
                await session.execute("query-status")
    asyncio.run(main())


def test_a_socket_appearing_ends_the_reconnect_delay(tmp_path: Path) -> None:
    """A QEMU that starts while netwatch waits out its backoff is found at once, not after the delay."""
    import socket as socket_mod
    import time

    from netwatch.qemu.sockwatch import SocketWatch

    async def main() -> float:
        watch = SocketWatch(str(tmp_path / "vm.qmp"))
        watch.start()
        try:
            loop = asyncio.get_running_loop()
            server = socket_mod.socket(socket_mod.AF_UNIX)
            loop.call_later(0.2, server.bind, str(tmp_path / "vm.qmp"))
            loop.call_later(0.1, (tmp_path / "other").touch)  # another name: no wake-up
            started = time.monotonic()
            await watch.sleep(30)
            server.close()
            return time.monotonic() - started
        finally:
            watch.close()
    # Without the watch this sleeps 30 s; the deadline is far from any timing claim.
    assert asyncio.run(asyncio.wait_for(main(), 10)) >= 0.2


def test_a_socket_bound_before_it_listens_is_connected_soon_after(tmp_path: Path) -> None:
    """QEMU binds (the file appears) a moment before it listens: the refused first try is retried at once.

    Found by bench/migrate.py: a migration target's QEMU waited out the
    backoff (up to 2 s) and its guest resumed before its NIC had a backend.
    """
    async def main() -> None:
        path = str(tmp_path / "vm.qmp")
        changes = asyncio.Event()
        # A backoff of 30 s: only the socket's appearance can end it in time.
        async with VmSession("late", path, changes.set, timeout=0.5, connect_wait=wait_fixed(30)) as session:
            await asyncio.sleep(0.1)  # the first try failed (no file): netwatch waits out its backoff
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)  # appears now, refuses connections until it listens
            await asyncio.sleep(0.2)
            server = await fake_qemu(path, run_state_server(["running"], []), run_state=None, sock=listener)
            await until(lambda: session.connected, "a connection", timeout=10)
            server.close()
    asyncio.run(main())


def run_state_server(states: list[str], events: list[bytes]) -> Behaviour:
    """A fake QEMU whose query-status answers states[0] (the test changes it), and which sends ``events``."""
    async def behave(msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
        if msg["execute"] == "query-status":
            answer = {"status": states[0], "running": states[0] == "running", "singlestep": False}
            writer.write(json.dumps({"return": answer, "id": msg.get("id")}).encode() + b"\n")
        else:
            writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\n")
        while events:
            writer.write(events.pop(0))
    return behave


def test_run_state_follows_events_and_polls_what_comes_without_one(tmp_path: Path) -> None:
    """A source migrating with the events capability off: STOP, then postmigrate with no event at all."""
    states = ["running"]
    stop = b'{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}\n'
    pending: list[bytes] = []

    async def main() -> None:
        path = str(tmp_path / "fake.qmp")
        server = await fake_qemu(path, run_state_server(states, pending), run_state=None)
        async with VmSession("fake", path, lambda: None, timeout=0.5, connect_wait=wait_fixed(0.05)) as session:
            session.runstate.fast = 0.01
            await until(lambda: session.run_state == "running", "connection")
            states[0] = "finish-migrate"
            pending.append(stop)
            await session.execute("query-name")  # the fake sends queued events after answers
            await until(lambda: session.run_state == "finish-migrate", "STOP followed")
            states[0] = "postmigrate"  # no event: QEMU sends none for this
            await until(lambda: session.run_state == "postmigrate", "postmigrate seen by polling")
        server.close()
    asyncio.run(main())


def test_an_incoming_qemu_is_seen_before_any_nic_acts(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "fake.qmp")
        states = ["inmigrate"]
        server = await fake_qemu(path, run_state_server(states, []), run_state=None)
        seen: list[str | None] = []
        session = VmSession("fake", path, lambda: seen.append(session.run_state), timeout=0.5,
                            connect_wait=wait_fixed(0.05))
        async with session:
            await until(lambda: session.connected, "connection")
            assert seen and seen[0] == "inmigrate" and session.runstate.incoming
        server.close()
    asyncio.run(main())


@pytest.mark.parametrize("answer", [{"status": "../../etc/passwd"}, {"status": 7}, "running", {}])
def test_a_bogus_run_state_is_refused_with_a_sentence(answer: object) -> None:
    from netwatch.qemu.runstate import parse_status
    with pytest.raises(QmpError, match=r"query-status answered .*, not a run state"):
        parse_status(answer)
