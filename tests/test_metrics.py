"""Prometheus metrics (node_exporter's textfile collector), checked with a real exposition-format parser."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netwatch.sandbox.testbed import wait_until
from netwatch.service.metrics import UnsafeMetricsDirectory, render, write_atomically

from .world import World

NIC: dict[str, Any] = {
    "id": "net0", "backend": "macvtap", "state": "attached", "lower_present": True, "guest_link": True,
    "configured": True, "swaps": 3, "last_attach_seconds": 0.0071, "hook_failures": 1, "ifname": "nw-web1-net0",
    "rx_bytes": 1500, "tx_bytes": 3000, "rx_packets": 10, "tx_packets": 20,
}


def parse(text: str) -> dict[str, Any]:
    """Family name -> family, as Prometheus reads them (counters lose their _total in the family name)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], family: str, **labels: str) -> float:
    samples = [sample.value for sample in families[family].samples
               if all(sample.labels.get(key) == wanted for key, wanted in labels.items())]
    assert len(samples) == 1, (family, labels, families[family].samples)
    return float(samples[0])


def test_every_family_has_help_and_type_and_follows_the_conventions() -> None:
    status = {"vms": [{"name": "web1", "connected": True, "run_state": "running", "qmp_errors": 2, "nics": [NIC]},
                      {"name": "db", "connected": False, "run_state": None, "qmp_errors": 0, "nics": [
                          {**NIC, "id": "net1", "state": "waiting-lower", "lower_present": False,
                           "guest_link": None, "rx_bytes": None, "tx_bytes": None, "rx_packets": None,
                           "tx_packets": None, "last_attach_seconds": None}]}],
              "service": {"link_resyncs": 4}}
    text = render(status)
    families = parse(text)
    for family in families.values():
        assert family.name.startswith("netwatch_") and family.documentation and family.type in ("gauge", "counter")
        if family.type == "counter":
            assert all(sample.name.endswith("_total") for sample in family.samples), family
    assert value(families, "netwatch_nic_state", vm="web1", state="attached") == 1
    assert value(families, "netwatch_nic_state", vm="web1", state="failed") == 0
    assert value(families, "netwatch_nic_state", vm="db", state="waiting-lower") == 1
    assert value(families, "netwatch_nic_lower_present", vm="db") == 0
    assert value(families, "netwatch_nic_swaps", vm="web1") == 3
    assert value(families, "netwatch_nic_last_attach_seconds", vm="web1") == pytest.approx(0.0071)
    assert value(families, "netwatch_backend_transmit_bytes", vm="web1", ifname="nw-web1-net0") == 3000
    assert value(families, "netwatch_nic_hook_failures", vm="web1") == 1
    assert value(families, "netwatch_vm_run_state", vm="web1", state="running") == 1
    assert value(families, "netwatch_vm_connected", vm="db") == 0
    assert value(families, "netwatch_qmp_errors", ) == 2
    assert value(families, "netwatch_link_resyncs") == 4
    # Unknown values are left out, not made up.
    assert not [s for s in families["netwatch_backend_receive_bytes"].samples if s.labels["vm"] == "db"]
    # Every line is a comment or a sample; one trailing newline, as the collector wants.
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_label_values_are_escaped() -> None:
    status = {"vms": [{"name": 'a"b\\c\nd', "connected": True, "run_state": "running", "nics": []}]}
    families = parse(render(status))
    assert value(families, "netwatch_vm_connected", vm='a"b\\c\nd') == 1


def metrics_world(world: World, path: Path) -> None:
    world.settings["metrics_file"] = str(path)
    world.vm("vm1", {"id": "net0", "backend": "macvtap", "lower": "lo0", "mac": "52:54:00:9e:00:01"})
    world.lower("lo0", "wi0")
    world.start_qemu("vm1")
    world.start_netwatch()
    world.wait_state("vm1", "net0", "attached")


@pytest.mark.integration
def test_the_metrics_file_follows_the_nics(world: World) -> None:
    path = world.tmp / "prom" / "netwatch.prom"
    path.parent.mkdir()
    metrics_world(world, path)

    def families_when(check: Any) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if not path.exists():
                return None
            families = parse(path.read_text())
            return families if check(families) else None
        return wait_until(ready, 20, "the metrics file to show it",
                          lambda: (path.read_text() if path.exists() else "no file") + world.dump())

    first = families_when(lambda f: value(f, "netwatch_nic_state", state="attached") == 1)
    assert value(first, "netwatch_nic_lower_present") == 1 and value(first, "netwatch_vm_connected") == 1, (
        path.read_text(), world.status())
    assert value(first, "netwatch_vm_run_state", state="running") == 1
    swaps = value(first, "netwatch_nic_swaps")
    assert swaps >= 1 and value(first, "netwatch_nic_last_attach_seconds") > 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, "readable by node_exporter's user"
    assert [p.name for p in path.parent.iterdir()] == ["netwatch.prom"], "no temporary file left"
    # A flap: the file shows the NIC waiting, then back with one more backend.
    world.delete_link("lo0")
    families_when(lambda f: value(f, "netwatch_nic_state", state="waiting-lower") == 1
                  and value(f, "netwatch_nic_lower_present") == 0)
    world.lower("lo0", "wi0")
    world.frame_reaches_guest("vm1", "net0", "wi0")
    back = families_when(lambda f: value(f, "netwatch_nic_state", state="attached") == 1)
    assert value(back, "netwatch_nic_swaps") == swaps + 1
    # The table admins read, with the backend's counters.
    text = world.cli("status").stdout
    header, row = text.splitlines()[:2]
    assert header.split() == ["VM", "NIC", "STATE", "BACKEND", "IFNAME", "LOWER", "WIRING", "PCI", "SWAPS", "RX",
                              "TX"], text
    assert row.split()[:3] == ["vm1", "net0", "attached"], text
    nic = world.nic("vm1", "net0")
    assert isinstance(nic["rx_bytes"], int) and isinstance(nic["tx_packets"], int), nic


@pytest.mark.integration
def test_an_unwritable_metrics_file_costs_nothing_else(world: World) -> None:
    path = world.tmp / "missing-dir" / "netwatch.prom"
    metrics_world(world, path)
    assert world.netwatch is not None
    wait_until(lambda: "cannot write metrics" in world.netwatch.log(), 20, "the error", world.dump)
    # Said once, not per write; the NIC is served all the same.
    world.delete_link("lo0")
    world.wait_state("vm1", "net0", "waiting-lower")
    world.lower("lo0", "wi0")
    world.wait_state("vm1", "net0", "attached")
    assert world.netwatch.log().count("cannot write metrics") == 1
    path.parent.mkdir()
    world.delete_link("lo0")
    wait_until(path.exists, 20, "the file once its directory exists", world.dump)
    wait_until(lambda: "metrics written" in world.netwatch.log(), 5, "the entry that metrics are written again",
               world.dump)


# -- planted files (issue 21 item 2) ---------------------------------------------

def other_account() -> int:
    """The account that owns node_exporter's directory here: not root, not netwatch."""
    return pwd.getpwnam("nobody").pw_uid


def planted(path: Path, kind: str, target: Path | None = None) -> None:
    """What another account leaves at ``path``: a FIFO, or a symlink to ``target``."""
    if kind == "fifo":
        os.mkfifo(path, 0o666)
    else:
        assert target is not None
        path.symlink_to(target)
    os.lchown(path, other_account(), other_account())


@contextlib.contextmanager
def fifo_reader(path: Path) -> Iterator[None]:
    """Cleanup only: a writer stuck opening the FIFO (the code before the fix) is let go, so it can stop."""
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))


def test_planted_files_are_replaced_never_followed(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    os.chown(directory, other_account(), other_account())
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = directory / "netwatch.prom"
    for kind in ("symlink", "fifo"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        planted(path, kind, victim)
        write_atomically(str(path), f"# {kind}\n")
        assert not path.is_symlink() and stat.S_ISREG(path.lstat().st_mode) and path.read_text() == f"# {kind}\n"
        assert path.stat().st_uid == os.geteuid()
        assert victim.read_text() == "precious\n"
    assert [p.name for p in directory.iterdir()] == ["netwatch.prom"], "no temporary file left"


def test_a_directory_others_can_swap_or_write_is_refused(tmp_path: Path) -> None:
    """The directory is reached without a symlink another account could have made or swapped."""
    real = tmp_path / "real"
    real.mkdir()
    victim = real / "netwatch.prom"
    victim.write_text("precious\n")
    # The collector's account owns the parent: it renames its own directory
    # away and puts a symlink to a directory of root's in its place.
    parent = tmp_path / "prometheus"
    parent.mkdir()
    (parent / "node-exporter").symlink_to(real)
    os.chown(parent, other_account(), other_account())
    with pytest.raises(UnsafeMetricsDirectory, match="is a symlink in a directory others can write to"):
        write_atomically(str(parent / "node-exporter" / "netwatch.prom"), "# swapped\n")
    assert victim.read_text() == "precious\n"
    # Root's own symlink (in a directory only root writes) is followed.
    os.chown(parent, 0, 0)
    write_atomically(str(parent / "node-exporter" / "netwatch.prom"), "# root's link\n")
    assert victim.read_text() == "# root's link\n"
    # Anyone may write into the directory: anyone could replace the file.
    real.chmod(0o777)
    with pytest.raises(UnsafeMetricsDirectory, match=r"writable by others \(mode 0777\) and not sticky"):
        write_atomically(str(real / "netwatch.prom"), "# open\n")
    real.chmod(0o1777)
    write_atomically(str(real / "netwatch.prom"), "# sticky\n")
    assert victim.read_text() == "# sticky\n"


@pytest.mark.integration
def test_files_planted_in_the_metrics_directory_cannot_stall_netwatch(world: World) -> None:
    """A FIFO at the old predictable temporary name froze netwatch: status timed out, flaps were not reattached.

    The directory is like node_exporter's: another account's, 0755. What
    it plants at the old name (``<file>.<pid>.tmp``) and at the final name
    is never opened, followed or waited on.
    """
    directory = world.tmp / "prom"
    directory.mkdir()
    os.chown(directory, other_account(), other_account())
    path = directory / "netwatch.prom"
    victim = world.tmp / "victim"
    victim.write_text("precious\n")
    metrics_world(world, path)
    assert world.netwatch is not None
    wait_until(path.exists, 20, "the first metrics file", world.dump)
    old_name = directory / f"netwatch.prom.{world.netwatch.pid}.tmp"
    for at_old, at_final in (("fifo", "symlink"), ("symlink", "fifo")):
        with contextlib.suppress(FileNotFoundError):
            old_name.unlink()
        planted(old_name, at_old, victim)
        path.unlink()
        planted(path, at_final, victim)
        with fifo_reader(old_name if at_old == "fifo" else path):
            # A flap: status answers throughout and the NIC is reattached.
            world.delete_link("lo0")
            world.wait_state("vm1", "net0", "waiting-lower")
            wait_until(lambda: stat.S_ISREG(path.lstat().st_mode)
                       and value(parse(path.read_text()), "netwatch_nic_state", state="waiting-lower") == 1, 20,
                       f"the metrics file to replace the {at_final} and show the NIC waiting", world.dump)
            world.lower("lo0", "wi0")
            world.wait_state("vm1", "net0", "attached")
            world.frame_reaches_guest("vm1", "net0", "wi0")
        assert victim.read_text() == "precious\n"
        planted_kind = stat.S_IFMT(old_name.lstat().st_mode)
        assert planted_kind == (stat.S_IFIFO if at_old == "fifo" else stat.S_IFLNK), "left as it was"
        assert sorted(p.name for p in directory.iterdir()) == sorted([path.name, old_name.name])
    assert "cannot write metrics" not in world.netwatch.log()


@pytest.mark.integration
def test_a_metrics_directory_anyone_can_write_is_refused_and_nothing_else_stops(world: World) -> None:
    directory = world.tmp / "prom"
    directory.mkdir()
    directory.chmod(0o777)
    path = directory / "netwatch.prom"
    metrics_world(world, path)
    assert world.netwatch is not None
    wait_until(lambda: "cannot write metrics" in world.netwatch.log(), 20, "the refusal", world.dump)
    line = next(line for line in world.netwatch.log().splitlines() if "cannot write metrics" in line)
    assert "writable by others (mode 0777) and not sticky" in line, line
    world.delete_link("lo0")
    world.wait_state("vm1", "net0", "waiting-lower")
    world.lower("lo0", "wi0")
    world.wait_state("vm1", "net0", "attached")
    assert world.netwatch.log().count("cannot write metrics") == 1 and not path.exists()
    directory.chmod(0o1777)
    world.delete_link("lo0")
    wait_until(path.exists, 20, "the file once the directory is sticky", world.dump)
