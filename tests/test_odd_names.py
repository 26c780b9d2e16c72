"""Link names are bytes to the kernel: one that is not UTF-8 is one str everywhere, shown escaped, never an error."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netwatch.config import ifname_problem
from netwatch.host import rtnl
from netwatch.host.links import Link
from netwatch.sandbox.testbed import wait_until
from netwatch.service import control
from netwatch.untrusted import clean

from .world import World

ODD = b"m\xff0"
LOWER_MAC = "02:00:00:00:ff:01"


def newlink(index: int, name: bytes) -> bytes:
    """An RTM_NEWLINK as the kernel sends it, with just a name."""
    attr = struct.pack("=HH", 4 + len(name) + 1, rtnl.IFLA_IFNAME) + name + b"\0"
    attr += b"\0" * (-len(attr) % 4)
    body = struct.pack("=BxHiII", 0, 1, index, 1, 0) + attr
    return struct.pack("=IHHII", 16 + len(body), rtnl.RTM_NEWLINK, 0, 0, 0) + body


def test_names_from_dumps_and_events_are_the_same_str() -> None:
    """pyroute2's dump gave bytes for such a name, the event decoder a lossy str: two types, two names."""
    [(_, fields)] = rtnl.decode_links(newlink(5, ODD))
    from_event = fields["name"]
    from_dump = Link.from_msg({"index": 5, "ifname": ODD, "flags": 1}).name
    assert from_event == from_dump == os.fsdecode(ODD)
    assert os.fsencode(from_dump) == ODD  # the kernel's bytes, back for hooks' environment
    assert ifname_problem(from_dump) is None
    assert ifname_problem("\ud800") is not None  # not a name any kernel gave: refused, not raised


def test_undecodable_bytes_are_shown_escaped() -> None:
    from netwatch.untrusted import displayable

    name = os.fsdecode(ODD)
    assert clean(name) == "m\\xff0"
    shown = displayable({"lower": name, "list": [name], "n": 1, "none": None})
    assert shown == {"lower": "m\\xff0", "list": ["m\\xff0"], "n": 1, "none": None}
    json.dumps(shown, ensure_ascii=False).encode()  # plain Unicode: any JSON reader takes it


def test_an_error_in_a_control_connection_is_logged(tmp_path: Path) -> None:
    """An exception outside a request's handler (its answer not JSON) went to the asyncio logger, set to CRITICAL."""
    script = textwrap.dedent(f"""
        import asyncio
        from netwatch import events
        from netwatch.service import control

        async def main():
            async def handler(request):
                return b"not JSON"
            async with control.ControlServer({str(tmp_path)!r}, {{"status": handler}}):
                try:
                    await asyncio.to_thread(control.request, {str(tmp_path)!r}, "status", 5)
                except control.ControlError as exc:
                    print("client:", exc)
                await asyncio.sleep(0.1)  # the connection's task ends after the client saw EOF

        events.setup()
        asyncio.run(main())
        events.setup()  # writes what a burst held
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "NETWATCH_JOURNAL_SOCKET": "/nonexistent"})
    assert "client:" in done.stdout, done
    assert "not JSON serializable" in done.stderr, done.stderr


@pytest.mark.integration
def test_a_lower_named_in_bytes_that_are_not_utf8(world: World) -> None:
    """A link named m\\xff0 matching a NIC's lower by MAC made every `netwatch status` fail ("unreadable answer")."""
    ns = world.ns.name.encode()

    def make_lower() -> None:
        subprocess.run([b"ip", b"-n", ns, b"link", b"add", b"name", ODD, b"address", LOWER_MAC.encode(),
                        b"type", b"veth", b"peer", b"name", b"mw0"], check=True)
        subprocess.run([b"ip", b"-n", ns, b"link", b"set", b"mw0", b"up"], check=True)
        subprocess.run([b"ip", b"-n", ns, b"link", b"set", ODD, b"up"], check=True)

    make_lower()  # before the start: from the dump
    seen = world.tmp / "lowers"
    world.hook("up", "50-lower", f'printf "%s\\n" "$LOWER" >> {seen}\n')
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": {"mac": LOWER_MAC}, "mac": "52:54:00:ee:00:0d"})
    world.start_qemu("vm1")
    netwatch = world.start_netwatch()
    wait_until(lambda: os.path.exists(control.socket_path(world.state)), 10, "the control socket", world.dump)

    def nic() -> dict[str, object]:
        return dict(control.request(world.state, "status", timeout=5)["vms"][0]["nics"][0])
    wait_until(lambda: nic()["state"] == "attached", 20, "attached", world.dump)
    assert nic()["lower"] == "m\\xff0"
    first = nic()["generation"]
    assert isinstance(first, int)
    # After the start: from link events.
    subprocess.run([b"ip", b"-n", ns, b"link", b"del", ODD], check=True)
    world.wait_state("vm1", "net0", "waiting-lower")
    make_lower()
    wait_until(lambda: nic()["state"] == "attached" and nic()["generation"] != first, 20, "attached again",
               world.dump)
    assert nic()["lower"] == "m\\xff0"
    assert "m\\xff0 (absent)" not in world.cli("status").stdout
    assert "m\\xff0" in world.cli("status").stdout
    # The hooks saw the kernel's own bytes, once for each attach.
    wait_until(lambda: seen.exists() and seen.read_bytes().count(ODD + b"\n") == 2, 10, "two if-up runs",
               world.dump)
    assert seen.read_bytes() == ODD + b"\n" + ODD + b"\n"
    assert "Traceback" not in netwatch.log()


def test_a_udev_event_for_such_a_name_is_not_lost() -> None:
    """pyudev decodes names strictly: the event still arrives, by its ifindex."""
    from netwatch.host.udev import UdevMonitor

    class Device:
        action = "move"

        @property
        def properties(self) -> dict[str, str]:
            return {"IFINDEX": "7"}

        @property
        def sys_name(self) -> str:
            return ODD.decode()

    class Monitor:
        def __init__(self) -> None:
            self.devices: list[Device | None] = [Device(), None]

        def poll(self, timeout: float) -> Device | None:
            return self.devices.pop(0)

    seen: list[tuple[str, str, int | None]] = []
    monitor = UdevMonitor("udev", lambda *event: seen.append(event), lambda: None)
    monitor._monitor = Monitor()  # type: ignore[assignment]
    monitor._drain()
    assert seen == [("move", "", 7)]
