"""Config validation: every problem is one line naming the file, the VM/NIC and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from netwatch import config
from netwatch.errors import ConfigError

GOOD = """
[netwatch]
state_dir = "/run/netwatch"
udev = "kernel"

[[vm]]
name = "web1"
qmp = "/run/netwatch/web1.qmp"

  [[vm.nic]]
  id = "net0"
  backend = "macvtap"
  lower = "eth1"
  mac = "52:54:00:12:34:56"

  [[vm.nic]]
  id = "net1"
  backend = "tap"
  mode = "bridged"
  bridge = "br0"
  lower = "eth2"
  mac = "52:54:00:12:34:57"
"""

VM = '[[vm]]\nname = "v"\nqmp = "/run/v.qmp"\n'
NIC = VM + "[[vm.nic]]\n"
MACVTAP = 'id = "net0"\nbackend = "macvtap"\nlower = "eth1"\nmac = "52:54:00:12:34:56"\n'


def load(tmp_path: Path, text: str | bytes) -> config.Config:
    path = tmp_path / "netwatch.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return config.load(str(path))


def problems(tmp_path: Path, text: str | bytes) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.problems


def test_good_config_with_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, GOOD)
    assert cfg.settings.state_dir == "/run/netwatch"
    assert cfg.settings.hooks_dir == "/etc/netwatch"
    assert cfg.settings.hook_timeout == 10.0
    vm = cfg.vm("web1")
    assert vm is not None
    net0, net1 = vm.nics
    assert (net0.mode, net0.hub, net0.model, net0.ifname) == ("bridge", 0, "virtio-net-pci", "nw-web1-net0")
    assert net0.lower == config.LowerSpec(name="eth1")
    assert (net1.backend, net1.mode, net1.bridge, net1.hub) == ("tap", "bridged", "br0", 1)


def test_example_config_is_accepted() -> None:
    example = Path(__file__).parent.parent / "conf" / "netwatch.toml"
    cfg = config.load(str(example))
    assert cfg.vms
    from netwatch.qemu.args import libvirt_problems
    assert not [problem for vm in cfg.vms for problem in libvirt_problems(vm)], "the example must suit libvirt"


def test_redirect_nic_and_what_the_service_needs(tmp_path: Path) -> None:
    text = NIC + MACVTAP + 'wiring = "redirect"\nmode = "vepa"\nqueues = 4\n'
    nic = load(tmp_path, text).vms[0].nics[0]
    assert (nic.wiring, nic.mode, nic.queues, nic.ifname) == ("redirect", "vepa", 4, "nw-v-net0")
    assert nic.macvlan_names == ("nwm-v-net0", "nwm-v-net0-r")
    assert nic.backend_names == ("nw-v-net0", "nw-v-net0-r")
    assert nic.link_names == ("nw-v-net0", "nw-v-net0-r", "nwm-v-net0", "nwm-v-net0-r")
    assert nic.netdev_id == "nwr-net0"
    hub = load(tmp_path, NIC + MACVTAP).vms[0].nics[0]
    assert hub.macvlan_names == () and hub.link_names == hub.backend_names
    assert config.default_wiring("macvtap") == "hub", "the default stays until the figures decide it"


def test_macvlan_names_are_short_apart_and_never_a_tap_name() -> None:
    # Tap names are unique (the config refuses two NICs with one); some derived ones meet ("web1"/"ua-net0"
    # and "web1-ua"/"net0"): once each.
    taps = list(dict.fromkeys([config.derived_ifname(vm, nic) for vm in ("v", "web1", "web1-ua", "a" * 12, "a" * 40,
                                                                         "ä" * 5)
                               for nic in ("net0", "net1", "ua-net0", "ua-net1", "n")]
                              + ["mv-web1", "nwm-x", "x" * 15, "nw-" + "9" * 11]))
    names = {tap: config.macvlan_ifname(tap) for tap in taps}
    seconds = {tap: config.alt_ifname(name) for tap, name in names.items()}
    every = [*taps, *names.values(), *seconds.values()]
    assert len(set(every)) == len(every), "no name is used twice"
    assert all(config.ifname_problem(name) is None for name in every)
    assert all(name.startswith("nwm-") for name in [*names.values(), *seconds.values()])
    assert names["nw-web1-net0"] == "nwm-web1-net0", "readable when it fits"
    assert names[config.derived_ifname("web1", "ua-net0")] != names[config.derived_ifname("web1", "ua-net1")]
    assert len(names["nw-web1-ua-net0"].encode()) == 15


def test_lower_as_table_is_normalised(tmp_path: Path) -> None:
    text = NIC + MACVTAP.replace('lower = "eth1"', 'lower = { mac = "AA:BB:CC:00:11:22", pci = "03:00.0" }')
    nic = load(tmp_path, text).vms[0].nics[0]
    assert nic.lower == config.LowerSpec(mac="aa:bb:cc:00:11:22", pci="0000:03:00.0")


def test_long_names_get_a_short_derived_ifname(tmp_path: Path) -> None:
    text = NIC.replace('name = "v"', 'name = "a-very-long-vm-name"') + MACVTAP
    nic = load(tmp_path, text).vms[0].nics[0]
    assert len(nic.ifname) <= 15 and nic.ifname.startswith("nw-")


BAD_CASES = [
    ("[netwatch]\nbogus = 1\n", "[netwatch]: key 'bogus': is not a known key"),
    ("[netwatch]\nudev = \"sometimes\"\n", "key 'udev': 'sometimes' is not one of auto, udev, kernel, off"),
    ("[netwatch]\nstate_dir = \"relative\"\n", "key 'state_dir': 'relative' must be an absolute path"),
    ("[netwatch]\nhook_timeout = -1\n", "key 'hook_timeout': -1 is not between 0 and 3600 seconds"),
    ("[netwatch]\nhook_timeout = true\n", "key 'hook_timeout': must be a number of seconds, not a boolean"),
    ("vm = 3\n", "key 'vm': must be an array of tables"),
    ('[netwatch]\ncontrol_group = "no-such-group-x"\n', "key 'control_group': there is no group named"),
    ('[[vm]]\nqmp = "/run/x"\n', "vm #1: key 'name': is required"),
    ('[[vm]]\nname = "v"\n', "vm 'v': key 'qmp': is required"),
    ('[[vm]]\nname = "v w"\nqmp = "/run/x"\n', "vm 'v w': key 'name': 'v w' must be"),
    ('[[vm]]\nname = "v"\nqmp = "x.qmp"\n', "key 'qmp': 'x.qmp' must be an absolute path"),
    ('[[vm]]\nname = "v"\nqmp = "/run/v"\ncolour = "red"\n', "vm 'v': key 'colour': is not a known key"),
    (NIC + MACVTAP + "speed = 10\n", "vm 'v' nic 'net0': key 'speed': is not a known key"),
    (NIC + MACVTAP.replace('id = "net0"\n', ""), "vm 'v' nic #1: key 'id': is required"),
    (NIC + MACVTAP.replace('"net0"', '"0net"'), "key 'id': '0net' is not a QEMU id"),
    (NIC + MACVTAP.replace('"net0"', '"net/0"'), "key 'id': 'net/0' is not a QEMU id"),
    (NIC + MACVTAP.replace('"net0"', '"abcdefghijklmnop"'), "is not a QEMU id: 1-15"),
    (NIC + MACVTAP.replace('"net0"', '"net0-tap1"'), "ends like a netwatch backend id"),
    (NIC + MACVTAP.replace('"macvtap"', '"vhost"'), "key 'backend': 'vhost' is not one of macvtap, tap"),
    (NIC + MACVTAP.replace('backend = "macvtap"\n', ""), "key 'backend': is required"),
    (NIC + MACVTAP + 'mode = "bridged"\n', "key 'mode': 'bridged' is not one of bridge, vepa, private, passthru"),
    (NIC + MACVTAP.replace("52:54:00:12:34:56", "52:54:00:12:34"), "is not a MAC address"),
    (NIC + MACVTAP.replace("52:54:00:12:34:56", "01:00:5e:00:00:01"), "is a multicast address"),
    (NIC + MACVTAP.replace("52:54:00:12:34:56", "00:00:00:00:00:00"), "is the all-zero address"),
    (NIC + MACVTAP.replace('mac = "52:54:00:12:34:56"\n', ""), "key 'mac': is required"),
    (NIC + MACVTAP.replace('"52:54:00:12:34:56"', "5254"), "key 'mac': must be a string, not an integer"),
    (NIC + MACVTAP.replace('"eth1"', '"a-very-long-lower0"'), "'a-very-long-lower0' is longer than 15 bytes"),
    (NIC + MACVTAP.replace('"eth1"', '"eth 1"'), "'eth 1' is not a valid interface name"),
    (NIC + MACVTAP.replace('lower = "eth1"\n', ""), "key 'lower': is required for a macvtap NIC"),
    (NIC + MACVTAP.replace('"eth1"', "{ }"), "key 'lower': needs at least one of name, mac, pci"),
    (NIC + MACVTAP.replace('"eth1"', '{ nmae = "x" }'), "nic 'net0' lower: key 'nmae': is not a known key"),
    (NIC + MACVTAP.replace('"eth1"', '{ pci = "3:0.0" }'), "'3:0.0' is not a PCI address"),
    (NIC + MACVTAP.replace('"eth1"', "7"), "key 'lower': must be an interface name or a table, not an integer"),
    (NIC + MACVTAP + "hub = -1\n", "key 'hub': -1 must be between 0 and 2147483647"),
    (NIC + MACVTAP + 'hub = "0"\n', "key 'hub': must be an integer, not a string"),
    (NIC + MACVTAP + 'ifname = "this-is-too-long-0"\n', "key 'ifname': 'this-is-too-long-0' is longer than 15"),
    (NIC + MACVTAP + 'model = "virtio net"\n', "key 'model': 'virtio net' is not a QEMU device model name"),
    (NIC + MACVTAP + 'bridge = "br0"\n', "key 'bridge': is only for tap NICs in bridged mode"),
    (NIC + 'id = "t0"\nbackend = "tap"\nmac = "52:54:00:00:00:01"\n', "key 'bridge': is required for a tap NIC"),
    (NIC + 'id = "t0"\nbackend = "tap"\nmode = "routed"\nbridge = "br0"\nmac = "52:54:00:00:00:01"\n',
     "key 'bridge': is only for tap NICs in bridged mode"),
    (NIC + MACVTAP + "[[vm.nic]]\n" + MACVTAP.replace("56", "57"), "nic 'net0': key 'id': is used by another NIC"),
    (NIC + MACVTAP + "[[vm.nic]]\n" + MACVTAP.replace("net0", "net1").replace("56", "57") + "hub = 0\n",
     "nic 'net1': key 'hub': 0 is used by NIC 'net0' too"),
    (NIC + MACVTAP + VM, "vm 'v': key 'name': is used by another VM"),
    (NIC + MACVTAP + VM.replace('name = "v"', 'name = "w"'), "vm 'w': key 'qmp': '/run/v.qmp' is used by another VM"),
    (NIC + MACVTAP + 'ifname = "shared0"\n' + NIC.replace('"v"', '"w"').replace("/run/v", "/run/w") + MACVTAP
     + 'ifname = "shared0"\n', "key 'ifname': 'shared0' is used by v/net0 too"),
    ("[[vm]\nname = 1", "invalid TOML"),
    (NIC + MACVTAP + 'guest_pci = "0x20"\n', "key 'guest_pci': slot 0x20 is not between 0x01 and 0x1f on the root bus"),
    (NIC + MACVTAP + "guest_pci = 0\n", "key 'guest_pci': slot 0x0 is not between 0x01 and 0x1f"),
    (NIC + MACVTAP + 'guest_pci = "slot 3"\n', "key 'guest_pci': 'slot 3' is not a PCI slot like \"0x19\""),
    (NIC + MACVTAP + "guest_pci = true\n", "key 'guest_pci': True is not a PCI slot"),
    (NIC + MACVTAP + 'guest_pci = "0x10"\n[[vm.nic]]\n' + MACVTAP.replace("net0", "net1").replace("56", "57")
     + "guest_pci = 16\n", "nic 'net1': key 'guest_pci': 0x10 is used by NIC 'net0' too"),
    ("[netwatch]\ndevice_dir = \"dev\"\n", "key 'device_dir': 'dev' must be an absolute path"),
    (NIC + MACVTAP + 'wiring = "straight"\n', "key 'wiring': 'straight' is not one of hub, direct, redirect"),
    (NIC + MACVTAP + "queues = 4\n",
     "key 'queues': needs wiring = \"direct\" or \"redirect\": a NIC wired through a hub has one"),
    (NIC + 'id = "t0"\nbackend = "tap"\nmode = "routed"\nmac = "52:54:00:00:00:01"\nwiring = "redirect"\n',
     "vm 'v' nic 't0': key 'wiring': \"redirect\" is only for macvtap NICs"),
    (NIC + MACVTAP + 'wiring = "redirect"\nmode = "routed"\n',
     "key 'mode': 'routed' is not one of bridge, vepa, private, passthru"),
    (NIC + MACVTAP + 'wiring = "redirect"\nqueues = 2\nmodel = "rtl8139"\n', "key 'queues': needs a virtio-net model"),
    (NIC + MACVTAP + 'wiring = "redirect"\nbridge = "br0"\n', "key 'bridge': is only for tap NICs"),
    # Another NIC's tap named like this redirect NIC's macvlan, either order.
    (NIC + MACVTAP + 'wiring = "redirect"\n[[vm.nic]]\n' + MACVTAP.replace("net0", "net1").replace("56", "57")
     + 'ifname = "nwm-v-net0"\n', "nic 'net1': key 'ifname': 'nwm-v-net0' is used by v/net0's macvlan too"),
    (NIC + MACVTAP + 'ifname = "nwm-v-net1-r"\n[[vm.nic]]\n' + MACVTAP.replace("net0", "net1").replace("56", "57")
     + 'wiring = "redirect"\n', "nic 'net1': key 'ifname': its macvlan's name 'nwm-v-net1-r' is used by v/net0 too"),
    (NIC + MACVTAP + 'wiring = "direct"\nqueues = 0\n', "key 'queues': 0 is not between 1 and 64"),
    (NIC + MACVTAP + 'wiring = "direct"\nqueues = 2\nmodel = "e1000"\n', "key 'queues': needs a virtio-net model"),
    (NIC + MACVTAP + "queues = true\n", "key 'queues': must be a number of queues, not a boolean"),
    (NIC.replace('qmp = "/run/v.qmp"', 'qmp = "/run/v.qmp"\nmachine = "isapc"') + MACVTAP,
     "vm 'v': key 'machine': 'isapc' is not one of pc, q35"),
    (NIC.replace('qmp = "/run/v.qmp"', 'qmp = "/run/v.qmp"\nspare_ports = 2') + MACVTAP,
     "vm 'v': key 'spare_ports': is only for machine = \"q35\""),
    (NIC.replace('qmp = "/run/v.qmp"', 'qmp = "/run/v.qmp"\nmachine = "q35"\nspare_ports = 9') + MACVTAP,
     "vm 'v': key 'spare_ports': 9 is not between 0 and 7"),
    ("[netwatch]\nunplug_timeout = 0\n", "key 'unplug_timeout': 0 is not between 0 and 3600 seconds"),
    ("[netwatch]\nmigration_handover = -1\n", "key 'migration_handover': -1 is not between 0 and 60 seconds"),
    ("[netwatch]\nmetrics_file = \"netwatch.prom\"\n", "key 'metrics_file': 'netwatch.prom' must be an absolute path"),
    ("[netwatch]\nmetrics_file = \"/var/lib/x/netwatch.txt\"\n",
     "key 'metrics_file': '/var/lib/x/netwatch.txt' must end in .prom (node_exporter reads only those)"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(expected in line for line in found), found
    for line in found:
        assert line.startswith(str(tmp_path / "netwatch.toml")) and "\n" not in line


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = NIC + MACVTAP.replace("52:54:00:12:34:56", "01:00:00:00:00:01").replace('"eth1"', '"x" ') + "hub = -2\n"
    assert len(problems(tmp_path, text)) == 2


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        config.load(str(tmp_path / "missing.toml"))
    assert "not UTF-8 text" in problems(tmp_path, b'[netwatch]\nstate_dir = "/\xff"\n')[0]
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        config.load(str(tmp_path))


def test_derived_ifname_is_stable_and_short() -> None:
    assert config.derived_ifname("web1", "net0") == "nw-web1-net0"
    long = config.derived_ifname("a" * 40, "net0")
    assert long == config.derived_ifname("a" * 40, "net0") and len(long) == 15
    assert long != config.derived_ifname("a" * 40, "net1")


def test_alt_ifnames_of_long_names_stay_apart() -> None:
    # 15-byte names sharing 13 leading bytes once shared their second name.
    first, second = config.alt_ifname("nw-web1-ua-net0"), config.alt_ifname("nw-web1-ua-net1")
    assert first != second and len(first) == len(second) == 15
    assert config.alt_ifname("nw-vm1-net0") == "nw-vm1-net0-r"
    assert config.alt_ifname(first) != first


def test_guest_pci_defaults_skip_explicit_slots(tmp_path: Path) -> None:
    nics = "".join("[[vm.nic]]\n" + MACVTAP.replace("net0", f"net{i}").replace(":56", f":5{i}")
                   + (f"guest_pci = {config.DEFAULT_GUEST_SLOTS[0]}\n" if i == 2 else "") for i in range(3))
    path = tmp_path / "netwatch.toml"
    path.write_text('[[vm]]\nname = "v"\nqmp = "/run/v.qmp"\n' + nics)
    slots = [nic.guest_pci for nic in config.load(str(path)).vms[0].nics]
    assert [s.slot for s in slots if s] == [*config.DEFAULT_GUEST_SLOTS[1:3], config.DEFAULT_GUEST_SLOTS[0]]
    assert str(slots[2]) == f"{config.DEFAULT_GUEST_SLOTS[0]:#04x}"
