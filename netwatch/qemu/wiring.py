"""How a NIC's backend reaches the guest inside QEMU: one interface, an
implementation per wiring (netwatch/qemu/hub.py, netwatch/qemu/direct.py).
The NIC controller decides when a backend is made, replaced or removed and
when the guest's NIC comes or goes; a wiring does it on QEMU's side.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from netwatch.config import NicConfig
from netwatch.errors import QmpError
from netwatch.qemu.qmp import NetworkInfo
from netwatch.qemu.vm import QemuVm

log = logging.getLogger(__name__)

# Where vhost-net is; absent on hosts without the module (and on these test machines).
VHOST_NET = "/dev/vhost-net"


class UnplugTimeout(QmpError):
    """The guest did not release a device within the timeout: it stays plugged."""


@dataclass(frozen=True)
class Pair:
    """What one backend is in QEMU: its tap netdev and, with a hub, the port joining it to the guest."""

    tap: str
    port: str


@dataclass(frozen=True)
class Survey:
    """QEMU's view of one NIC, read when a session (re)starts."""

    network: NetworkInfo
    netdevs: frozenset[str]  # every netdev of this NIC's backends in QEMU
    generations: tuple[int, ...]
    device: GuestDevice | None  # the guest NIC's device, if QEMU has one by the NIC's id


@dataclass(frozen=True)
class GuestDevice:
    """The guest NIC's device as QEMU has it."""

    peer: str | None  # the netdev it is peered with
    mac: str | None
    bus: str | None  # the last part of its parent bus's path ("pci.0", "nw-rp19")
    devfn: int | None


class Wiring(Protocol):
    """What the NIC controller asks of QEMU's side of a NIC."""

    nic: NicConfig
    hub: int | None
    unplug_timeout: float

    @property
    def guest_present(self) -> bool: ...
    def pair(self, generation: int) -> Pair: ...
    async def survey(self) -> Survey: ...
    def holds(self, pair: Pair, survey: Survey) -> bool: ...
    async def clean(self, survey: Survey, keep: Pair | None) -> None: ...
    async def add_guest(self) -> bool: ...
    async def plug(self, fds: tuple[int, ...], pair: Pair, inert: bool = False) -> None: ...
    async def switch(self, old: Pair, new: Pair) -> None: ...
    async def unplug(self, pair: Pair) -> None: ...
    async def reopen(self, pair: Pair) -> None: ...
    async def remove_guest(self) -> None: ...


class QemuSide:
    """What both wirings share: fds handed over, the guest device added, found and deleted."""

    def __init__(self, vm_name: str, nic: NicConfig, vm: QemuVm, unplug_timeout: float) -> None:
        self.vm_name = vm_name
        self.nic = nic
        self.vm = vm
        self.unplug_timeout = unplug_timeout
        self.hub: int | None = None
        # This NIC's backends in either wiring (hubports too: an earlier wiring's are cleaned as well).
        self._ids = re.compile(rf"nw-{re.escape(nic.id)}-(tap|up)(\d+)\Z")

    def own_netdevs(self, network: NetworkInfo) -> tuple[frozenset[str], tuple[int, ...]]:
        """The netdevs of this NIC's backends that QEMU has, and their generations."""
        netdevs = frozenset(name for name in network.netdevs if self._ids.match(name))
        return netdevs, tuple(int(match.group(2)) for name in netdevs if (match := self._ids.match(name)))

    def fdname(self, queue: int = 0, vhost: bool = False) -> str:
        # One set of names per NIC, not per generation: netdev_add consumes the
        # fds at once, and a stray one left under a name is closed by name.
        return f"nw-{self.nic.id}-{'vfd' if vhost else 'fd'}{queue or ''}"

    def stray_fdnames(self) -> list[str]:
        queues = max(self.nic.queues, 1)
        return [self.fdname(q, vhost) for q in range(queues) for vhost in (False, True)]

    async def close_strays(self) -> None:
        # An attach cut short between getfd and netdev_add (netwatch killed)
        # leaves QEMU holding fds under the NIC's names.
        for name in self.stray_fdnames():
            if await self.remove("closefd", {"fdname": name}):
                log.info("%s/%s: closed %s, left in QEMU by an attach that was cut short", self.vm_name,
                         self.nic.id, name)

    async def pass_fds(self, fds: tuple[int, ...], vhost: bool) -> tuple[list[str], list[str]]:
        """Hand the queue fds (and a vhost-net fd per queue, if asked) to QEMU; their names."""
        names: list[str] = []
        vhost_names: list[str] = []
        try:
            for queue, fd in enumerate(fds):
                await self.vm.pass_fd(fd, self.fdname(queue))
                names.append(self.fdname(queue))
            if vhost:
                for queue in range(len(fds)):
                    vfd = open_vhost()
                    try:
                        await self.vm.pass_fd(vfd, self.fdname(queue, vhost=True))
                    finally:
                        os.close(vfd)
                    vhost_names.append(self.fdname(queue, vhost=True))
        except BaseException:
            for name in names + vhost_names:
                await best_effort(self.vm.execute("closefd", {"fdname": name}), f"closefd {name}")
            raise
        return names, vhost_names

    async def add_tap(self, fds: tuple[int, ...], tap: str, vhost: bool = False) -> None:
        names, vhost_names = await self.pass_fds(fds, vhost)
        try:
            await self.vm.execute("netdev_add", tap_netdev(tap, names, vhost_names))
        except BaseException:
            for name in names + vhost_names:
                await best_effort(self.vm.execute("closefd", {"fdname": name}), f"closefd {name}")
            raise

    def device_args(self, netdev: str) -> dict[str, Any]:
        return device_args(self.nic, netdev, self.vm.machine)

    async def add_device(self, netdev: str) -> None:
        """device_add of the guest NIC, peered with ``netdev``, at its pinned address."""
        args = self.device_args(netdev)
        try:
            await self.vm.execute("device_add", args)
        except QmpError as exc:
            bus = args.get("bus")
            if bus is not None and "not found" in str(exc) and str(bus).startswith("nw-rp"):
                raise QmpError(f"QEMU has no pcie-root-port {bus} for NIC {self.nic.id} (q35 cannot hot-add one): "
                               f"start the VM with the arguments of 'netwatch qemu-args {self.vm_name}', which "
                               f"include spare ports for NICs added later ({exc})") from exc
            raise

    async def find_device(self, network: NetworkInfo) -> GuestDevice | None:
        nic_id = self.nic.id
        if nic_id not in network.netdevs:
            return None
        path = f"/machine/peripheral/{nic_id}"
        try:
            parent = await self.vm.execute("qom-get", {"path": path, "property": "parent_bus"})
            devfn = await self.vm.execute("qom-get", {"path": path, "property": "addr"})
            peer = await self.vm.execute("qom-get", {"path": path, "property": "netdev"})
            mac = await self.vm.execute("qom-get", {"path": path, "property": "mac"})
        except QmpError as exc:
            if "not found" in str(exc):  # a net client by that name that is no device of ours
                return None
            raise
        bus = parent.rsplit("/", 1)[-1] if isinstance(parent, str) else None
        return GuestDevice(peer=peer if isinstance(peer, str) and peer else None,
                           mac=mac.lower() if isinstance(mac, str) else None, bus=bus,
                           devfn=devfn if isinstance(devfn, int) else None)

    def device_in_place(self, device: GuestDevice) -> bool:
        """Whether the device has the NIC's MAC and PCI address (QEMU's words, compared only)."""
        assert self.nic.guest_pci is not None
        where = self.nic.guest_pci.placement(self.vm.machine)
        bus = where.get("bus") or ("pcie.0" if self.vm.machine == "q35" else "pci.0")
        return device.mac == self.nic.mac and device.bus == bus and device.devfn == int(where["addr"], 16) << 3

    async def delete_device(self) -> None:
        """device_del, then wait for QEMU to say the guest let go (DEVICE_DELETED)."""
        nic_id = self.nic.id
        waiter = self.vm.expect_deleted(nic_id)
        try:
            try:
                await self.vm.execute("device_del", {"id": nic_id})
            except QmpError as exc:
                if "not found" in str(exc):
                    return  # gone already
                if "in the process of unplug" not in str(exc):
                    raise
            try:
                async with asyncio.timeout(self.unplug_timeout):
                    await waiter
            except TimeoutError:
                raise UnplugTimeout(f"the guest did not release NIC {nic_id} within {self.unplug_timeout:g} s "
                                    f"(device_del sent; QEMU keeps it until the guest lets go)") from None
        finally:
            self.vm.forget_deleted(nic_id, waiter)

    async def remove(self, command: str, arguments: dict[str, Any]) -> bool:
        """Run a removal command; False if QEMU had nothing by that name."""
        try:
            await self.vm.execute(command, arguments)
        except QmpError as exc:
            if "not found" not in str(exc):
                raise
            return False
        return True


def tap_netdev(tap: str, fdnames: list[str], vhost_fdnames: list[str]) -> dict[str, Any]:
    """netdev_add's arguments for a tap netdev fed the given fds (vhost-net when there are vhost fds)."""
    args: dict[str, Any] = {"type": "tap", "id": tap}
    if len(fdnames) == 1:
        args["fd"] = fdnames[0]
    else:
        args["fds"] = ":".join(fdnames)
    if vhost_fdnames:
        args["vhost"] = True
        if len(vhost_fdnames) == 1:
            args["vhostfd"] = vhost_fdnames[0]
        else:
            args["vhostfds"] = ":".join(vhost_fdnames)
    return args


def device_args(nic: NicConfig, netdev: str, machine: str) -> dict[str, Any]:
    """device_add's arguments for the guest NIC: the same id, MAC and PCI address every time."""
    assert nic.guest_pci is not None
    args: dict[str, Any] = {"driver": nic.model, "id": nic.id, "netdev": netdev, "mac": nic.mac,
                            **nic.guest_pci.placement(machine)}
    if nic.queues > 1:
        # A vector per queue each way, one for config changes and one for control.
        args.update({"mq": True, "vectors": 2 * nic.queues + 2})
    return args


def vhost_available() -> bool:
    return os.path.exists(VHOST_NET)


def open_vhost() -> int:
    try:
        return os.open(VHOST_NET, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise QmpError(f"cannot open {VHOST_NET}: {exc.strerror or exc}") from exc


async def best_effort(action: Awaitable[Any], what: str) -> None:
    try:
        await action
    except QmpError as exc:
        log.warning("%s failed: %s", what, exc)
