"""Runtime records are read back and acted on: nothing in one is believed that its path and the kernel deny."""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import signal
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from netwatch.host.links import Link
from netwatch.nic.records import NicRecord, RecordError, RecordStore
from netwatch.sandbox.testbed import wait_until
from netwatch.service import control

from .world import World


def record(vm: str = "vm1", nic: str = "net0", **changes: object) -> NicRecord:
    fields: dict[str, object] = dict(
        vm=vm, nic=nic, backend="macvtap", ifname=f"nw-{vm}-{nic}", ifindex=7, lower="eth1", lower_ifindex=3,
        tap_netdev=f"nw-{nic}-tap1", hub_netdev=f"nw-{nic}-up1", generation=1, mac="52:54:00:12:34:56",
        mode="bridge", bridge=None, qemu_pid=4242, swaps=0, guest_pci="0x19")
    fields.update(changes)
    return NicRecord(**fields)  # type: ignore[arg-type]


def plant(root: Path, vm: str, nic: str, data: object) -> Path:
    path = root / "nics" / vm / f"{nic}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


def index_of(world: World, name: str) -> int:
    return int(world.ns.ip("-o", "link", "show", name).split(":")[0])


def test_round_trip(tmp_path: Path) -> None:
    store = RecordStore(str(tmp_path))
    store.save(record())
    assert store.load("vm1", "net0") == record()
    assert store.all() == [record()]


def test_a_record_naming_another_path_is_ignored_and_nothing_outside_is_touched(tmp_path: Path) -> None:
    outside = tmp_path / "keep" / "net0.json"
    outside.parent.mkdir()
    outside.write_text("precious")
    state = tmp_path / "state"
    plant(state, "a", "b", asdict(record(vm="../../keep")))
    store = RecordStore(str(state))
    assert store.all() == []
    with pytest.raises(RecordError):
        store.remove("../../keep", "net0")
    assert outside.read_text() == "precious"


@pytest.mark.parametrize("data", [
    {**asdict(record()), "ifindex": "7"},
    {**asdict(record()), "extra": 1},
    {k: v for k, v in asdict(record()).items() if k != "ifname"},
    {**asdict(record()), "ifname": "a/b"},
    {**asdict(record()), "backend": "veth"},
    [1, 2],
    # Every field is checked as the config's own input is: lower, mac, mode
    # and bridge reach the hooks' environment (a routed hook writes
    # /proc/sys/net/ipv4/conf/$LOWER/proxy_arp).
    {**asdict(record()), "lower": "../../../tmp/x"},
    {**asdict(record()), "lower": "eth0 x"},
    {**asdict(record()), "lower": ".."},
    {**asdict(record()), "lower": "a" * 16},
    {**asdict(record()), "lower": "eth0\u0000"},
    {**asdict(record()), "lower": "\ud800x"},
    {**asdict(record()), "mac": "52:54:00:12:34"},
    {**asdict(record()), "mac": "01:00:5e:00:00:01"},
    {**asdict(record()), "mac": "52:54:00:12:34:5G"},
    {**asdict(record()), "mode": "evil"},
    {**asdict(record()), "mode": "routed"},  # a tap's mode on a macvtap
    {**asdict(record(backend="tap", mode="bridged")), "bridge": "br0/../x"},
    {**asdict(record()), "ifindex": 2**40},
    {**asdict(record()), "ifindex": 0},
    {**asdict(record()), "lower_ifindex": -1},
    {**asdict(record()), "qemu_pid": 0},
    {**asdict(record()), "qemu_pid": 2**31},
    {**asdict(record()), "qemu_start": -5},
    {**asdict(record()), "queues": 0},
    {**asdict(record()), "swaps": -1},
    {**asdict(record()), "generation": -1},
    {**asdict(record()), "tap_netdev": "nw-other-tap1"},
    {**asdict(record()), "hub_netdev": "netdev0"},
    {**asdict(record()), "wiring": "wormhole"},
    {**asdict(record()), "guest_pci": "zz"},
    {**asdict(record()), "guest_pci": "0x77"},
    {**asdict(record()), "configured": 1},
    {**asdict(record()), "phase": "sideways"},
])
def test_malformed_records_are_ignored(tmp_path: Path, data: object) -> None:
    plant(tmp_path, "vm1", "net0", data)
    assert RecordStore(str(tmp_path)).load("vm1", "net0") is None


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(asdict(record())))
    link = tmp_path / "nics" / "vm1" / "net0.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    store = RecordStore(str(tmp_path))
    assert store.load("vm1", "net0") is None
    # The temporary name planted as a link is replaced, never written through.
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    Path(f"{link}.tmp").symlink_to(victim)
    link.unlink()
    store.save(record())
    assert victim.read_text() == "untouched"
    assert store.load("vm1", "net0") == record()


def test_records_as_netwatch_writes_them_are_read(tmp_path: Path) -> None:
    """The field checks refuse nothing netwatch itself writes."""
    store = RecordStore(str(tmp_path))
    kept = [
        record(),
        record(nic="n1", lower="", lower_ifindex=0, qemu_pid=None, qemu_start=None, guest_pci=None, phase="in"),
        record(nic="n2", backend="tap", mode="bridged", bridge="br0", wiring="direct", hub_netdev="", queues=4,
               tap_netdev="nw-n2-tap9", generation=9, guest_pci="pci.1:0x03", configured=False, phase="out"),
        record(nic="n3", lower="52:54:00:aa:bb:cc"),  # a lower by MAC that is absent
        record(nic="n4", lower="0000:03:00.0"),
        record(nic="n5", lower="m\udcff0"),  # a lower whose name is not UTF-8
    ]
    for one in kept:
        store.save(one)
    assert store.all() == sorted(kept, key=lambda one: one.nic)


def test_a_deeply_nested_record_is_refused_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """60,000 '[' (under the size limit) raised RecursionError: `netwatch run` exited 1 at start."""
    plant(tmp_path, "vm1", "net0", b"[" * 60_000)
    store = RecordStore(str(tmp_path))
    assert store.load("vm1", "net0") is None
    assert store.all() == []
    assert store.load("vm1", "net0") is None
    assert len([r for r in caplog.records if "net0.json" in r.getMessage()]) == 1, "one line, not one per read"


def test_a_symlinked_vm_directory_is_not_followed(tmp_path: Path) -> None:
    """Nothing is read, removed or written through a VM directory that is a symlink."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "net0.json").write_text(json.dumps(asdict(record())))
    (tmp_path / "state" / "nics").mkdir(parents=True)
    (tmp_path / "state" / "nics" / "vm1").symlink_to(target)
    store = RecordStore(str(tmp_path / "state"))
    assert store.load("vm1", "net0") is None
    assert store.all() == []
    store.remove("vm1", "net0")
    assert (target / "net0.json").exists()
    store.save(record(generation=2, tap_netdev="nw-net0-tap2", hub_netdev="nw-net0-up2"))
    assert json.loads((target / "net0.json").read_text()) == asdict(record())
    assert sorted(os.listdir(target)) == ["net0.json"]
    # The symlink (netwatch's own entry) was replaced by a directory of its own.
    assert store.load("vm1", "net0") == record(generation=2, tap_netdev="nw-net0-tap2", hub_netdev="nw-net0-up2")


def test_records_others_could_write_are_refused(tmp_path: Path) -> None:
    """A record, or a directory on its way, that is not netwatch's own or that others may write is not believed."""
    store = RecordStore(str(tmp_path))
    store.save(record())
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "nics" / "vm1" / "net0.json"
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    assert store.load("vm1", "net0") is None
    os.chown(path, 0, 0)
    path.chmod(0o666)
    assert store.load("vm1", "net0") is None
    path.chmod(0o600)
    assert store.load("vm1", "net0") == record()
    (tmp_path / "nics" / "vm1").chmod(0o777)
    assert store.load("vm1", "net0") is None
    assert store.all() == []
    (tmp_path / "nics" / "vm1").chmod(0o700)
    (tmp_path / "nics").chmod(0o777)
    assert store.load("vm1", "net0") is None


def test_a_fifo_at_a_record_path_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "nics" / "vm1" / "net0.json"
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    assert RecordStore(str(tmp_path)).load("vm1", "net0") is None


def test_only_netwatchs_own_backend_is_deleted_for_a_record() -> None:
    """The link a record names must itself say it is the NIC's backend: its name, kind and MAC."""
    from netwatch.host.backends import provably_ours

    names = ("nw-vm1-net0", "nw-vm1-net0-r")
    mac = "52:54:00:12:34:56"
    macvtap = Link(index=7, name="nw-vm1-net0", kind="macvtap", mac=mac, parent=3, flags=1)
    assert provably_ours(macvtap, record(), names)
    assert not provably_ours(replace(macvtap, kind="veth"), record(), names)
    assert not provably_ours(replace(macvtap, mac="02:00:00:00:00:01"), record(), names)
    assert not provably_ours(replace(macvtap, name="victim0"), record(ifname="victim0"), names)
    assert not provably_ours(replace(macvtap, name="nw-vm1-net0-r"), record(), names)  # not the recorded name
    tap = Link(index=7, name="nw-vm1-net0", kind="tun", mac="fe:54:00:12:34:56", parent=None, flags=1)
    assert provably_ours(tap, record(backend="tap", mode="routed"), names)
    assert not provably_ours(tap, record(), names)


def test_a_passing_read_error_is_an_error_not_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RecordStore(str(tmp_path))
    store.save(record())

    def emfile(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    monkeypatch.setattr(os, "open", emfile)
    with pytest.raises(RecordError, match="Too many open files"):
        store.load("vm1", "net0")


@pytest.mark.integration
def test_a_planted_record_cannot_make_netwatch_delete_a_link(world: World) -> None:
    world.ns.add_veth("keep0", "keep1")
    index = int(world.ns.ip("-o", "link", "show", "keep0").split(":")[0])
    plant(Path(world.state), "x", "y", asdict(record(vm="x", nic="y", ifname="keep0", ifindex=index)))
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:ee:00:09"})
    world.lower("lo0", "wi0")
    world.start_qemu("vm1")
    netwatch = world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")
    wait_until(lambda: "not removing keep0" in netwatch.log(), 10, "the refusal in the log", world.dump)
    assert world.ns.link_exists("keep0")


@pytest.mark.integration
def test_a_planted_record_for_a_stopped_vm_cannot_delete_a_link(world: World) -> None:
    """vm_gone: a record for a configured VM whose QEMU is not running named an unrelated veth: it was deleted."""
    world.ns.add_veth("victim0", "victim1")
    world.vm("off", {"id": "no0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:ee:00:0a"})
    netwatch = world.start_netwatch()
    world.wait_state("off", "no0", "waiting-vm")
    plant(Path(world.state), "off", "no0", asdict(record(vm="off", nic="no0", ifname="victim0",
                                                         ifindex=index_of(world, "victim0"), qemu_pid=None)))
    assert netwatch.proc is not None
    netwatch.proc.send_signal(signal.SIGHUP)  # a pass for every NIC

    def about_victim() -> list[str]:
        return [line for line in netwatch.log().splitlines() if "victim0" in line]
    wait_until(about_victim, 10, "a line about victim0", world.dump)
    assert world.ns.link_exists("victim0"), about_victim()
    # Another pass for the NIC: still there, still the one line.
    assert world.cli("reload").returncode == 0
    control.request(world.state, "status")
    assert world.ns.link_exists("victim0")
    assert len(about_victim()) == 1 and "not removing victim0" in about_victim()[0], about_victim()


@pytest.mark.integration
def test_a_deeply_nested_record_does_not_stop_the_service(world: World) -> None:
    """A record of 60,000 '[' made `netwatch run` exit 1 at start (a crash loop under systemd)."""
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:ee:00:0b"})
    plant(Path(world.state), "vm1", "net0", b"[" * 60_000)  # a configured NIC's
    plant(Path(world.state), "gone", "net9", b"[" * 60_000)  # an orphan's, read at start
    netwatch = world.start_netwatch()
    assert netwatch.proc is not None
    wait_until(lambda: netwatch.proc is None or netwatch.proc.poll() is not None
               or ("net9.json" in netwatch.log() and world.nic("vm1", "net0").get("state") == "waiting-vm"),
               20, "the service to start (or exit)", world.dump)
    assert netwatch.proc.poll() is None, netwatch.log()[-2000:]
    lines = [line for line in netwatch.log().splitlines() if ".json" in line]
    assert len([line for line in lines if "net9.json" in line]) == 1, lines
    assert control.request(world.state, "status")["vms"][0]["nics"][0]["state"] == "waiting-vm"


@pytest.mark.integration
def test_a_flap_writes_nothing_through_a_symlinked_vm_directory(world: World) -> None:
    """A flap removed and rewrote a record in the target of a symlink planted for the VM's directory."""
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:ee:00:0c"})
    world.lower("lo0", "wi0")
    world.start_qemu("vm1")
    world.start_netwatch()
    first = world.wait_state("vm1", "net0", "attached")
    target = world.tmp / "target"
    target.mkdir()
    (target / "net0.json").write_text("precious")
    (target / "other").write_text("also precious")
    vm_dir = Path(world.state) / "nics" / "vm1"
    shutil.rmtree(vm_dir)
    vm_dir.symlink_to(target)
    world.delete_link("lo0")
    world.wait_state("vm1", "net0", "waiting-lower")
    world.lower("lo0", "wi0")
    wait_until(lambda: world.nic("vm1", "net0").get("generation", 0) > first["generation"]
               and world.nic("vm1", "net0").get("state") == "attached", 20, "the NIC back", world.dump)
    assert sorted(os.listdir(target)) == ["net0.json", "other"]
    assert (target / "net0.json").read_text() == "precious"
    assert (target / "other").read_text() == "also precious"
    assert not vm_dir.is_symlink()
    assert json.loads((vm_dir / "net0.json").read_text())["generation"] > first["generation"]


@pytest.mark.integration
def test_a_link_that_only_has_a_backends_name_is_left_alone(world: World) -> None:
    """A veth an admin named like a NIC's backend was deleted to make room for the macvtap (by name alone)."""
    world.ns.add_veth("nw-vm1-net0", "squat1")
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:ee:00:0d"})
    world.lower("lo0", "wi0")
    world.start_qemu("vm1")
    world.start_netwatch()
    wait_until(lambda: "left alone" in world.nic("vm1", "net0").get("cause", ""), 15,
               "the NIC to say its backend name is taken", world.dump)
    assert world.ns.link_exists("nw-vm1-net0")
    # Its other name is free: the NIC gets there on a rebind's swap, never by taking the veth.
    assert world.nic("vm1", "net0")["state"] == "failed"
