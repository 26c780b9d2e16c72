"""What `netwatch qemu-args` prints for redirect-wired NICs: a tap netdev QEMU opens by name and the
pinned device (shell/JSON), or libvirt <interface type='ethernet'> elements (--libvirt), checked by
parsing, and by a real libvirtd that defines a domain holding them and attaches each alone."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netwatch.config import GuestPci, LowerSpec, NicConfig, VmConfig
from netwatch.errors import BadRequest
from netwatch.qemu import args as qemu_args
from netwatch.qemu.args import render_libvirt, vm_args
from netwatch.sandbox.testbed import Netns, unique

from .libvirt_host import QEMU_NS, LibvirtHost, LibvirtUnavailable

MAC = "52:54:00:12:34:56"


def nic(**changes: Any) -> NicConfig:
    base = NicConfig(id="net0", backend="macvtap", mac=MAC, hub=0, model="virtio-net-pci", ifname="nw-web1-net0",
                     lower=LowerSpec(name="eth1"), guest_pci=GuestPci(0x19), wiring="redirect")
    return NicConfig(**{**base.__dict__, **changes})


def vm(*nics: NicConfig, **changes: Any) -> VmConfig:
    return VmConfig(**{"name": "web1", "qmp": "/run/nw/web1.qmp", "nics": nics or (nic(),), **changes})


def parsed(text: str) -> ET.Element:
    """Everything printed, under one root (as it would sit in a domain): it must be well-formed."""
    return ET.fromstring(f"<domain xmlns:qemu='{QEMU_NS}'>{text}</domain>")


def comments(text: str) -> str:
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    root = ET.fromstring(f"<r xmlns:qemu='{QEMU_NS}'>{text}</r>", parser=parser)
    return " ".join(str(node.text) for node in root.iter() if node.tag is ET.Comment)


# -- QEMU's arguments ------------------------------------------------------------------------------

def test_a_redirect_nic_is_a_tap_opened_by_name_and_its_pinned_device() -> None:
    assert vm_args(vm(), vhost=False) == [
        "-qmp", "unix:/run/nw/web1.qmp,server=on,wait=off",
        "-netdev", "tap,id=nwr-net0,ifname=nw-web1-net0,script=no,downscript=no,vnet_hdr=on",
        "-device", f"virtio-net-pci,id=net0,netdev=nwr-net0,mac={MAC},addr=0x19",
    ]


def test_vhost_and_queues() -> None:
    netdev, device = vm_args(vm(nic(queues=2)), vhost=True)[3::2]
    assert netdev == "tap,id=nwr-net0,ifname=nw-web1-net0,script=no,downscript=no,vnet_hdr=on,vhost=on,queues=2"
    assert device == f"virtio-net-pci,id=net0,netdev=nwr-net0,mac={MAC},addr=0x19,mq=on,vectors=6"


def test_vhost_is_there_when_dev_vhost_net_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_args, "VHOST_NET", str(tmp_path / "vhost-net"))
    assert not any("vhost=on" in arg for arg in vm_args(vm()))
    (tmp_path / "vhost-net").touch()
    assert vm_args(vm())[3].endswith(",vnet_hdr=on,vhost=on")


def test_a_comma_in_a_name_cannot_start_an_option_of_its_own() -> None:
    # The kernel takes "x,script=/tmp/y" as an interface name; QEMU would run /tmp/y.
    args = vm_args(vm(nic(ifname="x,script=/y"), qmp="/run/a,b.qmp"), vhost=False)
    assert args[1] == "unix:/run/a,,b.qmp,server=on,wait=off"
    assert args[3] == "tap,id=nwr-net0,ifname=x,,script=/y,script=no,downscript=no,vnet_hdr=on"


def test_q35_gives_redirect_nics_a_root_port_as_it_does_hub_nics() -> None:
    q35 = vm(nic(), nic(id="net1", mac="52:54:00:12:34:57", ifname="nw-web1-net1", guest_pci=GuestPci(0x18),
                        wiring="hub"), machine="q35", spare_ports=1)
    args = vm_args(q35, vhost=False)
    ports = [arg.split(",")[1] for arg in args if arg.startswith("pcie-root-port")]
    assert ports == ["id=nw-rp19", "id=nw-rp18", "id=nw-rp17"]
    assert f"virtio-net-pci,id=net0,netdev=nwr-net0,mac={MAC},bus=nw-rp19,addr=0x0" in args


# -- libvirt ---------------------------------------------------------------------------------------

def interfaces(root: ET.Element) -> list[ET.Element]:
    return root.findall("interface")


def test_libvirt_redirect_nics_are_interfaces_and_no_commandline() -> None:
    # No qmp: the VM as a libvirt admin configures it (a monitor asked for would need the block).
    text = render_libvirt(vm(nic(queues=2), nic(id="ua-net1", mac="52:54:00:12:34:57", ifname="nw-web1-net1",
                                                guest_pci=GuestPci(0x18), model="e1000"), qmp=None))
    root = parsed(text)
    assert root.find(f"{{{QEMU_NS}}}commandline") is None and "qemu:" not in text
    first, second = interfaces(root)
    assert first.attrib == {"type": "ethernet"}
    assert first.find("mac").attrib == {"address": MAC}  # type: ignore[union-attr]
    assert first.find("target").attrib == {"dev": "nw-web1-net0", "managed": "no"}  # type: ignore[union-attr]
    assert first.find("model").attrib == {"type": "virtio"}  # type: ignore[union-attr]
    assert first.find("driver").attrib == {"queues": "2"}  # type: ignore[union-attr]
    assert first.find("address").attrib == {  # type: ignore[union-attr]
        "type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x19", "function": "0x0"}
    assert first.find("alias") is None, "libvirt names a device whose id is not a user alias"
    assert second.find("model").attrib == {"type": "e1000"}  # type: ignore[union-attr]
    assert second.find("driver") is None
    assert second.find("alias").attrib == {"name": "ua-net1"}  # type: ignore[union-attr]
    assert second.find("address").get("slot") == "0x18"  # type: ignore[union-attr]
    assert "Without netwatch's monitor the guest's carrier does not follow the lower" in comments(text)


def test_libvirt_on_q35_leaves_the_root_bus_address_to_libvirt() -> None:
    text = render_libvirt(vm(nic(), nic(id="net1", mac="52:54:00:12:34:57", ifname="nw-web1-net1",
                                        guest_pci=GuestPci(3, "pci.4")), machine="q35"))
    first, second = interfaces(parsed(text))
    assert first.find("address") is None
    assert "libvirt puts it behind a pcie-root-port of its own" in comments(text)
    assert second.find("address").attrib == {  # type: ignore[union-attr]
        "type": "pci", "domain": "0x0000", "bus": "0x04", "slot": "0x03", "function": "0x0"}


def test_libvirt_mixed_vm_prints_both_parts() -> None:
    text = render_libvirt(vm(nic(id="ua-r"), nic(id="ua-h", mac="52:54:00:12:34:57", ifname="nw-web1-h",
                                                 guest_pci=GuestPci(0x18), wiring="hub"),
                             nic(id="plain", mac="52:54:00:12:34:58", ifname="nw-web1-p", guest_pci=GuestPci(0x17)),
                             machine="q35", spare_ports=1))
    root = parsed(text)
    assert [i.find("target").get("dev") for i in interfaces(root)] == ["nw-web1-net0", "nw-web1-p"]  # type: ignore
    block = [arg.get("value") for arg in root.iter(f"{{{QEMU_NS}}}arg")]
    assert block == vm_args(vm(nic(id="ua-h", mac="52:54:00:12:34:57", ifname="nw-web1-h", guest_pci=GuestPci(0x18),
                                   wiring="hub"), machine="q35", spare_ports=1))
    ports = [arg.split(",")[1] for arg in block if arg.startswith("pcie-root-port")]
    assert ports == ["id=nw-rp18", "id=nw-rp19"], "the hub NIC's and one spare: none for the redirect NICs"
    assert not any("nwr-" in arg for arg in block), "the redirect NICs are libvirt's"
    said = comments(text)
    assert "makes the guest's carrier follow the lower for the NICs whose id starts 'ua-'" in said
    assert "not for 'plain'" in said


def test_libvirt_values_are_escaped_and_comments_stay_comments() -> None:
    odd = nic(ifname="a&b'<c\"", id="a--b")
    text = render_libvirt(vm(odd, name="web--1", qmp="/run/x--/y.qmp"))
    assert interfaces(parsed(text))[0].find("target").get("dev") == "a&b'<c\""  # type: ignore[union-attr]
    # The <qemu:commandline> part too: a VM name with "--" once ended its comment early.
    hub = render_libvirt(vm(nic(id="ua-n", wiring="hub"), name="web--1", qmp="/run/x--/y.qmp"))
    values = [a.get("value") for a in parsed(hub).iter(f"{{{QEMU_NS}}}arg")]
    assert values[1] == "unix:/run/x--/y.qmp,server=on,wait=off"


@pytest.mark.parametrize(("changes", "expected"), [
    ({"model": "virtio-net-pci-non-transitional"},
     "VM 'web1' NIC 'net0': libvirt has no <model type> for virtio-net-pci-non-transitional; under libvirt a "
     "redirect NIC's model is one of virtio-net-pci, e1000, e1000e, rtl8139"),
    ({"guest_pci": GuestPci(5, "mybus")},
     "VM 'web1' NIC 'net0': guest_pci mybus:0x05 is on bus 'mybus', which libvirt has no name for (its PCI buses "
     "are pci.N, N the index of their <controller type='pci'>, 0-255)"),
    ({"ifname": "t\x01"}, "VM 'web1' NIC 'net0': its tap's name 't\\x01' holds characters XML cannot carry"),
])
def test_libvirt_refuses_what_it_cannot_express(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(BadRequest) as info:
        render_libvirt(vm(nic(**changes)))
    assert str(info.value).startswith(expected)


def test_libvirt_ids_of_redirect_nics_are_free() -> None:
    # libvirt names the device itself: "net0" collides with nothing there (a hub NIC's id would).
    assert render_libvirt(vm(nic(id="net0")))
    with pytest.raises(BadRequest, match="libvirt uses ids like 'net0'"):
        render_libvirt(vm(nic(id="net0", wiring="hub")))


# -- a real libvirtd -------------------------------------------------------------------------------

@pytest.fixture
def libvirt(netns: Netns, short_tmp: Path) -> Iterator[LibvirtHost]:
    short_tmp.chmod(0o711)
    host = LibvirtHost(short_tmp / "libvirt", netns)
    try:
        host.start()
    except LibvirtUnavailable as exc:
        problems = host.close()
        pytest.fail(f"libvirt unavailable: {exc} {problems}", pytrace=False)
    try:
        yield host
    finally:
        problems = host.close()
        assert not problems, "left behind (now removed):\n" + "\n".join(problems)


def elements(text: str) -> list[str]:
    """Each <interface> element as printed, alone (it starts and ends on lines of its own)."""
    found, current = [], None
    for line in text.splitlines():
        if line.startswith("<interface "):
            current = []
        if current is not None:
            current.append(line)
        if line == "</interface>" and current is not None:
            found.append("\n".join(current))
            current = None
    return found


@pytest.mark.integration
@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_libvirt_defines_and_attaches_the_printed_interfaces(libvirt: LibvirtHost, short_tmp: Path,
                                                              machine: str) -> None:
    """libvirt's own parser, schema (define --validate) and address rules take what is printed; each element
    alone is taken by attach-device (to the config: no guest is started, TCG guests are slow)."""
    config = vm(nic(queues=2), nic(id="ua-net1", mac="52:54:00:12:34:57", ifname="nw-web1-net1",
                                   guest_pci=GuestPci(0x18), model="e1000"), machine=machine)
    text = render_libvirt(config)
    first, second = elements(text)
    head = text.split(first)[0]  # the comments, kept as an admin pastes them
    name = unique("nwrd-")
    libvirt.domains.add(name)
    domain = short_tmp / "domain.xml"
    domain.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{head}{first}
  </devices>
</domain>
""")
    libvirt.virsh("define", "--validate", str(domain))
    alone = short_tmp / "nic.xml"
    alone.write_text(second)
    libvirt.virsh("attach-device", name, str(alone), "--config")
    kept = ET.fromstring(libvirt.virsh("dumpxml", "--inactive", name))
    got = {i.find("target").get("dev"): i for i in kept.iter("interface")}  # type: ignore[union-attr]
    assert set(got) == {"nw-web1-net0", "nw-web1-net1"}, libvirt.dump(name)
    for dev, mac, model in (("nw-web1-net0", MAC, "virtio"), ("nw-web1-net1", "52:54:00:12:34:57", "e1000")):
        element = got[dev]
        assert element.get("type") == "ethernet"
        assert element.find("target").get("managed") == "no"  # type: ignore[union-attr]
        assert element.find("mac").get("address") == mac  # type: ignore[union-attr]
        assert element.find("model").get("type") == model  # type: ignore[union-attr]
    assert got["nw-web1-net0"].find("driver").get("queues") == "2"  # type: ignore[union-attr]
    assert got["nw-web1-net1"].find("alias").get("name") == "ua-net1"  # type: ignore[union-attr]
    addresses = {dev: (int(a.get("bus"), 16), int(a.get("slot"), 16))  # type: ignore[arg-type]
                 for dev, i in got.items() if (a := i.find("address")) is not None}
    if machine == "pc":
        assert addresses == {"nw-web1-net0": (0, 0x19), "nw-web1-net1": (0, 0x18)}, addresses
    else:
        # Off the root bus, on controllers libvirt added: the virtio NIC (PCIe) behind a pcie-root-port,
        # the e1000 (conventional PCI) on a pcie-to-pci-bridge.
        models = {int(c.get("index")): c.get("model") for c in kept.iter("controller")  # type: ignore[arg-type]
                  if c.get("type") == "pci"}
        placed = {dev: models.get(bus) for dev, (bus, _) in addresses.items()}
        assert placed == {"nw-web1-net0": "pcie-root-port", "nw-web1-net1": "pcie-to-pci-bridge"}, \
            (addresses, libvirt.virsh("dumpxml", "--inactive", name))
    print(f"\n{machine}: libvirt kept both interfaces, addresses (bus, slot) {addresses}")
