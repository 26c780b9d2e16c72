"""Runtime records are read back and acted on: nothing in one is believed that its path and the kernel deny."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from netwatch.nic.records import NicRecord, RecordError, RecordStore
from netwatch.sandbox.testbed import wait_until

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
    path.write_text(json.dumps(data))
    return path


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
