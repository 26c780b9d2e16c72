"""Prometheus metrics (node_exporter's textfile collector), checked with a real exposition-format parser."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netwatch.sandbox.testbed import wait_until
from netwatch.service.metrics import render

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
