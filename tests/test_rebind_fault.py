"""Issue 21 item 12: a make-before-break swap whose set_link goes wrong.

Both pairs hang off the guest's hub during a swap; QEMU's hub forwards
between every open port, so two open pairs join the old and the new
lower's networks. The swap's two set_link commands go out together and
QEMU runs the second whatever became of the first. Here the NIC's real
SwappedBackend and HubWiring run against a stand-in for QEMU that models the
hub (which netdevs exist, their links, which hubports join them) and
refuses or leaves unanswered a command once; every command after which
two pairs were open is recorded.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from netwatch.config import GuestPci, NicConfig
from netwatch.errors import QmpError
from netwatch.host.backends import Created, Placement
from netwatch.host.links import Link
from netwatch.nic.hookplan import HookPlan
from netwatch.nic.swapped import SwappedBackend
from netwatch.qemu.wiring import Pair

NIC = NicConfig(id="net0", backend="macvtap", mac="52:54:00:00:00:01", hub=0, model="virtio-net-pci",
                ifname="nw-v-net0", guest_pci=GuestPci(0x19), wiring="hub")
OLD, NEW = "nw-net0-tap1", "nw-net0-tap2"


@dataclass
class HubQemu:
    """The parts of VmSession a hub wiring uses, answering as QEMU would; ``faults`` go wrong once each.

    A fault is (command, arguments, how): "refused" (QEMU says no, changes
    nothing) or "unanswered" (QEMU does it, the answer never comes: a timeout).
    """

    faults: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    machine: str = "pc"
    pid: int = 4242
    pid_start: int = 1
    links: dict[str, bool] = field(default_factory=dict)  # tap netdev -> its link is up
    ports: dict[str, str] = field(default_factory=dict)  # hubport -> the tap netdev it joins to the hub
    ran: list[str] = field(default_factory=list)
    both_open: list[str] = field(default_factory=list)  # each command after which two pairs were open
    runstate: Any = field(default_factory=lambda: SimpleNamespace(arrived=set(), phase_of=lambda pid: None,
                                                                  incoming=False))

    async def pass_fd(self, fd: int, fdname: str) -> None:
        os.fstat(fd)

    def announce(self, nic_id: str) -> None:
        pass

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        # Applied at once, in call order: QEMU runs commands in the order they were sent.
        arguments = arguments or {}
        what = f"{command} {' '.join(str(v) for v in arguments.values())}"
        fault = next((f for f in self.faults if f[:2] == (command, arguments)), None)
        if fault is not None:
            self.faults.remove(fault)
            if fault[2] == "refused":
                self.ran.append(what + " (refused)")
                raise QmpError(f"{command} failed: injected")
        self._apply(command, arguments)
        self.ran.append(what)
        if sum(1 for tap in self.ports.values() if self.links.get(tap)) >= 2:
            self.both_open.append(what)
        if fault is not None:
            raise QmpError(f"{command} got no answer within 5 s")
        return {}

    def _apply(self, command: str, arguments: dict[str, Any]) -> None:
        name = arguments.get("id") or arguments.get("name")
        if command == "netdev_add" and arguments["type"] == "tap":
            self.links[arguments["id"]] = True
        elif command == "netdev_add" and arguments["type"] == "hubport":
            self.ports[arguments["id"]] = arguments["netdev"]
        elif command == "set_link" and name in self.links:
            self.links[name] = arguments["up"]
        elif command == "netdev_del" and name in self.ports:
            del self.ports[name]
        elif command == "netdev_del" and name in self.links:
            del self.links[name]
        elif command not in ("closefd",):
            raise QmpError(f"{command} failed: Device '{name}' not found")


def lower(name: str, index: int) -> Placement:
    return Placement(Link(index=index, name=name, kind="veth", mac=f"02:00:00:00:00:0{index}", parent=None,
                          flags=1), None, True, "")


def swap_with(faults: list[tuple[str, dict[str, Any], str]]) -> tuple[HubQemu, SwappedBackend, list[int],
                                                                        QmpError | None]:
    """Attach on lower lo0, then swap to lo1 with ``faults``: QEMU, the NIC, the links deleted, the error."""
    qemu = HubQemu()
    deleted: list[int] = []
    made: dict[int, Link] = {}  # the backend links "in the kernel", by ifindex

    async def delete(index: int) -> bool:
        deleted.append(index)
        return True
    env = SimpleNamespace(unplug_timeout=1.0, node_dir="/nonexistent", records=SimpleNamespace(save=lambda r: None),
                          links=SimpleNamespace(get=made.get, named=lambda name: None),
                          ops=SimpleNamespace(delete=delete), hooks=SimpleNamespace(submit=lambda *a: None))
    life = SwappedBackend("v", NIC, qemu, env, HookPlan(NIC, qemu, env), lambda: None)  # type: ignore[arg-type]
    error: QmpError | None = None

    async def create(name: str, placement: Placement, inert: bool = False) -> tuple[Created, Pair, int]:
        # The kernel's side stands in; QEMU's is the real wiring's.
        gen = life.generation + 1
        pair = life.qemu.pair(gen)
        fd = os.open("/dev/null", os.O_RDWR)
        try:
            await life.qemu.plug((fd,), pair, inert)
        finally:
            os.close(fd)
        life.generation, life.swaps = gen, life.swaps + 1
        made[100 + gen] = Link(index=100 + gen, name=name, kind="macvtap", mac=NIC.mac, parent=None, flags=1)
        return Created(100 + gen, ()), pair, gen

    async def main() -> None:
        nonlocal error
        life._create = create  # type: ignore[method-assign]
        await life.attach(lower("lo0", 1))
        qemu.faults = faults
        qemu.ran.clear()
        try:
            await life.swap(lower("lo1", 2), "rebind requested")
        except QmpError as exc:
            error = exc
    asyncio.run(main())
    return qemu, life, deleted, error


def test_old_pair_not_going_quiet_leaves_the_hub_at_once_and_the_swap_completes() -> None:
    """The issue's case: the first set_link fails, the second succeeds."""
    qemu, life, deleted, error = swap_with([("set_link", {"name": OLD, "up": False}, "refused")])
    # Only the command QEMU ran with the failed one had both open; the next one closed it.
    assert qemu.both_open == [f"set_link {NEW} True"], qemu.ran
    assert error is None, qemu.ran
    assert life.backend is not None and life.backend.tap_netdev == NEW and life.backend.lower == "lo1"
    assert (qemu.ports, qemu.links) == ({"nw-net0-up2": NEW}, {NEW: True}), qemu.ran
    assert deleted == [101], "the old backend's link is deleted"


def test_new_pair_not_opening_rolls_back_to_the_old_one() -> None:
    qemu, life, deleted, error = swap_with([("set_link", {"name": NEW, "up": True}, "refused")])
    assert error is not None and qemu.both_open == [], qemu.ran
    assert life.backend is not None and life.backend.tap_netdev == OLD
    assert (qemu.ports, qemu.links) == ({"nw-net0-up1": OLD}, {OLD: True}), qemu.ran
    assert deleted == [102], "the new backend's link is deleted"


@pytest.mark.parametrize("first", ["refused", "unanswered"])
def test_unanswered_switch_never_reopens_the_old_pair_while_the_new_one_is_open(first: str) -> None:
    """QEMU ran the new pair's set_link but no answer came: the new pair is quieted before the old reopens."""
    qemu, life, deleted, error = swap_with([("set_link", {"name": OLD, "up": False}, first),
                                            ("set_link", {"name": NEW, "up": True}, "unanswered")])
    assert qemu.both_open == ([f"set_link {NEW} True"] if first == "refused" else []), qemu.ran
    assert error is not None and "no answer" in str(error), "the new pair's failure is the one told"
    assert life.backend is not None and life.backend.tap_netdev == OLD
    assert (qemu.ports, qemu.links) == ({"nw-net0-up1": OLD}, {OLD: True}), qemu.ran
    assert deleted == [102]
