"""A QMP peer that stops reading (issue 21 item 6): every wait on it has a bound.

The peer (tests/hostile_peer.py "deaf") completes the handshake and never
reads again; it answers each command by peeking at it and keeps netwatch
asking query-status until netwatch's socket holds all it can and the rest
waits in netwatch. Before the fix, closing such a session waited for the
peer to read, for good: a reload that removed its VM never finished, and
SIGTERM did not stop netwatch.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tenacity import wait_fixed

from netwatch.qemu import qmp
from netwatch.qemu.qmp import VmSession
from netwatch.sandbox.testbed import Netwatch, until

from .peer_process import PeerProcess, hostile
from .world import World, run_netwatch

MAC_1, MAC_2 = "52:54:00:de:af:01", "52:54:00:de:af:02"


async def close_within(session: VmSession, peer: PeerProcess, seconds: float = 10) -> None:
    """Close ``session``; fail if that takes more than ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            await session.__aexit__(None, None, None)
    except TimeoutError:
        # Before the fix the close waited for the peer to read, for good: only
        # the peer's end lets it finish, so that the test fails and does not hang.
        peer.proc.kill()
        pytest.fail(f"closing the session took more than {seconds:g} s")


def test_a_session_whose_peer_stopped_reading_closes_within_seconds(short_tmp: Path) -> None:
    path = str(short_tmp / "deaf.qmp")
    with hostile("deaf", path, output=short_tmp / "peer.out") as peer:
        async def main() -> None:
            session = VmSession("deaf", path, lambda: None, timeout=1.0, connect_wait=wait_fixed(0.05))
            await session.__aenter__()
            try:
                await until(lambda: session.connected, "the session")
                await until(lambda: peer.count("full") > 0, "netwatch's writes to fill the socket", timeout=30)
            finally:
                await close_within(session, peer)
        asyncio.run(main())


def test_a_peer_that_stopped_reading_loses_its_session(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What netwatch holds for a peer that does not read is bounded: past it the session ends (and is retried)."""
    monkeypatch.setattr(qmp, "WRITE_LIMIT", 0)  # any byte the socket could not take: reached as soon as it fills
    path = str(short_tmp / "deaf.qmp")
    with hostile("deaf", path, output=short_tmp / "peer.out") as peer:
        async def main() -> None:
            session = VmSession("deaf", path, lambda: None, timeout=1.0, connect_wait=wait_fixed(0.05))
            await session.__aenter__()
            try:
                await until(lambda: session.connected, "the session")
                await until(lambda: session.session >= 2, "the stalled session dropped and a new one", timeout=30)
                assert peer.count("accepted") >= 2
            finally:
                await close_within(session, peer)
        asyncio.run(main())


def deaf_vm(world: World, name: str, lower: str, mac: str) -> None:
    world.vm(name, {"id": "net0", "backend": "macvtap", "lower": lower, "mac": mac})
    world.lower(lower, f"w{lower}")


@contextmanager
def service(world: World) -> Iterator[Netwatch]:
    netwatch = world.start_netwatch()
    try:
        yield netwatch
    finally:
        # Ended by pid whatever happened (before the fix SIGTERM did not end it).
        if netwatch.proc is not None and netwatch.proc.poll() is None:
            netwatch.proc.kill()
            netwatch.proc.wait(10)
        world.netwatch = None


@pytest.mark.integration
def test_a_reload_that_removes_a_deaf_peers_vm_completes(world: World) -> None:
    """Found in review: removing a deaf peer's VM and reloading never completed (nor did the next reload)."""
    deaf_vm(world, "d1", "lo0", MAC_1)
    deaf_vm(world, "ok", "lo1", MAC_2)
    with hostile("deaf", str(world.vm_dict("d1")["qmp"]), output=world.tmp / "d1.out") as d1, \
            service(world) as netwatch:
        d1.wait_for("full", timeout=60, dump=world.dump)
        world.vms = [vm for vm in world.vms if vm["name"] != "d1"]
        world.write_config()
        # Before the fix: "the service did not answer within 10 s (a reload goes on in the background)".
        result = run_netwatch("reload", "-c", world.config_path, timeout=30)
        assert result.returncode == 0, result.stderr + netwatch.log()[-3000:]
        assert "1 VMs removed" in result.stdout, result.stdout
        status = world.cli("status", "--json")
        # By name: a substring test once met "d1" in the random temp dir of ok.qmp's path.
        assert status.returncode == 0 and [vm["name"] for vm in json.loads(status.stdout)["vms"]] == ["ok"], \
            status.stdout + status.stderr


@pytest.mark.integration
def test_sigterm_stops_netwatch_whatever_a_peer_does(world: World) -> None:
    """Found in review: with a deaf peer connected, SIGTERM did not stop netwatch."""
    deaf_vm(world, "d2", "lo0", MAC_1)
    with hostile("deaf", str(world.vm_dict("d2")["qmp"]), output=world.tmp / "d2.out") as d2, \
            service(world) as netwatch:
        d2.wait_for("full", timeout=60, dump=world.dump)
        assert netwatch.proc is not None
        netwatch.proc.send_signal(signal.SIGTERM)
        try:
            code = netwatch.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not stop netwatch within 10 s:\n" + netwatch.log()[-3000:])
        assert code == 0, netwatch.log()[-3000:]
