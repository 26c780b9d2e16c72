"""What the wirings send QEMU: netdev_add and device_add arguments, vhost-net,
multiqueue, q35 root ports, and the order of a replug (against a recording
stand-in for the VM session; tests/test_hotplug.py runs them with a guest)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from netwatch import config
from netwatch.config import GuestPci, NicConfig, VmConfig
from netwatch.errors import QmpError
from netwatch.qemu import wiring
from netwatch.qemu.args import vm_args
from netwatch.qemu.direct import DirectWiring
from netwatch.qemu.wiring import Pair, device_args, tap_netdev


def nic(**changes: Any) -> NicConfig:
    base = NicConfig(id="net0", backend="macvtap", mac="52:54:00:00:00:01", hub=0, model="virtio-net-pci",
                     ifname="nw-v-net0", guest_pci=GuestPci(0x19), wiring="direct")
    return NicConfig(**{**base.__dict__, **changes})


def test_tap_netdev_arguments() -> None:
    assert tap_netdev("t", ["f"], []) == {"type": "tap", "id": "t", "fd": "f"}
    assert tap_netdev("t", ["a", "b"], []) == {"type": "tap", "id": "t", "fds": "a:b"}
    assert tap_netdev("t", ["a"], ["v"]) == {"type": "tap", "id": "t", "fd": "a", "vhost": True, "vhostfd": "v"}
    assert tap_netdev("t", ["a", "b"], ["v", "w"]) == {"type": "tap", "id": "t", "fds": "a:b", "vhost": True,
                                                       "vhostfds": "v:w"}


def test_device_arguments_pin_the_address_on_pc_and_behind_a_root_port_on_q35() -> None:
    assert device_args(nic(), "t", "pc") == {"driver": "virtio-net-pci", "id": "net0", "netdev": "t",
                                             "mac": "52:54:00:00:00:01", "addr": "0x19"}
    assert device_args(nic(), "t", "q35")["bus"] == "nw-rp19"
    assert device_args(nic(), "t", "q35")["addr"] == "0x0"
    assert device_args(nic(guest_pci=GuestPci(3, "pci.1")), "t", "q35")["bus"] == "pci.1"
    many = device_args(nic(queues=4), "t", "pc")
    assert many["mq"] is True and many["vectors"] == 10


def test_qemu_args_for_direct_nics_are_only_what_makes_them_pluggable(tmp_path: Path) -> None:
    pc = VmConfig(name="v", qmp="/run/v.qmp", nics=(nic(),))
    assert vm_args(pc) == ["-qmp", "unix:/run/v.qmp,server=on,wait=off"]
    q35 = VmConfig(name="v", qmp="/run/v.qmp", nics=(nic(), nic(id="net1", guest_pci=GuestPci(0x18), wiring="hub")),
                   machine="q35", spare_ports=2)
    args = vm_args(q35)
    ports = [arg for arg in args if arg.startswith("pcie-root-port")]
    assert [port.split(",")[1:3] for port in ports] == [["id=nw-rp19", "bus=pcie.0"], ["id=nw-rp18", "bus=pcie.0"],
                                                         ["id=nw-rp17", "bus=pcie.0"], ["id=nw-rp16", "bus=pcie.0"]]
    assert "virtio-net-pci,id=net1,netdev=nw-net1,mac=52:54:00:00:00:01,bus=nw-rp18,addr=0x0" in args
    assert not any("id=net0" in arg for arg in args), "the direct NIC is plugged by netwatch"
    chassis = [port.split("chassis=")[1].split(",")[0] for port in ports]
    assert len(set(chassis)) == len(chassis)


def test_default_slots_stay_with_running_nics() -> None:
    a, b, c = nic(id="a", guest_pci=None), nic(id="b", guest_pci=None), nic(id="c", guest_pci=None)
    placed, short = config.assign_slots([b, c], {"b": GuestPci(0x18)})
    assert [(n.id, n.guest_pci) for n in placed] == [("b", GuestPci(0x18)), ("c", GuestPci(0x19))] and not short
    placed, _ = config.assign_slots([a, b], {})
    assert [n.guest_pci for n in placed] == [GuestPci(0x19), GuestPci(0x18)]
    fixed = nic(id="d", guest_pci=GuestPci(0x18), guest_pci_set=True)
    placed, _ = config.assign_slots([b, fixed], {"b": GuestPci(0x18)})
    # A slot set in the file wins over the one a running NIC has; that NIC moves to a free default.
    assert {n.id: n.guest_pci for n in placed} == {"b": GuestPci(0x19), "d": GuestPci(0x18)}


class RecordingVm:
    """The parts of VmSession a wiring uses, recording every command.

    Like QEMU with a guest: device_del only asks; the guest lets go a moment
    later, and only then does DEVICE_DELETED come and the id become free
    (it is recorded among the commands, where it came). A device_add of an
    id still in use is refused, as QEMU refuses it.
    """

    machine = "pc"
    RELEASE_DELAY = 0.05  # the guest's own time to let go

    def __init__(self) -> None:
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.passed: list[tuple[str, int]] = []
        self.devices: set[str] = set()
        self._deleted: dict[str, asyncio.Future[None]] = {}

    async def pass_fd(self, fd: int, fdname: str) -> None:
        os.fstat(fd)  # still open when handed over
        self.passed.append((fdname, fd))

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        arguments = arguments or {}
        self.commands.append((command, arguments))
        if command == "device_add":
            if arguments["id"] in self.devices:
                raise QmpError(f"Duplicate device ID '{arguments['id']}' for device")
            self.devices.add(arguments["id"])
        elif command == "device_del":
            asyncio.get_running_loop().call_later(self.RELEASE_DELAY, self._released, arguments["id"])
        return {}

    def _released(self, device: str) -> None:
        self.devices.discard(device)
        self.commands.append(("DEVICE_DELETED", {"id": device}))
        waiter = self._deleted.get(device)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def expect_deleted(self, device: str) -> asyncio.Future[None]:
        self._deleted[device] = asyncio.get_running_loop().create_future()
        return self._deleted[device]

    def forget_deleted(self, device: str, waiter: asyncio.Future[None]) -> None:
        self._deleted.pop(device, None)


def test_direct_plug_hands_over_a_vhost_fd_per_queue_when_vhost_net_exists(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    # /dev/vhost-net does not exist on these machines: a file stands in, so
    # what is tested is the arguments QEMU gets, not vhost itself.
    fake = tmp_path / "vhost-net"
    fake.write_bytes(b"")
    monkeypatch.setattr(wiring, "VHOST_NET", str(fake))
    vm = RecordingVm()
    direct = DirectWiring("v", nic(queues=2), vm)  # type: ignore[arg-type]
    fds = (os.open("/dev/null", os.O_RDWR), os.open("/dev/null", os.O_RDWR))
    try:
        asyncio.run(direct.plug(fds, Pair("nw-net0-tap1", "")))
    finally:
        for fd in fds:
            os.close(fd)
    assert [name for name, _ in vm.passed] == ["nw-net0-fd", "nw-net0-fd1", "nw-net0-vfd", "nw-net0-vfd1"]
    assert vm.commands == [
        ("netdev_add", {"type": "tap", "id": "nw-net0-tap1", "fds": "nw-net0-fd:nw-net0-fd1", "vhost": True,
                        "vhostfds": "nw-net0-vfd:nw-net0-vfd1"}),
        ("device_add", {"driver": "virtio-net-pci", "id": "net0", "netdev": "nw-net0-tap1",
                        "mac": "52:54:00:00:00:01", "addr": "0x19", "mq": True, "vectors": 6}),
    ]
    assert direct.guest_present


def test_without_vhost_net_no_vhost_is_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(wiring, "VHOST_NET", str(tmp_path / "absent"))
    vm = RecordingVm()
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        asyncio.run(DirectWiring("v", nic(), vm).plug((fd,), Pair("nw-net0-tap1", "")))  # type: ignore[arg-type]
    finally:
        os.close(fd)
    assert vm.commands[0] == ("netdev_add", {"type": "tap", "id": "nw-net0-tap1", "fd": "nw-net0-fd"})


def test_a_replug_deletes_the_device_and_waits_before_adding_it_back() -> None:
    vm = RecordingVm()
    direct = DirectWiring("v", nic(), vm)  # type: ignore[arg-type]

    async def run() -> None:
        fd = os.open("/dev/null", os.O_RDWR)
        try:
            await direct.plug((fd,), Pair("nw-net0-tap1", ""))
            await direct.plug((fd,), Pair("nw-net0-tap2", ""), inert=True)
        finally:
            os.close(fd)
        await direct.switch(Pair("nw-net0-tap1", ""), Pair("nw-net0-tap2", ""))
        await direct.unplug(Pair("nw-net0-tap1", ""))
    asyncio.run(run())
    assert [(c, a.get("id"), a.get("netdev")) for c, a in vm.commands] == [
        ("netdev_add", "nw-net0-tap1", None), ("device_add", "net0", "nw-net0-tap1"),
        ("netdev_add", "nw-net0-tap2", None),
        ("device_del", "net0", None), ("DEVICE_DELETED", "net0", None), ("device_add", "net0", "nw-net0-tap2"),
        ("netdev_del", "nw-net0-tap1", None),
    ]
